"""Weight streaming: plans, packed layers, offloaded output against resident output, codecs."""

from __future__ import annotations

import json

import pytest
import torch

from offload_infer.engine import Engine
from offload_infer.offload import OffloadBuilder, OffloadPlanError, make_plan, pack_layer, parse_size, unpack_layer
from offload_infer.speculate import TreeConfig
from quant.codecs import CODECS, dequantize, quantize
from weights.load import load_model
from weights.resolve import resolve

PROMPT = [5, 17, 42, 7, 99, 3]


def _gen(model, ssms=(), n=24, tree=None):
    e = Engine(model, list(ssms), tree or TreeConfig(), max_sequence_length=96)
    return [t for s in e.generate(PROMPT, n) for t in s]


def test_parse_size():
    assert parse_size("4096") == 4096 * 2**20
    assert parse_size("4G") == 4 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("100k") == 100 * 1024
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


@pytest.mark.parametrize("codec", CODECS)
def test_codec_round_trip_error_bounds(codec):
    # relative Frobenius error, worst over 50 random matrices; bounds measured then given ~25% headroom
    bound = {"nf4": 0.12, "fp4": 0.16, "int8-row": 0.012, "int8-block": 0.013}[codec]
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(50):
        w = torch.randn(64, 256, generator=g) * torch.rand(1, generator=g) * 3
        packed, state = quantize(w, codec, 64)
        assert packed.dtype == torch.uint8
        back = dequantize(packed, state)
        assert back.shape == w.shape and back.dtype == w.dtype
        worst = max(worst, float((back - w).norm() / w.norm()))
    assert worst < bound, worst


def test_codec_errors():
    with pytest.raises(ValueError, match="unknown codec"):
        quantize(torch.randn(8, 64), "int3")
    with pytest.raises(ValueError, match="invalid block size 48"):
        quantize(torch.randn(8, 64), "nf4", 48)


def test_pack_unpack_exact_without_codec():
    w = {"a.weight": torch.randn(7, 5), "a.bias": torch.randn(7), "n.weight": torch.randn(3)}
    layer = pack_layer(w, None, 64, torch.device("cpu"), pin=False)
    assert layer.buffer.dtype == torch.uint8 and layer.buffer.ndim == 1
    back = unpack_layer(layer.buffer, layer, torch.float32)
    for k in w:
        assert torch.equal(back[k], w[k])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Six layers, so that two ring slots hold less than the model and every layer streams."""
    from tests.conftest import build_hf, llama_cfg

    d = tmp_path_factory.mktemp("llama6")
    build_hf(llama_cfg(num_hidden_layers=6)).save_pretrained(d)
    return d


def _load(d, builder=None, **kw):
    from weights.load import resident_layers

    return load_model(resolve(str(d)), layer_builder=builder or resident_layers, progress=False, **kw).model


def test_plan_budget_edges(llama_dir):
    model = _load(llama_dir)
    cfg = model.config
    big = make_plan(cfg, torch.float32, 2**30)
    assert big.streamed_layers == () and len(big.resident_layers) == cfg.n_layers
    tight = make_plan(cfg, torch.float32, big.global_bytes + 2 * big.packed_layer_bytes)
    assert tight.resident_layers == () and tight.streamed_layers == tuple(range(cfg.n_layers))
    one = make_plan(cfg, torch.float32, tight.reserve_bytes + big.dense_layer_bytes)
    assert len(one.resident_layers) == 1 and len(one.streamed_layers) == cfg.n_layers - 1
    with pytest.raises(OffloadPlanError, match="too small.*ring buffers"):
        make_plan(cfg, torch.float32, big.global_bytes + big.packed_layer_bytes)
    q = make_plan(cfg, torch.float32, tight.reserve_bytes, "nf4")
    assert q.packed_layer_bytes < big.packed_layer_bytes / 4 and len(q.resident_layers) > 0


def test_plan_refuses_more_pinned_memory_than_available(llama_dir, monkeypatch):
    import offload_infer.memory as mem

    monkeypatch.setattr(mem, "available_host_bytes", lambda: 1000)
    with pytest.raises(OffloadPlanError, match="host RAM"):
        _load(llama_dir, _streamed_builder(llama_dir))


def _streamed_builder(d, codec=None, ring=2):
    """A builder whose reserve holds the globals and the ring only: every layer streams."""
    cfg = _load(d).config
    p = make_plan(cfg, torch.float32, 2**30, codec)
    return OffloadBuilder(p.global_bytes + ring * p.packed_layer_bytes, codec, ring_slots=ring, verbose=False)


@pytest.mark.parametrize("name", ["llama6", "opt-350m-style", "qwen2"])
def test_offloaded_output_equals_resident_exactly(tiny_dirs, llama_dir, name):
    d = llama_dir if name == "llama6" else tiny_dirs[name][0]
    resident = _load(d)
    streamed = _load(d, _streamed_builder(d, ring=1))
    assert streamed.weights.layers.order == list(range(resident.config.n_layers))
    ids = torch.arange(3, 30)
    a = resident.forward(ids, torch.arange(len(ids)), resident.new_cache(32))
    b = streamed.forward(ids, torch.arange(len(ids)), streamed.new_cache(32))
    assert torch.equal(a, b)
    assert _gen(resident) == _gen(streamed)


@pytest.mark.parametrize("codec", ["nf4", "int8-row"])
def test_speculation_with_quantized_offloaded_llm_equals_its_incremental_output(llama_dir, codec):
    llm = _load(llama_dir, _streamed_builder(llama_dir, codec))
    ssm = _load(llama_dir)  # the unquantized model is a good, imperfect SSM for its quantized self
    ref = _gen(llm)
    assert _gen(llm, [ssm], tree=TreeConfig(budget=8)) == ref
    assert _gen(llm, [ssm], tree=TreeConfig(expansion=(2, 1, 1))) == ref


def test_quantized_model_stays_close_to_fp32(llama_dir):
    ref = _load(llama_dir)
    q = _load(llama_dir, _streamed_builder(llama_dir, "int8-row"))
    ids = torch.arange(3, 30)
    a = ref.forward(ids, torch.arange(len(ids)), ref.new_cache(32))
    b = q.forward(ids, torch.arange(len(ids)), q.new_cache(32))
    assert float((a - b).norm() / a.norm()) < 0.05


@pytest.mark.cuda
@pytest.mark.parametrize("codec", [None, "nf4", "int8-row"])
def test_cuda_streaming_matches_resident(llama_dir, codec):
    dev = torch.device("cuda")
    resident = _load(llama_dir, device=dev, dtype=torch.float32)
    builder = _streamed_builder(llama_dir, codec)
    streamed = _load(llama_dir, builder, device=dev, dtype=torch.float32)
    if codec is None:
        ids = torch.arange(3, 30)
        a = resident.forward(ids, torch.arange(len(ids)), resident.new_cache(32))
        b = streamed.forward(ids, torch.arange(len(ids)), streamed.new_cache(32))
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert _gen(resident) == _gen(streamed)
    cpu = _load(llama_dir, _streamed_builder(llama_dir, codec))
    assert _gen(streamed, [resident], tree=TreeConfig(budget=8)) == _gen(streamed)
    if codec is not None:  # two layers resident (compressed on the GPU), the rest streamed
        p = make_plan(streamed.config, torch.float32, 2**30, codec)
        mixed = _load(llama_dir, OffloadBuilder(p.global_bytes + 4 * p.packed_layer_bytes, codec, verbose=False),
                      device=dev, dtype=torch.float32)
        assert len(mixed.weights.layers.resident) == 2 and mixed.weights.layers.cuda
        assert _gen(mixed) == _gen(streamed)
    assert streamed.weights.layers.bytes_streamed > 0
    assert _gen(cpu) == _gen(streamed)


# -- the compression tool ---------------------------------------------------------------------------
def test_compressed_checkpoint_gives_same_tokens_as_compressing_at_load(llama_dir, tmp_path, tiny_tokenizer_dir):
    import shutil

    from typer.testing import CliRunner

    from offload_infer.cli import app

    src = tmp_path / "src"
    shutil.copytree(llama_dir, src)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    out = tmp_path / "nf4"
    r = CliRunner().invoke(app, ["compress", str(src), "--out", str(out), "--bits", "4", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "config.json").read_text())["offload_infer_compression"]
    assert meta["codec"] == "nf4" and meta["format_version"] == "1"
    at_load = _gen(_load(src, _streamed_builder(src, "nf4")))
    stored = _load(out, _streamed_builder(out, "nf4"))
    assert stored.weights.layers.packed  # streamed from the stored packed bytes
    assert _gen(stored) == at_load
    assert _gen(_load(out)) == at_load  # resident: dequantized once at load
    # the tokenizer travelled with it
    from weights.tokenizer import load_tokenizer

    assert load_tokenizer(out).encode("The quick fox") == load_tokenizer(src).encode("The quick fox")
    # refuses to overwrite; asked for another codec, it streams its own nf4 bytes all the same (never
    # recompressing the error twice) unless told to requantize
    r = CliRunner().invoke(app, ["compress", str(src), "--out", str(out)])
    assert r.exit_code != 0 and "--force" in r.output
    as_stored = _load(out, _streamed_builder(src, "int8-row"))
    assert _gen(as_stored) == at_load
    assert {e.fmt.describe() for p in as_stored.weights.layers.packed.values() for e in p.entries if e.fmt} == {"nf4"}
    builder = _streamed_builder(src, "int8-row")
    builder.requantize = True
    again = _load(out, builder)
    assert {e.fmt.describe() for p in again.weights.layers.packed.values() for e in p.entries if e.fmt} == {"int8-row"}


def test_compressed_format_version_mismatch_is_clear(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from weights.compress import compress
    from weights.sources import CheckpointError

    out = compress(resolve(str(llama_dir)), tmp_path / "c", "int8-row", dtype=torch.float32, progress=False)
    f = out / "model-layer-0000.safetensors"
    tensors = load_file(f)
    save_file(tensors, f, metadata={"format": "offload-infer-compressed", "format_version": "99"})
    g = out / "model-globals.safetensors"
    save_file(load_file(g), g, metadata={"format": "offload-infer-compressed", "format_version": "99"})
    with pytest.raises(CheckpointError, match="version '99' is not supported"):
        _load(out)


def test_resident_layers_stay_compressed_and_match_streaming(llama_dir):
    cfg = _load(llama_dir).config
    p = make_plan(cfg, torch.float32, 2**30, "nf4")
    reserve = p.global_bytes + 2 * p.packed_layer_bytes + 2 * p.packed_layer_bytes  # room for 2 compressed layers
    dense = make_plan(cfg, torch.float32, reserve, "nf4", resident_compressed=False)
    packed = make_plan(cfg, torch.float32, reserve, "nf4")
    assert len(packed.resident_layers) == 2 and len(packed.resident_layers) > len(dense.resident_layers)
    assert packed.gpu_bytes <= reserve
    streamed = _gen(_load(llama_dir, _streamed_builder(llama_dir, "nf4")))
    mixed = _load(llama_dir, OffloadBuilder(reserve, "nf4", verbose=False))
    assert len(mixed.weights.layers.resident) == 2
    assert sorted(mixed.weights.layers.resident) != [0, 1]  # spread between streamed layers
    assert _gen(mixed) == streamed


def test_device_check_counts_the_kv_cache(llama_dir, monkeypatch):
    import offload_infer.offload as off

    seen = {}
    monkeypatch.setattr(off, "check_plan", lambda plan, device, kv, **kw: seen.setdefault("kv", kv))
    cfg = _load(llama_dir).config
    OffloadBuilder(2**30, kv_tokens=100, verbose=False).prepare(cfg, torch.device("cpu"), torch.float32)
    assert seen["kv"] == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 100 * 4


def test_gpu_memory_shortfall_is_clear(llama_dir, monkeypatch):
    import offload_infer.offload as off

    cfg = _load(llama_dir).config
    plan = make_plan(cfg, torch.float32, 2**30)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 2000))
    with pytest.raises(OffloadPlanError, match="needs .* GB of GPU memory.*free"):
        off.check_plan(plan, torch.device("cuda"), kv_bytes=10**6)


@pytest.mark.parametrize("codec", CODECS)
def test_quant_state_round_trips_through_safetensors(tmp_path, codec):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from quant.codecs import QuantState

    w = torch.randn(32, 128)
    packed, state = quantize(w, codec, 64)
    save_file({"w.qdata": packed, **{f"w.{k}": v for k, v in state.tensors().items()}}, tmp_path / "q.safetensors",
              metadata=state.metadata())
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        back = QuantState.from_tensors(f.metadata(), {"scales": f.get_tensor("w.scales")})
        assert torch.equal(dequantize(f.get_tensor("w.qdata"), back), dequantize(packed, state))
    with pytest.raises(ValueError, match="unknown codec"):
        QuantState.from_tensors({**state.metadata(), "codec": "int2"}, state.tensors())


def _rss_anon() -> int:
    """Anonymous resident memory, after glibc hands back the heap it keeps for reuse."""
    from weights.load import release_freed_memory

    release_freed_memory()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_streamed_weights_exist_once_in_host_memory(tmp_path):
    """Building a streamed int8 model from a 200 MB fp32 checkpoint adds about its packed bytes to the
    process's anonymous memory: no second (pageable or uncompressed) copy of the weights stays behind."""
    import gc

    from safetensors.torch import save_file

    from offload_infer.models import config_from_dict

    cfg = dict(model_type="llama", vocab_size=1000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = config_from_dict(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in config.global_shapes().items()}
    for i in range(config.n_layers):
        tensors |= {config.layer_prefix(i) + k: torch.randn(s, generator=g) * 0.02
                    for k, s in config.layer_shapes().items()}
    save_file(tensors, tmp_path / "model.safetensors")
    del tensors
    gc.collect()
    plan = make_plan(config, torch.float32, 2**40, "int8-row")
    builder = OffloadBuilder(plan.global_bytes + 2 * plan.packed_layer_bytes, "int8-row", verbose=False)
    quantize(torch.randn(64, 64), "int8-row")  # bitsandbytes' import and first use cost ~120 MB once
    before = _rss_anon()
    model = _load(tmp_path, builder)
    gc.collect()
    grown = _rss_anon() - before
    packed = sum(p.buffer.numel() for p in model.weights.layers.packed.values())
    assert packed == builder.plan.pinned_bytes
    assert grown <= 1.05 * (packed + builder.plan.global_bytes) + 24 * 2**20, (grown, packed)
