"""``--tree-budget auto``: pick the tree budget that maximises tokens per second.

Hardware-aware in Sequoia's sense, learned online from two measurements per pass:

- **Tokens per pass, for every budget up to the one used.** A best-first tree of budget ``b`` is the
  ``b`` nodes the SSMs rank highest, so the tree of a smaller budget ``b'`` is a subset of the one
  just verified, and verification walks the LLM's own tokens down the tree: the smaller tree would have
  accepted exactly the leading nodes of the accepted path that rank among its ``b'``. Each pass
  therefore tells what every smaller budget would have produced on the same text (no model of
  acceptance, no independence assumption; real acceptance comes in streaks that such models miss).
  Content varies (easy and hard stretches), so what is kept is the smallest budget's tokens per pass,
  which every pass measures, and for each larger budget its gain over the next smaller one, measured
  on the passes that covered both: a budget tried during a hard stretch shows a small gain there,
  not a small absolute figure.
- **Seconds per step (drafting + the LLM pass)**, per budget used: the lower median of its last few
  steps, so a one-off stall is outvoted; untried budgets get a line fitted to the measured ones.

Budgets larger than any tried get an optimistic estimate (the last gain per doubling continued), so
they are tried; every ``probe_every``-th pass tries a neighbour of the best budget (alternately the
next smaller and larger), which refreshes stale figures. Token figures are moving averages, so the
choice follows changes in content (code vs prose) and carries over between requests.
"""

from __future__ import annotations

import math
from collections import deque

from offload_infer.tree import TokenTree


_PRIOR_PASSES = 2  # weight, in passes, of the optimistic prior on each doubling's gain
_GAIN_DECAY = 0.05  # per pass: gains average over ~20 passes (the smallest budget's figure, which
# scales every estimate alike and so never changes the choice, follows content faster)


def rank_nodes(tree: TokenTree) -> list[int]:
    """Speculated nodes, most probable first (cumulative SSM probability; ties: shallower, earlier):
    the order in which best-first growth keeps them."""
    cum = [1.0] * len(tree)
    for i in range(1, len(tree)):
        cum[i] = cum[tree.parents[i]] * tree.q[i]
    return sorted(range(1, len(tree)), key=lambda i: (-cum[i], tree.depths[i], i))


def tokens_by_budget(tree: TokenTree, path: list[int], budgets: list[int]) -> dict[int, int]:
    """Tokens the pass would have produced (accepted + 1) had the tree held only its best ``b`` nodes."""
    rank = {node: r for r, node in enumerate(rank_nodes(tree))}
    reach = []  # reach[j]: the fewest best nodes that hold the first j + 1 accepted nodes
    worst = -1
    for node in path[1:]:
        worst = max(worst, rank[node])
        reach.append(worst + 1)
    return {b: 1 + sum(1 for need in reach if need <= b) for b in budgets}


class AutoBudget:
    def __init__(self, max_budget: int, start: int = 16, alpha: float = 0.15, probe_every: int = 8) -> None:
        self.candidates = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if b <= max_budget]
        if max_budget not in self.candidates:
            self.candidates.append(max_budget)
        self.alpha = alpha
        self.probe_every = probe_every
        self._chosen = 0  # passes chosen so far
        self.current = min(start, max_budget)
        self._base: float | None = None  # tokens per pass (accepted + 1) at the smallest candidate
        self._num: dict[int, float] = {}  # budget -> decayed sum of its tokens over the passes covering it
        self._den: dict[int, float] = {}  # budget -> the same passes' tokens at the next smaller candidate
        self.seconds: dict[int, float] = {}  # budget -> seconds per step (drafting + LLM pass)
        self._recent: dict[int, deque[float]] = {}  # budget -> its last step times
        self.history: deque[tuple[int, dict[int, int], float | None]] = deque(maxlen=10000)  # for benchmarks

    def observe(self, budget: int, tree: TokenTree, path: list[int], seconds: float | None) -> None:
        """Learn from one pass: tokens for every budget the tree covers, the step time unless None."""
        covered = [b for b in self.candidates if b <= len(tree) - 1]
        if not covered:
            return
        tokens = tokens_by_budget(tree, path, covered)
        self.history.append((budget, tokens, seconds))
        first = tokens[self.candidates[0]]
        self._base = first if self._base is None else (1 - self.alpha) * self._base + self.alpha * first
        for prev, b in zip(covered, covered[1:]):
            self._num[b] = (1 - _GAIN_DECAY) * self._num.get(b, 0.0) + tokens[b]
            self._den[b] = (1 - _GAIN_DECAY) * self._den.get(b, 0.0) + tokens[prev]
        if seconds is not None:  # the lower median of the last few: a one-off stall is outvoted at once
            recent = self._recent.setdefault(budget, deque(maxlen=5))
            recent.append(seconds)
            self.seconds[budget] = sorted(recent)[(len(recent) - 1) // 2]

    def _seconds(self, b: int) -> float:
        """Measured step time, else a line ``c0 + c1 * b`` fitted to the measurements (one measurement:
        flat above it, proportional below it; both optimistic, so untried budgets get tried)."""
        if b in self.seconds:
            return self.seconds[b]
        if not self.seconds:
            return 1.0
        if len(self.seconds) == 1:
            (b0, t0), = self.seconds.items()
            return t0 if b > b0 else t0 * b / b0
        xs, ys = list(self.seconds), list(self.seconds.values())
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        c1 = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var)
        c0 = max(1e-6, my - c1 * mx)
        return c0 + c1 * b

    def tokens(self, b: int) -> float:
        """Estimated tokens per pass at budget ``b``: the smallest budget's, times the gain of each
        doubling up to ``b``. A doubling's gain is measured, blended with a prior of two passes' weight
        that continues the previous doubling's increase in tokens (optimistic, but only linearly in
        doublings), so a budget seen a few times in a hard stretch is tried again before being ruled out."""
        if self._base is None:
            return 1.5
        t, increase = self._base, 0.5 * self._base
        for prev, c in zip(self.candidates, self.candidates[1:]):
            if c > b:
                break
            prior = 1 + max(increase, 0.05 * t) * math.log2(c / prev) / t
            weight = _PRIOR_PASSES * t  # the next smaller budget's tokens over two passes
            step = (self._num.get(c, 0.0) + prior * weight) / (self._den.get(c, 0.0) + weight)
            increase = t * (step - 1) / math.log2(c / prev)  # tokens gained per doubling
            t *= step
        return t

    def rate(self, b: int) -> float:
        """Estimated tokens per second at budget ``b``."""
        return self.tokens(b) / self._seconds(b)

    def choose(self) -> int:
        """The budget for the next pass."""
        if not self.seconds:
            return self.current
        best = max(self.candidates, key=self.rate)
        self._chosen += 1
        self.current = best
        if self.probe_every and self._chosen % self.probe_every == 0:
            at = self.candidates.index(best)
            side = -1 if (self._chosen // self.probe_every) % 2 else 1
            for i in (at + side, at - side):
                if 0 <= i < len(self.candidates):
                    return self.candidates[i]
        return best
