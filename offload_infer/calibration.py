"""How often the LLM accepts what an SSM drafts, learned online from verified trees.

A small SSM's probabilities are a poor guide to how far a path will be accepted: along a stretch the
answer copies from the prompt it keeps being right far beyond what 0.9 x 0.9 x ... suggests, while its
guesses among near-ties are accepted less often than their probabilities say. Best-first growth ranks
nodes by the estimated probability that the LLM accepts the whole path, the product of each node's
estimated acceptance given that its parent was accepted.

The estimate for a draft token is keyed by its SSM probability (bucketed) and by its parent (the root, or
a drafted token of low, middle or high SSM probability: a confident parent is often one link of a
copied run). Each key holds acceptance counts from verified trees: for every node whose parent lay on
the accepted path, whether it did too (nodes below a rejected one tell nothing and are not counted).
Before any record the estimate is the SSM's own probability, and records move it away from there:
``(hits + w q) / (trials + w)``. Old records fade (counts halve past ``horizon`` trials), so the
estimate follows the text being written. Verification is untouched: this only shapes trees.
"""

from __future__ import annotations

import bisect

from offload_infer.tree import TokenTree

# upper edges of the SSM-probability buckets (finer near 1, where long runs are decided)
EDGES = (0.01, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0)
PARENT_EDGES = (0.5, 0.9)  # a drafted parent's SSM probability: low / middle / high


class AcceptanceCalibration:
    def __init__(self, prior_weight: float = 4.0, horizon: float = 4096.0) -> None:
        self.prior_weight = prior_weight
        self.horizon = horizon
        n = (len(PARENT_EDGES) + 2) * len(EDGES)
        self.hits = [0.0] * n
        self.trials = [0.0] * n
        self.records = 0  # nodes recorded so far

    @staticmethod
    def key(q: float, parent_q: float | None) -> int:
        """``parent_q``: the parent's SSM probability, None for the root."""
        ctx = 0 if parent_q is None else 1 + bisect.bisect_left(PARENT_EDGES, parent_q)
        return ctx * len(EDGES) + min(len(EDGES) - 1, bisect.bisect_left(EDGES, q))

    def estimate(self, q: float, parent_q: float | None) -> float:
        """Estimated probability that the LLM accepts a draft token of SSM probability ``q`` once its
        parent is accepted."""
        k = self.key(q, parent_q)
        return (self.hits[k] + self.prior_weight * q) / (self.trials[k] + self.prior_weight)

    def record(self, q: float, parent_q: float | None, accepted: bool) -> None:
        k = self.key(q, parent_q)
        if self.trials[k] >= self.horizon:
            self.hits[k] *= 0.5
            self.trials[k] *= 0.5
        self.hits[k] += float(accepted)
        self.trials[k] += 1.0
        self.records += 1

    def observe(self, tree: TokenTree, accepted: list[int]) -> None:
        """Record a verified tree: walk the accepted tokens (and the LLM's next token) down from the
        root; every child of a node on the accepted path is a trial, a hit if it is the next on it."""
        node = 0
        for token in accepted:
            parent_q = None if node == 0 else tree.q[node]
            nxt = tree.child(node, token)
            for c in tree.children(node):
                self.record(tree.q[c], parent_q, c == nxt)
            if nxt is None:
                return
            node = nxt
