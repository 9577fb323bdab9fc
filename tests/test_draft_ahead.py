"""Drafting ahead: the SSMs go on growing the tree while the LLM verifies it, and what lies under the LLM's
next token is carried into the next tree. On a GPU this runs beside the streamed pass; here a fixed
number of rounds (``TreeConfig.draft_ahead``) runs after it, which exercises the same carrying."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_infer.engine import Engine
from offload_infer.sampling import SamplingParams
from offload_infer.speculate import TreeConfig
from offload_infer.stats import GenerationStats
from tests.conftest import assert_outputs_follow, build_hf, joint_distribution, llama_cfg
from weights.load import load_model
from weights.resolve import resolve

PROMPT = [5, 17, 42, 7, 99, 3]


def _load(d):
    return load_model(resolve(str(d)), progress=False).model


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("random-ssm-ahead")
    build_hf(llama_cfg(num_hidden_layers=1), seed=123).save_pretrained(d)
    sharp = copy.deepcopy(_load(tiny_dirs["llama"][0]))
    sharp.weights.globals["lm_head.weight"].mul_(2000.0)  # nearly one-hot: a reliable SSM of itself
    return {"llm": _load(tiny_dirs["llama"][0]), "random": _load(d), "qwen2": _load(tiny_dirs["qwen2"][0]),
            "sharp": sharp}


def generate(llm, ssms, tree=None, n=40, stats=None, **kw):
    engine = Engine(llm, ssms, tree, max_sequence_length=160, **kw)
    return [t for step in engine.generate(PROMPT, n, stats=stats) for t in step]


@pytest.mark.parametrize("ahead", [1, 4, 32])
@pytest.mark.parametrize("budget", [4, 16])
def test_greedy_output_is_the_llms_whatever_is_drafted_ahead(models, ahead, budget):
    llm = models["llm"]
    ref = generate(llm, [])
    for ssms in ([models["random"]], [llm], [models["qwen2"], models["random"]]):
        stats = GenerationStats()
        assert generate(llm, ssms, TreeConfig(budget=budget, draft_ahead=ahead), stats=stats) == ref
        assert stats.ahead_calls and max(stats.ahead_calls) > 0


def test_a_reliable_ssm_drafts_the_next_tree_during_the_pass(models):
    """The LLM as its own (sharp) SSM: with 8 rounds drafted ahead, the next tree's chain is already there
    when its pass begins (the LLM's next token is the chain's next link): about one SSM forward per pass
    instead of nine, and the same output."""
    sharp = models["sharp"]
    ref = generate(sharp, [], n=100)
    before, ahead = GenerationStats(), GenerationStats()
    # whole trees (weigh_rounds off): the LLM drafting for itself costs as much a round as a pass
    assert generate(sharp, [sharp], TreeConfig(budget=8, draft_ahead=0, weigh_rounds=False), n=100, stats=before) == ref
    assert generate(sharp, [sharp], TreeConfig(budget=8, draft_ahead=8, weigh_rounds=False), n=100, stats=ahead) == ref
    assert before.tokens_per_pass[:5] == ahead.tokens_per_pass[:5] == [9] * 5
    assert min(before.ssm_calls[1:5]) >= 9  # the root's forward, then a level per round
    assert max(ahead.ssm_calls[1:5]) <= 2, ahead.ssm_calls
    assert ahead.ahead_calls[:5] == [8] * 5


def test_carried_trees_survive_batching_and_a_continued_conversation(models):
    """Several requests drafting ahead in one batch each get their own output; a finished one continued as
    the next turn of a conversation (its kept caches reused) still gives the LLM's own continuation."""
    llm, ssm = models["llm"], models["sharp"]
    prompts = [PROMPT, PROMPT[:4] + [11, 12], [3, 1, 4, 1, 5, 9, 2, 6]]
    alone = [[t for s in Engine(llm, [], max_sequence_length=160).generate(p, 30) for t in s] for p in prompts]
    engine = Engine(llm, [ssm], TreeConfig(budget=8, draft_ahead=4), max_sequence_length=160)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    ids = [engine.add_request(p, params, keep_kv=True) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert [engine.sequence(i).output for i in ids] == alone
    turn2 = prompts[0] + alone[0] + [7, 8]
    second = engine.continue_request(ids[0], turn2, params)
    while engine.has_unfinished():
        engine.step()
    assert engine.sequence(second).output == [t for s in Engine(llm, [], max_sequence_length=160).generate(turn2, 30)
                                              for t in s]


def test_sampling_with_trees_drafted_ahead_follows_the_llms_distribution(models):
    """Sampled outputs (top-k 2, six tokens) follow the LLM's own joint distribution (chi-square) when the
    trees are partly drafted ahead (the SSM is the LLM itself, so its drafts are often carried)."""
    llm = models["llm"]
    n, new = 4000, 6
    params = dict(max_new_tokens=new, temperature=1.0, top_k=2, ignore_eos=True)
    expected = joint_distribution(llm, PROMPT, new, SamplingParams(**params).sampling)
    engine = Engine(llm, [llm], TreeConfig(budget=2, draft_ahead=2), max_sequence_length=64, max_batch_size=64,
                    max_batch_tokens=1024)
    ids = [engine.add_request(PROMPT, SamplingParams(**params, seed=s)) for s in range(n)]
    carried = 0
    while engine.has_unfinished():
        engine.step()
        carried += sum(1 for i in ids if engine.sequence(i).drafts and engine.sequence(i).drafts[0].carry)
    assert carried > 100  # next trees did start from what was drafted ahead
    assert_outputs_follow([tuple(engine.sequence(i).output) for i in ids], expected)


def test_draft_ahead_must_not_be_negative():
    with pytest.raises(ValueError, match="draft_ahead"):
        TreeConfig(draft_ahead=-1)


@pytest.mark.cuda
def test_cuda_drafting_ahead_beside_a_streamed_pass(tiny_dirs):
    """On a GPU with every LLM layer streamed, ``draft_ahead=None`` drafts until the pass is done: the SSM's
    rounds run on their own stream while the pass is in flight, and the output is still the LLM's own."""
    from offload_infer.offload import OffloadBuilder, make_plan

    d = tiny_dirs["llama"][0]
    dev = torch.device("cuda")
    cfg = _load(d).config
    p = make_plan(cfg, torch.float32, 2**30)
    llm = load_model(resolve(str(d)), layer_builder=OffloadBuilder(p.global_bytes + 2 * p.packed_layer_bytes, verbose=False),
                     device=dev, dtype=torch.float32, progress=False).model
    ssm = load_model(resolve(str(d)), device=dev, dtype=torch.float32, progress=False).model
    for m in (llm, ssm):  # nearly one-hot, so the SSM's chains are accepted and carried
        m.weights.globals["lm_head.weight"].mul_(2000.0)
    ref = [t for s in Engine(llm, [], max_sequence_length=256).generate(PROMPT, 120) for t in s]
    stats = GenerationStats()
    engine = Engine(llm, [ssm], TreeConfig(budget=8, draft_ahead=None), max_sequence_length=256)
    assert engine.drafters[0].stream is not None
    assert [t for s in engine.generate(PROMPT, 120, stats=stats) for t in s] == ref
    assert len(stats.ahead_calls) == len(stats.ssm_calls) > 0
