"""GPU dequantization time of one matrix per stored format: PyTorch ops against the Triton kernels.

    PYTHONPATH=. python tools/bench_dequant.py [--rows 11008 --cols 4096] [--runs 20]

Prints, per format, the device time of one dequantization (CUDA events, median), the bytes it reads and
writes, the effective memory bandwidth, and the host time of one call (what the Python side costs), to
weigh against the PCIe time of the same compressed bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import random_stored  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=11008)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--modes", default="eager,kernels", help="eager: PyTorch ops; kernels: quant/triton_kernels.py")
    args = ap.parse_args()
    cases = {"Q4_K": ("mlp.up_proj.weight", "q4_k_m", 10), "Q6_K": ("mlp.down_proj.weight", "q4_k_m", 0),
             "awq g128": ("mlp.up_proj.weight", "awq", 0), "gptq g128": ("mlp.up_proj.weight", "gptq", 0)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, weight {args.rows}x{args.cols} -> fp16")
    for mode in args.modes.split(","):
        os.environ["OFFLOAD_INFER_EAGER_DEQUANT"] = "1" if mode == "eager" else ""
        for label, (name, precision, layer) in cases.items():
            st = random_stored(name, (args.rows, args.cols), precision, layer, 32, "cuda")
            fmt, pieces = st.fmt, st.pieces
            for _ in range(3):
                fmt.dequantize(pieces, torch.float16)
            torch.cuda.synchronize()
            dev, host = [], []
            for _ in range(args.runs):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                t0 = time.perf_counter()
                fmt.dequantize(pieces, torch.float16)
                host.append(time.perf_counter() - t0)
                b.record()
                torch.cuda.synchronize()
                dev.append(a.elapsed_time(b) / 1e3)
            d, h = statistics.median(dev), statistics.median(host)
            moved = st.nbytes + args.rows * args.cols * 2
            print(f"{mode:>9} {label:>9}: device {d * 1e3:7.3f} ms ({moved / d / 1e9:6.0f} GB/s), host call {h * 1e6:6.0f} us; "
                  f"PCIe time of its {st.nbytes / 1e6:.1f} MB at 55 GB/s: {st.nbytes / 55e9 * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
    sys.exit(main())
