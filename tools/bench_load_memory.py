"""Host memory while loading a real checkpoint with its SSM, against what the pre-flight counted.

    PYTHONPATH=. python tools/bench_load_memory.py --llm qwen2.5-coder-1.5b-instruct \
        --ssm qwen2.5-coder-0.5b-instruct --offload --reserve 1G [--codec nf4] [--device cpu|cuda] [--json out.json]

Builds the engine as ``generate`` does (``build_engine``: pre-flight, LLM streamed or resident, the SSM
resident, KV pools) while sampling the process's resident memory every 5 ms, then prints what grew (RSS
and anonymous RSS, final and peak) against the bytes the run holds on the host by the pre-flight's count
(pinned layers; on the CPU also the resident weights, KV pools and SSMs) and the target
``peak <= 1.05 x held + one layer's source tensors``. Anonymous memory is the figure to read: a GGUF or
safetensors file is memory-mapped, and the pages of it that loading touches count in RSS as file pages
the kernel may drop at will, not as memory the run holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from memwatch import MemoryWatch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", required=True)
    ap.add_argument("--ssm", action="append", default=[])
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--reserve", default="1G")
    ap.add_argument("--codec", default=None)
    ap.add_argument("--requantize", default=None, help="nf4, int8 or dense: a quantized checkpoint converted at load")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-sequence-length", type=int, default=1024)
    ap.add_argument("--max-batch-size", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import offload_infer.cli_options as opts

    o = opts.ModelOptions(llm=args.llm, ssm=tuple(args.ssm), offload=args.offload, offload_reserve_space_size=args.reserve,
                          quant_codec=args.codec, requantize=args.requantize, device=args.device, max_sequence_length=args.max_sequence_length,
                          max_batch_size=args.max_batch_size)
    if args.device.startswith("cuda"):  # the CUDA context and libraries are not the model's memory
        torch.zeros(1, device=args.device)
        from quant import triton_kernels
        from quant.codecs import load_backend

        load_backend()
        triton_kernels.warm_up(args.device)  # compiling the dequantization kernels costs host memory once
    t0 = time.perf_counter()
    with MemoryWatch() as watch:
        engine, _ = opts.build_engine(o, args.max_batch_size)
    load_s = time.perf_counter() - t0
    fp = engine.footprint
    assert fp is not None
    staging = max(v for k, v in fp.host.items() if k.startswith("loading"))
    held = sum(v for k, v in fp.host.items() if not k.startswith("loading") and k != "activations")
    grown = watch.grown()
    row = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "date": time.strftime("%Y-%m-%d"), "args": vars(args), "load_s": load_s, "host_footprint": fp.host,
           "held": held, "one_layer_staging": staging, "grown": grown,
           "peak_anon_over_held": grown["peak_anon"] / held if held else None,
           "target": 1.05 * held + staging, "meets_target": grown["peak_anon"] <= 1.05 * held + staging}
    print(f"loaded in {load_s:.1f} s; pre-flight host figures, GB: "
          + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in fp.host.items()), flush=True)
    print(f"held on the host {held / 1e9:.3f} GB, one layer's source {staging / 1e9:.3f} GB; grown: "
          + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in grown.items())
          + f"; peak anon / held {row['peak_anon_over_held']:.3f}; target (1.05 x held + one layer) "
          f"{row['target'] / 1e9:.3f} GB: {'met' if row['meets_target'] else 'NOT met'}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
