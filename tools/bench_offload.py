"""Offloaded pass time on a CUDA GPU, with random weights at real model shapes, against the PCIe floor.

    PYTHONPATH=. python tools/bench_offload.py --shapes llama-7b,llama-13b --precisions fp16,int8,int4 \
        --trees 1,16,64,256,1024 --reserve 4G --runs 7 [--json out.json]

For each shape and precision it builds the model layer by layer straight into pinned buffers (no
checkpoint; ``--pin registered,caching`` builds it once with each host allocator: exact-size registered
pages, the default, and PyTorch's power-of-two caching allocator), prints the plan and the process's
resident memory grown while building (RSS and anonymous RSS, final and peak, sampled every 5 ms) against
the plan's pinned bytes, then times one LLM pass (a tree of T tokens over a 64-token prefix,
median of ``--runs``), the bytes streamed per pass, the effective bandwidth and its ratio to the
pinned host-to-device bandwidth measured in the same run. ``floor`` = streamed bytes / measured bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from memwatch import MemoryWatch  # noqa: E402
from random_models import build  # noqa: E402


def h2d_bandwidth(nbytes: int = 1 << 30, runs: int = 5) -> float:
    from offload_infer.pinned import pinned_empty

    src, region = pinned_empty(nbytes)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del src, dst, region
    return nbytes / statistics.median(times[1:])


def warm_up() -> None:
    """Load the libraries and kernels building uses, so their pages are not counted as the model's."""
    from quant.codecs import load_backend, quantize

    load_backend()
    for codec in ("nf4", "int8-row"):
        quantize(torch.randn(256, 256, device="cuda", dtype=torch.float16), codec)
    torch.randn(64, 64, device="cuda", dtype=torch.float16) @ torch.randn(64, 64, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()


def time_pass(model, n_tokens: int, runs: int, prefix: int = 64) -> float:
    from offload_infer.models.attention import causal_mask

    cache = model.new_cache(prefix + n_tokens + 8)
    model.forward(torch.randint(0, 1000, (prefix,)), torch.arange(prefix), cache)
    cache.commit_all()
    # a random tree: node i's parent is a random earlier node
    parents = [-1] + [int(torch.randint(0, i, (1,))) for i in range(1, n_tokens)]
    depth = [0] * n_tokens
    mask = torch.zeros(n_tokens, prefix + n_tokens, dtype=torch.bool)
    mask[:, :prefix] = True
    for i in range(n_tokens):
        depth[i] = 0 if i == 0 else depth[parents[i]] + 1
        mask[i, prefix:] = mask[parents[i], prefix:] if i else False
        mask[i, prefix + i] = True
    if n_tokens == 1:
        mask = causal_mask(prefix, 1, torch.device("cpu"))
    tokens = torch.randint(0, 1000, (n_tokens,))
    positions = prefix + torch.tensor(depth)
    times = []
    for _ in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.forward(tokens, positions, cache, mask).argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
        cache.rollback()
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama-7b,llama-13b")
    ap.add_argument("--precisions", default="fp16,int8,int4", help="fp16, int8, int4 (NF4), and as stored by a "
                    "checkpoint: q4_k_m (GGUF blocks), awq, gptq (int4 group 128)")
    ap.add_argument("--dequant", default="kernels", help="stored formats' GPU dequantization: kernels (Triton, "
                    "quant/triton_kernels.py), eager (PyTorch ops), or both")
    ap.add_argument("--trees", default="1,16,64,256,1024")
    ap.add_argument("--reserve", default="4G")
    ap.add_argument("--ring", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--resident", choices=("compressed", "dense"), default="compressed",
                    help="keep resident layers compressed (default) or dense, for int8/int4")
    ap.add_argument("--pin", default="registered", help="host allocators to compare: registered,caching")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_infer.offload import parse_size

    reserve = parse_size(args.reserve)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    bw = h2d_bandwidth()
    print(f"pinned host->device bandwidth (1 GiB, median of 5): {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    warm_up()
    for shape, precision, pin in ((s, p, a) for s in args.shapes.split(",") for p in args.precisions.split(",")
                                  for a in args.pin.split(",")):
        with MemoryWatch() as watch:
            model, plan, build_s = build(shape, precision, reserve, args.ring, args.resident == "compressed",
                                         pin_allocator=pin)
            torch.cuda.synchronize()
        per_pass = sum(p.buffer.numel() for p in model.weights.layers.packed.values())
        mem = watch.grown()
        print(f"\n{shape} {precision} ({pin} pinned memory): {plan.describe()} (built in {build_s:.0f} s)", flush=True)
        print("host memory grown while building, GB (x the plan's pinned host bytes): " + ", ".join(
            f"{k} {v / 1e9:.2f} ({v / plan.pinned_bytes:.3f}x)" for k, v in mem.items()), flush=True)
        rows.append(dict(shape=shape, precision=precision, pin=pin, pinned_bytes=plan.pinned_bytes, build_s=build_s,
                         **{f"{k}_grown": v for k, v in mem.items()}))
        modes = args.dequant.split(",") if args.dequant != "both" else ["kernels", "eager"]
        for mode, t in ((m, int(x)) for m in modes for x in args.trees.split(",")):
            os.environ["OFFLOAD_INFER_EAGER_DEQUANT"] = "1" if mode == "eager" else ""
            if t == int(args.trees.split(",")[0]):
                print(f"dequantization: {mode}", flush=True)
                print(f"{'tokens':>7} {'pass ms':>9} {'GB streamed':>12} {'eff GB/s':>9} {'vs floor':>9}", flush=True)
            s = time_pass(model, t, args.runs)
            row = dict(shape=shape, precision=precision, pin=pin, dequant=mode, tokens=t, pass_s=s, bytes=per_pass,
                       eff_bw=per_pass / s, h2d_bw=bw, ratio_to_floor=s / (per_pass / bw) if per_pass else None,
                       resident_layers=len(plan.resident_layers), streamed_layers=len(plan.streamed_layers))
            rows.append(row)
            ratio = f"{row['ratio_to_floor']:>9.2f}" if per_pass else f"{'-':>9}"
            print(f"{t:>7} {s * 1e3:>9.1f} {per_pass / 1e9:>12.2f} {per_pass / s / 1e9:>9.1f} {ratio}", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        if hasattr(torch._C, "_host_emptyCache"):
            torch._C._host_emptyCache()  # the caching allocator's freed pinned blocks back to the system
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "h2d_bw": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
