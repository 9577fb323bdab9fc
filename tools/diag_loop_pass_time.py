"""The offloaded LLM pass inside the decoding loop against the same pass once its shapes were seen.

    PYTHONPATH=. python tools/diag_loop_pass_time.py [--reps 2]

7B shape, int4, 1.5 GiB reserve, the agreeing pair of bench_auto_budget.py. Each configuration decodes
3 prompts x 128 tokens; the second repetition replays exactly the same shapes (same prompts, same
outputs). Per pass: LLM time, host time to enqueue the pass (enqueue), and caching-allocator events.
This found cuDNN attention's per-shape plan building (the first repetition was up to 2x slower).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import agreeing_pair  # noqa: E402

_COUNTERS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")


def main() -> None:
    from offload_infer.engine import Engine, GenerationStats
    from offload_infer.offload import StreamedLayers
    from offload_infer.speculate import TreeConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    llm, ssm, _ = agreeing_pair("llama-7b", "int4", int(1.5 * 2**30), 0.03, 2, 10.0)
    src = llm.weights.layers
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 32000, (64,), generator=g).tolist() for _ in range(3)]
    enqueue: list[float] = []  # host seconds from a pass's first layer request to its last
    plain_layers = StreamedLayers.layers

    def timed_layers(self):
        t0 = time.perf_counter()
        yield from plain_layers(self)
        enqueue.append(time.perf_counter() - t0)

    StreamedLayers.layers = timed_layers

    def counters() -> dict[str, int]:
        s = torch.cuda.memory_stats()
        return {k: s.get(k, 0) for k in _COUNTERS}

    def run(name: str, tree: TreeConfig, gap: float = 0.0, prefetch: bool = True, ssms: bool = True) -> None:
        engine = Engine(llm, [ssm] if ssms else [], tree, max_sequence_length=64 + 129)
        for d in engine.drafters:
            d.capture_graphs()
        list(engine.generate(prompts[0], 4))
        if not prefetch:
            src.prefetch = lambda: None
        enqueue.clear()
        c0, st, tokens, seconds = counters(), GenerationStats(), 0, 0.0
        for p in prompts:
            it = engine.generate(p, 128, stats=st)
            next(it)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for step in it:
                tokens += len(step)
                if gap:
                    time.sleep(gap)
            torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
        if not prefetch:
            del src.prefetch
        c1, n = counters(), len(st.tokens_per_pass)
        print(f"{name:<26} {tokens / seconds:7.2f} tok/s tpp {st.as_dict()['tokens_per_pass_mean']:.2f} "
              f"ssm {1e3 * st.ssm_time_s / n:5.1f} llm {1e3 * st.llm_time_s / n:5.1f} "
              f"enqueue {1e3 * sum(enqueue) / len(enqueue):5.1f} ms "
              + " ".join(f"{k[4:]}={c1[k] - c0[k]}" for k in _COUNTERS), flush=True)

    for _ in range(args.reps):
        run("incremental", TreeConfig(), ssms=False)
        run("fixed 16", TreeConfig(budget=16, max_depth=16))
        run("fixed 16 + 10ms gap", TreeConfig(budget=16, max_depth=16), gap=0.01)
        run("fixed 16, no prefetch", TreeConfig(budget=16, max_depth=16), prefetch=False)
        run("fixed 256", TreeConfig(budget=256, max_depth=16))


if __name__ == "__main__":
    main()
