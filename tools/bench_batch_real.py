"""Batched decoding with the real Qwen2.5-Coder pair (MODELS.md): incremental vs token trees, batch 1 vs many.

    PYTHONPATH=. python tools/bench_batch_real.py --llm qwen-1.5b --ssm qwen-0.5b --offload --reserve 1.2G \
        --batches 1,16,32 --budget 16 --new 96 --json out.json

The LLM streams from pinned host memory (fp16 on CUDA, ``--reserve`` of GPU memory for its weights),
the SSM is resident. Prompts: bench_tree_acceptance.py's held-out code and chat prompts through the
chat template, repeated to fill the batch; greedy; requests stop at EOS or ``--new`` tokens, so they
finish at different steps and continuous batching refills nothing (all join at once). Reported per
configuration: aggregate tokens/s (every generated token over the wall time from the first step to the
last, prefill included), per-request tokens/s (its tokens over the time until it finished), tokens per
LLM pass per request, and how many outputs equal the same request served alone (fp16 arithmetic
differs between batch shapes, so a near-tie may flip a token; fp32 on the CPU equals exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_tree_acceptance import PROMPTS  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def serve(engine, prompts: list[list[int]], new: int) -> dict:
    from offload_infer.sampling import SamplingParams

    dev = engine.llm.device
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=new)) for p in prompts]
    steps0 = engine.steps
    sync(dev)
    t0 = time.perf_counter()
    done: dict[int, float] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.id] = time.perf_counter()
    sync(dev)
    wall = time.perf_counter() - t0
    outs = [engine.sequence(i).output for i in ids]
    tokens = sum(len(o) for o in outs)
    passes = [engine.sequence(i).stats.llm_passes for i in ids]
    per_pass = [(len(o) - 1) / max(1, p - 1) for o, p in zip(outs, passes)]  # decoding passes: prefill left out
    for i in ids:
        engine.forget(i)
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "per_request_tokens_per_s_median": statistics.median(len(o) / (done[i] - t0) for o, i in zip(outs, ids)),
            "tokens_per_pass_per_request": statistics.mean(per_pass), "llm_passes": engine.steps - steps0,
            "outputs": outs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", default="qwen-1.5b")
    ap.add_argument("--ssm", default="qwen-0.5b")
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--reserve", default="1.2G")
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help="distinct prompts (repeated to fill a batch)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_infer.engine import Engine
    from offload_infer.offload import OffloadBuilder, parse_size
    from offload_infer.speculate import TreeConfig, shared_vocab_size
    from weights.load import load_model, resident_layers
    from weights.resolve import resolve

    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       "cpu" if args.device == "auto" else args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    t = time.perf_counter()
    builder = OffloadBuilder(parse_size(args.reserve), kv_bytes=1 << 30) if args.offload else resident_layers
    llm = load_model(resolve(args.llm), device=dev, dtype=dtype, layer_builder=builder)
    ssm = load_model(resolve(args.ssm), device=dev, dtype=dtype)
    vocab = shared_vocab_size(llm.tokenizer.token_strings(), ssm.tokenizer.token_strings(), llm.model.vocab_size,
                              ssm.model.vocab_size, args.ssm)
    print(f"device: {card}; loaded in {time.perf_counter() - t:.1f} s", flush=True)
    texts = PROMPTS[: args.prompts]
    encoded = [llm.tokenizer.encode_prompt(p, chat=True) for p in texts]
    batches = [int(b) for b in args.batches.split(",")]
    longest = max(len(p) for p in encoded) + args.new + 1
    rows, alone_outputs = [], {}
    for name, ssms, tree in (("incremental", [], TreeConfig()),
                             (f"budget {args.budget}", [ssm.model], TreeConfig(budget=args.budget))):
        for b in batches:
            engine = Engine(llm.model, ssms, tree, longest, llm.tokenizer.eos_ids, min(vocab, llm.model.vocab_size),
                            max_batch_size=b, max_batch_tokens=max(2048, b * (1 + args.budget)))
            serve(engine, [encoded[0][:8]], 4)  # warm-up: kernels chosen, batch-1 graphs captured
            for d in engine.drafters:
                d.capture_graphs([b], [256])
            prompts = [encoded[i % len(encoded)] for i in range(max(b, len(encoded)) if b == 1 else b)]
            if b == 1:  # batch 1 serves every distinct prompt once, one after the other
                res = [serve(engine, [p], args.new) for p in encoded]
                r = {"requests": len(res), "tokens": sum(x["tokens"] for x in res),
                     "wall_s": sum(x["wall_s"] for x in res),
                     "per_request_tokens_per_s_median": statistics.median(x["tokens_per_s"] for x in res),
                     "tokens_per_pass_per_request": statistics.mean(x["tokens_per_pass_per_request"] for x in res),
                     "llm_passes": sum(x["llm_passes"] for x in res), "outputs": [x["outputs"][0] for x in res]}
                r["tokens_per_s"] = r["tokens"] / r["wall_s"]
                alone_outputs[name] = r["outputs"]
            else:
                r = serve(engine, prompts, args.new)
            ref = alone_outputs.get(name)
            if ref is not None:
                r["equal_to_alone"] = sum(o == ref[i % len(ref)] for i, o in enumerate(r["outputs"]))
            del r["outputs"]
            row = {"config": name, "batch": b, **r}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del engine
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": card, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
