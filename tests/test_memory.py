"""The memory pre-flight counts what a run really allocates, and refuses before loading when it cannot fit;
streamed layers are pinned at their exact size."""

from __future__ import annotations

import warnings

import pytest
import torch

import offload_infer.cli_options as opts
import offload_infer.memory as mem
from offload_infer.memory import OffloadPlanError
from offload_infer.offload import make_plan


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _record_footprints(monkeypatch) -> list:
    import offload_infer.offload as off

    seen = []
    real = mem.check_footprint

    def record(fp, device, *a, **kw):
        seen.append(fp)
        return real(fp, device, *a, **kw)

    monkeypatch.setattr(mem, "check_footprint", record)
    monkeypatch.setattr(off, "check_footprint", record)
    return seen


def _cfg(d):
    import json

    from offload_infer.models import config_from_dict

    return config_from_dict(json.loads((d / "config.json").read_text()))


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny llama of 4 layers (2 do not leave room for a plan with both resident and streamed layers)."""
    import shutil

    from tests.conftest import build_hf, llama_cfg

    d = tmp_path_factory.mktemp("llama4")
    build_hf(llama_cfg(num_hidden_layers=4)).save_pretrained(d)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


def _options(tiny_dirs, d, offload: bool) -> opts.ModelOptions:
    p = make_plan(_cfg(d), torch.float32, 2**30)
    reserve = p.global_bytes + 2 * p.packed_layer_bytes + p.dense_layer_bytes  # one resident layer, three streamed
    return opts.ModelOptions(llm=str(d), ssm=(str(tiny_dirs["qwen2"][0]),), offload=offload, device="cpu",
                             offload_reserve_space_size=f"{reserve // 1024 + 1}K", max_sequence_length=100,
                             max_batch_size=3, use_full_precision=True)


@pytest.mark.parametrize("offload", [True, False], ids=["offloaded", "resident"])
def test_preflight_counts_what_is_allocated(tiny_dirs, llama4_dir, monkeypatch, offload):
    """Every figure the pre-flight checked (LLM weights, pinned layers, KV pools, SSM weights and pool) is
    the number of bytes the built engine holds, to the byte."""
    seen = _record_footprints(monkeypatch)
    engine, _ = opts.build_engine(_options(tiny_dirs, llama4_dir, offload), 3)
    assert len(seen) == 1
    host = seen[0].host
    llm, drafter = engine.llm, engine.drafters[0]
    ssm = drafter.model
    layers = llm.weights.layers
    if offload:
        assert host["pinned layers"] == sum(p.buffer.numel() for p in layers.packed.values()) > 0
        resident = [t for w in layers.resident.values() for t in w.values()]
        assert layers.resident and layers.packed
        assert host["LLM weights"] == _storage_bytes([*llm.weights.globals.values(), *resident])
        assert host["KV cache"] == engine.pool.kv.nbytes
    else:
        resident = [t for _, w in layers.layers() for t in w.values()]
        assert host["LLM weights"] == _storage_bytes([*llm.weights.globals.values(), *resident])
        assert host["LLM KV cache"] == engine.pool.kv.nbytes
    name = f"SSM {tiny_dirs['qwen2'][0]}"
    ssm_tensors = [*ssm.weights.globals.values(), *(t for _, w in ssm.weights.layers.layers() for t in w.values())]
    assert host[f"{name} weights"] == _storage_bytes(ssm_tensors)
    assert host[f"{name} KV cache"] == drafter.pool.kv.nbytes


def test_preflight_refuses_before_loading_when_the_ssm_does_not_fit(tiny_dirs, llama4_dir, monkeypatch):
    """The LLM alone would fit; with the SSM and its cache it does not: refused with the breakdown, and no
    weight is read."""
    import weights.load

    seen = _record_footprints(monkeypatch)
    o = _options(tiny_dirs, llama4_dir, True)
    opts.build_engine(o, 3)
    total = sum(seen[0].host.values())
    ssm = sum(v for k, v in seen[0].host.items() if k.startswith("SSM"))
    monkeypatch.setattr(mem, "available_host_bytes", lambda: total - ssm // 2)
    monkeypatch.setattr(weights.load, "iter_layers", lambda *a, **k: pytest.fail("read weights before the pre-flight"))
    with pytest.raises(OffloadPlanError, match=r"host RAM \(pinned layers .*SSM .* weights .*available"):
        opts.build_engine(o, 3)
    with pytest.raises(OffloadPlanError, match=r"host RAM .*LLM weights"):
        opts.build_engine(_options(tiny_dirs, llama4_dir, False), 3)


def test_cuda_footprint_goes_to_the_device(tiny_dirs, monkeypatch):
    """On a GPU the weights, pools and activations are counted on the device, the pinned layers and the
    layer being loaded on the host (checked with a pretend GPU of 1 KB free)."""
    import offload_infer.offload as off

    plan = make_plan(_cfg(tiny_dirs["llama"][0]), torch.float16, 10**9)
    fp = off.plan_footprint(plan, torch.device("cuda"), kv_bytes=1000, staging_bytes=7)
    assert fp.host == {"pinned layers": plan.pinned_bytes, "loading": 7}
    assert fp.device["LLM weights"] == plan.gpu_bytes and fp.device["KV cache"] == 1000
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 2000))
    with pytest.raises(OffloadPlanError, match="GPU memory .*LLM weights.*KV cache.*free"):
        mem.check_footprint(fp, torch.device("cuda"))


def test_pinning_refused_falls_back_to_pageable_with_one_warning(monkeypatch):
    import offload_infer.pinned as pinned

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinned, "_register", lambda ptr, n: 2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(pinned, "_clear_cuda_error", lambda: None)
    monkeypatch.setattr(pinned, "_warned", False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a, ra = pinned.pinned_empty(10_000)
        b, rb = pinned.pinned_empty(20_000)
    assert ra is None and rb is None and a.numel() == 10_000 and b.numel() == 20_000
    assert len([x for x in w if "pinning" in str(x.message)]) == 1


def test_registered_buffers_own_whole_pages(monkeypatch):
    """Each buffer registers its own page-aligned span (two buffers never share a page, which CUDA would
    refuse as already registered), and the registration is undone when the layer goes away."""
    import gc

    import offload_infer.pinned as pinned

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinned, "_register", lambda ptr, n: calls.append(("reg", ptr, n)) or 0)
    monkeypatch.setattr(pinned, "_unregister", lambda ptr: calls.append(("unreg", ptr)) or 0)
    bufs = [pinned.pinned_empty(n) for n in (100, 5000, 4096)]
    spans = [(ptr, ptr + n) for op, ptr, n in calls]
    for (t, region), (start, end), n in zip(bufs, spans, (100, 5000, 4096)):
        assert start % pinned.PAGE == 0 and end % pinned.PAGE == 0 and end - start >= n
        assert t.numel() == n and start <= t.data_ptr() and t.data_ptr() + n <= end
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    ptrs = [region.ptr for _, region in bufs]
    del bufs, region
    gc.collect()
    assert sorted(p for op, p, *_ in calls if op == "unreg") == sorted(ptrs)


@pytest.mark.cuda
def test_cuda_streamed_weights_cost_their_packed_bytes_in_host_memory():
    """Building a streamed model on a GPU (weights drawn on the GPU, so no source copy on the host) grows
    the process's anonymous memory by the packed layer bytes within 5%, and the buffers are pinned."""
    import gc
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
    from random_models import build

    from offload_infer.models import config_from_dict
    from tests.test_offload import _rss_anon
    from quant.codecs import quantize

    shape = dict(model_type="llama", vocab_size=1000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512)
    for codec in ("nf4", "int8-row"):
        quantize(torch.randn(256, 256, device="cuda", dtype=torch.float16), codec)  # kernels and libraries loaded
        torch.cuda.synchronize()
        gc.collect()
        p = make_plan(config_from_dict(shape), torch.float16, 2**40, codec)
        before = _rss_anon()
        # a reserve of the globals and the ring: every layer streams
        model, plan, _ = build(shape, {"nf4": "int4", "int8-row": "int8"}[codec], p.global_bytes + 2 * p.packed_layer_bytes)
        torch.cuda.synchronize()
        gc.collect()
        grown = _rss_anon() - before
        packed = model.weights.layers.packed
        assert len(packed) == 16 and sum(p.buffer.numel() for p in packed.values()) == plan.pinned_bytes > 400e6
        assert all(p.buffer.is_pinned() for p in packed.values())
        assert grown <= 1.05 * plan.pinned_bytes, (codec, grown / plan.pinned_bytes)
        del model, packed
        gc.collect()
