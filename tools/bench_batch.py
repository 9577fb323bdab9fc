"""Batched throughput against FlexGen's throughput mode, on a CUDA GPU, at FlexGen's settings.

    PYTHONPATH=. python tools/bench_batch.py --shapes opt-6.7b,opt-13b --precisions fp16,int4 \
        --batches 1,8,32,128 --spec-batches 16,32,64 --flexgen --json out.json [--plot frontier.png]

Every decoder layer streams from pinned host memory (FlexGen: ``--percent 0 100 100 0 100 0``, all
weights on the CPU; here a reserve of the globals and the ring only), random weights at the shapes
(FlexGen: ``--path _DUMMY_``), prompts of 64 tokens, 32 new tokens each, fp16 compute; int4 is NF4
here and FlexGen's group-64 4-bit (``--compress-weight``). For each batch size B: B requests join at
once; the first step reads every prompt (FlexGen's prefill), then the decode throughput is the
tokens after each request's first over the seconds after the prefill (FlexGen's "decode
throughput"), and per request its own tokens after the first over the seconds until it finished.

``--spec-batches``: the same with token-tree speculation, an SSM that agrees with the LLM (the
agreeing pair of bench_auto_budget.py: the SSM is the LLM's first layers, the LLM's later layers
barely move the residual stream), tree budget ``--budget`` per request.
``--device cpu --shapes tiny`` runs the whole flow at a tiny shape (a check of the script, no figures).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import CODEC, SHAPES, agreeing_pair, build  # noqa: E402

SHAPES = {**SHAPES, "tiny": dict(model_type="opt", vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=4,
                                 num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)}


def all_streamed_reserve(shape: str, precision: str, dtype: torch.dtype) -> int:
    """A reserve that holds the globals and the ring only: every layer streams, as in FlexGen's setting."""
    from offload_infer.models import config_from_dict
    from offload_infer.offload import make_plan

    p = make_plan(config_from_dict(SHAPES[shape]), dtype, 1 << 40, CODEC[precision])
    return p.global_bytes + 2 * p.packed_layer_bytes


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_batch(llm, ssms, tree, batch: int, prompt_len: int, new: int, device: str, seed: int = 0) -> dict:
    """B requests at once: decode tokens/s over the batch and per request (FlexGen's definitions)."""
    from offload_infer.engine import Engine
    from offload_infer.sampling import SamplingParams

    per_tree = 1 + tree.budget * len(ssms) if ssms else 1
    engine = Engine(llm, ssms, tree, max_sequence_length=prompt_len + new + 1, max_batch_size=batch,
                    max_batch_tokens=max(batch * prompt_len, batch * per_tree))
    gen = torch.Generator().manual_seed(seed)
    vocab = llm.vocab_size
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    warm = engine.add_request(torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(),
                              SamplingParams(max_new_tokens=4, ignore_eos=True))
    while engine.has_unfinished():  # kernels chosen, drafting graphs captured at batch 1
        engine.step()
    engine.forget(warm)
    for d in engine.drafters:  # capture the batch's drafting graphs before timing
        d.capture_graphs([batch], [256])
    ids = [engine.add_request(torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(), params)
           for _ in range(batch)]
    steps0 = engine.steps
    sync(device)
    t_start = time.perf_counter()
    engine.step()  # every prompt in one pass (max_batch_tokens holds them): each request's first token
    sync(device)
    t0 = time.perf_counter()
    done: dict[int, float] = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.id] = time.perf_counter()
    sync(device)
    t1 = time.perf_counter()
    outs = [engine.sequence(i).output for i in ids]
    assert all(len(o) == new for o in outs), [len(o) for o in outs]
    per_req = [(new - 1) / (done[i] - t0) for i in ids]
    passes = engine.steps - steps0 - 1
    stats = [engine.sequence(i).stats for i in ids]
    return {"batch": batch, "prefill_s": t0 - t_start, "decode_s": t1 - t0,
            "tokens_per_s": batch * (new - 1) / (t1 - t0),
            "per_request_tokens_per_s_median": statistics.median(per_req),
            "per_request_tokens_per_s_min": min(per_req),
            "llm_passes": passes, "tokens_per_pass_per_request": (new - 1) / passes * 1.0,
            "ssm_s_per_pass": statistics.mean(s.ssm_time_s / max(1, s.llm_passes) for s in stats),
            "s_per_pass": (t1 - t0) / passes}


def flexgen(shape: str, compress: bool, batch: int, prompt_len: int, new: int, workdir: str, timeout: int) -> dict:
    name = {"opt-6.7b": "facebook/opt-6.7b", "opt-13b": "facebook/opt-13b"}[shape]
    gbs = min(batch, 32)
    cmd = [sys.executable, "-m", "flexgen.flex_opt", "--model", name, "--path", "_DUMMY_", "--percent", "0", "100",
           "100", "0", "100", "0", "--gpu-batch-size", str(gbs), "--num-gpu-batches", str(batch // gbs),
           "--prompt-len", str(prompt_len), "--gen-len", str(new), "--offload-dir", os.path.join(workdir, "offload")]
    if compress:
        cmd.append("--compress-weight")
    row = {"system": "flexgen", "shape": shape, "precision": "int4" if compress else "fp16", "batch": batch}
    try:
        res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"no result within {timeout} s"}
    m = re.search(r"decode throughput: ([\d.]+)", res.stdout)
    if not m:
        print(res.stdout[-2000:], res.stderr[-2000:], file=sys.stderr)
        return {**row, "error": "no throughput line"}
    tps = float(m.group(1))
    return {**row, "tokens_per_s": tps, "per_request_tokens_per_s_median": tps / batch}


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "tokens_per_s" in r:
            groups.setdefault((r["system"], r["shape"], r["precision"]), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 5))
    for (system, shape, precision), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["batch"])
        ax.plot([r["per_request_tokens_per_s_median"] for r in rs], [r["tokens_per_s"] for r in rs], "o-",
                label=f"{system} {shape} {precision}")
        for r in rs:
            ax.annotate(str(r["batch"]), (r["per_request_tokens_per_s_median"], r["tokens_per_s"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("per-request decode tokens/s (median)")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title("throughput-latency frontier (labels: batch size)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="opt-6.7b,opt-13b")
    ap.add_argument("--precisions", default="fp16,int4")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--spec-batches", default="16,32,64")
    ap.add_argument("--spec-precisions", default="fp16,int4")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--eps", type=float, default=0.05)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--flexgen", action="store_true", help="run FlexGen's throughput mode at the same settings")
    ap.add_argument("--flexgen-timeout", type=int, default=150)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    from offload_infer.speculate import TreeConfig

    dev = args.device
    card = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"device: {card}", flush=True)
    rows: list[dict] = []

    def emit(r: dict) -> None:
        rows.append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": card, "date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}, f,
                          indent=1)

    batches = [int(b) for b in args.batches.split(",") if b]
    spec_batches = [int(b) for b in args.spec_batches.split(",") if b]
    dtype = torch.float16 if dev.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as wd:
        if args.flexgen:
            from bench_peers import _flexgen_tokenizer

            _flexgen_tokenizer(wd)
        for shape in args.shapes.split(","):
            for precision in args.precisions.split(","):
                reserve = all_streamed_reserve(shape, precision, dtype)
                if batches:
                    llm, plan, _ = build(SHAPES[shape], precision, reserve, dtype=dtype, device=dev)
                    print(plan.describe(), flush=True)
                    for b in batches:
                        r = run_batch(llm, [], TreeConfig(), b, args.prompt_len, args.new, dev)
                        emit({"system": "offload-infer", "shape": shape, "precision": precision, **r})
                    del llm
                if spec_batches and precision in args.spec_precisions.split(","):
                    gc.collect()
                    llm, ssm, _ = agreeing_pair(SHAPES[shape], precision, reserve, args.eps, 2, 10.0, dtype, dev)
                    for b in spec_batches:
                        r = run_batch(llm, [ssm], TreeConfig(budget=args.budget), b, args.prompt_len, args.new, dev)
                        emit({"system": "offload-infer+spec", "shape": shape, "precision": precision,
                              "budget": args.budget, **r})
                    del llm, ssm
                gc.collect()
                if dev.startswith("cuda"):
                    torch.cuda.empty_cache()
                if args.flexgen:
                    for b in batches:
                        emit(flexgen(shape, precision == "int4", b, args.prompt_len, args.new, wd,
                                     args.flexgen_timeout))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
