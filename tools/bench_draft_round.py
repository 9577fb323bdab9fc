"""What one drafting round costs, and where the time goes (issue 16).

    PYTHONPATH=. python tools/bench_draft_round.py [--ssm qwen2.5-0.5b] [--budgets 16,64] [--drafts 20]
        [--device cuda] [--attention matmul,sdpa] [--profile] [--kernels]

A resident SSM with random weights at a real shape (the Qwen2.5-Coder 0.5B by default) drafts trees
for one request with a 256-token prompt, through the engine's ``Drafter`` (CUDA graphs on a GPU).
Prints, per budget, the median seconds per draft, SSM forwards (rounds) per draft and seconds per
round; with ``--profile``, the functions that take the host's time (cProfile, by own time) over the
drafts of the last budget, so the host-side cost of a round can be told from the SSM's forward.
Random weights give flat distributions, so trees are wider and shallower than a real pair's: read the
per-round cost, not the rounds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import SHAPES, random_resident  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ssm", default="qwen2.5-0.5b")
    ap.add_argument("--budgets", default="16,64")
    ap.add_argument("--drafts", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="list the GPU kernels of the last budget's drafts")
    ap.add_argument("--ops", action="store_true", help="the device time of each PyTorch op of eager drafts (the "
                    "replayed graphs' kernels cannot be told apart by op)")
    ap.add_argument("--no-fuse", action="store_true", help="keep the SSM's projections unfused")
    ap.add_argument("--attention", default="matmul", help="comma-separated: matmul (batched products, the default "
                    "for a fused SSM), sdpa (PyTorch's fused kernel)")
    args = ap.parse_args()
    from offload_infer.speculate import Drafter, TreeConfig

    dev = args.device
    dtype = torch.float16 if dev == "cuda" else torch.float32
    shape = SHAPES[args.ssm]
    ssm = random_resident(shape, dev, dtype)
    prompt = torch.randint(0, 1000, (256,)).tolist()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def drafter(budget: int, attention: str, static: bool | None = None):
        """A drafter for one request whose prompt is read (and graphs of its first shapes captured)."""
        d = Drafter(ssm, shape["vocab_size"], TreeConfig(budget=budget, calibrated=False), 64, 16, static=static,
                    fuse=not args.no_fuse and dev == "cuda")
        d.pool.matmul_attention = attention == "matmul"
        st = d.admit(600, prompt)
        d.draft([st], [budget], [budget])
        d.commit([(st, [], 7)])
        return d, st

    for attention, budget in [(a, int(b)) for a in args.attention.split(",") for b in args.budgets.split(",")]:
        d, st = drafter(budget, attention)
        times, calls = [], []
        prof = cProfile.Profile() if args.profile else None
        for i in range(args.drafts + 2):
            sync()
            t0 = time.perf_counter()
            if prof is not None and i >= 2:
                prof.enable()
            d.draft([st], [budget], [budget])
            if prof is not None:
                prof.disable()
            sync()
            if i >= 2:  # the first two: the graphs of new shapes
                times.append(time.perf_counter() - t0)
                calls.append(st.calls)
            d.commit([(st, [], 7 + i % 50)])
        med = statistics.median(times)
        rounds = statistics.median(calls)
        print(f"{attention} attention, budget {budget}: {med * 1e3:.2f} ms per draft, {rounds:.0f} rounds, {med / rounds * 1e3:.2f} ms per round "
              f"(graphs captured {d.graphs_captured})", flush=True)
        if args.kernels and dev == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as kp:
                for i in range(5):
                    d.draft([st], [budget], [budget])
                    d.commit([(st, [], 9 + i)])
                sync()
            kernels = [e for e in kp.events() if e.device_type.name == "CUDA"]
            total = sum(e.device_time for e in kernels)
            print(f"  {len(kernels) / 5:.0f} kernels per draft, {total / 5 / 1e3:.2f} ms of kernel time per draft")
            print(kp.key_averages().table(sort_by="device_time_total", row_limit=25))
        if args.ops and dev == "cuda":
            from torch.profiler import ProfilerActivity, profile

            eager, est = drafter(budget, attention, static=False)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as op:
                for i in range(5):
                    eager.draft([est], [budget], [budget])
                    eager.commit([(est, [], 9 + i)])
                sync()
            print(op.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=40))
        if prof is not None:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())


if __name__ == "__main__":
    main()
