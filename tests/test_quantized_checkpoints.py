"""Quantized checkpoints kept as stored (issue 13): GGUF blocks, AWQ, GPTQ and bitsandbytes 4/8-bit.

Each format's dequantization is checked against a reference written independently (the ``gguf``
package for GGUF; loops over the documented layouts for AWQ and GPTQ; bitsandbytes itself for its
formats), and tiny checkpoints of each kind give the logits of their dequantized twins, resident and
streamed as stored.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from offload_infer.offload import OffloadBuilder, make_plan
from quant.formats import AWQFormat, GPTQFormat
from quant.int4_groups import AWQ_ORDER
from weights.load import load_model
from weights.resolve import resolve
from weights.sources import CheckpointError

IDS = torch.tensor([5, 17, 42, 7, 99, 3, 250, 11])

# -- GGUF ----------------------------------------------------------------------------------------------
# where each block type keeps its fp16 scales: set to small finite values in otherwise random blocks
_F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_K": (0, 2),
               "Q6_K": (208,), "Q2_K": (80, 82)}
_LAYER_TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q4_0",
                "ffn_up": "Q4_1", "ffn_down": "Q5_0"}
_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
       "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
       "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
HIDDEN, FFN, HEADS, KV, LAYERS = 256, 512, 4, 2, 2


def _blocks(rng, kind: str, rows: int, cols: int) -> np.ndarray:
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    per, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows * cols // per, nbytes), dtype=np.uint8)
    for off in _F16_FIELDS[kind]:
        b[:, off : off + 2] = rng.uniform(0.002, 0.02, size=(len(b), 1)).astype(np.float16).view(np.uint8)
    return b.reshape(rows, -1)


def _write_tiny_gguf(path, smollm2_path, layer1_up: str = "Q2_K") -> None:
    """A 2-layer llama GGUF at hidden 256 with every streamed block type (and one Q2_K matrix, which is
    dequantized at load), borrowing SmolLM2's tokenizer."""
    import gguf

    from weights.gguf_reader import GGUFFile

    tok = GGUFFile(smollm2_path).values
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", LAYERS)
    w.add_uint32("llama.embedding_length", HIDDEN)
    w.add_uint32("llama.feed_forward_length", FFN)
    w.add_uint32("llama.attention.head_count", HEADS)
    w.add_uint32("llama.attention.head_count_kv", KV)
    w.add_uint32("llama.context_length", 256)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", tok["tokenizer.ggml.model"])
    w.add_string("tokenizer.ggml.pre", tok["tokenizer.ggml.pre"])
    w.add_array("tokenizer.ggml.tokens", tok["tokenizer.ggml.tokens"])
    w.add_array("tokenizer.ggml.merges", tok["tokenizer.ggml.merges"])
    w.add_uint32("tokenizer.ggml.bos_token_id", int(tok["tokenizer.ggml.bos_token_id"]))
    w.add_uint32("tokenizer.ggml.eos_token_id", int(tok["tokenizer.ggml.eos_token_id"]))
    vocab = len(tok["tokenizer.ggml.tokens"])

    def raw(name, kind, rows, cols):
        b = _blocks(rng, kind, rows, cols)
        w.add_tensor(name, b, raw_shape=b.shape, raw_dtype=gguf.GGMLQuantizationType[kind])

    w.add_tensor("token_embd.weight", (rng.standard_normal((vocab, HIDDEN)) * 0.5).astype(np.float16))
    w.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    raw("output.weight", "Q6_K", vocab, HIDDEN)
    head_dim = HIDDEN // HEADS
    shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (KV * head_dim, HIDDEN), "attn_v": (KV * head_dim, HIDDEN),
              "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    for i in range(LAYERS):
        for k, (rows, cols) in shapes.items():
            raw(f"blk.{i}.{k}.weight", layer1_up if (i == 1 and k == "ffn_up") else _LAYER_TYPES[k], rows, cols)
        for k in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{k}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_twin(gguf_path, out) -> None:
    """The same model as ordinary fp32 safetensors, dequantized by the gguf package (q/k rows unpermuted
    as MODELS.md gives it)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {}
    for t in reader.tensors:
        a = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        a = a.reshape(shape)
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_HF[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):
                n = HEADS if parts[2] == "attn_q" else KV
                a = a.reshape(n, a.shape[0] // n // 2, 2, a.shape[1]).swapaxes(1, 2).reshape(a.shape)
        else:
            name = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight",
                    "output": "lm_head.weight"}[parts[0]]
        tensors[name] = torch.from_numpy(np.array(a, copy=True))
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    (out / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False)))


def _streaming_builder(path, stored=True) -> OffloadBuilder:
    """A builder whose reserve holds the globals and a ring of one slot: every layer streams."""
    from weights.load import read_config, read_stored_sizes

    r = resolve(str(path))
    config = read_config(r)
    p = make_plan(config, torch.float32, 2**40, None, stored=read_stored_sizes(r, config) if stored else None)
    return OffloadBuilder(p.global_bytes + p.packed_layer_bytes, ring_slots=1, verbose=False)


def _logits(model) -> torch.Tensor:
    return model.forward(IDS, torch.arange(len(IDS)), model.new_cache(32))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_path):
    d = tmp_path_factory.mktemp("gguf")
    _write_tiny_gguf(d / "tiny.gguf", smollm2_path)
    _gguf_twin(d / "tiny.gguf", d / "twin")
    return d


def test_gguf_streamed_as_stored_gives_the_logits_of_the_gguf_dequantized(tiny_gguf, capsys):
    twin = load_model(resolve(str(tiny_gguf / "twin")), progress=False).model
    resident = load_model(resolve(str(tiny_gguf / "tiny.gguf")), progress=False).model
    builder = _streaming_builder(tiny_gguf / "tiny.gguf")
    streamed = load_model(resolve(str(tiny_gguf / "tiny.gguf")), layer_builder=builder, progress=False).model
    assert "Q2_K is dequantized at load" in capsys.readouterr().err
    layers = streamed.weights.layers
    assert not layers.resident and len(layers.packed) == LAYERS
    kinds = {e.name: e.fmt.describe() if e.fmt else None for e in layers.packed[1].entries}
    assert kinds == {"self_attn.q_proj.weight": "Q4_K", "self_attn.k_proj.weight": "Q5_K",
                     "self_attn.v_proj.weight": "Q6_K", "self_attn.o_proj.weight": "Q8_0",
                     "mlp.gate_proj.weight": "Q4_0", "mlp.up_proj.weight": None, "mlp.down_proj.weight": "Q5_0",
                     "input_layernorm.weight": None, "post_attention_layernorm.weight": None}
    # the blocks went into the buffers byte for byte: the pinned bytes are the file's, not fp32's
    assert builder.plan.pinned_bytes == sum(p.buffer.numel() for p in layers.packed.values())
    assert builder.plan.pinned_bytes < builder.plan.dense_layer_bytes * LAYERS / 3
    ref = _logits(twin)
    assert torch.equal(_logits(resident), ref)
    assert torch.equal(_logits(streamed), ref)


def test_gguf_requantize_keeps_the_old_behaviour(tiny_gguf):
    src = resolve(str(tiny_gguf / "tiny.gguf"))
    p = make_plan(load_model(src, progress=False).model.config, torch.float32, 2**40, "nf4")
    builder = OffloadBuilder(p.global_bytes + p.packed_layer_bytes, "nf4", ring_slots=1, verbose=False, requantize=True)
    model = load_model(src, layer_builder=builder, progress=False).model
    kinds = {e.fmt.describe() for layer in model.weights.layers.packed.values() for e in layer.entries if e.fmt}
    assert kinds == {"nf4"}
    assert torch.isfinite(_logits(model)).all()


def test_cli_streams_a_gguf_as_stored_and_requantizes_on_request(tiny_gguf):
    from typer.testing import CliRunner

    from offload_infer.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["generate", "hello", "-m", str(tiny_gguf / "tiny.gguf"), "-n", "4", "--json",
                                        "--no-chat", *args])

    base = run()
    stored = run("--offload", "--offload-reserve-space-size", "110M", "--offload-ring-slots", "1")
    assert base.exit_code == 0 and stored.exit_code == 0, stored.output
    assert "quantized matrices as stored" in stored.stderr
    assert json.loads(base.stdout)[0]["output_token_ids"] == json.loads(stored.stdout)[0]["output_token_ids"]
    again = run("--offload", "--offload-reserve-space-size", "110M", "--requantize", "nf4")
    assert again.exit_code == 0, again.output
    assert "codec nf4" in again.stderr
    note = run("--offload", "--offload-reserve-space-size", "110M", "--4bit-quantization")
    assert note.exit_code == 0 and "stream as stored; nf4 applies to its other matrices" in note.stderr
    dense = run("--offload", "--offload-reserve-space-size", "110M", "--requantize", "dense")
    assert dense.exit_code == 0 and "codec none" in dense.stderr, dense.output
    assert json.loads(dense.stdout)[0]["output_token_ids"] == json.loads(base.stdout)[0]["output_token_ids"]
    for args, message in ((("--offload", "--requantize", "int3"), "--requantize: choose one of nf4, int8"),
                          (("--requantize", "nf4"), "add --offload"),
                          (("--offload", "--requantize", "nf4", "--quant-codec", "int8-row"), "disagree")):
        r = run(*args)
        assert r.exit_code != 0 and message in r.output, r.output


# -- AWQ and GPTQ: references from the documented layouts ----------------------------------------------
def _pack_awq(q: torch.Tensor) -> torch.Tensor:
    """[rows, cols] 4-bit ints -> int32 [rows, cols / 8], column AWQ_ORDER[i] in nibble i (AutoAWQ gemm)."""
    out = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for c in range(q.shape[1] // 8):
        for i in range(8):
            out[:, c] |= q[:, c * 8 + AWQ_ORDER[i]].long() << (4 * i)
    return (out - ((out >> 31) << 32)).to(torch.int32)  # two's complement into int32


def _pack_gptq_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, cols] -> int32 [rows * bits / 32, cols]: rows packed in order, lowest bits first."""
    per = 32 // bits
    out = torch.zeros(q.shape[0] // per, q.shape[1], dtype=torch.int64)
    for r in range(q.shape[0]):
        out[r // per] |= q[r].long() << (bits * (r % per))
    return (out - ((out >> 31) << 32)).to(torch.int32)


def _pack_gptq_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    return _pack_gptq_rows(q.t().contiguous(), bits).t().contiguous()


def _reference(q, z, s, group_of) -> torch.Tensor:
    """w[o, i] = (q[i, o] - z[g(i), o]) * s[g(i), o], element by element (then the [out, in] layout)."""
    n_in, out = q.shape
    w = torch.empty(out, n_in)
    for i in range(n_in):
        g = group_of(i)
        w[:, i] = (q[i] - z[g]).float() * s[g].float()
    return w


def _awq_case(n_in=256, out=64, group=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n_in, out), generator=g)
    z = torch.randint(0, 16, (n_in // group, out), generator=g)
    s = (torch.rand(n_in // group, out, generator=g) * 0.02 + 0.001).half()
    return q, z, s


def test_awq_dequantizes_like_the_documented_layout():
    q, z, s = _awq_case()
    pieces = {"qweight": _pack_awq(q), "qzeros": _pack_awq(z), "scales": s}
    got = AWQFormat(64, (64, 256)).dequantize(pieces, torch.float32)
    assert torch.equal(got, _reference(q, z, s, lambda i: i // 64))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_dequantizes_like_the_documented_layout(bits, act_order, v1):
    n_in, out, group = 256, 64, 32
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (n_in, out), generator=g)
    z = torch.randint(0, 2**bits, (n_in // group, out), generator=g)
    s = (torch.rand(n_in // group, out, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.randperm(n_in, generator=g) // group if act_order else torch.arange(n_in) // group
    stored_z = (z - 1) % 2**bits if v1 else z  # v1 keeps zeros minus one
    pieces = {"qweight": _pack_gptq_rows(q, bits), "qzeros": _pack_gptq_cols(stored_z, bits), "scales": s}
    if act_order:
        pieces["g_idx"] = g_idx.to(torch.int32)
    got = GPTQFormat(bits, group, 1 if v1 else 0, (out, n_in), act_order).dequantize(pieces, torch.float32)
    assert torch.equal(got, _reference(q, z, s, lambda i: int(g_idx[i])))


# -- tiny quantized checkpoints against their dequantized twins -----------------------------------------
_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")


def _quantized_pair(src, tmp_path, kind: str):
    """(quantized checkpoint dir, dequantized twin dir) from the tiny llama ``src`` (hidden 32, ffn 64)."""
    from safetensors.torch import load_file

    tensors = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    qdir, twin = tmp_path / kind, tmp_path / f"{kind}-twin"
    qdir.mkdir()
    twin.mkdir()
    quantized, dense = {}, {}
    g = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        base = name[: -len(".weight")]
        if not any(base.endswith(m) for m in _MATRICES):
            quantized[name] = dense[name] = t
            continue
        out, n_in = t.shape
        if kind in ("awq", "gptq", "gptq-act"):
            group = 16
            q = torch.randint(0, 16, (n_in, out), generator=g)
            z = torch.randint(0, 16, (n_in // group, out), generator=g)
            s = (t.abs().amax() / 8 * (0.5 + torch.rand(n_in // group, out, generator=g))).half()
            if kind == "awq":
                quantized |= {base + ".qweight": _pack_awq(q), base + ".qzeros": _pack_awq(z), base + ".scales": s}
                dense[name] = _reference(q, z, s, lambda i: i // group)
            else:
                g_idx = (torch.randperm(n_in, generator=g) if kind == "gptq-act" else torch.arange(n_in)) // group
                quantized |= {base + ".qweight": _pack_gptq_rows(q, 4), base + ".qzeros": _pack_gptq_cols((z - 1) % 16, 4),
                              base + ".scales": s, base + ".g_idx": g_idx.to(torch.int32)}
                dense[name] = _reference(q, z, s, lambda i: int(g_idx[i]))
        elif kind == "bnb4":
            import bitsandbytes.functional as F

            packed, qs = F.quantize_4bit(t.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
            quantized[name] = packed
            quantized |= {f"{name}.{k}": v for k, v in qs.as_dict(packed=True).items()}
            dense[name] = F.dequantize_4bit(packed, qs)
        else:  # bnb8: LLM.int8 rows
            scb = t.abs().amax(dim=1).float()
            w8 = torch.round(t / scb[:, None] * 127).to(torch.int8)
            quantized |= {name: w8, base + ".SCB": scb}
            dense[name] = w8.float() * (scb / 127)[:, None]
    qcfg = {"awq": {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "gemm"},
            "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False, "sym": False},
            "gptq-act": {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": False},
            "bnb4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
            "bnb8": {"quant_method": "bitsandbytes", "load_in_8bit": True}}[kind]
    save_file({k: v.contiguous() for k, v in quantized.items()}, qdir / "model.safetensors")
    save_file({k: v.contiguous() for k, v in dense.items()}, twin / "model.safetensors")
    (qdir / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg}))
    (twin / "config.json").write_text(json.dumps(cfg))
    return qdir, twin


@pytest.mark.parametrize("kind", ["awq", "gptq", "gptq-act", "bnb4", "bnb8"])
def test_quantized_checkpoint_matches_its_dequantized_twin(tiny_dirs, tmp_path, kind):
    qdir, twin = _quantized_pair(tiny_dirs["llama"][0], tmp_path, kind)
    ref = _logits(load_model(resolve(str(twin)), progress=False).model)
    resident = load_model(resolve(str(qdir)), progress=False).model
    builder = _streaming_builder(qdir)
    streamed = load_model(resolve(str(qdir)), layer_builder=builder, progress=False).model
    packed = streamed.weights.layers.packed
    assert packed and all(e.fmt is not None for p in packed.values() for e in p.entries if e.name.endswith("proj.weight"))
    # the plan knew every layer's stored bytes before reading: the buffers are exactly what it counted
    assert builder.plan.pinned_bytes == sum(p.buffer.numel() for p in packed.values())
    tol = {} if kind != "bnb4" else dict(atol=1e-5, rtol=1e-5)  # bnb's CPU kernels differ in the last bit
    torch.testing.assert_close(_logits(resident), ref, **tol)
    torch.testing.assert_close(_logits(streamed), ref, **tol)


def test_compress_converts_a_quantized_checkpoint_like_its_dequantized_twin(tiny_dirs, tmp_path):
    from weights.compress import compress

    qdir, twin = _quantized_pair(tiny_dirs["llama"][0], tmp_path, "gptq-act")
    a = compress(resolve(str(qdir)), tmp_path / "a", "nf4", dtype=torch.float32, progress=False)
    b = compress(resolve(str(twin)), tmp_path / "b", "nf4", dtype=torch.float32, progress=False)
    assert torch.equal(_logits(load_model(resolve(str(a)), progress=False).model),
                       _logits(load_model(resolve(str(b)), progress=False).model))


def test_a_gguf_cut_short_after_opening_is_a_clear_error(tiny_gguf, tmp_path):
    """The reader checks every tensor against the file's size when it opens it; a file that shrinks
    afterwards (being rewritten) fails with the file named, not with a traceback from a reading thread."""

    from weights.load import open_source

    path = tmp_path / "t.gguf"
    shutil.copy(tiny_gguf / "tiny.gguf", path)
    source, _ = open_source(resolve(str(path)))
    name = "model.layers.1.mlp.down_proj.weight"
    piece = source.blocks(name)
    with open(path, "r+b") as f:
        f.truncate(piece.offset + 10)
    with pytest.raises(OSError, match="ends at .* before a tensor does"):
        piece.read()


@pytest.mark.parametrize("qcfg, match", [
    ({"quant_method": "awq", "bits": 4, "group_size": 16, "version": "gemv"}, "gemm"),
    ({"quant_method": "awq", "bits": 3, "group_size": 16}, "3 bits"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 16}, "3 bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 16, "checkpoint_format": "marlin"}, "marlin"),
    ({"quant_method": "hqq"}, "'hqq' is not supported"),
    ({"quant_method": "bitsandbytes"}, "neither load_in_4bit"),
])
def test_unsupported_quantization_configs_are_clear_errors(tiny_dirs, tmp_path, qcfg, match):
    qdir, _ = _quantized_pair(tiny_dirs["llama"][0], tmp_path, "awq")
    cfg = json.loads((qdir / "config.json").read_text())
    (qdir / "config.json").write_text(json.dumps({**cfg, "quantization_config": qcfg}))
    with pytest.raises(CheckpointError, match=match):
        load_model(resolve(str(qdir)), progress=False)


def test_zero_biases_of_quantized_linears_are_accepted_and_others_refused(tiny_dirs, tmp_path):
    """AutoGPTQ writes a bias for every quantized Linear, zeros where the model has none."""
    from safetensors.torch import load_file

    qdir, twin = _quantized_pair(tiny_dirs["llama"][0], tmp_path, "gptq")
    t = load_file(qdir / "model.safetensors")
    for k in [k for k in t if k.endswith(".qweight")]:
        t[k[: -len(".qweight")] + ".bias"] = torch.zeros(t[k].shape[1], dtype=torch.float16)
    save_file(t, qdir / "model.safetensors")
    torch.testing.assert_close(_logits(load_model(resolve(str(qdir)), progress=False).model),
                               _logits(load_model(resolve(str(twin)), progress=False).model))
    t["model.layers.0.mlp.up_proj.bias"][3] = 1.0
    save_file(t, qdir / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not use: model.layers.0.mlp.up_proj.bias"):
        load_model(resolve(str(qdir)), progress=False)


def test_mismatched_quantized_shapes_are_clear_errors(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    qdir, _ = _quantized_pair(tiny_dirs["llama"][0], tmp_path, "awq")
    t = load_file(qdir / "model.safetensors")
    t["model.layers.0.mlp.up_proj.scales"] = t["model.layers.0.mlp.up_proj.scales"][:1].contiguous()
    save_file(t, qdir / "model.safetensors")
    with pytest.raises(CheckpointError, match="up_proj.scales.*has shape"):
        load_model(resolve(str(qdir)), progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_cuda_kernels_match_the_cpu(kind):
    import gguf

    from quant.formats import GGUFFormat

    rng = np.random.default_rng(0)
    b = torch.from_numpy(_blocks(rng, kind, 512, 1024))
    nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    fmt = GGUFFormat(kind, nbytes, (512, 1024))
    cpu = fmt.dequantize({"blocks": b}, torch.float32)
    for dtype in (torch.float32, torch.float16):
        gpu = fmt.dequantize({"blocks": b.cuda()}, dtype).cpu()
        torch.testing.assert_close(gpu.float(), cpu.to(dtype).float(), atol=0, rtol=2**-10 if dtype == torch.float16 else 1e-6)
    q, z, s = _awq_case(1024, 512, 128)
    pieces = {"qweight": _pack_awq(q), "qzeros": _pack_awq(z), "scales": s}
    fmt = AWQFormat(128, (512, 1024))
    cpu = fmt.dequantize(pieces, torch.float16)
    gpu = fmt.dequantize({k: v.cuda() for k, v in pieces.items()}, torch.float16).cpu()
    torch.testing.assert_close(gpu, cpu, atol=0, rtol=2**-10)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["gptq", "gptq-act", "bnb4", "bnb8"])
def test_cuda_loads_quantized_checkpoints_like_the_cpu(tiny_dirs, tmp_path, kind):
    qdir, twin = _quantized_pair(tiny_dirs["llama"][0], tmp_path, kind)
    ref = _logits(load_model(resolve(str(twin)), progress=False).model)
    builder = _streaming_builder(qdir)
    gpu = load_model(resolve(str(qdir)), device="cuda", layer_builder=builder, progress=False).model
    assert gpu.weights.layers.packed
    ids = IDS.cuda()
    out = gpu.forward(ids, torch.arange(len(ids), device="cuda"), gpu.new_cache(32)).cpu()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


_INTERPRETED = r"""
import sys
import numpy as np, torch, gguf
sys.path.insert(0, "tests")
from quant import triton_kernels as tk, gguf_blocks
from quant.int4_groups import awq
from test_quantized_checkpoints import _blocks, _awq_case, _pack_awq
rng = np.random.default_rng(0)
for kind in ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]:
    nb = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    b = torch.from_numpy(_blocks(rng, kind, 24, 512))  # 24 rows: the last program's blocks are partly masked
    ref = gguf_blocks.DEQUANTIZE[kind](b.reshape(-1, nb)).reshape(24, -1)
    assert torch.equal(tk.gguf(b.contiguous(), kind, nb, 24, torch.float32), ref), kind
q, z, s = _awq_case(256, 72, 64)
q, z = q[:, :64], z[:, :64]
qw, qz, s = _pack_awq(q), _pack_awq(z), s[:, :64].contiguous()
assert torch.equal(tk.awq(qw, qz, s, 64, torch.float32), awq(qw, qz, s, 64)), "awq"
from quant.int4_groups import gptq
from test_quantized_checkpoints import _pack_gptq_rows, _pack_gptq_cols
g = torch.Generator().manual_seed(0)
for bits in (2, 4, 8):
    for act_order in (False, True):
        n_in, out, group = 256, 64, 32
        q = torch.randint(0, 2**bits, (n_in, out), generator=g)
        z = torch.randint(0, 2**bits, (n_in // group, out), generator=g)
        s = (torch.rand(n_in // group, out, generator=g) * 0.02 + 0.001).half()
        g_idx = (torch.randperm(n_in, generator=g) // group).to(torch.int32) if act_order else None
        qw, qz = _pack_gptq_rows(q, bits), _pack_gptq_cols(z, bits)
        assert torch.equal(tk.gptq(qw, qz, s, g_idx, bits, group, 1, torch.float32),
                           gptq(qw, qz, s, g_idx, bits, group, 1)), ("gptq", bits, act_order)
print("ok")
"""


def test_triton_kernels_equal_the_pytorch_code_bit_for_bit():
    """The GPU kernels, run by Triton's interpreter on the CPU, give the PyTorch code's fp32 weights exactly."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
