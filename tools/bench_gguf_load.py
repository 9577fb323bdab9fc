"""Load time of a GGUF streamed as stored, against the time to read its bytes (issue 13, item 6).

    PYTHONPATH=. python tools/bench_gguf_load.py --shape llama-7b --path /tmp/q4km-7b.gguf \
        --reserve 1G [--device cuda] [--runs 3] [--json out.json]

Writes (once) a GGUF at a real shape with random Q4_K_M-layout blocks (tools/random_models.py:
Q4_K, and Q6_K for attn_v/ffn_down in half the layers; fp16 embeddings and head), reads it once so
that it is in the page cache, then times, median of ``--runs``:

- ``read``: copying every byte of the file out of the page cache into memory (``readinto`` of a
  preallocated buffer), the floor of any load;
- ``load``: ``load_model`` with every layer streamed (blocks copied as stored into pinned buffers, no
  dequantization on the CPU), including the globals' transfer to the device.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import SHAPES, q4_k_m_type  # noqa: E402

from weights.sources import _GGUF_LAYER  # noqa: E402

_HF_TO_GGUF = {f"{hf}.weight": name for name, hf in _GGUF_LAYER.items()}


def write_gguf(path: Path, shape: dict) -> None:
    """A llama GGUF at ``shape`` with random Q4_K_M-like blocks and a byte-level vocabulary of placeholder tokens."""
    import gguf

    from offload_infer.models import config_from_dict

    cfg = config_from_dict(shape)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", cfg.n_layers)
    w.add_uint32("llama.embedding_length", shape["hidden_size"])
    w.add_uint32("llama.feed_forward_length", shape["intermediate_size"])
    w.add_uint32("llama.attention.head_count", shape["num_attention_heads"])
    w.add_uint32("llama.attention.head_count_kv", shape["num_key_value_heads"])
    w.add_uint32("llama.context_length", shape["max_position_embeddings"])
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [f"<t{i}>" for i in range(shape["vocab_size"])])
    w.add_uint32("tokenizer.ggml.eos_token_id", 0)
    sizes = {"Q4_K": 144, "Q6_K": 210}
    h = shape["hidden_size"]
    w.add_tensor("token_embd.weight", (rng.standard_normal((shape["vocab_size"], h), dtype=np.float32) * 0.02).astype(np.float16))
    w.add_tensor("output.weight", (rng.standard_normal((shape["vocab_size"], h), dtype=np.float32) * 0.02).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(cfg.n_layers):
        for k, s in cfg.layer_shapes().items():
            name = f"blk.{i}.{_HF_TO_GGUF[k]}.weight"
            if len(s) == 1:
                w.add_tensor(name, np.ones(s, dtype=np.float32))
                continue
            kind = q4_k_m_type(k, i, cfg.n_layers)
            b = rng.integers(0, 256, size=(s[0], s[1] // 256 * sizes[kind]), dtype=np.uint8)
            w.add_tensor(name, b, raw_shape=b.shape, raw_dtype=gguf.GGMLQuantizationType[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_time(path: Path) -> float:
    size = path.stat().st_size
    buf = bytearray(size)
    view = memoryview(buf)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < size:
            got += f.readinto(view[got : got + (256 << 20)])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--path", default=None, help="where the GGUF is written (default /tmp/q4km-SHAPE.gguf)")
    ap.add_argument("--reserve", default="1G")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_infer.offload import OffloadBuilder, parse_size
    from weights.load import load_model
    from weights.resolve import resolve

    path = Path(args.path or f"/tmp/q4km-{args.shape}.gguf")
    if not path.exists():
        t0 = time.perf_counter()
        write_gguf(path, SHAPES[args.shape])
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
    size = path.stat().st_size
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    read_time(path)  # into the page cache
    reads, loads = [], []
    for _ in range(args.runs):
        reads.append(read_time(path))
        gc.collect()
        builder = OffloadBuilder(parse_size(args.reserve), verbose=False)
        t0 = time.perf_counter()
        loaded = load_model(resolve(str(path)), device=dev, dtype=dtype, layer_builder=builder, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        loads.append(time.perf_counter() - t0)
        phases = {**loaded.phases, "of which waiting for pinned buffers": builder.pin_wait_s}
        print("load phases, s: " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()), flush=True)
        plan = builder.plan
        del loaded
        gc.collect()
    r, l = statistics.median(reads), statistics.median(loads)
    print(f"{args.shape} Q4_K_M-like GGUF, {size / 1e9:.2f} GB, {args.device}: {plan.describe()}")
    print(f"read {r:.2f} s ({size / r / 1e9:.1f} GB/s), load {l:.2f} s ({size / l / 1e9:.1f} GB/s): load / read = "
          f"{l / r:.2f}x (medians of {args.runs}; reads {[round(x, 2) for x in reads]}, loads {[round(x, 2) for x in loads]})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, bytes=size, device=args.device, read_s=reads, load_s=loads), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
