"""Projected end-to-end tokens/s per shape: real acceptance (CPU, the Qwen2.5-Coder 1.5B/0.5B pair)
combined with GPU pass and drafting times measured with random weights at real shapes.

    python tools/project_e2e.py --acceptance benchmarks/cpu_tree_acceptance.json --gpu-dir benchmarks --plots benchmarks

For a best-first tree of budget b:
    step(b)    = t_llm(b + 1) + t_draft(b) - overlap(b)
    t_draft(b) = SSM calls per pass (CPU run, real pair) x one drafting round at budget b (GPU, 0.5B
                 shape: SSM forward replayed from CUDA graphs + the tree bookkeeping around it,
                 tools/bench_e2e.py's draft_round_ms_graphs; --drafting eager takes the eager rounds)
    overlap(b) = min(t_draft(b), 2 ring slots x one streamed layer's copy time)  (prefetch during drafting)
    tokens/s   = tokens per pass (CPU run, real pair) / step(b)
t_llm(n) is interpolated (log-linear in n) from tools/bench_offload.py. For the OPT shapes only the
one-token pass was measured (tools/bench_peers.py); their curve borrows the flatness measured on the
Llama shape of similar size. FlexGen figures are its own batch-1 decode throughput from the same card.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def interp(points: dict[int, float], n: float) -> float:
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]]
    for lo, hi in zip(xs, xs[1:]):
        if n <= hi:
            f = (math.log(n) - math.log(lo)) / (math.log(hi) - math.log(lo))
            return points[lo] + f * (points[hi] - points[lo])
    return points[xs[-1]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acceptance", default="benchmarks/cpu_tree_acceptance.json")
    ap.add_argument("--gpu-dir", default="benchmarks")
    ap.add_argument("--plots", default=None)
    ap.add_argument("--e2e", default="h200_e2e_llama_7b_graphs.json", help="bench_e2e.py output (in --gpu-dir)")
    ap.add_argument("--drafting", choices=("graphs", "eager"), default="graphs")
    args = ap.parse_args()
    gd = Path(args.gpu_dir)
    acc = json.loads(Path(args.acceptance).read_text())["trees"]
    budgets = sorted(int(k.split()[1]) for k in acc if k.startswith("budget ") and k.split()[1].isdigit())
    tpp = {b: acc[f"budget {b}"]["tokens_per_pass"] for b in budgets}
    calls = {b: acc[f"budget {b}"]["ssm_calls_mean"] for b in budgets}

    # pass-time curves: later files (after the prefetch fix, then with compressed resident layers spread
    # between streamed ones, the current default plan) override earlier rows of the same shape/precision
    curves: dict[tuple[str, str], dict[int, float]] = {}
    layer_copy: dict[tuple[str, str], float] = {}
    for name in ("h200_offload_llama_7b_13b.json", "h200_offload_llama_7b_int_after_prefetch_fix.json",
                 "h200_offload_llama_70b_int4.json", "h200_offload_compressed_resident.json"):
        d = json.loads((gd / name).read_text())
        for r in d["rows"]:
            key = (r["shape"], r["precision"])
            if name == "h200_offload_compressed_resident.json" and key in curves and r["tokens"] == 1:
                curves[key] = {}
            curves.setdefault(key, {})[r["tokens"]] = r["pass_s"]
            layer_copy[key] = r["bytes"] / r["streamed_layers"] / r["h2d_bw"] if r["streamed_layers"] else 0.0
    e2e = json.loads((gd / args.e2e).read_text())
    # one drafting round by budget; the running maximum keeps it monotone in the budget (conservative)
    round_s, top = {}, 0.0
    for k, v in sorted((int(k), v) for k, v in e2e[f"draft_round_ms_{args.drafting}"].items()):
        top = max(top, v / 1e3)
        round_s[k] = top
    flexgen, opt_pass = {}, {}
    for name in ("h200_peers_7b.json", "h200_peers_13b.json"):
        for r in json.loads((gd / name).read_text())["rows"]:
            if r["peer"] == "flexgen":
                flexgen[(r["shape"], r["precision"])] = r["tokens_per_s"]
            elif r["peer"] == "offload-infer" and r["shape"].startswith("opt"):
                opt_pass[(r["shape"], r["precision"])] = r["s_per_token"]
    for (shape, prec), t1 in opt_pass.items():
        like = "llama-7b" if "6.7" in shape else "llama-13b"
        base = curves[(like, prec)]
        curves[(shape, prec)] = {n: t1 * base[n] / base[1] for n in base}
        layer_copy[(shape, prec)] = layer_copy[(like, prec)]

    print(f"GPU: NVIDIA H200 (pass and drafting times, random weights; drafting: {args.drafting}); "
          "acceptance: CPU, real Qwen2.5-Coder pair")
    print(f"{'shape':<10} {'prec':<5} {'incr tok/s':>10} " + " ".join(f"{'b=' + str(b):>8}" for b in budgets)
          + f" {'best':>10} {'FlexGen':>8} {'x FlexGen':>9}")
    table = {}
    for (shape, prec), curve in sorted(curves.items()):
        incr = 1 / curve[1]
        row = {}
        for b in budgets:
            draft = calls[b] * interp(round_s, b)
            step = interp(curve, b + 1) + draft - min(draft, 2 * layer_copy[(shape, prec)])
            row[b] = tpp[b] / step
        best = max(row, key=row.get)
        fg = flexgen.get((shape, prec))
        table[(shape, prec)] = row
        print(f"{shape:<10} {prec:<5} {incr:>10.2f} " + " ".join(f"{row[b]:>8.1f}" for b in budgets)
              + f" {row[best]:>7.1f}@{best:<3}" + (f" {fg:>8.2f} {row[best] / fg:>8.1f}x" if fg else ""))
    if args.plots:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(args.plots)
        style = {"fp16": "-", "int8": "--", "int4": ":"}
        colors = dict(zip(sorted({s for s, _ in table}), plt.cm.tab10.colors))

        def plot(series: dict, xlabel: str, ylabel: str, title: str, name: str) -> None:
            """One log-log figure; ``series`` maps (shape, precision) to {x: y}."""
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for (shape, prec), points in sorted(series.items()):
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], marker="o", ls=style[prec], color=colors[shape],
                        label=f"{shape} {prec}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(out / name, dpi=120)

        plot(table, "tree budget (speculated tokens per pass)", "projected tokens/s",
             "Projected tokens/s vs tree budget (H200 times x CPU acceptance)", "tokens_per_s_vs_budget.png")
        plot({k: {n: 1e3 * t for n, t in c.items()} for k, c in curves.items() if k[0].startswith("llama")},
             "tokens in the tree (one LLM pass)", "pass time, ms",
             "Offloaded pass time vs tree size (H200, 4 GiB reserve)", "pass_time_vs_tokens.png")
        print(f"plots written to {out}")


if __name__ == "__main__":
    main()
