"""Fixed-shape SSM forwards (padded buckets, slot-indexed KV writes; CUDA graphs on a GPU) equal the plain forward."""

from __future__ import annotations

import pytest
import torch

from offload_infer.engine import Engine
from offload_infer.stats import GenerationStats
from offload_infer.speculate import TreeConfig
from offload_infer.kv_pool import Part
from offload_infer.static_forward import StaticForward
from tests.conftest import build_hf, llama_cfg
from weights.load import load_model
from weights.resolve import resolve

PROMPT = [5, 17, 42, 7, 99, 3]


def _load(d, device="cpu"):
    return load_model(resolve(str(d)), device=torch.device(device), dtype=torch.float32, progress=False).model


@pytest.fixture(scope="module")
def random_ssm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("random-ssm-static")
    build_hf(llama_cfg(num_hidden_layers=1), seed=321).save_pretrained(d)
    return d


def _eager(model, pool):
    return lambda parts, t, p: model.forward_batch(t, p, pool.batch(parts))


def _rounds(model, run, pool, prompt: list[int] = PROMPT) -> list[torch.Tensor]:
    """Two requests: prompts of different lengths, then request 0 a 3-node tree (a root child with one
    child, and a sibling; two kept) while request 1 takes one token, then one token each."""
    a, b = pool.allocate(len(prompt) + 16), pool.allocate(len(prompt) + 16)
    other = prompt[1:4]
    out = [run([Part(a, len(prompt)), Part(b, len(other))], torch.tensor(prompt + other),
               torch.cat([torch.arange(len(prompt)), torch.arange(len(other))]))]
    pool.commit([(a, list(range(len(prompt)))), (b, list(range(len(other))))])
    p, q = len(prompt), len(other)
    mask = torch.zeros(3, p + 3, dtype=torch.bool)
    mask[:, :p] = True
    mask[0, p] = mask[1, p] = mask[1, p + 1] = mask[2, p + 2] = True  # 0 <- 1, 2 a sibling of 0
    out.append(run([Part(a, 3, mask), Part(b, 1)], torch.tensor([11, 12, 13, 20]), torch.tensor([p, p + 1, p, q])))
    pool.commit([(a, [0, 1]), (b, [0])])
    out.append(run([Part(a, 1), Part(b, 1)], torch.tensor([14, 21]), torch.tensor([a.end, b.end])))
    pool.commit([(a, [0]), (b, [0])])
    return out


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_padded_forward_matches_plain_forward(tiny_dirs, family):
    model = _load(tiny_dirs[family][0])
    plain_pool, static_pool = model.new_pool(8, 16), model.new_pool(8, 16)
    plain = _rounds(model, _eager(model, plain_pool), plain_pool)
    static = StaticForward(model, static_pool, graphs=False)
    padded = _rounds(model, static.forward, static_pool)
    assert static.graphs is False and static.replays == 3
    assert set(static._buckets) == {(2, 8, 256), (2, 4, 256), (2, 1, 256)}  # (Bb, Nb, span)
    for x, y in zip(plain, padded):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    for pool in (plain_pool, static_pool):
        assert pool.blocks.free_blocks == 4  # two requests of 22 slots: two blocks each
    n = len(PROMPT) + 3  # request 0's committed slots hold the same keys in both pools
    s = torch.arange(n)  # request 0 holds blocks 0 and 1
    torch.testing.assert_close(static_pool.kv[:, s], plain_pool.kv[:, s], atol=1e-5, rtol=1e-5)


def test_a_round_too_large_to_pad_runs_eagerly(tiny_dirs):
    model = _load(tiny_dirs["llama"][0])
    pool = model.new_pool(8, 16)
    static = StaticForward(model, pool, graphs=False, max_tokens=8)
    seq = pool.allocate(32)
    assert static.forward([Part(seq, len(PROMPT + PROMPT))], torch.tensor(PROMPT + PROMPT), torch.arange(12)) is None
    assert seq.pending == 0  # nothing reserved: the caller runs it eagerly
    with pytest.raises(ValueError, match="beyond the model's context"):
        static.forward([Part(seq, 1)], torch.tensor([1]), torch.tensor([10**6]))


@pytest.fixture(scope="module")
def long_ssm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("random-ssm-long")
    build_hf(llama_cfg(num_hidden_layers=1, max_position_embeddings=1024), seed=7).save_pretrained(d)
    return d


def _long_prompt(n: int) -> list[int]:
    return [i % 300 + 3 for i in range(n)]


@pytest.mark.parametrize("prompt_len, span", [(5, 256), (300, 512), (600, 1024)])
def test_attention_spans_only_the_context_in_use(long_ssm_dir, prompt_len, span):
    """A padded round attends over the shortest span (256, 512, ...) that holds its requests' slots,
    not over all they reserved; the result is the same. The prompts themselves run eagerly."""
    model = _load(long_ssm_dir)
    plain_pool, static_pool = model.new_pool(100, 16), model.new_pool(100, 16)
    static = StaticForward(model, static_pool, graphs=False, max_tokens=64)
    prompt = _long_prompt(prompt_len)
    plain = _rounds(model, _eager(model, plain_pool), plain_pool, prompt)

    def run_or_eager(parts, t, p):
        out = static.forward(parts, t, p)
        return out if out is not None else _eager(model, static_pool)(parts, t, p)

    padded = _rounds(model, run_or_eager, static_pool, prompt)
    assert {bk.shape[2] for bk in static._buckets.values()} == {span}
    for x, y in zip(plain, padded):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


# fixed budgets grow whole trees here: weighing rounds by their measured times would make the shapes
# depend on timing (a run that happened to be slower stops growing sooner)
@pytest.mark.parametrize("tree", [TreeConfig(budget=16, weigh_rounds=False), TreeConfig(expansion=(2, 2, 1, 1)),
                                  TreeConfig(budget=200, weigh_rounds=False)])
def test_static_drafting_grows_the_same_trees(tiny_dirs, random_ssm_dir, tree):
    llm, ssm = _load(tiny_dirs["llama"][0]), _load(random_ssm_dir)
    ref = [t for s in Engine(llm, max_sequence_length=128).generate(PROMPT, 40) for t in s]
    runs = {}
    for static in (False, True):
        stats = GenerationStats()
        engine = Engine(llm, [ssm, llm], tree, max_sequence_length=128, ssm_static=static)
        out = [t for s in engine.generate(PROMPT, 40, stats=stats) for t in s]
        assert out == ref
        runs[static] = (stats.tree_sizes, stats.tokens_per_pass)
        replays = [d.static.replays if d.static else 0 for d in engine.drafters]
        assert (min(replays) > 0) if static else replays == [0, 0]
    assert runs[True] == runs[False]


@pytest.mark.cuda
def test_cuda_graph_drafting(tiny_dirs, random_ssm_dir):
    llm, ssm = _load(tiny_dirs["llama"][0], "cuda"), _load(random_ssm_dir, "cuda")
    plain_pool, graphed_pool = ssm.new_pool(8, 16), ssm.new_pool(8, 16)
    graphed = StaticForward(ssm, graphed_pool)
    assert graphed.graphs
    plain = _rounds(ssm, _eager(ssm, plain_pool), plain_pool)
    out = _rounds(ssm, graphed.forward, graphed_pool)
    assert graphed.replays == 3 and graphed.captures == 3
    for a, b in zip(plain, out):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    ref = [t for s in Engine(llm, max_sequence_length=128).generate(PROMPT, 40) for t in s]
    engine = Engine(llm, [ssm, llm], TreeConfig(budget=16), max_sequence_length=128)
    for d in engine.drafters:
        d.capture_graphs([1])
        assert d.graphs_captured == 6  # Nb = 1, 2, 4, 8, 16, 32 at batch 1, span 256
    assert [t for s in engine.generate(PROMPT, 40) for t in s] == ref
    assert all(d.static is not None and d.static.graphs and d.static.replays > 0 for d in engine.drafters)


@pytest.mark.cuda
@pytest.mark.parametrize("prompt_len", [5, 300, 600])
def test_cuda_graphs_per_attention_span(long_ssm_dir, prompt_len):
    model = _load(long_ssm_dir, "cuda")
    plain_pool, graphed_pool = model.new_pool(100, 16), model.new_pool(100, 16)
    graphed = StaticForward(model, graphed_pool, max_tokens=64)

    def run_or_eager(parts, t, p):
        out = graphed.forward(parts, t, p)
        return out if out is not None else _eager(model, graphed_pool)(parts, t, p)

    prompt = _long_prompt(prompt_len)
    plain = _rounds(model, _eager(model, plain_pool), plain_pool, prompt)
    out = _rounds(model, run_or_eager, graphed_pool, prompt)
    assert graphed.captures == len(graphed._buckets) >= 2
    for a, b in zip(plain, out):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_attention_never_uses_cudnn(tiny_dirs, monkeypatch):
    """cuDNN attention plans per shape (tens of ms of host time each); our shapes change every pass."""
    import offload_infer.kv_pool as kv_pool

    seen = []
    real = kv_pool.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(kv_pool.F, "scaled_dot_product_attention", spy)
    model = load_model(resolve(str(tiny_dirs["llama"][0])), device=torch.device("cuda"), dtype=torch.float16,
                       progress=False).model
    model.forward(torch.tensor(PROMPT), torch.arange(len(PROMPT)), model.new_cache(16))
    pool = model.new_pool(2, 16)
    model.forward_batch(torch.tensor(PROMPT), torch.arange(len(PROMPT)), pool.batch([Part(pool.allocate(16), 6)]))
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the user's setting is left as it was


def test_grouped_attention_with_repeated_kv_heads_equals_gqa():
    """On CUDA each KV head is repeated for its query heads (the memory-efficient kernel takes masks but
    not grouped heads): the same attention as PyTorch's grouped-query path."""
    from offload_infer.kv_pool import grouped_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.rand(2, 1, 5, 9) > 0.3
    mask[..., 0] = True
    ref = grouped_attention(q, k, v, mask, repeat_kv=False)
    torch.testing.assert_close(grouped_attention(q, k, v, mask, repeat_kv=True), ref)
    # query head 3 attends with KV head 1 (heads grouped in runs of H / KV = 3)
    att = torch.softmax((q[:, 3] @ k[:, 1].transpose(-1, -2) / 8 ** 0.5).masked_fill(~mask[:, 0], -torch.inf), -1)
    torch.testing.assert_close(ref[:, 3], att @ v[:, 1])


def _same_gqa_logits_either_way(tiny_dirs, flag: str, n_blocks: int, run) -> None:
    """The tiny grouped-query model's logits ``run(model, pool, a, b)`` (two requests' slots ``a``, ``b``)
    with the pool's attention setting ``flag`` off and on: the same."""
    model = load_model(resolve(str(tiny_dirs["qwen2"][0])), progress=False).model
    assert model.config.n_kv_heads != model.config.n_heads
    out = []
    for on in (False, True):
        pool = model.new_pool(n_blocks, 16)
        setattr(pool, flag, on)
        out.append(run(model, pool, pool.allocate(32), pool.allocate(32)))
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)


def test_batched_attention_gathering_repeated_kv_heads_gives_the_same_logits(tiny_dirs):
    """The CUDA way of grouped-query attention in a batch (each KV head gathered once per query head, an
    additive mask made once per forward), run on the CPU: the same logits as the grouped path."""
    def run(model, pool, a, b):
        batch = pool.batch([Part(a, 6), Part(b, 3)])
        tokens = torch.tensor(PROMPT + PROMPT[:3])
        return model.forward_batch(tokens, torch.cat([torch.arange(6), torch.arange(3)]), batch)

    _same_gqa_logits_either_way(tiny_dirs, "repeat_kv", 4, run)


def test_attention_by_matmul_gives_the_same_logits(tiny_dirs):
    """A drafting pool's attention by two batched products (query heads grouped by KV head, as on a
    GPU), over a padded batch with trees and a padding request: the same logits as the fused kernel's."""
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # a root and its two children

    def run(model, pool, a, b):
        first = pool.batch([Part(a, 6), Part(b, 4)])
        model.forward_batch(torch.tensor(PROMPT + PROMPT[:4]), torch.cat([torch.arange(6), torch.arange(4)]), first)
        pool.commit([(a, list(range(6))), (b, list(range(4)))])
        batch = pool.batch([Part(a, 3, ancestors=tree), Part(b, 1)], shape=(4, 4, 256))
        tokens = torch.zeros(16, dtype=torch.long)
        tokens[batch.real_rows] = torch.tensor([5, 7, 9, 11])
        positions = torch.zeros(16, dtype=torch.long)
        positions[batch.real_rows] = torch.tensor([6, 7, 7, 4])
        return model.forward_batch(tokens, positions, batch)[batch.real_rows]

    _same_gqa_logits_either_way(tiny_dirs, "matmul_attention", 8, run)
