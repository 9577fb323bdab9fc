"""Fixed-shape SSM forwards (padded buckets, slot-indexed KV writes; CUDA graphs on a GPU) equal the plain forward."""

from __future__ import annotations

import pytest
import torch

from offload_infer.engine import Engine, GenerationStats
from offload_infer.speculate import TreeConfig
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


def _tree_step(model, forward, cache, prompt: list[int] = PROMPT):
    """Prefill (plain forward), a 3-node tree (a root child with one child, and a sibling), keep two,
    then one more token."""
    out = [model.forward(torch.tensor(prompt), torch.arange(len(prompt)), cache)]
    cache.commit_all()
    p = len(prompt)
    mask = torch.zeros(3, p + 3, dtype=torch.bool)
    mask[:, :p] = True
    mask[0, p] = mask[1, p] = mask[1, p + 1] = mask[2, p + 2] = True  # 0 <- 1, 2 a sibling of 0
    out.append(forward(torch.tensor([11, 12, 13]), torch.tensor([p, p + 1, p]), mask))
    cache.commit([0, 1])
    end = cache.end
    out.append(forward(torch.tensor([14]), torch.tensor([end]), torch.ones(1, end + 1, dtype=torch.bool)))
    cache.commit_all()
    return out


@pytest.mark.parametrize("family", ["llama", "opt", "qwen2"])
def test_padded_forward_matches_plain_forward(tiny_dirs, family):
    model = _load(tiny_dirs[family][0])
    plain_cache, static_cache = model.new_cache(64), model.new_cache(64)
    plain = _tree_step(model, lambda t, p, m: model.forward(t, p, plain_cache, m), plain_cache)
    static = StaticForward(model, static_cache, graphs=False)
    padded = _tree_step(model, static.forward, static_cache)
    assert static.graphs is False and static.replays == 2  # the prefill is a plain forward
    for a, b in zip(plain, padded):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    n = plain_cache.length
    assert static_cache.length == n == len(PROMPT) + 3
    torch.testing.assert_close(static_cache.k[:, :, :n], plain_cache.k[:, :, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static_cache.v[:, :, :n], plain_cache.v[:, :, :n], atol=1e-5, rtol=1e-5)


def test_too_many_tokens_or_no_room_for_padding_falls_back(tiny_dirs):
    model = _load(tiny_dirs["llama"][0])
    cache = model.new_cache(len(PROMPT) + 3)
    static = StaticForward(model, cache, buckets=(1, 2), graphs=False)
    ref_cache = model.new_cache(len(PROMPT) + 3)
    ref = model.forward(torch.tensor(PROMPT), torch.arange(len(PROMPT)), ref_cache)
    out = static.forward(torch.tensor(PROMPT), torch.arange(len(PROMPT)), torch.ones(6, 6).tril().bool())
    torch.testing.assert_close(out, ref)
    cache.commit_all()
    # 3 tokens: no bucket holds them; 1 token fits bucket 1 exactly at the end of the cache
    out = static.forward(torch.tensor([1, 2, 3]), torch.arange(6, 9), torch.ones(3, 9).tril(6).bool())
    assert out.shape[0] == 3 and cache.end == 9
    cache.rollback()
    with pytest.raises(ValueError, match="beyond the model's context"):
        static.forward(torch.tensor([1]), torch.tensor([10**6]), torch.ones(1, 7, dtype=torch.bool))


@pytest.fixture(scope="module")
def long_ssm_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("random-ssm-long")
    build_hf(llama_cfg(num_hidden_layers=1, max_position_embeddings=1024), seed=7).save_pretrained(d)
    return d


def _long_prompt(n: int) -> list[int]:
    return [i % 300 + 3 for i in range(n)]


@pytest.mark.parametrize("prompt_len, span", [(5, 256), (300, 512), (600, 700)])
def test_attention_spans_only_the_context_in_use(long_ssm_dir, prompt_len, span):
    """A padded forward attends over the shortest span (256, 512, ..., the cache's length) that holds
    its slots, not over the whole cache; the result is the same."""
    model = _load(long_ssm_dir)
    plain_cache, static_cache = model.new_cache(700), model.new_cache(700)
    static = StaticForward(model, static_cache, graphs=False)
    assert static.spans == (256, 512, 700)
    prompt = _long_prompt(prompt_len)
    plain = _tree_step(model, lambda t, p, m: model.forward(t, p, plain_cache, m), plain_cache, prompt)
    padded = _tree_step(model, static.forward, static_cache, prompt)
    assert {b.span for b in static._buckets.values()} == {span}
    for a, b in zip(plain, padded):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tree", [TreeConfig(budget=16), TreeConfig(expansion=(2, 2, 1, 1)), TreeConfig(budget=200)])
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
    cache, ref_cache = ssm.new_cache(64), ssm.new_cache(64)
    graphed = StaticForward(ssm, cache)
    assert graphed.graphs
    graphed.capture_all()
    assert graphed.spans == (64,) and graphed.captures == len([s for s in graphed.sizes if s <= 64])
    plain = _tree_step(ssm, lambda t, p, m: ssm.forward(t, p, ref_cache, m), ref_cache)
    out = _tree_step(ssm, graphed.forward, cache)
    for a, b in zip(plain, out):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert graphed.replays == 2
    ref = [t for s in Engine(llm, max_sequence_length=128).generate(PROMPT, 40) for t in s]
    engine = Engine(llm, [ssm, llm], TreeConfig(budget=16), max_sequence_length=128)
    for d in engine.drafters:
        d.capture_graphs()
        assert d.static.spans == (256, d.cache.max_len)  # (bucket, span) pairs that fit the cache:
        assert d.graphs_captured == sum(1 for s in d.static.sizes for L in d.static.spans if s <= L)
    assert [t for s in engine.generate(PROMPT, 40) for t in s] == ref
    assert all(d.static is not None and d.static.graphs and d.static.replays > 0 for d in engine.drafters)


@pytest.mark.cuda
@pytest.mark.parametrize("prompt_len", [5, 300, 600])
def test_cuda_graphs_per_attention_span(long_ssm_dir, prompt_len):
    model = _load(long_ssm_dir, "cuda")
    plain_cache, graphed_cache = model.new_cache(700), model.new_cache(700)
    graphed = StaticForward(model, graphed_cache)
    prompt = _long_prompt(prompt_len)
    plain = _tree_step(model, lambda t, p, m: model.forward(t, p, plain_cache, m), plain_cache, prompt)
    out = _tree_step(model, graphed.forward, graphed_cache, prompt)
    assert graphed.replays == 2 and graphed.captures == 2  # buckets 4 and 1, at this context's span
    for a, b in zip(plain, out):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_attention_never_uses_cudnn(tiny_dirs, monkeypatch):
    """cuDNN attention plans per shape (tens of ms of host time each); our shapes change every pass."""
    import offload_infer.models.attention as attention

    seen = []
    real = attention.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    model = load_model(resolve(str(tiny_dirs["llama"][0])), device=torch.device("cuda"), dtype=torch.float16,
                       progress=False).model
    model.forward(torch.tensor(PROMPT), torch.arange(len(PROMPT)), model.new_cache(16))
    assert seen and not any(seen)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # the user's setting is left as it was
