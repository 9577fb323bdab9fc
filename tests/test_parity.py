"""Logits and greedy tokens equal transformers on tiny random configs of every family and quirk."""

from __future__ import annotations

import pytest
import torch

from offload_infer.engine import Engine
from tests.conftest import tiny_configs
from weights.load import load_model
from weights.resolve import resolve

NAMES = list(tiny_configs())


def _load(d):
    return load_model(resolve(str(d)), progress=False).model


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(tiny_dirs, name):
    d, hf = tiny_dirs[name]
    model = _load(d)
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    cache = model.new_cache(64)
    ours = model.forward(ids[0], torch.arange(24), cache)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers_generate(tiny_dirs, name):
    d, hf = tiny_dirs[name]
    model = _load(d)
    prompt = [5, 17, 42, 7, 99]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    engine = Engine(model, max_sequence_length=128)
    ours = [t for step in engine.generate(prompt, 32) for t in step]
    assert ours == ref


@pytest.mark.parametrize("name", ["llama", "opt-350m-style", "qwen2"])
def test_cached_decoding_equals_full_recomputation(tiny_dirs, name):
    model = _load(tiny_dirs[name][0])
    ids = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(2))
    full = model.forward(ids, torch.arange(20), model.new_cache(32))
    cache = model.new_cache(32)
    parts = [model.forward(ids[:8], torch.arange(8), cache)]
    cache.commit_all()
    for i in range(8, 20):
        parts.append(model.forward(ids[i : i + 1], torch.tensor([i]), cache))
        cache.commit_all()
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "opt", "mistral"])
def test_tree_mask_forward_equals_per_path_forwards(tiny_dirs, name):
    from offload_infer.tree import TokenTree

    model = _load(tiny_dirs[name][0])
    prefix = [9, 8, 7, 6]
    tree = TokenTree.root(11)
    a = tree.add(20, 0)
    b = tree.add(21, 0)
    c = tree.add(30, a)
    tree.add(31, a)
    tree.add(40, b)
    tree.add(50, c)
    cache = model.new_cache(32)
    model.forward(torch.tensor(prefix), torch.arange(4), cache)
    cache.commit_all()
    logits = model.forward(tree.token_tensor(), 4 + tree.depth_tensor(), cache, tree.attention_mask(4))
    for node in range(len(tree)):
        path = [tree.tokens[i] for i in tree.path(node)]
        seq = torch.tensor(prefix + path)
        ref = model.forward(seq, torch.arange(len(seq)), model.new_cache(32))[-1]
        torch.testing.assert_close(logits[node], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_run_and_stay_close(tiny_dirs, dtype):
    d, hf = tiny_dirs["qwen2"]
    model = load_model(resolve(str(d)), dtype=dtype, progress=False).model
    ids = torch.arange(3, 27)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    out = model.forward(ids, torch.arange(24), model.new_cache(32))
    assert model.weights.globals["model.embed_tokens.weight"].dtype == dtype
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())
