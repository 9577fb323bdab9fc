"""Can the SSM draft while the offloaded LLM's pass streams? (issue 16)

    PYTHONPATH=. python tools/bench_overlap.py [--llm qwen2.5-1.5b] [--ssm qwen2.5-0.5b] [--reserve 1.2G]
        [--tokens 32] [--runs 5]

Random weights at the Qwen2.5-Coder pair's shapes (the LLM streamed at fp16, the SSM resident), CUDA
only. Prints, medians of ``--runs``:

- the LLM pass of a ``--tokens`` tree: seconds until ``forward`` returns on the host (the pass is only
  enqueued) and until the GPU has finished it;
- one SSM round alone (a forward of 8 tree tokens and its top-k brought to the host);
- both at once: the pass enqueued, then SSM rounds on a side stream until the pass is done: how many
  rounds fit, and the pass's time against its time alone (does drafting slow the stream?).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import SHAPES, build, random_resident  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="qwen2.5-1.5b")
    ap.add_argument("--ssm", default="qwen2.5-0.5b")
    ap.add_argument("--reserve", default="1.2G")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from offload_infer.offload import parse_size

    assert torch.cuda.is_available(), "this benchmark needs CUDA"
    llm, plan, _ = build(args.llm, "fp16", parse_size(args.reserve))
    ssm = random_resident(SHAPES[args.ssm])
    print(plan.describe(), flush=True)
    from offload_infer.kv_pool import Part

    prefix, n = 256, args.tokens
    pool, scache = llm.new_pool(-(-(prefix + n + 8) // 16), 16), ssm.new_cache(prefix + 64)
    seq = pool.allocate(prefix + n + 8)
    llm.forward_batch(torch.randint(0, 1000, (prefix,)), torch.arange(prefix), pool.batch([Part(seq, prefix)]))
    seq.commit_all()

    def llm_pass():  # as the engine runs it: a chain of n tree tokens in the shared pool
        seq.pending = 0
        return llm.forward_batch(tokens, positions, pool.batch([Part(seq, n, ancestors=torch.ones(n, n).tril().bool())]))
    ssm.forward(torch.randint(0, 1000, (prefix,)), torch.arange(prefix), scache)
    scache.commit_all()
    tokens, positions = torch.randint(0, 1000, (n,)), prefix + torch.arange(n)
    side = torch.cuda.Stream()

    def ssm_round() -> None:
        with torch.cuda.stream(side):
            logits = ssm.forward(torch.randint(0, 1000, (8,)), prefix + torch.arange(8), scache)
            torch.topk(torch.log_softmax(logits.float(), -1), 8, -1).indices.tolist()
            scache.rollback()

    for _ in range(3):  # warm up (allocator, kernels)
        ssm_round()
        llm_pass().argmax(-1).tolist()
    enq, alone, rounds_alone = [], [], []
    for _ in range(args.runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm_pass()
        enq.append(time.perf_counter() - t0)
        out.argmax(-1).tolist()
        alone.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ssm_round()
        rounds_alone.append(time.perf_counter() - t0)
    together, fit = [], []
    for _ in range(args.runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = llm_pass()
        done = torch.cuda.Event()
        done.record()
        k = 0
        while not done.query():
            ssm_round()
            k += 1
        out.argmax(-1).tolist()
        together.append(time.perf_counter() - t0)
        fit.append(k)
    med = statistics.median
    print(f"LLM pass of {n} tokens: enqueued in {med(enq) * 1e3:.1f} ms, done in {med(alone) * 1e3:.1f} ms "
          f"(runs {[round(x * 1e3, 1) for x in alone]})")
    print(f"SSM round (8 tokens, eager): {med(rounds_alone) * 1e3:.2f} ms")
    print(f"pass with SSM rounds beside it: {med(together) * 1e3:.1f} ms ({med(together) / med(alone):.2f}x alone), "
          f"{med(fit):.0f} rounds fit (runs {fit})")


if __name__ == "__main__":
    main()
