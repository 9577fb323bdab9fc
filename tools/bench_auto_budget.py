"""``--tree-budget auto`` against every fixed budget on a CUDA GPU, with real offloaded pass times.

    PYTHONPATH=. python tools/bench_auto_budget.py --shape llama-7b --precision int4 --eps 0.02,0.05,0.1 --json auto.json

Random weights give no acceptance with an unrelated SSM, so this builds a pair that agrees by
construction: the LLM is a random model at a real shape, offloaded as usual, whose decoder layers from
``--ssm-layers`` on have their output projections (o_proj, down_proj) scaled by ``eps``; the SSM is the
LLM's own embeddings, first ``--ssm-layers`` layers (dense, resident) and head. The smaller ``eps``,
the more the LLM's later layers leave the SSM's choice alone: ``eps`` sets how much is accepted. The
head is scaled by ``--head-scale`` (both models share it) so the SSM's probabilities are peaked, as a
trained model's are. Every configuration decodes the same prompts greedily; the report gives tokens/s
(total generated tokens over total decoding time, prefill excluded), tokens per pass, the budgets auto
chose, and whether outputs match incremental decoding. The acceptance here is synthetic; the point is
the auto budget's choice against real step times (drafting from CUDA graphs + offloaded passes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))
from random_models import agreeing_pair  # noqa: E402


def decode(llm, ssms, tree, prompts, new: int) -> dict:
    from offload_infer.autobudget import AutoBudget
    from offload_infer.engine import Engine, GenerationStats

    class Fixed(AutoBudget):  # records what every pass of a fixed budget would have given smaller budgets
        def choose(self) -> int:
            return self.current

    engine = Engine(llm, ssms, tree, max_sequence_length=len(prompts[0]) + new + 1)
    record_fixed = engine.auto is None and bool(ssms)
    for d in engine.drafters:
        d.capture_graphs()
    engine_warm = [t for s in engine.generate(prompts[0], 4) for t in s]  # graphs captured, kernels chosen
    assert engine_warm
    if engine.auto is not None:  # forget what the warm-up taught: auto learns on the measured prompts
        engine.auto = AutoBudget(tree.budget)
    elif record_fixed:
        engine.auto = Fixed(tree.budget, start=tree.budget)
    stats, outputs, tokens, seconds = GenerationStats(), [], 0, 0.0
    for p in prompts:
        it = engine.generate(p, new, stats=stats)
        first = next(it)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rest = [t for s in it for t in s]
        torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        tokens += len(rest)
        outputs.append(first + rest)
    d = stats.as_dict()
    passes = len(stats.tokens_per_pass)
    extra = {}
    if record_fixed:  # each pass's tokens for every smaller budget, and its seconds
        extra = {"history": list(engine.auto.history)}
    elif engine.auto is not None:  # what it learned, and each pass's budget, tokens by budget, seconds
        a = engine.auto
        extra = {"estimates": {b: [a.tokens(b), a._seconds(b)] for b in a.candidates},
                 "history": list(a.history)}
        print("auto estimates (tokens, ms):",
              {b: (round(t, 2), round(1e3 * s, 1)) for b, (t, s) in extra["estimates"].items()}, flush=True)
    return {"tokens_per_s": tokens / seconds, "tokens_per_pass": d["tokens_per_pass_mean"],
            "ssm_ms_per_pass": 1e3 * stats.ssm_time_s / passes, "llm_ms_per_pass": 1e3 * stats.llm_time_s / passes,
            "budgets": dict(Counter(stats.budgets)), "outputs": outputs, **extra}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--reserve", default="4G")
    ap.add_argument("--eps", default="0.02,0.05,0.1")
    ap.add_argument("--ssm-layers", type=int, default=2)
    ap.add_argument("--head-scale", type=float, default=10.0)
    ap.add_argument("--budgets", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                    help="compute dtype; float32 keeps the configurations on the same text (fp16 rounding lets it drift)")
    ap.add_argument("--seed", type=int, default=1, help="draws the prompts")
    ap.add_argument("--again", default="", help="fixed budgets to run once more after auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from offload_infer.offload import parse_size
    from offload_infer.speculate import TreeConfig

    budgets = [int(b) for b in args.budgets.split(",")]
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(3, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    res = {"device": torch.cuda.get_device_name(), "shape": args.shape, "precision": args.precision,
           "dtype": args.dtype,
           "ssm_layers": args.ssm_layers, "head_scale": args.head_scale, "new": args.new,
           "prompts": args.prompts, "seed": args.seed, "runs": []}
    print(f"device: {res['device']}; {args.shape} {args.precision}, reserve {args.reserve}; SSM = the LLM's first "
          f"{args.ssm_layers} layers", flush=True)
    for eps in (float(e) for e in args.eps.split(",")):
        llm, ssm, plan = agreeing_pair(args.shape, args.precision, parse_size(args.reserve), eps, args.ssm_layers,
                                       args.head_scale, getattr(torch, args.dtype))
        print(f"\neps {eps}: {plan.describe()}", flush=True)
        ref = decode(llm, [], TreeConfig(), prompts, args.new)
        rows = {"incremental": ref}
        for b in budgets:
            rows[f"budget {b}"] = decode(llm, [ssm], TreeConfig(budget=b, max_depth=16), prompts, args.new)
        rows["auto"] = decode(llm, [ssm], TreeConfig(budget=max(budgets), auto=True, max_depth=16), prompts, args.new)
        for b in (int(x) for x in filter(None, args.again.split(","))):  # does running order matter?
            rows[f"budget {b} again"] = decode(llm, [ssm], TreeConfig(budget=b, max_depth=16), prompts, args.new)
        fixed = {k: r["tokens_per_s"] for k, r in rows.items() if k.startswith("budget") and "again" not in k}
        best = max(fixed, key=fixed.get)
        print(f"{'config':<12} {'tok/s':>7} {'tok/pass':>8} {'ssm ms':>7} {'llm ms':>7} {'same':>5}  budgets chosen")
        for k, r in rows.items():
            same = sum(o == e for o, e in zip(r["outputs"], ref["outputs"]))
            r["identical_to_incremental"] = same
            print(f"{k:<12} {r['tokens_per_s']:>7.2f} {r['tokens_per_pass']:>8.2f} {r['ssm_ms_per_pass']:>7.1f} "
                  f"{r['llm_ms_per_pass']:>7.1f} {same:>2}/{len(prompts)}  "
                  + (str(dict(sorted(r["budgets"].items()))) if k == "auto" else ""), flush=True)
        ratio = rows["auto"]["tokens_per_s"] / fixed[best]
        print(f"auto / best fixed ({best}): {ratio:.3f}", flush=True)
        for r in rows.values():
            r.pop("outputs")
        res["runs"].append({"eps": eps, "rows": rows, "best_fixed": best, "auto_over_best": ratio})
        del llm, ssm
        gc.collect()
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
