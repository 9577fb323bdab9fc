"""``--tree-budget auto``: pick the tree budget that maximises expected tokens per second.

Hardware-aware in Sequoia's sense: the expected tokens per pass of every candidate budget comes from
the SSMs' own probabilities, calibrated online against what the LLM actually accepted, and the cost
of a step (drafting + the LLM pass) is measured per budget as generation proceeds. Candidates not yet
tried get an optimistic estimate (the last measured step time, the last acceptance gain continued),
so each is tried once and then judged on measurements. Expected tokens are moving averages and step
times the lower median of each budget's last few, so the choice follows changes in content (code vs
prose) and carries over between requests. Every ``probe_every``-th
pass tries a neighbour of the best budget (alternately the next smaller and larger), so a step time
measured once under unusual load (or a stale one) is measured again instead of ruling a budget out.
"""

from __future__ import annotations

import math
from collections import deque

from offload_infer.tree import TokenTree

_BINS = 20  # calibration bins over the SSM's conditional probability of a node's token
_SLOW = 0.1  # smoothing of realised tokens per pass (noisy: 1 to depth + 1)


class AutoBudget:
    def __init__(self, max_budget: int, start: int = 16, alpha: float = 0.3, probe_every: int = 8) -> None:
        self.candidates = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if b <= max_budget]
        if max_budget not in self.candidates:
            self.candidates.append(max_budget)
        self.alpha = alpha
        self.probe_every = probe_every
        self._chosen = 0  # passes chosen so far
        self.current = min(start, max_budget)
        self.tokens: dict[int, float] = {}  # budget -> expected tokens per pass (accepted + 1)
        self.seconds: dict[int, float] = {}  # budget -> seconds per step (drafting + LLM pass)
        self._recent: dict[int, deque[float]] = {}  # budget -> its last step times
        # realised vs expected tokens per pass, per budget used (moving averages): the model multiplies
        # per-node acceptances as if independent, but real acceptance runs in streaks (easy stretches
        # of text), so it underestimates deep trees; their ratio corrects it
        self._real: dict[int, float] = {}
        self._model: dict[int, float] = {}
        self.offered = [1.0] * _BINS  # pseudo-counts: a weak prior a(q) = q
        self.accepted = [(i + 0.5) / _BINS for i in range(_BINS)]

    # -- the acceptance model -------------------------------------------------------------------------
    def _a(self, q: float) -> float:
        i = min(_BINS - 1, int(q * _BINS))
        return self.accepted[i] / self.offered[i]

    def expected_tokens(self, tree: TokenTree, budget: int) -> float:
        """1 + expected accepted nodes among the ``budget`` nodes the SSMs rank highest."""
        return self._expected_by_budget(tree, [budget])[budget]

    def _expected_by_budget(self, tree: TokenTree, budgets: list[int]) -> dict[int, float]:
        """``expected_tokens`` for several budgets, ranking the tree's nodes once."""
        n = len(tree)
        cum = [1.0] * n
        for i in range(1, n):
            cum[i] = cum[tree.parents[i]] * tree.q[i]
        ranked = sorted(range(1, n), key=lambda i: (-cum[i], tree.depths[i], i))
        out = {}
        for budget in budgets:
            keep = set(ranked[:budget])
            reach = [0.0] * n  # probability that the path to node i is accepted
            reach[0] = 1.0
            for parent in range(n):
                kids = [c for c in tree.children(parent) if c in keep]
                raw = [self._a(tree.q[c]) for c in kids]
                total = sum(raw)
                scale = 1.0 / total if total > 1.0 else 1.0  # siblings exclude each other
                for c, a in zip(kids, raw):
                    reach[c] = reach[parent] * a * scale
            out[budget] = 1.0 + sum(reach[1:])
        return out

    # -- learning and choosing ------------------------------------------------------------------------
    def observe(self, budget: int, tree: TokenTree, path: list[int], seconds: float | None) -> None:
        """Learn from one pass: acceptance always, the step time unless ``seconds`` is None."""
        on_path = set(path)
        for node in path:
            for c in tree.children(node):
                i = min(_BINS - 1, int(tree.q[c] * _BINS))
                self.offered[i] += 1
                self.accepted[i] += c in on_path
        fitting = [b for b in self.candidates if b <= len(tree) - 1]
        expected = self._expected_by_budget(tree, sorted(set(fitting) | {min(budget, len(tree) - 1)}))
        for b in fitting:
            self._ema(self.tokens, b, expected[b])
        self._ema(self._real, budget, float(len(path)), _SLOW)
        self._ema(self._model, budget, expected[min(budget, len(tree) - 1)], _SLOW)
        if seconds is not None:  # the lower median of the last few: a one-off stall is outvoted at once
            recent = self._recent.setdefault(budget, deque(maxlen=5))
            recent.append(seconds)
            self.seconds[budget] = sorted(recent)[(len(recent) - 1) // 2]

    def _ema(self, table: dict[int, float], key: int, value: float, alpha: float | None = None) -> None:
        a = self.alpha if alpha is None else alpha
        table[key] = value if key not in table else (1 - a) * table[key] + a * value

    def _correction(self, b: int) -> float:
        """Realised / expected tokens at the tried budget nearest to ``b`` (1 before any pass)."""
        if not self._real:
            return 1.0
        k = min(self._real, key=lambda x: (abs(math.log2(x / b)), x))
        return self._real[k] / max(self._model[k], 1e-9)

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

    def _estimate(self, b: int) -> tuple[float, float]:
        sec = self._seconds(b)
        known_e = sorted(self.tokens)
        if b in self.tokens:
            tok = self.tokens[b]
        elif not known_e or b < known_e[0]:
            tok = 1.0 + 0.5 * b / max(1, b)
        else:
            k = max(x for x in known_e if x < b)
            prev = [x for x in known_e if x < k]
            gain = self.tokens[k] - self.tokens[prev[-1]] if prev else 0.5
            tok = self.tokens[k] + max(gain, 0.05) * math.log2(b / k)
        return tok * self._correction(b), sec

    def choose(self) -> int:
        """The budget for the next pass."""
        if not self.seconds:
            return self.current
        best = max(self.candidates, key=lambda b: self._estimate(b)[0] / self._estimate(b)[1])
        self._chosen += 1
        self.current = best
        if self.probe_every and self._chosen % self.probe_every == 0:
            at = self.candidates.index(best)
            side = -1 if (self._chosen // self.probe_every) % 2 else 1
            for i in (at + side, at - side):
                if 0 <= i < len(self.candidates):
                    return self.candidates[i]
        return best
