"""Token-tree speculation: output equals incremental decoding token for token (fp32), whatever the SSMs."""

from __future__ import annotations

import pytest
import torch

from offload_infer.engine import Engine
from offload_infer.stats import GenerationStats
from offload_infer.kv_pool import KVPool
from offload_infer.sampling import SamplingConfig
from offload_infer.speculate import TreeConfig
from tests.conftest import build_hf, llama_cfg
from weights.load import load_model
from weights.resolve import resolve

PROMPT = [5, 17, 42, 7, 99, 3]


def _load(d):
    return load_model(resolve(str(d)), progress=False).model


@pytest.fixture(scope="module")
def models(tiny_dirs, tmp_path_factory):
    d = tmp_path_factory.mktemp("random-ssm")
    build_hf(llama_cfg(num_hidden_layers=1), seed=123).save_pretrained(d)
    return {"llama": _load(tiny_dirs["llama"][0]), "opt": _load(tiny_dirs["opt"][0]),
            "qwen2": _load(tiny_dirs["qwen2"][0]), "random": _load(d)}


def run(llm, ssms, tree=None, n=40, eos=None, max_len=128, sampling=SamplingConfig(), seed=None, stats=None):
    engine = Engine(llm, ssms, tree or TreeConfig(), max_sequence_length=max_len, eos_ids=eos)
    return [t for step in engine.generate(PROMPT, n, sampling, seed, stats) for t in step]


class StubSSM:
    """Looks like a CausalLM to the drafter, but always prefers the same tokens: forced rejections."""

    def __init__(self, like, favourite: int) -> None:
        self.config, self.vocab_size, self.fav = like.config, like.vocab_size, favourite
        self.device = torch.device("cpu")

    def new_pool(self, n_blocks: int, block_size: int) -> KVPool:
        c = self.config
        return KVPool(c.n_layers, c.n_kv_heads, c.head_dim, n_blocks, block_size, "cpu", torch.float32)

    def forward_batch(self, tokens, positions, batch):
        rows = len(tokens) if batch.logit_rows is None else len(batch.logit_rows)
        logits = torch.zeros(rows, self.vocab_size)
        logits[:, self.fav] = 5.0
        logits[:, (self.fav + 1) % self.vocab_size] = 4.0
        return logits


TREES = {
    "chain": TreeConfig(expansion=(1, 1, 1, 1, 1)),
    "wide": TreeConfig(expansion=(4, 3, 2)),
    "specinfer": TreeConfig(expansion=(1, 1, 3, 1, 1, 1, 1, 1)),
    "budget1": TreeConfig(budget=1),
    "budget16": TreeConfig(budget=16),
    "budget-over-max-new": TreeConfig(budget=200, max_depth=50, branch=4),
}


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("tree", list(TREES))
def test_greedy_speculation_equals_incremental(models, family, tree):
    llm = models[family]
    ref = run(llm, [])
    assert len(ref) == 40
    ssm_same = models[family]
    assert run(llm, [ssm_same], TREES[tree]) == ref
    assert run(llm, [models["random"] if family == "llama" else StubSSM(llm, 7)], TREES[tree]) == ref


def test_identical_ssm_gets_the_whole_path_accepted(models):
    llm = models["llama"]
    stats = GenerationStats()
    out = run(llm, [llm], TreeConfig(expansion=(1, 1, 1, 1)), n=41, stats=stats)
    assert out == run(llm, [], n=41)
    assert stats.tokens_per_pass == [5] * 8  # 1 prefill token + 8 passes x (4 accepted + 1 bonus)
    assert all(v == 1.0 for v in GenerationStats.as_dict(stats)["acceptance_per_depth"].values())


def test_several_ssms_merged(models):
    llm = models["llama"]
    stats = GenerationStats()
    out = run(llm, [models["random"], llm, StubSSM(llm, 11)], TreeConfig(budget=8), stats=stats)
    assert out == run(llm, [])
    assert max(stats.tree_sizes) > 8  # three trees merged
    assert stats.llm_passes < 40


def test_eos_and_length_limit_inside_accepted_path(models):
    llm = models["qwen2"]
    ref = run(llm, [])
    eos = ref[9]
    first = ref.index(eos)
    tree = TreeConfig(expansion=(1,) * 12)
    assert run(llm, [llm], tree, eos={eos}) == ref[: first + 1]
    assert run(llm, [llm], tree, n=7) == ref[:7]
    # the maximum sequence length cuts inside a path too
    assert run(llm, [llm], tree, max_len=len(PROMPT) + 5) == ref[:5]


def test_kv_consistency_after_many_forced_rejections(models):
    llm = models["llama"]
    stats = GenerationStats()
    ref = run(llm, [], n=80, max_len=160)
    out = run(llm, [StubSSM(llm, 250), models["random"]], TreeConfig(expansion=(3, 2, 2)), n=80, max_len=160,
              stats=stats)
    assert out == ref
    assert stats.llm_passes >= 50  # mostly rejected: many steps, each compacting the caches


def test_seeded_sampling_matches_incremental_sampling(models):
    llm = models["llama"]
    s = SamplingConfig(temperature=0.8, top_k=50, top_p=0.95)
    ref = run(llm, [], sampling=s, seed=7)
    assert run(llm, [llm], TreeConfig(budget=8), sampling=s, seed=7) == ref
    assert run(llm, [models["random"]], TreeConfig(expansion=(2, 2)), sampling=s, seed=7) == ref
    assert run(llm, [], sampling=s, seed=8) != ref


def test_tree_config_errors():
    with pytest.raises(ValueError, match="budget"):
        TreeConfig(budget=0)
    with pytest.raises(ValueError, match="expansion"):
        TreeConfig(expansion=(1, 0))
    assert TreeConfig(expansion=(1, 1, 3, 1)).max_nodes == 1 + 1 + 3 + 3


def test_best_first_growth_stops_where_the_drafting_cache_ends(models, monkeypatch):
    """Best-first growth expands nodes that later fall out of its best ``budget``; the SSM's cache
    (every drafting forward attends over all of it) holds PROCESSED_PER_BUDGET x budget of them. At the
    limit it expands the best that fit: the tree stays valid and the output exact."""
    from offload_infer.speculate import PROCESSED_PER_BUDGET, Drafter

    assert TreeConfig(budget=8, max_depth=16).max_processed() == PROCESSED_PER_BUDGET * 8
    llm, ssm = models["llama"], models["random"]
    ref = run(llm, [])
    tree = TreeConfig(budget=8, max_depth=8, branch=4)
    d = Drafter(ssm, ssm.vocab_size, tree, 16, 16)
    st = d.admit(64, PROMPT)
    d.draft([st], [8], [8])
    assert len(st.slot) == 8  # this SSM expands 8 nodes for a budget of 8
    monkeypatch.setattr(TreeConfig, "max_processed", lambda self: 5)  # so a limit of 5 bites
    d = Drafter(ssm, ssm.vocab_size, tree, 16, 16)
    st = d.admit(64, PROMPT)
    grown = d.draft([st], [8], [8])[0]
    assert len(st.slot) == 5 and 1 <= len(grown) - 1 <= 8
    assert all(grown.parents[i] < i for i in range(1, len(grown)))
    assert run(llm, [ssm], tree) == ref


@pytest.mark.parametrize("family", ["llama", "qwen2", "llama-bias"])
def test_fused_projections_give_the_same_logits(tiny_dirs, family):
    """A drafting SSM's q/k/v and gate/up projections fused into one matrix each (fewer kernels per
    forward): the same logits, and a second fusion changes nothing."""
    from offload_infer.speculate import fuse_layers

    ref, fused = _load(tiny_dirs[family][0]), _load(tiny_dirs[family][0])
    fuse_layers(fused)
    fuse_layers(fused)
    w = next(fused.weights.layers.layers())[1]
    assert "self_attn.qkv_proj.weight" in w and "mlp.gate_up_proj.weight" in w and "self_attn.q_proj.weight" not in w
    assert ("self_attn.qkv_proj.bias" in w) == (family != "llama")
    tokens, positions = torch.tensor(PROMPT), torch.arange(len(PROMPT))
    a = ref.forward(tokens, positions, ref.new_cache(16))
    b = fused.forward(tokens, positions, fused.new_cache(16))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_fused_ssm_drafts_losslessly(models, tiny_dirs, monkeypatch):
    """An SSM fused as on a GPU (its numbers change in the last bits) still gives exactly the LLM's output;
    the LLM itself is never fused, even when it is its own SSM."""
    from offload_infer import speculate

    llm = models["llama"]
    ref = run(llm, [])
    monkeypatch.setattr(speculate, "can_use_graphs", lambda m: True)  # fused by default, as on a GPU
    ssm = _load(tiny_dirs["llama"][0])
    engine = Engine(llm, [ssm], TreeConfig(budget=8), max_sequence_length=128, ssm_static=False)
    assert "self_attn.qkv_proj.weight" in next(ssm.weights.layers.layers())[1]
    assert [t for step in engine.generate(PROMPT, 40) for t in step] == ref
    Engine(llm, [llm], TreeConfig(budget=8), max_sequence_length=64, ssm_static=False)
    assert "self_attn.q_proj.weight" in next(llm.weights.layers.layers())[1]
