"""The offloaded LLM pass inside the decoding loop against the same pass once its shapes were seen.

    PYTHONPATH=. python tools/diag_loop_pass_time.py [--reps 2]

7B shape, int4, 1.5 GiB reserve, the agreeing pair of bench_auto_budget.py. Each configuration decodes
3 prompts x 128 tokens; the second repetition replays exactly the same shapes (same prompts, same
outputs). Per pass: LLM time, host time to enqueue the pass (enqueue), and caching-allocator events.
This found cuDNN attention's per-shape plan building (the first repetition was up to 2x slower).
"""
import argparse
import sys
import time

import torch
sys.path.insert(0, "tools")
from bench_auto_budget import agreeing_pair
from offload_infer.engine import Engine, GenerationStats
from offload_infer.speculate import TreeConfig
from offload_infer.offload import StreamedLayers
ap = argparse.ArgumentParser()
ap.add_argument("--reps", type=int, default=2)
args = ap.parse_args()
llm, ssm, plan = agreeing_pair("llama-7b", "int4", int(1.5 * 2**30), 0.03, 2, 10.0)
src = llm.weights.layers
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, 32000, (64,), generator=g).tolist() for _ in range(3)]
enq = []
orig_layers = StreamedLayers.layers
def timed_layers(self):
    t0 = time.perf_counter()
    for item in orig_layers(self):
        yield item
    enq.append(time.perf_counter() - t0)
StreamedLayers.layers = timed_layers
def stats():
    s = torch.cuda.memory_stats()
    return {k: s.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}
def run(name, tree, gap=0.0, prefetch=True, ssms=True):
    e = Engine(llm, [ssm] if ssms else [], tree, max_sequence_length=64 + 129)
    for d in e.drafters: d.static.capture_all()
    list(e.generate(prompts[0], 4))
    if not prefetch: src.prefetch = lambda: None
    enq.clear(); s0 = stats()
    st = GenerationStats(); tok = 0; sec = 0.0
    for p in prompts:
        it = e.generate(p, 128, stats=st); next(it); torch.cuda.synchronize(); t0 = time.perf_counter()
        for s in it:
            tok += len(s)
            if gap: time.sleep(gap)
        torch.cuda.synchronize(); sec += time.perf_counter() - t0
    if not prefetch: del src.prefetch
    s1 = stats(); n = len(st.tokens_per_pass)
    print(f"{name:<26} {tok/sec:7.2f} tok/s tpp {st.as_dict()['tokens_per_pass_mean']:.2f} ssm {1e3*st.ssm_time_s/n:5.1f} "
          f"llm {1e3*st.llm_time_s/n:5.1f} enqueue {1e3*sum(enq)/len(enq):5.1f} ms "
          + " ".join(f"{k[4:]}={s1[k]-s0[k]}" for k in s0), flush=True)
for rep in range(args.reps):
    run("incremental", TreeConfig(), ssms=False)
    run("fixed 16", TreeConfig(budget=16, max_depth=16))
    run("fixed 16 + 10ms gap", TreeConfig(budget=16, max_depth=16), gap=0.01)
    run("fixed 16, no prefetch", TreeConfig(budget=16, max_depth=16), prefetch=False)
    run("fixed 256", TreeConfig(budget=256, max_depth=16))
