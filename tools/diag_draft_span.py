"""Drafting round time with attention over the context in use (spans) vs over the whole SSM cache.

    PYTHONPATH=. python tools/diag_draft_span.py --max-len 2048

A random SSM of Qwen2.5-0.5B's shape, resident, drafting from CUDA graphs with a 64-token prompt in a
cache sized for ``--max-len`` tokens (the CLI's default maximum sequence length is 2048). ``whole
cache`` pins the span to the cache's length, as before spans existed. Prints median ms per drafting
round by tree budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import draft_round_ms, random_ssm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--budgets", default="1,16,64,256")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import offload_infer.static_forward as sf

    budgets = tuple(int(b) for b in args.budgets.split(","))
    ssm = random_ssm()
    print(f"device: {torch.cuda.get_device_name()}; SSM cache for {args.max_len} tokens", flush=True)
    spans, whole = {}, {}
    for _ in range(args.repeat):  # alternate, so a drift in the GPU's state hits both alike
        sf.MIN_SPAN = 256
        for b, ms in draft_round_ms(ssm, budgets, max_len=args.max_len).items():
            spans.setdefault(b, []).append(ms)
        sf.MIN_SPAN = 1 << 30  # every span is the whole cache
        for b, ms in draft_round_ms(ssm, budgets, max_len=args.max_len).items():
            whole.setdefault(b, []).append(ms)
    spans = {b: statistics.median(v) for b, v in spans.items()}
    whole = {b: statistics.median(v) for b, v in whole.items()}
    for b in budgets:
        print(f"budget {b:>4}: spans {spans[b]:6.2f} ms, whole cache {whole[b]:6.2f} ms per drafting round")


if __name__ == "__main__":
    main()
