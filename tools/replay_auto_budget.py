"""Replay ``--tree-budget auto`` offline on the passes a GPU run of tools/bench_auto_budget.py recorded.

    python tools/replay_auto_budget.py benchmarks/h100_auto_budget_v5_int4_fp32_eps03.json --seeds 30

bench_auto_budget records, for every fixed budget b, each pass's step and drafting times and the tokens
and tree depth every budget up to b would have had at that point of the text (see offload_infer/autobudget.py). A pass is
keyed by (request, position in the generated text): the tree, and so the tokens, depend only on the
text so far (exactly so in float32, where every configuration decodes the same text). The replay runs
the auto budget's choices against those records: budget b at a position costs the seconds the
fixed-b run spent on its pass at that position (or the nearest one it made in that request) and
yields the tokens recorded there for b. Fixed budgets replayed the same way reproduce their measured
rates, which checks the replay. Prints tokens/s of each and auto / best fixed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from offload_infer.autobudget import AutoBudget  # noqa: E402


class Records:
    """The recorded passes of one bench_auto_budget run, by budget, request and position."""

    def __init__(self, rows: dict, new: int) -> None:
        self.per_request = new - 1  # the first token comes from the prefill
        self.passes: dict[int, dict[int, dict[int, dict]]] = {}  # budget -> request -> position -> record
        self.covered: dict[tuple[int, int], dict] = {}  # (request, position) -> the record covering most
        self.measured: dict[int, float] = {}  # budget -> its tokens/s in the GPU run
        for name, row in rows.items():
            if not name.startswith("budget ") or "again" in name or "history" not in row:
                continue
            b = int(name.split()[1])
            self.measured[b] = row["tokens_per_s"]
            by_req = self.passes.setdefault(b, {})
            for r, q, rec in self._walk(row["history"], b):
                by_req.setdefault(r, {})[q] = rec
                known = self.covered.get((r, q))
                if known is None or len(rec["tokens"]) > len(known["tokens"]):
                    self.covered[(r, q)] = rec
        self.budgets = sorted(self.passes)
        self.requests = len(next(iter(self.passes.values())))
        missing = [c for c in AutoBudget(max(self.budgets)).candidates if c not in self.passes]
        if missing:
            raise SystemExit(f"auto may choose budgets {missing}, which this run did not record; rerun "
                             f"tools/bench_auto_budget.py with them in --budgets")

    def _walk(self, history: list, b: int):
        r, q = 0, 0
        if history and not isinstance(history[0], dict):
            raise SystemExit("this run's history predates per-pass depths and drafting times; rerun "
                             "tools/bench_auto_budget.py to record them")
        for h in history:
            rec = {**h, "tokens": {int(k): v for k, v in h["tokens"].items()},
                   "depths": {int(k): v for k, v in h["depths"].items()}}
            yield r, q, rec
            toks = rec["tokens"]
            q += min(toks.get(b, toks[max(toks)]), self.per_request - q)
            if q >= self.per_request:
                r, q = r + 1, 0

    def step(self, r: int, q: int, b: int, rng: random.Random | None = None) -> dict:
        """The record of a pass at budget b from position q of request r: tokens and depths (for b and
        each smaller budget) from a pass made there, step times from the fixed-b run's pass there or
        nearest (with ``rng``: one of its 5 nearest, at random)."""
        near = sorted(self.passes[b][r], key=lambda x: (abs(x - q), x))
        timing = self.passes[b][r][rng.choice(near[:5]) if rng else near[0]]
        for d in range(self.per_request):  # the nearest position with a record covering b
            for x in (q - d, q + d):
                rec = self.covered.get((r, x))
                if rec is None:
                    continue
                if b in rec["tokens"] or (x == q and max(rec["tokens"]) >= self.per_request - q):
                    keep = [c for c in rec["tokens"] if c <= b]  # (or the tree was cut by the tokens left)
                    return {"budget": b, "tokens": {c: rec["tokens"][c] for c in keep},
                            "depths": {c: rec["depths"][c] for c in keep}, "nodes": min(b, rec["nodes"]),
                            "seconds": timing["seconds"], "draft_seconds": timing["draft_seconds"],
                            "timed": q != 0}  # as the engine: a request's first step is not timed
        raise AssertionError(f"no record covers budget {b}")


def replay(rec: Records, policy, seed: int | None = None) -> tuple[float, Counter]:
    """policy: None for auto, else a fixed budget. Returns tokens/s and the budgets used. With a seed,
    step times are drawn from nearby passes (a different draw of the noise)."""
    rng = random.Random(seed) if seed is not None else None
    auto = AutoBudget(max(rec.budgets)) if policy is None else None
    tokens, seconds, used = 0, 0.0, Counter()
    for r in range(rec.requests):
        q = 0
        while q < rec.per_request:
            b = auto.choose() if auto else policy
            p = rec.step(r, q, b, rng)
            if auto:
                auto.learn(p)
            t = min(p["tokens"][max(p["tokens"])], rec.per_request - q)
            tokens, seconds, q = tokens + t, seconds + p["seconds"], q + t
            used[b] += 1
    return tokens / seconds, used


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json", nargs="+")
    ap.add_argument("--seeds", type=int, default=20, help="replays with step times drawn from nearby passes")
    args = ap.parse_args()
    for path in args.json:
        d = json.load(open(path))
        for run in d["runs"]:
            rec = Records(run["rows"], d["new"])
            print(f"{os.path.basename(path)} ({d['device']}, {d['precision']}, {d.get('dtype', 'float16')}, "
                  f"eps {run['eps']}):")
            fixed = {}
            for b in rec.budgets:
                fixed[b], _ = replay(rec, b)
                print(f"  budget {b:<4} replayed {fixed[b]:7.2f} tok/s (measured {rec.measured[b]:7.2f})")
            rate, used = replay(rec, None)
            best = max(fixed, key=fixed.get)
            print(f"  auto        replayed {rate:7.2f} tok/s, budgets {dict(sorted(used.items()))}")
            print(f"  auto / best fixed ({best}): {rate / fixed[best]:.3f}")
            ratios = []
            for seed in range(args.seeds):
                f = {b: replay(rec, b, seed)[0] for b in rec.budgets}
                ratios.append(replay(rec, None, seed)[0] / max(f.values()))
            if ratios:
                ratios.sort()
                print(f"  {args.seeds} redrawn replays: auto / best fixed median {ratios[len(ratios) // 2]:.3f}, "
                      f"worst {ratios[0]:.3f}")


if __name__ == "__main__":
    main()
