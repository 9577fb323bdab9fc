"""Continuous batching: every request's output in a batch equals that request served alone (fp32)."""

from __future__ import annotations

import pytest
import torch

from offload_infer.engine import Engine, RequestTooLargeError
from offload_infer.sampling import SamplingParams, probs_from_logits
from offload_infer.speculate import TreeConfig
from tests.conftest import assert_outputs_follow, build_hf, llama_cfg
from weights.load import load_model
from weights.resolve import resolve

PROMPTS = [[5, 17, 42, 7, 99, 3], [8, 9], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113],
           [250, 3, 77, 7], [12, 13, 14]]


def _load(d):
    return load_model(resolve(str(d)), progress=False).model


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("random-ssm-batch")
    build_hf(llama_cfg(num_hidden_layers=1), seed=123).save_pretrained(d)
    return {"llm": _load(tiny_dirs["llama"][0]), "opt": _load(tiny_dirs["opt"][0]), "ssm": _load(d)}


def alone(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    sid = engine.add_request(prompt, params)
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            assert o.id == sid
            out += o.new_tokens
    return out


def batched(engine: Engine, jobs: list[tuple[int, list[int], SamplingParams]]) -> dict[int, list[int]]:
    """Run ``(join_step, prompt, params)`` jobs: each request joins at its step; outputs by job index."""
    out: dict[int, list[int]] = {}
    ids: dict[int, int] = {}
    step = 0
    while len(ids) < len(jobs) or engine.has_unfinished():
        for j, (at, prompt, params) in enumerate(jobs):
            if at == step:
                ids[engine.add_request(prompt, params)] = j
                out[j] = []
        for o in engine.step():
            out[ids[o.id]] += o.new_tokens
        step += 1
    assert max(engine.batch_sizes) > 1, "the requests never shared a pass"
    return out


def _engines(llm, ssms, tree=None, **kw):
    def make(**extra):
        return Engine(llm, ssms, tree or TreeConfig(budget=8), max_sequence_length=96, **(kw | extra))
    return make


def _jobs(sampling: bool = False) -> list[tuple[int, list[int], SamplingParams]]:
    jobs = []
    for i, p in enumerate(PROMPTS):  # join at steps 0, 0, 3, 5, 6; ask for 9 to 30 tokens
        params = SamplingParams(max_new_tokens=9 + 5 * i)
        if sampling and i % 2:
            params = SamplingParams(max_new_tokens=9 + 5 * i, temperature=0.8 + 0.1 * i, top_k=20 * i,
                                    top_p=0.9, seed=1000 + i)
        jobs.append(([0, 0, 3, 5, 6][i], p, params))
    return jobs


@pytest.mark.parametrize("spec", ["none", "ssm", "two-ssms", "expansion"])
def test_each_request_in_a_batch_equals_it_alone(models, spec):
    llm, ssm = models["llm"], models["ssm"]
    ssms = {"none": [], "ssm": [ssm], "two-ssms": [ssm, llm], "expansion": [ssm]}[spec]
    tree = TreeConfig(expansion=(2, 2, 1)) if spec == "expansion" else None
    # a small step budget: prompts are read in chunks, alongside the trees of running requests
    make = _engines(llm, ssms, tree, max_batch_size=4, max_batch_tokens=40)
    jobs = _jobs()
    together = batched(make(), jobs)
    for j, (_, prompt, params) in enumerate(jobs):
        ref = alone(Engine(llm, max_sequence_length=96), prompt, params)  # plain incremental decoding
        assert together[j] == ref, f"request {j}"
        assert alone(make(), prompt, params) == ref


def test_sampling_settings_per_request(models):
    """Greedy and seeded sampling requests, each with its own settings, share a batch; every one draws
    what it draws alone (its own generator)."""
    llm, ssm = models["llm"], models["ssm"]
    make = _engines(llm, [ssm], max_batch_size=3)
    jobs = _jobs(sampling=True)
    together = batched(make(), jobs)
    for j, (_, prompt, params) in enumerate(jobs):
        assert together[j] == alone(make(), prompt, params), f"request {j}"
    assert together[1] != alone(make(), PROMPTS[1], SamplingParams(max_new_tokens=14)), "sampled, not greedy"


def test_opt_batch(models):
    llm = models["opt"]
    jobs = _jobs()
    together = batched(_engines(llm, [llm], max_batch_size=5)(), jobs)
    for j, (_, prompt, params) in enumerate(jobs):
        assert together[j] == alone(Engine(llm, max_sequence_length=96), prompt, params)


def test_abort_frees_kv_and_leaves_the_others_unchanged(models):
    llm, ssm = models["llm"], models["ssm"]
    engine = _engines(llm, [ssm], max_batch_size=4)()
    free = (engine.pool.blocks.free_blocks, engine.drafters[0].pool.blocks.free_blocks)
    params = SamplingParams(max_new_tokens=30)
    a, b = engine.add_request(PROMPTS[0], params), engine.add_request(PROMPTS[2], params)
    outs = {a: [], b: []}
    for _ in range(3):
        for o in engine.step():
            outs[o.id] += o.new_tokens
    assert engine.abort(a) and not engine.abort(a)
    assert engine.sequence(a).finish_reason == "abort"
    while engine.has_unfinished():
        for o in engine.step():
            assert o.id == b
            outs[b] += o.new_tokens
    assert outs[b] == alone(_engines(llm, [ssm])(), PROMPTS[2], params)
    assert (engine.pool.blocks.free_blocks, engine.drafters[0].pool.blocks.free_blocks) == free
    # a waiting request can be aborted too, and an unknown one is refused
    c = engine.add_request(PROMPTS[1], params)
    assert engine.abort(c) and not engine.has_unfinished() and not engine.abort(12345)


def test_a_full_pool_makes_requests_wait(models):
    """A pool with room for one request at a time: the others wait in the queue and then run."""
    llm = models["llm"]
    params = SamplingParams(max_new_tokens=10)
    slot = llm.slot_bytes()
    engine = Engine(llm, max_sequence_length=96, max_batch_size=4, kv_cache_size=slot * 32)
    ids = [engine.add_request(p, params) for p in PROMPTS[:3]]
    outs = {i: [] for i in ids}
    most = 0
    while engine.has_unfinished():
        most = max(most, len(engine.scheduler.running) + 0 * len(engine.step()))
    engine2 = Engine(llm, max_sequence_length=96, max_batch_size=4, kv_cache_size=slot * 32)
    for i, p in zip(ids, PROMPTS[:3]):
        outs[i] = alone(engine2, p, params)
    assert most == 1
    assert all(engine.sequence(i).output == outs[i] for i in ids)


def test_a_request_that_can_never_fit_is_a_clear_error(models):
    llm = models["llm"]
    engine = Engine(llm, max_sequence_length=96, kv_cache_size=llm.slot_bytes() * 16)
    with pytest.raises(RequestTooLargeError, match="--kv-cache-size"):
        engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="less than one block"):
        Engine(llm, max_sequence_length=96, kv_cache_size=10)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Engine(llm, max_sequence_length=96, max_batch_size=8, max_batch_tokens=4)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([5, 10**6])


def test_stop_token_ids_and_stop_strings(models):
    llm = models["llm"]
    ref = alone(Engine(llm, max_sequence_length=96), PROMPTS[0], SamplingParams(max_new_tokens=30))
    stop_at = ref[7]
    first = ref.index(stop_at)
    engine = Engine(llm, [llm], max_sequence_length=96, detokenize=lambda ids: " ".join(f"t{t}" for t in ids))
    out = alone(engine, PROMPTS[0], SamplingParams(max_new_tokens=30, stop_token_ids=(stop_at,)))
    assert out == ref[: first + 1]
    # a stop string that ends inside an accepted path: tokens up to the one completing it, text before it
    target = f"t{ref[4]} t{ref[5]}"
    sid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=30, stop=[target]))
    while engine.has_unfinished():
        engine.step()
    seq = engine.sequence(sid)
    text = " ".join(f"t{t}" for t in ref)
    cut = text.index(target)
    assert seq.finish_reason == "stop" and seq.stop_text == text[:cut]
    assert seq.output == ref[: len(text[: cut + len(target)].split(" "))]
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(llm, max_sequence_length=96).add_request(PROMPTS[0], SamplingParams(stop=["x"]))


def test_a_long_prompt_is_read_in_chunks_while_the_others_decode(models):
    llm, ssm = models["llm"], models["ssm"]
    make = _engines(llm, [ssm], max_batch_size=2, max_batch_tokens=16)
    engine = make()
    params = SamplingParams(max_new_tokens=40)
    a = engine.add_request(PROMPTS[1], params)
    outs = {a: []}
    for _ in range(2):
        for o in engine.step():
            outs[o.id] += o.new_tokens
    long_prompt = [(7 * i) % 300 + 3 for i in range(50)]
    b = engine.add_request(long_prompt, SamplingParams(max_new_tokens=5))
    outs[b] = []
    steps_reading = 0
    while engine.sequence(b).root is None:
        got = {o.id for o in engine.step() if o.new_tokens}
        steps_reading += 1
        assert a in got, "the running request stalled while the prompt was read"
    assert steps_reading >= 4  # at most 8 prompt tokens per step while a tree runs beside it
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.id] += o.new_tokens
    assert engine.sequence(b).output == alone(make(), long_prompt, SamplingParams(max_new_tokens=5))
    assert engine.sequence(b).first_token_s is not None


@pytest.mark.parametrize("with_ssm", [False, True])
def test_a_conversation_keeps_its_kv_between_turns(models, with_ssm):
    """A second turn prefills only the tokens after what the cache holds, and decodes what a fresh
    request for the whole conversation decodes."""
    llm, ssm = models["llm"], models["ssm"]
    make = _engines(llm, [ssm] if with_ssm else [], max_batch_size=2)
    engine = make()
    free = engine.pool.blocks.free_blocks
    params = SamplingParams(max_new_tokens=12)
    first = engine.add_request(PROMPTS[0], params, keep_kv=True)
    while engine.has_unfinished():
        engine.step()
    out1 = engine.sequence(first).output
    assert engine.pool.blocks.free_blocks < free  # kept
    turn2 = PROMPTS[0] + out1 + [40, 41, 42]
    second = engine.continue_request(first, turn2, params)
    seq = engine.sequence(second)
    assert seq.prefilled == len(PROMPTS[0]) + len(out1) - 1  # only the last answer token and the new ones remain
    while engine.has_unfinished():
        engine.step()
    assert seq.output == alone(make(), turn2, params)
    # a conversation whose history was edited reuses the common prefix only
    turn3 = PROMPTS[0][:3] + [200, 201]
    third = engine.continue_request(second, turn3, params)
    assert engine.sequence(third).prefilled == 3
    while engine.has_unfinished():
        engine.step()
    assert engine.sequence(third).output == alone(make(), turn3, params)
    engine.release(third)
    assert engine.pool.blocks.free_blocks == free
    with pytest.raises(ValueError, match="no kept KV"):
        engine.continue_request(third, turn3, params)


def test_repetition_penalty_greedy_matches_transformers_and_speculation(models, tiny_dirs):
    """The penalty is part of the target: greedy speculation with it equals incremental decoding with it,
    which equals transformers' generate(repetition_penalty=...)."""
    llm, ssm = models["llm"], models["ssm"]
    hf = tiny_dirs["llama"][1]
    params = SamplingParams(max_new_tokens=24, repetition_penalty=1.8, ignore_eos=True)
    plain = alone(Engine(llm, max_sequence_length=96), PROMPTS[0], params)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          repetition_penalty=1.8)[0, len(PROMPTS[0]):].tolist()
    assert plain == ref
    assert plain != alone(Engine(llm, max_sequence_length=96), PROMPTS[0], SamplingParams(max_new_tokens=24,
                                                                                           ignore_eos=True))
    for ssms in ([ssm], [llm]):
        assert alone(_engines(llm, ssms)(), PROMPTS[0], params) == plain


@pytest.mark.parametrize("penalty", [1.0, 3.0])
def test_batched_sampling_is_lossless_chi_square(models, penalty):
    """Many seeded requests sampled in batches with SSMs: the first two tokens follow the LLM's own
    distribution (top-k 4, so 16 outcomes; with a repetition penalty, penalised by each one's context),
    checked by a chi-square test."""
    from offload_infer.sampling import penalize

    llm, prompt, n = models["llm"], PROMPTS[0], 3000
    cfg = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=4, repetition_penalty=penalty).sampling
    with torch.inference_mode():
        first = llm.forward(torch.tensor(prompt), torch.arange(6), llm.new_cache(16))[-1]
        p1 = probs_from_logits(penalize(first, set(prompt), penalty), cfg)
        expected = {}
        for a in p1.nonzero().flatten().tolist():
            row = llm.forward(torch.tensor(prompt + [a]), torch.arange(7), llm.new_cache(16))[-1]
            p2 = probs_from_logits(penalize(row, set(prompt) | {a}, penalty), cfg)
            for b in p2.nonzero().flatten().tolist():
                expected[(a, b)] = float(p1[a] * p2[b])
    engine = Engine(llm, [models["ssm"], llm], TreeConfig(budget=4), max_sequence_length=96, max_batch_size=64,
                    max_batch_tokens=1024)
    ids = [engine.add_request(prompt, SamplingParams(max_new_tokens=2, temperature=1.0, top_k=4, seed=s,
                                                     repetition_penalty=penalty)) for s in range(n)]
    while engine.has_unfinished():
        engine.step()
    assert_outputs_follow([tuple(engine.sequence(i).output) for i in ids], expected)


def test_stop_strings_inside_accepted_paths_equal_incremental(models):
    """A stop string completed inside an accepted tree path ends the output exactly where incremental
    decoding ends it."""
    llm = models["llm"]
    detok = lambda ids: "".join(chr(97 + t % 26) for t in ids)  # noqa: E731 - one letter per token
    ref = alone(Engine(llm, max_sequence_length=96), PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True))
    text = detok(ref)
    k = next(k for k in range(9, 16) if text.index(text[k: k + 3]) == k)
    stop = text[k: k + 3]  # spans three tokens, first seen at token k
    params = SamplingParams(max_new_tokens=30, stop=(stop,), ignore_eos=True)
    plain = Engine(llm, max_sequence_length=96, detokenize=detok)
    spec = Engine(llm, [llm], TreeConfig(expansion=(1,) * 8), max_sequence_length=96, detokenize=detok)
    outs = []
    for e in (plain, spec):
        sid = e.add_request(PROMPTS[0], params)
        while e.has_unfinished():
            e.step()
        outs.append((e.sequence(sid).output, e.sequence(sid).stop_text, e.sequence(sid).finish_reason))
    assert outs[0] == outs[1]
    assert outs[1][1] == text[: text.index(stop)] and outs[1][2] == "stop"
    # a chain of 8 (the LLM drafting for itself) is accepted whole: tokens 1-9, then 10-18 cut after k + 2
    assert spec.sequence(sid).stats.tokens_per_pass == [9, k + 2 - 9]


def test_slow_speculation_is_reported_once_and_auto_turns_it_off(models, monkeypatch):
    import time as _time

    from offload_infer.speculate import Drafter

    llm, ssm = models["llm"], models["ssm"]
    real = Drafter._launch

    def slow(self, states, asks):  # a drafting round that costs far more than the LLM pass
        _time.sleep(0.01)
        return real(self, states, asks)

    monkeypatch.setattr(Drafter, "_launch", slow)
    engine = Engine(llm, [ssm], TreeConfig(budget=4), max_sequence_length=96)
    alone(engine, PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert len(engine.notices) == 1 and "slower than plain decoding" in engine.notices[0]
    assert "tokens/s with the SSMs" in engine.notices[0] and "--tree-budget auto" in engine.notices[0]
    auto = Engine(llm, [ssm], TreeConfig(budget=16, auto=True), max_sequence_length=96)
    sid = auto.add_request(PROMPTS[0], SamplingParams(max_new_tokens=40, ignore_eos=True))
    while auto.has_unfinished():
        auto.step()
    budgets = auto.sequence(sid).stats.budgets
    assert budgets[-16:].count(0) >= 12, budgets  # plain decoding, with a probe now and then
