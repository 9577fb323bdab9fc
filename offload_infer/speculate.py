"""Small speculative models (SSMs) that grow token trees for the LLM to verify.

Each SSM keeps its own KV cache, holding the committed sequence up to and including the tree's root
once it drafts, and a backlog of committed tokens it has not processed yet (the prompt at first, then
accepted tokens that were leaves of its tree and the LLM's bonus token). Two ways to grow a tree:

- ``expansion``: SpecInfer's per-depth widths: each node at depth d-1 gets the SSM's top ``w_d`` tokens.
- ``budget``: best-first by cumulative SSM probability (SpecExec/Sequoia): each round expands, in one
  SSM call, every not-yet-expanded node among the ``budget`` most probable so far, and stops when all
  of them are expanded (the kept set is then exactly the best ``budget`` nodes reachable with at most
  ``branch`` children per node) or the depth limit is hit.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from offload_infer.models import CausalLM
from offload_infer.models.attention import causal_mask
from offload_infer.static_forward import BUCKETS, StaticForward, can_use_graphs
from offload_infer.tree import TokenTree


PROCESSED_PER_BUDGET = 4  # best-first growth expands at most this many nodes per node of budget


@dataclass(frozen=True)
class TreeConfig:
    budget: int = 16  # speculated nodes per LLM pass (best-first); with auto, the largest budget tried
    auto: bool = False  # choose the budget per pass from measured step times and acceptance (autobudget.py)
    expansion: tuple[int, ...] = ()  # SpecInfer per-depth widths, e.g. (1, 1, 3, 1, 1, 1, 1, 1)
    max_depth: int = 16  # deepest speculated node in best-first growth
    branch: int = 8  # children considered per expanded node in best-first growth

    def __post_init__(self) -> None:
        if self.expansion and any(w < 1 for w in self.expansion):
            raise ValueError(f"expansion widths must be >= 1, got {list(self.expansion)}")
        if not self.expansion and self.budget < 1:
            raise ValueError(f"tree budget must be >= 1, got {self.budget}")
        if self.max_depth < 1 or self.branch < 1:
            raise ValueError("max_depth and branch must be >= 1")
        if self.auto and self.expansion:
            raise ValueError("an automatic tree budget applies to best-first growth, not to expansion widths")

    @property
    def max_nodes(self) -> int:
        """Most speculated nodes one SSM can propose (root excluded)."""
        if self.expansion:
            return sum(math.prod(self.expansion[: d + 1]) for d in range(len(self.expansion)))
        return self.budget

    def max_processed(self) -> int:
        """Most nodes one SSM may process in one tree (sizes its cache beyond the sequence). Best-first
        growth expands about twice its budget (nodes expanded and then outranked); it stops at four times
        (rarely reached), which bounds the SSM's cache (budget x max_depth would be 4K slots at 256)."""
        if self.expansion:
            return self.max_nodes
        return min(self.budget * self.max_depth, PROCESSED_PER_BUDGET * self.budget)


class Drafter:
    """One resident SSM: its cache, its backlog and the tree it last grew.

    ``static`` runs its forwards at padded fixed shapes (static_forward.py), replayed from CUDA graphs
    when the SSM is resident on a GPU; by default it is on exactly then.
    """

    def __init__(
        self, model: CausalLM, max_len: int, valid_vocab: int, cfg: TreeConfig, static: bool | None = None
    ) -> None:
        self.model = model
        self.cfg = cfg
        static = can_use_graphs(model) if static is None else static
        pad = max(BUCKETS) if static else 0  # room for the padding rows of the largest bucket
        self.cache = model.new_cache(max_len + cfg.max_processed() + 1 + pad)
        self.static = StaticForward(model, self.cache) if static else None
        self.valid_vocab = valid_vocab  # ids at or above this are embedding padding: never proposed
        self.backlog: list[int] = []
        self._tree = TokenTree.root(0)
        self._slot: dict[int, int] = {}  # tree node -> pending cache slot (nodes the SSM processed)
        self._anc = torch.zeros(64, 64, dtype=torch.bool)  # pending slot -> pending slots of its ancestors + itself
        self.calls = 0  # SSM forwards in the last draft (drafting rounds)

    @property
    def graphs_captured(self) -> int:
        return self.static.captures if self.static is not None else 0

    def capture_graphs(self) -> None:
        """Capture every drafting size's CUDA graph now rather than on first use (no-op without graphs)."""
        if self.static is not None:
            self.static.capture_all()

    def reset(self, committed: list[int]) -> None:
        self.cache.reset()
        self.backlog = list(committed)

    def _children(self, logits: Tensor, k: int) -> tuple[list[float], list[int]]:
        logp = torch.log_softmax(logits[..., : self.valid_vocab].float(), dim=-1)
        top = torch.topk(logp, min(k, self.valid_vocab), dim=-1)
        return top.values.tolist(), top.indices.tolist()

    def _forward_nodes(self, nodes: list[int]) -> Tensor:
        """SSM logits ``[len(nodes), V]`` for tree nodes whose ancestors it has processed."""
        tree, cache = self._tree, self.cache
        past, length = cache.end, cache.length
        n = len(nodes)
        first = past - length  # pending slot of nodes[0]; the root is committed, so it has none
        if first + n > self._anc.shape[0]:
            grown = torch.zeros(2 * (first + n), 2 * (first + n), dtype=torch.bool)
            grown[: self._anc.shape[0], : self._anc.shape[1]] = self._anc
            self._anc = grown
        parent_slots = torch.tensor([self._slot.get(tree.parents[x], -1) for x in nodes])
        rows = torch.zeros(n, self._anc.shape[1], dtype=torch.bool)  # [n, pending slots]: ancestors + self
        has_parent = parent_slots >= 0
        rows[has_parent] = self._anc[parent_slots[has_parent]]
        own = torch.arange(first, first + n)
        rows[torch.arange(n), own] = True
        self._anc[own] = rows
        mask = torch.cat([torch.ones(n, length, dtype=torch.bool), rows[:, : first + n]], dim=1)  # [n, past + n]
        root_pos = length - 1
        tokens = torch.tensor([tree.tokens[x] for x in nodes])
        positions = torch.tensor([root_pos + tree.depths[x] for x in nodes])
        logits = self._forward(tokens, positions, mask)
        self.calls += 1
        for r, node in enumerate(nodes):
            self._slot[node] = first + r
        return logits

    def _forward(self, tokens: Tensor, positions: Tensor, mask: Tensor | None) -> Tensor:
        if self.static is None or tokens.numel() > self.static.max_tokens:
            return self.model.forward(tokens, positions, self.cache, mask)
        if mask is None:
            mask = causal_mask(self.cache.end, tokens.numel(), torch.device("cpu"))
        return self.static.forward(tokens, positions, mask)

    def draft(self, max_depth: int, budget: int | None = None) -> TokenTree:
        """Grow a tree from the last committed token (the end of the backlog), at most ``max_depth`` deep
        and, growing best-first, of ``budget`` nodes (default: the config's)."""
        root = self.backlog[-1]
        self._tree, self._slot, self.calls = TokenTree.root(root), {}, 0
        if max_depth < 1:
            return TokenTree.root(root)
        start = self.cache.length
        chain = torch.tensor(self.backlog)
        root_logits = self._forward(chain, torch.arange(start, start + len(chain)), None)[-1]
        self.calls += 1
        self.cache.commit_all()
        self.backlog = []
        if self.cfg.expansion:
            return self._grow_by_widths(root_logits, max_depth)
        return self._grow_best_first(root_logits, max_depth, min(budget or self.cfg.budget, self.cfg.budget))

    def _grow_by_widths(self, root_logits: Tensor, max_depth: int) -> TokenTree:
        tree = self._tree
        widths = self.cfg.expansion[:max_depth]
        frontier, logits = [0], root_logits[None]
        for d, w in enumerate(widths):
            if d > 0:
                if not frontier:
                    break
                logits = self._forward_nodes(frontier)
            lps, toks = self._children(logits, w)
            frontier = [tree.add(t, node, math.exp(lp)) for node, lrow, row in zip(frontier, lps, toks)
                        for lp, t in zip(lrow, row)]
        return tree

    def _grow_best_first(self, root_logits: Tensor, max_depth: int, budget: int) -> TokenTree:
        tree = self._tree
        k = min(self.cfg.branch, budget)
        logp = [0.0]
        expanded: set[int] = set()

        def add_children(node: int, lps: list[float], toks: list[int]) -> None:
            for lp, t in zip(lps, toks):  # a node is expanded once, its top-k tokens are distinct: all new
                tree.add(t, node, math.exp(lp))
                logp.append(logp[node] + lp)
            assert len(logp) == len(tree)

        def rank(i: int) -> tuple[float, int, int]:
            return (-logp[i], tree.depths[i], i)

        lps, toks = self._children(root_logits, k)
        add_children(0, lps, toks)
        top = sorted(range(1, len(tree)), key=rank)[:budget]  # the best `budget` nodes so far
        limit = self.cfg.max_processed()
        while True:
            todo = sorted(i for i in top if i not in expanded and tree.depths[i] < max_depth)
            if len(expanded) + len(todo) > limit:  # the cache holds no more: the best that fit
                todo = sorted(sorted(todo, key=rank)[: limit - len(expanded)])
            if not todo:
                break
            logits = self._forward_nodes(todo)
            lps_all, toks_all = self._children(logits, k)
            new = len(tree)
            for node, lps, toks in zip(todo, lps_all, toks_all):
                expanded.add(node)
                add_children(node, lps, toks)
            # nodes only ever join the tree, so one that falls out of the best `budget` never returns
            top = heapq.nsmallest(budget, top + list(range(new, len(tree))), key=rank)
        keep = sorted(top)
        out = TokenTree.root(tree.tokens[0])
        where = {0: 0}
        for i in keep:  # parents precede children, and a kept node's parent is kept (its logp is higher)
            where[i] = out.add(tree.tokens[i], where[tree.parents[i]], tree.q[i])
        return out

    def commit(self, accepted: list[int], next_token: int) -> None:
        """Keep the cache entries of the accepted tokens this SSM processed; queue the rest."""
        node, slots, i = 0, [], 0
        while i < len(accepted):
            child = self._tree.child(node, accepted[i])
            if child is None or child not in self._slot:
                break
            slots.append(self._slot[child])
            node, i = child, i + 1
        self.cache.commit(slots)
        self.backlog = self.backlog + accepted[i:] + [next_token]  # non-empty only if it did not draft


class VocabularyMismatchError(ValueError):
    pass


def shared_vocab_size(llm_tokens: list[str], ssm_tokens: list[str], llm_rows: int, ssm_rows: int, name: str) -> int:
    """The number of leading token ids the two models share; raises if their tokenizers differ.

    Token strings are compared id by id; embedding rows past a tokenizer's vocabulary (padding) are
    tolerated, never proposed.
    """
    n = min(len(llm_tokens), len(ssm_tokens))
    if len(llm_tokens) != len(ssm_tokens):
        raise VocabularyMismatchError(
            f"SSM {name} has a vocabulary of {len(ssm_tokens)} tokens, the LLM {len(llm_tokens)}: "
            "speculation needs the same tokenizer"
        )
    for i in range(n):
        if llm_tokens[i] != ssm_tokens[i]:
            raise VocabularyMismatchError(
                f"SSM {name} and the LLM disagree on token {i}: {ssm_tokens[i]!r} vs {llm_tokens[i]!r}; "
                "speculation needs the same tokenizer"
            )
    if n > min(llm_rows, ssm_rows):
        raise VocabularyMismatchError(f"SSM {name}: tokenizer has {n} tokens but the embeddings only "
                                      f"{min(llm_rows, ssm_rows)} rows")
    return n
