"""Small speculative models (SSMs) that grow token trees for the LLM to verify.

Each SSM keeps its own KV cache, holding the committed sequence up to and including the tree's root
once it drafts, and a backlog of committed tokens it has not processed yet (the prompt at first, then
accepted tokens that were leaves of its tree and the LLM's bonus token). Two ways to grow a tree:

- ``expansion``: SpecInfer's per-depth widths: each node at depth d-1 gets the SSM's top ``w_d`` tokens.
- ``budget``: best-first (SpecExec/Sequoia) by the estimated probability that the LLM accepts the whole
  path, each node's acceptance learned online from verified trees (calibration.py; the SSM's own
  probability until there are records). Each round expands, in one SSM call, the not-yet-expanded nodes
  among the ``budget`` best so far that score within a factor ``EXPAND_RATIO`` of the best of them (so a
  confident chain grows a level per round without spending the cache on siblings it will outrank), and
  growth stops when all of the best ``budget`` are expanded: the kept set is then exactly the best
  ``budget`` nodes reachable with at most ``branch`` children per node. Depth is bounded by the budget
  alone (a chain of the whole budget is possible), or by ``max_depth`` when set. With measured costs
  (``level_cost``: a round's time over the LLM pass's; ``TreeConfig.weigh_rounds``) growth stops sooner,
  once another round would lower the expected tokens per second.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Generator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from offload_infer.calibration import AcceptanceCalibration
from offload_infer.models import CausalLM, ResidentLayers
from offload_infer.kv_pool import Part, SeqKV
from offload_infer.static_forward import StaticForward, can_use_graphs
from offload_infer.tree import TokenTree


PROCESSED_PER_BUDGET = 4  # best-first growth expands at most this many nodes per node of budget
EXPAND_RATIO = 0.1  # a round expands the candidates scoring at least this fraction of the best candidate


@dataclass(frozen=True)
class TreeConfig:
    budget: int = 16  # speculated nodes per LLM pass (best-first); with auto, the largest budget tried
    auto: bool = False  # choose the budget per pass from measured step times and acceptance (autobudget.py)
    expansion: tuple[int, ...] = ()  # SpecInfer per-depth widths, e.g. (1, 1, 3, 1, 1, 1, 1, 1)
    max_depth: int | None = None  # deepest speculated node (None: as deep as the budget or widths allow)
    branch: int = 8  # children considered per expanded node in best-first growth
    calibrated: bool = True  # best-first ranks by learned acceptance (False: by the SSM's probabilities)
    expand_ratio: float = EXPAND_RATIO  # a round expands candidates scoring this fraction of the best (0: all)
    # best-first growth stops once another drafting round (one SSM forward) would lower the expected tokens
    # per second, by the round's and the LLM pass's measured times (auto always weighs them); False: grow
    # until the budget's best nodes are all expanded, however long that takes
    weigh_rounds: bool = True
    # SSM forwards drafting ahead while the LLM verifies (best-first trees; what lies under the LLM's next
    # token is kept for the next tree): None = on a GPU with a streamed LLM, until its pass is done. Off by
    # default: on the H200 with the Qwen2.5-Coder pair, drafting between the streamed layers made ~5.4
    # rounds ahead and saved ~3.4 a pass, but the pass took as much longer (no tokens/s gained)
    draft_ahead: int | None = 0

    def __post_init__(self) -> None:
        if self.expansion and any(w < 1 for w in self.expansion):
            raise ValueError(f"expansion widths must be >= 1, got {list(self.expansion)}")
        if not self.expansion and self.budget < 1:
            raise ValueError(f"tree budget must be >= 1, got {self.budget}")
        if not 0 <= self.expand_ratio <= 1:
            raise ValueError(f"expand_ratio must be within [0, 1], got {self.expand_ratio}")
        if (self.max_depth is not None and self.max_depth < 1) or self.branch < 1:
            raise ValueError("max_depth and branch must be >= 1")
        if self.draft_ahead is not None and self.draft_ahead < 0:
            raise ValueError(f"draft_ahead must be >= 0, got {self.draft_ahead}")
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
        growth expands little more than its budget (nodes expanded and then outranked); it stops at four
        times, which bounds the SSM's cache."""
        if self.expansion:
            return self.max_nodes
        return PROCESSED_PER_BUDGET * self.budget

    def pending_slots(self) -> int:
        """Pending (speculated) slots of one request in an SSM's cache: the nodes one tree processes, twice
        over when drafting ahead (what was carried from the last pass, then a whole tree's growth)."""
        return self.max_processed() * (1 if self.draft_ahead == 0 or self.expansion else 2)


@dataclass
class DraftState:
    """One request's drafting state in one SSM: its place in the SSM's pool, its backlog (committed
    tokens the SSM has not processed: the prompt at first, then accepted leaves and the bonus token),
    and the tree it last grew."""

    kv: SeqKV
    backlog: list[int] = field(default_factory=list)
    tree: TokenTree = field(default_factory=lambda: TokenTree.root(0))
    slot: dict[int, int] = field(default_factory=dict)  # tree node -> pending slot (nodes the SSM processed)
    anc: Tensor = field(default_factory=lambda: torch.zeros(64, 64, dtype=torch.bool))  # pending slot ->
    # pending slots of its ancestors and itself
    calls: int = 0  # SSM forwards in the last draft (drafting rounds)
    kept: TokenTree | None = None  # the tree it proposed for verification (for calibration)
    growth: "_BestFirst | None" = None  # the last best-first growth, which drafting ahead continues
    ahead: int = 0  # SSM forwards drafting ahead during the last LLM pass
    # drafted ahead and kept for the next tree (empty unless the LLM's next token was drafted ahead): the
    # root (the last committed token, processed by the SSM) and its processed descendants, by their
    # tokens' path from the root -> (pending slot, None for the root; their children's log-probabilities
    # and ids)
    carry: dict[tuple[int, ...], tuple[int | None, list[float], list[int]]] = field(default_factory=dict)
    root: int = 0  # the last committed token when the backlog is empty (it was carried)


@dataclass
class _Forward:
    """What a growing tree asks of the SSM next: tokens after its pending tail, their mask (None:
    causal), how many top children per row it needs, and whether only the last row's are needed."""

    tokens: list[int]
    positions: list[int]
    mask: Tensor | None
    k: int
    last_only: bool = False
    nodes: list[int] = field(default_factory=list)  # the tree nodes it processes (slots recorded for them)


Growth = Generator[_Forward, tuple[list[list[float]], list[list[int]]], TokenTree]


class _BestFirst:
    """One request's best-first growth in one SSM: the tree grown so far (``st.tree``), what the SSM said
    of each expanded node (its top children), and the best ``budget`` nodes. A node carried over from
    drafting ahead (``st.carry``) is expanded from what was kept, without an SSM call."""

    def __init__(self, st: DraftState, cal: AcceptanceCalibration | None, max_depth: int, k: int) -> None:
        self.st, self.cal, self.max_depth, self.k = st, cal, max_depth, k
        self.tree = st.tree
        self.score = self.tree.score  # log of the estimated probability that the LLM accepts the path to each node
        self.expanded: dict[int, tuple[list[float], list[int]]] = {}  # node -> its children's log-probs and ids
        self.top: list[int] = []  # the best `budget` nodes so far
        self.budget = 0
        self.cutoff = -math.inf  # the worst kept node's score once `budget` nodes are kept
        self.path: dict[int, tuple[int, ...]] = {0: ()}  # carried nodes in this tree -> their key in st.carry

    def rank(self, i: int) -> tuple[float, int, int]:
        return (-self.score[i], self.tree.depths[i], i)

    def expand(self, node: int, lps: list[float], toks: list[int]) -> None:
        """Add ``node``'s children the SSM ranked (those that could still enter the best ``budget``)."""
        tree, cal = self.tree, self.cal
        self.expanded[node] = (lps, toks)
        parent_q = None if node == 0 else tree.q[node]
        scored = []
        for lp, t in zip(lps, toks):
            q = math.exp(lp)
            s = math.log(max(cal.estimate(q, parent_q), 1e-30)) if cal is not None else lp
            scored.append((self.score[node] + s, t, q))
        key = self.path.get(node)
        for s, t, q in sorted(scored, reverse=True):  # a node is expanded once: its top-k tokens are new
            if s < self.cutoff:
                break  # below every kept node, and the kept set only gets better: it could never enter
            child = tree.add(t, node, q, s)
            if key is not None and key + (t,) in self.st.carry:
                self.path[child] = key + (t,)

    def apply(self, nodes: list[int], lps_all: list[list[float]], toks_all: list[list[int]]) -> None:
        new = len(self.tree)
        for node, lps, toks in zip(nodes, lps_all, toks_all):
            self.expand(node, lps, toks)
        # nodes only ever join the tree, so one that falls out of the best `budget` never returns
        self.top = heapq.nsmallest(self.budget, self.top + list(range(new, len(self.tree))), key=self.rank)
        if len(self.top) == self.budget:
            self.cutoff = self.score[self.top[-1]]

    def rank_top(self, budget: int) -> None:
        """The best ``budget`` nodes; a budget larger than before (drafting ahead) first brings back the
        children its cutoff left out."""
        if budget > self.budget and self.budget:
            self.cutoff = -math.inf
            for node, (lps, toks) in list(self.expanded.items()):
                self.expand(node, lps, toks)
        self.budget = budget
        self.top = heapq.nsmallest(budget, range(1, len(self.tree)), key=self.rank)
        if len(self.top) == budget:
            self.cutoff = self.score[self.top[-1]]

    def todo(self, ratio: float, limit: int) -> list[int]:
        """The nodes to expand next with one SSM call: the best unexpanded ones (within ``ratio`` of the
        best of them), as many as the SSM's cache of ``limit`` pending nodes still holds. Carried nodes
        among them are expanded first, for free."""
        st, tree = self.st, self.tree
        while True:
            todo = [i for i in self.top if i not in self.expanded and tree.depths[i] < self.max_depth]
            free = [i for i in todo if i in self.path]
            if not free:
                break
            for i in sorted(free):
                slot, lps, toks = st.carry[self.path[i]]
                st.slot[i] = slot  # type: ignore[assignment]
                self.apply([i], [lps], [toks])
        if todo and ratio > 0:  # the best candidates only: the rest wait for a later round, if they stay in the top
            best = max(self.score[i] for i in todo)
            todo = [i for i in todo if self.score[i] >= best + math.log(ratio)]
        room = limit - st.kv.pending
        if len(todo) > room:  # the cache holds no more: the best that fit
            todo = sorted(todo, key=self.rank)[: max(0, room)]
        return sorted(todo)

    def kept(self, budget: int) -> TokenTree:
        """The tree of the best ``budget`` nodes (the proposal)."""
        tree, score = self.tree, self.score
        keep = sorted(heapq.nsmallest(budget, self.top, key=self.rank))
        out = TokenTree.root(tree.tokens[0])
        where = {0: 0}
        for i in keep:  # parents precede children, and a kept node's parent is kept (its score is higher)
            where[i] = out.add(tree.tokens[i], where[tree.parents[i]], tree.q[i], score[i])
        return out


class Drafter:
    """One resident SSM drafting for every running request at once: each SSM forward advances every
    request's tree by one level (one round of best-first or width expansion), all requests' tokens
    flattened into one batched forward over the SSM's KV pool."""

    def __init__(self, model: CausalLM, valid_vocab: int, cfg: TreeConfig, n_blocks: int, block_size: int,
                 static: bool | None = None, fuse: bool | None = None) -> None:
        """``static``: draft at padded fixed shapes (static_forward.py), replayed from CUDA graphs when
        the SSM is resident on a GPU; by default on exactly then. ``fuse``: merge the SSM's q/k/v and
        gate/up projections in place and attend by batched matrix products (``KVPool.matmul_attention``):
        its forward is bound by its kernel count; by default when the SSM is resident on a GPU; never pass
        it for a model that is also the LLM, whose numbers must not change."""
        self.model = model
        fuse = can_use_graphs(model) if fuse is None else fuse
        if fuse:
            fuse_layers(model)
        self.cfg = cfg
        self.pool = model.new_pool(n_blocks, block_size)
        self.pool.matmul_attention = fuse  # likewise: three small kernels rather than one with a tiny grid
        self.valid_vocab = valid_vocab  # ids at or above this are embedding padding: never proposed
        self.calibration = AcceptanceCalibration()
        static = can_use_graphs(model) if static is None else static
        self.static = StaticForward(model, self.pool) if static else None
        self.stream = torch.cuda.Stream(model.device) if model.device.type == "cuda" else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(model.device))  # the pool's zeroing

    @property
    def graphs_captured(self) -> int:
        return self.static.captures if self.static is not None else 0

    def capture_graphs(self, batch_sizes: list[int] = [1], spans: list[int] = [256]) -> None:
        """Capture the drafting graphs of these batch sizes and attention spans now rather than on first
        use, for every per-request token count up to the tree's (no-op without graphs)."""
        if self.static is not None:
            widest = max(self.cfg.expansion) * self.cfg.max_nodes if self.cfg.expansion else self.cfg.budget
            counts = [1 << i for i in range(max(1, widest).bit_length() + 1)]
            self.static.capture(batch_sizes, counts, spans)

    def slots_for(self, llm_slots: int) -> int:
        """Slots a request needs here when it needs ``llm_slots`` in the LLM: its sequence plus the
        most nodes one tree may process."""
        return llm_slots + self.cfg.pending_slots() + 1

    def admit(self, llm_slots: int, committed: list[int]) -> DraftState:
        return DraftState(self.pool.allocate(self.slots_for(llm_slots)), list(committed))

    def release(self, st: DraftState) -> None:
        self.pool.free(st.kv)

    def draft(self, states: list[DraftState], max_depths: list[int], budgets: list[int],
              level_cost: float | None = None) -> list[TokenTree]:
        """Grow one tree per request from its last committed token (the end of its backlog), at most
        ``max_depths[i]`` deep and, growing best-first, of ``budgets[i]`` nodes; one SSM forward per round
        for all requests still growing. ``level_cost``: a drafting round's time over the LLM pass's (auto
        budget measures it); best-first growth then stops once another round would lower the expected
        tokens per second."""
        trees: list[TokenTree | None] = [None] * len(states)
        active: dict[int, tuple[Growth, _Forward]] = {}
        for i, (st, depth, budget) in enumerate(zip(states, max_depths, budgets)):
            root = st.backlog[-1] if st.backlog else st.root
            st.tree, st.slot, st.calls, st.kept, st.growth = TokenTree.root(root), {}, 0, None, None
            if self.cfg.max_depth is not None:
                depth = min(depth, self.cfg.max_depth)
            if depth < 1 or budget < 1:
                trees[i] = TokenTree.root(root)
                continue
            g = self._grow(st, depth, min(budget, self.cfg.budget), level_cost)
            try:
                active[i] = (g, next(g))
            except StopIteration as done:  # grown from what was drafted ahead alone: no SSM call
                trees[i] = st.kept = done.value
        for i, n in self._drive(states, active, finished=trees).items():
            states[i].calls += n
            states[i].kept = trees[i]
        return trees  # type: ignore[return-value]

    def _drive(self, states: list[DraftState], active: dict[int, tuple[Generator, _Forward]],
               finished: list | None = None, rounds: float = math.inf, stop: Callable[[], bool] = lambda: False
               ) -> dict[int, int]:
        """Serve the growths in ``active`` (request index -> generator, its pending ask) one batched SSM
        forward per round, until all are done, ``rounds`` were made or ``stop()``; a finished growth leaves
        ``active`` and its value goes to ``finished[i]``. Returns each request's rounds."""
        g = self._rounds(states, active, finished, rounds, stop)
        while True:
            try:
                next(g)  # each round's results are awaited at once
            except StopIteration as done:
                return done.value

    def _rounds(self, states: list[DraftState], active: dict[int, tuple[Generator, _Forward]],
                finished: list | None, rounds: float, stop: Callable[[], bool]
                ) -> Generator["_Round", None, dict[int, int]]:
        """``_drive``'s loop, yielding each round once its SSM forward is enqueued: the caller resumes it
        when it likes (when the round is ``ready()``, or to wait for it)."""
        made = dict.fromkeys(active, 0)
        while active and max(made.values()) < rounds and not stop():
            order = list(active)
            with self._on_stream():
                r = self._launch([states[i] for i in order], [active[i][1] for i in order])
            yield r
            with self._on_stream():
                results = self._collect(r)
            for i, res in zip(order, results):
                made[i] += 1
                try:
                    active[i] = (active[i][0], active[i][0].send(res))
                except StopIteration as done:
                    if finished is not None:
                        finished[i] = done.value
                    del active[i]
        return made

    def draft_ahead(self, states: list[DraftState], rounds: int, stop: Callable[[], bool] = lambda: False) -> int:
        """While the LLM verifies the trees just drafted, go on growing each request's tree best-first
        beyond what was proposed (the candidates for the LLM's next token, and below them), at most
        ``rounds`` SSM forwards, until ``stop()``. ``commit`` then keeps what lies under the LLM's next
        token for the next tree. Returns the SSM forwards made."""
        run = self.start_ahead(states, rounds, stop)
        return run.finish()

    def start_ahead(self, states: list[DraftState], rounds: int, stop: Callable[[], bool] = lambda: False
                    ) -> "AheadRun":
        """``draft_ahead`` made resumable: ``poll()`` it between other host work (the LLM's layers being
        enqueued), then ``finish()`` it."""
        active: dict[int, tuple[Growth, _Forward]] = {}
        for i, st in enumerate(states):
            st.ahead = 0
            if st.growth is not None and st.kept is not None:
                g = self._extend(st)
                try:
                    active[i] = (g, next(g))
                except StopIteration:
                    pass
        return AheadRun(states, active, self._rounds(states, active, None, rounds, stop))

    def _on_stream(self):
        """The SSM's GPU work runs on a stream of its own, so that it can run beside the LLM's pass."""
        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def _launch(self, states: list[DraftState], asks: list[_Forward]) -> "_Round":
        """Enqueue one batched SSM forward and the transfer of its rows' top children to the host."""
        parts = [Part(st.kv, len(a.tokens), a.mask) for st, a in zip(states, asks)]
        wanted, offset = [], 0
        for a in asks:
            n = len(a.tokens)
            wanted.append(list(range(offset + n - 1, offset + n)) if a.last_only else list(range(offset, offset + n)))
            offset += n
        flat = torch.tensor([r for w in wanted for r in w])
        tokens = torch.tensor([t for a in asks for t in a.tokens])
        positions = torch.tensor([p for a in asks for p in a.positions])
        logits = self.static.forward(parts, tokens, positions, flat) if self.static is not None else None  # [M, V]
        if logits is None:
            batch = self.pool.batch(parts)
            batch.logit_rows = flat.to(self.pool.device)
            logits = self.model.forward_batch(tokens, positions, batch)  # [M, V]
        k = max(a.k for a in asks)
        logp = torch.log_softmax(logits[:, : self.valid_vocab].float(), dim=-1)
        top = torch.topk(logp, min(k, self.valid_vocab), dim=-1)
        # one transfer for every request: ids ride along as floats (exact below 2**24)
        assert self.valid_vocab < 1 << 24, "token ids would not survive the float transfer"
        both = torch.cat([top.values, top.indices.float()], dim=1)  # [M, 2k]
        done = None
        if both.is_cuda:
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            both = host
        return _Round(asks, wanted, both, top.values.shape[1], done)

    @staticmethod
    def _collect(r: "_Round") -> list[tuple[list[list[float]], list[list[int]]]]:
        """Each ask's rows' top children, once the round's forward is done (waits for it)."""
        if r.done is not None:
            r.done.synchronize()
        both, kk = r.top.tolist(), r.k
        values, indices = [x[:kk] for x in both], [[int(t) for t in x[kk:]] for x in both]
        out, row = [], 0
        for a, w in zip(r.asks, r.wanted):
            out.append(([v[: a.k] for v in values[row: row + len(w)]], [t[: a.k] for t in indices[row: row + len(w)]]))
            row += len(w)
        return out

    def _grow(self, st: DraftState, max_depth: int, budget: int, level_cost: float | None = None) -> Growth:
        start = st.kv.length
        k = self.cfg.expansion[0] if self.cfg.expansion else min(self.cfg.branch, budget)
        if st.backlog or () not in st.carry:
            st.carry = {}
            lps, toks = yield _Forward(st.backlog, list(range(start, start + len(st.backlog))), None, k, True)
            st.kv.commit_all()
            st.backlog = []
            lps, toks = lps[0], toks[0]
        else:  # the root was drafted ahead: its children are known
            _, lps, toks = st.carry[()]
        if self.cfg.expansion:
            return (yield from self._grow_by_widths(st, [lps], [toks], max_depth))
        st.growth = _BestFirst(st, self.calibration if self.cfg.calibrated else None, max_depth, k)
        return (yield from self._grow_best_first(st, lps, toks, budget, level_cost))

    def _ask_nodes(self, st: DraftState, nodes: list[int], k: int) -> _Forward:
        """The forward of tree nodes whose ancestors the SSM has processed; records their pending slots."""
        tree, kv = st.tree, st.kv
        past, length = kv.end, kv.length
        n = len(nodes)
        first = past - length  # pending slot of nodes[0]; the root is committed, so it has none
        if first + n > st.anc.shape[0]:
            grown = torch.zeros(2 * (first + n), 2 * (first + n), dtype=torch.bool)
            grown[: st.anc.shape[0], : st.anc.shape[1]] = st.anc
            st.anc = grown
        parent_slots = torch.tensor([st.slot.get(tree.parents[x], -1) for x in nodes])
        rows = torch.zeros(n, st.anc.shape[1], dtype=torch.bool)  # [n, pending slots]: ancestors + self
        has_parent = parent_slots >= 0
        rows[has_parent] = st.anc[parent_slots[has_parent]]
        own = torch.arange(first, first + n)
        rows[torch.arange(n), own] = True
        st.anc[own] = rows
        mask = torch.cat([torch.ones(n, length, dtype=torch.bool), rows[:, : first + n]], dim=1)  # [n, past + n]
        for r, node in enumerate(nodes):
            st.slot[node] = first + r
        root_pos = length - 1
        return _Forward([tree.tokens[x] for x in nodes], [root_pos + tree.depths[x] for x in nodes], mask, k,
                        nodes=list(nodes))

    def _grow_by_widths(self, st: DraftState, lps: list[list[float]], toks: list[list[int]], max_depth: int) -> Growth:
        tree = st.tree
        widths = self.cfg.expansion[:max_depth]
        frontier = [0]
        for d, w in enumerate(widths):
            if d > 0:
                if not frontier:
                    break
                lps, toks = yield self._ask_nodes(st, frontier, w)
            frontier = [tree.add(t, node, math.exp(lp)) for node, lrow, row in zip(frontier, lps, toks)
                        for lp, t in zip(lrow[:w], row[:w])]
        return tree

    def _grow_best_first(self, st: DraftState, root_lps: list[float], root_toks: list[int], budget: int,
                         level_cost: float | None = None) -> Growth:
        g = st.growth
        assert g is not None
        g.expand(0, root_lps, root_toks)
        g.rank_top(budget)
        expected = 1 + sum(math.exp(g.score[i]) for i in g.top)  # tokens the pass yields, by the estimates
        rounds = 1  # SSM forwards so far (the first read the backlog)
        # a whole tree's growth beyond what was carried from drafting ahead (pending already)
        limit = min(self.cfg.pending_slots(), st.kv.pending + self.cfg.max_processed())
        while True:
            todo = g.todo(self.cfg.expand_ratio, limit)
            if not todo:
                break
            lps_all, toks_all = yield self._ask_nodes(st, todo, g.k)
            g.apply(todo, lps_all, toks_all)
            rounds += 1
            if level_cost is not None:
                # tokens/s ~ expected / (1 + rounds x level_cost): another round pays while its gain (taken
                # to be like this one's) is at least expected x level_cost / (1 + rounds x level_cost)
                now = 1 + sum(math.exp(g.score[i]) for i in g.top)
                gain, expected = now - expected, now
                if gain < expected * level_cost / (1 + rounds * level_cost):
                    break
        return g.kept(budget)

    def _extend(self, st: DraftState) -> Generator[_Forward, tuple[list[list[float]], list[list[int]]], None]:
        """Best-first growth continued past the proposed tree (drafting ahead), within the SSM's cache."""
        g = st.growth
        assert g is not None
        g.rank_top(self.cfg.pending_slots())
        while True:
            todo = g.todo(self.cfg.expand_ratio, self.cfg.pending_slots())
            if not todo:
                return
            lps_all, toks_all = yield self._ask_nodes(st, todo, g.k)
            g.apply(todo, lps_all, toks_all)

    def commit(self, items: list[tuple[DraftState, list[int], int]]) -> None:
        """For each (request, accepted tokens, next token): keep the cache entries of the accepted tokens
        this SSM processed and queue the rest; one pool copy for all requests."""
        kept, carried = [], []
        for st, accepted, next_token in items:
            drafted = st.kept is not None
            if drafted and len(st.kept) > 1:  # this step's tree, verified: learn from it
                self.calibration.observe(st.kept, accepted + [next_token])
            st.kept, st.carry = None, {}
            node, slots, i = 0, [], 0
            while i < len(accepted):
                child = st.tree.child(node, accepted[i])
                if child is None or child not in st.slot:
                    break
                slots.append(st.slot[child])
                node, i = child, i + 1
            nxt = st.tree.child(node, next_token) if drafted and i == len(accepted) else None
            if nxt is not None and st.growth is not None and nxt in st.slot and nxt in st.growth.expanded:
                below = self._carry(st, nxt)  # the next token was drafted ahead: keep what lies under it
                kept.append((st.kv, slots + [st.slot[nxt]] + [st.slot[x] for x in below]))
                carried.append((st, len(below)))
                st.backlog, st.root = [], next_token
            else:
                kept.append((st.kv, slots))
                st.backlog = st.backlog + accepted[i:] + [next_token]  # non-empty only if it did not draft
            st.growth = None
        with self._on_stream():  # ordered before the next drafting round reads the pool
            self.pool.commit(kept)
        for st, n in carried:  # the carried nodes stay pending, right after the new root
            st.kv.length -= n
            st.kv.pending = n

    @staticmethod
    def _carry(st: DraftState, root: int) -> list[int]:
        """Set ``st.carry`` (and the pending slots' ancestry) for the tree under ``root``, which becomes the
        last committed token: its processed descendants, in the order of their slots, which ``commit``
        moves right after the root. Returns them."""
        g = st.growth
        assert g is not None
        path = {root: ()}
        below = []
        for x in sorted(st.slot, key=st.slot.__getitem__):  # parents were processed before their children
            parent = st.tree.parents[x]
            if parent in path and x != root:
                path[x] = path[parent] + (st.tree.tokens[x],)
                below.append(x)
        index = {x: j for j, x in enumerate(below)}
        anc = torch.zeros(max(64, 2 * len(below)), max(64, 2 * len(below)), dtype=torch.bool)
        for j, x in enumerate(below):
            parent = st.tree.parents[x]
            if parent != root:
                anc[j] = anc[index[parent]]
            anc[j, j] = True
        st.anc = anc
        st.carry = {(): (None, *g.expanded[root])}
        for x in below:
            st.carry[path[x]] = (index[x], *g.expanded[x])
        return below


@dataclass
class _Round:
    """One SSM forward in flight: the asks it serves, its rows per ask, and its rows' top-k log-probabilities
    and ids (``[M, 2k]``, on the host once ``done`` has happened; None: already)."""

    asks: list[_Forward]
    wanted: list[list[int]]
    top: Tensor
    k: int
    done: torch.cuda.Event | None

    def ready(self) -> bool:
        return self.done is None or self.done.query()


class AheadRun:
    """Drafting ahead in progress (``Drafter.start_ahead``): one round in flight at a time."""

    def __init__(self, states: list[DraftState], active: dict[int, tuple[Growth, _Forward]],
                 rounds: Generator[_Round, None, dict[int, int]]) -> None:
        self.states, self.active, self.rounds = states, active, rounds
        self.current: _Round | None = None
        self.made: dict[int, int] | None = None  # each request's rounds, once over

    def _advance(self) -> None:
        try:
            self.current = next(self.rounds)
        except StopIteration as done:
            self.current, self.made = None, done.value

    def poll(self) -> None:
        """Without waiting: take in the round in flight if it is done, and start the next."""
        if self.made is None and (self.current is None or self.current.ready()):
            self._advance()

    def finish(self) -> int:
        """Go on until ``rounds`` or ``stop()`` (waiting for each round); returns the SSM forwards made."""
        while self.made is None:
            self._advance()
        for i, n in self.made.items():
            self.states[i].ahead = n
        for i, (_, ask) in self.active.items():  # asks left unsent: their nodes were not processed after all
            for x in ask.nodes:
                del self.states[i].slot[x]
        return max(self.made.values(), default=0)


def fuse_layers(model: CausalLM) -> None:
    """Fuse a resident model's projections in place where its family can (``fuse_layer``)."""
    fuse = getattr(model.config, "fuse_layer", None)
    if fuse is not None and isinstance(model.weights.layers, ResidentLayers):
        for _, w in model.weights.layers.layers():
            fuse(w)


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
