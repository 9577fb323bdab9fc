"""Token trees as parallel arrays (tokens, parent, depth) and their attention masks.

Node 0 is the root: the last committed token, which no model has processed yet. Every other node is
a speculated continuation of its parent. Children always come after their parents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    depths: list[int] = field(default_factory=lambda: [0])
    q: list[float] = field(default_factory=lambda: [1.0])  # drafting SSM's probability of each token given its parent
    # the drafter's ranking score of each node (log of the estimated probability that the LLM accepts the
    # path to it; by default the cumulative log q): best-first growth kept the highest
    score: list[float] = field(default_factory=lambda: [0.0])
    _children: list[dict[int, int]] = field(default_factory=lambda: [{}])

    @classmethod
    def root(cls, token: int) -> "TokenTree":
        return cls([token])

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, q: float = 1.0, score: float | None = None) -> int:
        """Add a child of ``parent``; an existing child with the same token is returned, not duplicated
        (it keeps the better of the two scores)."""
        if score is None:
            score = self.score[parent] + (math.log(q) if q > 0 else -math.inf)
        existing = self._children[parent].get(token)
        if existing is not None:
            self.score[existing] = max(self.score[existing], score)
            return existing
        i = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.q.append(q)
        self.score.append(score)
        self._children.append({})
        self._children[parent][token] = i
        return i

    def child(self, node: int, token: int) -> int | None:
        return self._children[node].get(token)

    def children(self, node: int) -> list[int]:
        return list(self._children[node].values())

    def path(self, node: int) -> list[int]:
        """Node indices from the root to ``node``."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def merge(self, other: "TokenTree") -> None:
        """Add every path of ``other`` (same root token), each distinct path once."""
        assert other.tokens[0] == self.tokens[0], "trees with different roots"
        where = [0]
        for i in range(1, len(other)):
            where.append(self.add(other.tokens[i], where[other.parents[i]], other.q[i], other.score[i]))

    def token_tensor(self) -> Tensor:
        return torch.tensor(self.tokens, dtype=torch.long)

    def depth_tensor(self) -> Tensor:
        return torch.tensor(self.depths, dtype=torch.long)

    def parent_tensor(self) -> Tensor:
        return torch.tensor(self.parents, dtype=torch.long)

    def ancestor_mask(self) -> Tensor:
        """``[T, T]`` bool: node i sees node j iff j is i or one of its ancestors."""
        n = len(self)
        bits = [0] * n  # bit j of bits[i]: node j is i or an ancestor of i (parents come first)
        for i in range(n):
            bits[i] = (bits[self.parents[i]] if i else 0) | (1 << i)
        packed = torch.tensor([[(b >> (8 * k)) & 0xFF for k in range((n + 7) // 8)] for b in bits], dtype=torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8)
        return ((packed[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :n]  # [T, T]

    def attention_mask(self, past: int) -> Tensor:
        """``[T, past + T]``: every node sees the committed prefix and its own ancestors."""
        return torch.cat([torch.ones(len(self), past, dtype=torch.bool), self.ancestor_mask()], dim=1)
