"""``--tree-budget auto``: pick the tree budget that maximises tokens per second.

Hardware-aware in Sequoia's sense: expected tokens per pass over expected seconds per step, both
learned online from what each verified pass shows.

- **Tokens per pass, for every budget up to the one used.** A best-first tree of budget ``b`` is the
  ``b`` nodes the SSMs rank highest, so the tree of a smaller budget ``b'`` is a subset of the one
  just verified, and verification walks the LLM's own tokens down the tree: the smaller tree would have
  accepted exactly the leading nodes of the accepted path that rank among its ``b'``. Each pass
  therefore tells what every smaller budget would have produced on the same text (no model of
  acceptance; real acceptance comes in streaks that such models miss). Content varies (easy and hard
  stretches), so what is kept is the smallest budget's figure, which every pass measures, and for each
  larger budget its gain over the next smaller one, measured on the passes that covered both.
- **Seconds per step = the LLM pass + drafting.** The offloaded pass costs about the same whatever the
  tree (the weights' transfer), so it is kept per budget (lower median of the last few: a stall is
  outvoted), made non-decreasing in the budget and interpolated for untried ones. Drafting costs one
  SSM forward per tree level plus a little per node; its two rates are fitted to recent passes, and
  the levels each budget's tree needs come, like the tokens, from every verified tree (the depth of
  its best ``b`` nodes). Drafting time follows content (an easy stretch grows deep trees), so a budget
  is not judged by the stretch it happened to be tried in.

Budgets larger than any tried get an optimistic estimate (the last gain per doubling continued), so
they are tried; every ``probe_every``-th pass tries a neighbour of the best budget (alternately the
next smaller and larger), which refreshes the LLM-pass figures. Figures are moving averages, so the
choice follows changes in content and carries over between requests.
"""

from __future__ import annotations

import math
from collections import deque

from offload_infer.tree import TokenTree


_PRIOR_PASSES = 4  # weight, in passes, of the optimistic prior on each doubling's gain
_GAIN_DECAY = 0.05  # per pass: gains average over ~20 passes
_KEEP, _QUANTILE = 8, 0.25  # a cost is the lower quartile of its last 8 measurements
_INFLATED = 1.25  # a cost this far above a larger budget's had a one-time cost in it


def rank_nodes(tree: TokenTree) -> list[int]:
    """Speculated nodes, best first (the drafter's scores: calibrated acceptance of the path, or the
    cumulative SSM probability; ties: shallower, earlier): the order in which best-first growth keeps them."""
    return sorted(range(1, len(tree)), key=lambda i: (-tree.score[i], tree.depths[i], i))


def depth_by_budget(tree: TokenTree, budgets: list[int]) -> dict[int, int]:
    """Depth of the tree each budget would have grown (its best ``b`` nodes): drafting takes about one
    SSM forward per level."""
    deepest, out = [], 0
    for node in rank_nodes(tree):
        out = max(out, tree.depths[node])
        deepest.append(out)
    return {b: deepest[min(b, len(deepest)) - 1] if deepest else 0 for b in budgets}


def tokens_by_budget(tree: TokenTree, path: list[int], budgets: list[int]) -> dict[int, int]:
    """Tokens the pass would have produced (accepted + 1) had the tree held only its best ``b`` nodes."""
    rank = {node: r for r, node in enumerate(rank_nodes(tree))}
    reach = []  # reach[j]: the fewest best nodes that hold the first j + 1 accepted nodes
    worst = -1
    for node in path[1:]:
        worst = max(worst, rank[node])
        reach.append(worst + 1)
    return {b: 1 + sum(1 for need in reach if need <= b) for b in budgets}


class _PerPass:
    """A per-pass figure known for every budget the tree covers (tokens, drafting levels): the smallest
    budget's moving average times each doubling's gain, averaged over the passes that covered both."""

    def __init__(self, candidates: list[int], alpha: float) -> None:
        self.candidates, self.alpha = candidates, alpha
        self.base: float | None = None
        self._num: dict[int, float] = {}  # budget -> decayed sum of its figure over the passes covering it
        self._den: dict[int, float] = {}  # budget -> the same passes' figure at the next smaller candidate

    def update(self, values: dict[int, float]) -> None:
        covered = [b for b in self.candidates if b in values]
        first = values[self.candidates[0]]
        self.base = first if self.base is None else (1 - self.alpha) * self.base + self.alpha * first
        for prev, b in zip(covered, covered[1:]):
            self._num[b] = (1 - _GAIN_DECAY) * self._num.get(b, 0.0) + values[b]
            self._den[b] = (1 - _GAIN_DECAY) * self._den.get(b, 0.0) + values[prev]

    def at(self, b: int, default: float, optimistic: bool = True) -> float:
        """The figure at budget ``b``. A doubling's gain is measured, blended with a prior of a few passes'
        weight that continues the previous doubling's increase (linearly in doublings), so a budget
        seen a few times in a hard stretch is tried again before being ruled out. Not ``optimistic``:
        measured gains only (a doubling never measured gains nothing)."""
        if self.base is None:
            return default
        t, increase = self.base, 0.5 * self.base
        for prev, c in zip(self.candidates, self.candidates[1:]):
            if c > b:
                break
            prior = 1 + max(increase, 0.05 * t) * math.log2(c / prev) / t
            weight = _PRIOR_PASSES * t if optimistic else 0.0  # the next smaller budget's figure over that many passes
            if weight == 0.0 and not self._den.get(c):
                break
            step = (self._num.get(c, 0.0) + prior * weight) / (self._den.get(c, 0.0) + weight)
            increase = t * (step - 1) / math.log2(c / prev)  # gained per doubling
            t *= step
        return t


class _PerBudget:
    """A cost measured at the budgets used: the lower quartile of each one's last few measurements (a
    stall is outvoted), non-decreasing in the budget (a figure above a larger budget's is capped by it or,
    far above it, was inflated by a one-time cost and is left out until re-measured), linear in the
    budget between measured budgets and, beyond them, flat or continued along the nearest two
    (optimistic where the true curve bends up, so untried budgets get tried; then their own measurement
    replaces the guess)."""

    def __init__(self, proportional_below: bool, extend: bool = True) -> None:
        self.proportional_below = proportional_below  # with one budget measured: else flat below it
        self.extend = extend  # continue the slope beyond the measured budgets, else flat
        self.value: dict[int, float] = {}
        self._recent: dict[int, deque[float]] = {}

    def record(self, b: int, value: float) -> None:
        recent = self._recent.setdefault(b, deque(maxlen=_KEEP))
        recent.append(value)
        self.value[b] = sorted(recent)[int(_QUANTILE * (len(recent) - 1))]

    def at(self, b: int) -> float:
        assert self.value, "nothing measured yet"
        pts, low = [], math.inf
        for c in sorted(self.value, reverse=True):  # a smaller tree never costs more: a figure above a
            if self.value[c] <= _INFLATED * low:  # larger budget's is noise (capped) or, far above it,
                low = min(low, self.value[c])  # inflated by a one-time cost (left out until re-measured)
                pts.append((c, low))
        pts.reverse()
        known = dict(pts)
        if b in known:
            return known[b]
        if len(pts) == 1:  # flat above; below flat or proportional
            (x0, y0), = pts
            return y0 * b / x0 if b < x0 and self.proportional_below else y0
        if b < pts[0][0]:
            if not self.extend:
                return pts[0][1]
            (x0, y0), (x1, y1) = pts[0], pts[1]
        elif b > pts[-1][0]:
            if not self.extend:
                return pts[-1][1]
            (x0, y0), (x1, y1) = pts[-2], pts[-1]
        else:
            i = next(i for i in range(1, len(pts)) if pts[i][0] > b)
            (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return max(y0 + (y1 - y0) * (b - x0) / (x1 - x0), 0.5 * pts[0][1])


class AutoBudget:
    def __init__(self, max_budget: int, start: int = 16, alpha: float = 0.15, probe_every: int = 8) -> None:
        self.candidates = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if b <= max_budget]
        if max_budget not in self.candidates:
            self.candidates.append(max_budget)
        self.probe_every = probe_every
        self._chosen = 0  # passes chosen so far
        self.current = min(start, max_budget)
        self._tokens = _PerPass(self.candidates, alpha)  # tokens per pass (accepted + 1)
        self._levels = _PerPass(self.candidates, alpha)  # SSM forwards per drafting: 1 + the tree's depth
        self._llm = _PerBudget(proportional_below=True)  # seconds per LLM pass
        self._per_level = _PerBudget(proportional_below=False, extend=False)  # drafting s per SSM forward
        self.history: deque[dict] = deque(maxlen=10000)  # what each pass told (for benchmarks)
        self._plain = _PerBudget(proportional_below=False, extend=False)  # seconds per step without drafting
        self._plain_streak = 0  # passes in a row without drafting

    def observe(self, budget: int, tree: TokenTree, path: list[int], seconds: float,
                draft_seconds: float | None = None, timed: bool = True) -> None:
        """Learn from one pass: its step time (drafting + LLM pass; ``draft_seconds`` of it drafting,
        if known), unless ``timed`` is false (a one-time cost was in it), and what every budget the tree
        covers would have produced."""
        covered = [b for b in self.candidates if b <= len(tree) - 1]
        if covered:
            self.learn({"budget": budget, "tokens": tokens_by_budget(tree, path, covered),
                        "depths": depth_by_budget(tree, covered), "nodes": len(tree) - 1,
                        "seconds": seconds, "draft_seconds": draft_seconds, "timed": timed})

    def observe_plain(self, seconds: float) -> None:
        """Learn the time of a step that drafted nothing (budget 0: plain incremental decoding)."""
        self._plain.record(0, seconds)

    def plain_rate(self) -> float:
        """Estimated tokens per second without drafting: one token per LLM pass. Until measured, the
        cheapest LLM pass seen (an offloaded pass costs about the same with or without a tree)."""
        if self._plain.value:
            return 1.0 / self._plain.at(0)
        return 1.0 / min(self._llm.value.values())

    def learn(self, p: dict) -> None:
        """Learn from one pass's record (the dict ``observe`` builds; its keys ascend)."""
        self.history.append(p)
        self._tokens.update(p["tokens"])
        self._levels.update({b: 1 + d for b, d in p["depths"].items()})
        if not p["timed"]:
            return
        b, draft = p["budget"], p["draft_seconds"] or 0.0
        self._llm.record(b, p["seconds"] - draft)
        self._per_level.record(b, draft / (1 + p["depths"].get(b, max(p["depths"].values()))))

    def _seconds(self, b: int) -> float:
        """Estimated seconds per step at budget ``b``: the LLM pass and the drafting."""
        if not self._llm.value:
            return 1.0
        return self._llm.at(b) + self._per_level.at(b) * self._levels.at(b, 1.0)

    def level_cost(self, b: int) -> float | None:
        """One drafting round's time as a fraction of the LLM pass at budget ``b`` (None until measured):
        what best-first growth weighs a deeper level against."""
        if not self._llm.value or not self._per_level.value:
            return None
        return self._per_level.at(b) / self._llm.at(b)

    def tokens(self, b: int, optimistic: bool = True) -> float:
        """Estimated tokens per pass at budget ``b`` (not ``optimistic``: from measured gains alone)."""
        return self._tokens.at(b, 1.5, optimistic)

    def rate(self, b: int, optimistic: bool = True) -> float:
        """Estimated tokens per second at budget ``b``."""
        return self.tokens(b, optimistic) / self._seconds(b)

    def choose(self) -> int:
        """The budget for the next pass; 0 (no drafting) when no budget has shown, in what was measured
        (the optimistic prior left out), a rate above plain decoding's. Without drafting nothing is learnt
        about trees, so every ``probe_every``-th such pass drafts the best budget's tree again."""
        if not self._llm.value:
            return self.current
        best = max(self.candidates, key=self.rate)
        self._chosen += 1
        if self.plain_rate() > max(self.rate(b, optimistic=False) for b in self.candidates):
            self._plain_streak += 1
            if self.probe_every and self._plain_streak % self.probe_every == 0:
                return best
            self.current = 0
            return 0
        self._plain_streak = 0
        self.current = best
        if self.probe_every and self._chosen % self.probe_every == 0:
            at = self.candidates.index(best)
            side = 1 if (self._chosen // self.probe_every) % 2 else -1
            for i in (at + side, at - side):
                if 0 <= i < len(self.candidates):
                    return self.candidates[i]
        return best
