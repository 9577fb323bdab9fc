"""The step engine: many requests, one LLM pass per step, token trees kept.

Each ``step()`` admits waiting requests, lets every SSM draft one tree per decoding request (one SSM
forward per tree level for all of them), flattens every running request's tree and every prefill
chunk into a single LLM forward (so each streamed layer crosses PCIe once per step), verifies each
tree, commits each request's caches and reports what each request gained. Generating for one request
is a batch of one: ``generate`` is a loop over ``step()``.

Invariant between steps, per decoding request: the LLM's pool holds every committed token but the
last (the root of the next tree); each SSM holds a prefix of them and queues the rest in its backlog.
Without SSMs the tree is the root alone: plain incremental decoding.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from offload_infer.autobudget import AutoBudget
from offload_infer.kv_pool import Part
from offload_infer.memory import Footprint
from offload_infer.models import CausalLM, ResidentLayers
from offload_infer.sampling import SamplingConfig, SamplingParams, select
from offload_infer.scheduler import Scheduler
from offload_infer.sequence import Sequence, Status, cut_at_stops
from offload_infer.speculate import Drafter, TreeConfig
from offload_infer.stats import GenerationStats, SpeculationCheck
from offload_infer.tree import TokenTree
from offload_infer.verify import verify

BLOCK_SIZE = 16  # KV slots per pool block


def _default_kv_cap(device: torch.device) -> int:
    """Bytes a default KV pool may take: half the free GPU memory, or 4 GiB of host memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 4 << 30


def request_slots(max_sequence_length: int, tree: TreeConfig, n_ssms: int) -> int:
    """LLM KV slots of a request as long as allowed: its sequence, the most nodes one merged tree of
    ``n_ssms`` SSMs speculates, and the bonus token."""
    return max_sequence_length + tree.max_nodes * n_ssms + 1


def ssm_pool_blocks(llm_blocks: int, full: int, tree: TreeConfig) -> int:
    """Blocks of an SSM's KV pool: as many requests of the largest size (``full`` LLM slots) as the LLM's
    pool of ``llm_blocks`` holds, each with room for the nodes a tree processes."""
    return -(-llm_blocks * BLOCK_SIZE * (full + tree.pending_slots() + 1) // full // BLOCK_SIZE) + 1


class PromptTooLongError(ValueError):
    pass


class RequestTooLargeError(ValueError):
    """A request needs more KV slots than the whole pool holds: it could never run."""


@dataclass
class StepOutput:
    """What one request gained in a step."""

    id: int
    new_tokens: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "eos", "stop" (a stop id or string), "length" or "abort" once finished


class Engine:
    """Serves many requests through one LLM (offloaded or resident) and optional SSMs sharing its tokenizer."""

    def __init__(
        self,
        llm: CausalLM,
        ssms: list[CausalLM] | None = None,
        tree: TreeConfig | None = None,
        max_sequence_length: int = 2048,
        eos_ids: set[int] | None = None,
        valid_vocab: int | None = None,
        ssm_static: bool | None = None,
        *,
        max_batch_size: int = 8,
        max_batch_tokens: int = 2048,
        kv_cache_size: int | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> None:
        """``kv_cache_size``: bytes of the LLM's KV pool (default: room for ``max_batch_size`` requests
        of ``max_sequence_length``, within half the free GPU memory or 4 GiB on the CPU); the SSMs' pools hold as many requests. ``detokenize`` turns token
        ids into text, needed for stop strings. ``ssm_static``: draft with padded fixed-shape SSM forwards
        (CUDA graphs on a GPU); default: whenever an SSM is resident on a CUDA device."""
        self.llm = llm
        self.tree_cfg = tree or TreeConfig()
        limit = llm.config.max_position_embeddings
        if max_sequence_length > limit:
            raise ValueError(f"--max-sequence-length {max_sequence_length} exceeds the model's context of {limit}")
        if max_sequence_length < 2:
            raise ValueError(f"max_sequence_length must be >= 2, got {max_sequence_length}")
        self.max_sequence_length = max_sequence_length
        self.eos_ids = frozenset(eos_ids or ())
        self.detokenize = detokenize
        vocab = valid_vocab or llm.vocab_size
        ssms = ssms or []
        self.scheduler = Scheduler(max_batch_size, max_batch_tokens)
        self.spec_nodes = self.tree_cfg.max_nodes * len(ssms)  # most speculated nodes of one merged tree
        full = request_slots(max_sequence_length, self.tree_cfg, len(ssms))
        if kv_cache_size is None:
            n_blocks = max_batch_size * -(-full // BLOCK_SIZE)
            cap = _default_kv_cap(llm.device) // (llm.slot_bytes() * BLOCK_SIZE)
            n_blocks = max(-(-full // BLOCK_SIZE), min(n_blocks, cap))  # at least one request of full length
        else:
            n_blocks = kv_cache_size // (llm.slot_bytes() * BLOCK_SIZE)
            if n_blocks < 1:
                raise ValueError(f"a KV cache of {kv_cache_size} bytes holds less than one block of {BLOCK_SIZE} "
                                 f"tokens ({llm.slot_bytes() * BLOCK_SIZE} bytes)")
        self.pool = llm.new_pool(n_blocks, BLOCK_SIZE)
        self.drafters = []
        # an SSM that is the LLM itself shares its layer source: it cannot draft between the LLM's layers
        self._ssm_is_llm = False
        for m in ssms:
            is_llm = m is llm or getattr(getattr(m, "weights", None), "layers", None) is llm.weights.layers
            self._ssm_is_llm |= is_llm
            self.drafters.append(Drafter(m, vocab, self.tree_cfg, ssm_pool_blocks(n_blocks, full, self.tree_cfg),
                                         BLOCK_SIZE, ssm_static, fuse=False if is_llm else None))
        # measured step costs: auto chooses each pass's budget by them; best-first growth weighs another
        # level's drafting against them (``TreeConfig.weigh_rounds``)
        learn = ssms and not self.tree_cfg.expansion and (self.tree_cfg.auto or self.tree_cfg.weigh_rounds)
        self.costs = AutoBudget(self.tree_cfg.budget) if learn else None
        self.auto = self.costs if self.tree_cfg.auto and ssms else None
        self._ids = itertools.count()
        self._seqs: dict[int, Sequence] = {}
        self.steps = 0  # LLM passes so far
        self.batch_sizes: list[int] = []  # requests in each step's pass
        self.notices: list[str] = []  # things a user should hear once (the CLI prints them)
        self.footprint: Footprint | None = None  # the memory pre-flight's figures, when a builder made one
        self._spec_check = SpeculationCheck()

    # ---- requests ----------------------------------------------------------------------------------
    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_sequence_length:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens leaves no room to generate within the maximum sequence "
                f"length of {self.max_sequence_length} tokens"
            )
        vocab = self.llm.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab}")

    def validate(self, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> tuple[int, int]:
        """Check a request without queuing it (raises ValueError); returns (tokens it may produce, LLM KV
        slots it reserves)."""
        self.check_prompt(prompt_ids)
        if params.stop and self.detokenize is None:
            raise ValueError("stop strings need an engine built with a tokenizer (detokenize=...)")
        limit = min(params.max_new_tokens, self.max_sequence_length - len(prompt_ids))
        slots = len(prompt_ids) + limit + self.spec_nodes + 1
        for pool, need in self._needs(slots):
            if not pool.blocks.fits_ever(need):
                raise RequestTooLargeError(
                    f"a request of {len(prompt_ids)} prompt tokens and up to {limit} new ones needs {need} KV "
                    f"slots, but the pool holds {pool.blocks.n_blocks * pool.blocks.block_size}: raise "
                    "--kv-cache-size or lower --max-new-tokens")
        return limit, slots

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
                    keep_kv: bool = False) -> int:
        """Queue a request; it joins the batch at a coming step. Returns its id. With ``keep_kv`` its KV
        outlives it (for ``continue_request``) until ``release``."""
        limit, slots = self.validate(prompt_ids, params)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seq = Sequence(next(self._ids), list(prompt_ids), params, limit, slots, stop_ids, keep_kv=keep_kv)
        self._seqs[seq.id] = seq
        self.scheduler.add(seq)
        return seq.id

    def continue_request(self, prev_id: int, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> int:
        """The next turn of a conversation: a request for ``prompt_ids`` (the whole conversation so far)
        that takes over a finished request's kept KV and prefills only what differs from its tokens
        (at least the last token). Its KV is kept again."""
        prev = self._seqs.get(prev_id)
        if prev is None or prev.status != Status.FINISHED or prev.kv is None:
            raise ValueError(f"request {prev_id} has no kept KV to continue from")
        limit, slots = self.validate(prompt_ids, params)
        cached = (prev.prompt + prev.output)[: prev.kv.length]  # what the LLM's cache holds, in order
        common = 0
        for a, b in zip(cached, prompt_ids):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt_ids) - 1)  # the last prompt token is run for its logits
        for pool, need in self._needs(slots):
            held = prev.kv if pool is self.pool else prev.drafts[[d.pool for d in self.drafters].index(pool)].kv
            if not pool.can_extend(held, need):
                raise RequestTooLargeError(f"the KV pool has no room to continue this conversation ({need} slots)")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        seq = Sequence(next(self._ids), list(prompt_ids), params, limit, slots, stop_ids, keep_kv=True)
        seq.kv, seq.drafts, prev.kv, prev.drafts = prev.kv, prev.drafts, None, []
        seq.kv.length, seq.kv.pending, seq.prefilled = common, 0, common
        self.pool.extend(seq.kv, slots)
        for d, st in zip(self.drafters, seq.drafts):
            st.kv.length, st.kv.pending, st.carry = min(st.kv.length, common), 0, {}
            st.backlog = list(prompt_ids[st.kv.length:])
            d.pool.extend(st.kv, d.slots_for(slots))
        self.forget(prev_id)
        self._seqs[seq.id] = seq
        self.scheduler.add(seq)
        return seq.id

    def release(self, seq_id: int) -> None:
        """Free a finished request's kept KV and forget it."""
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.status == Status.FINISHED:
            seq.keep_kv = False
            self._free(seq)
            del self._seqs[seq_id]

    def _needs(self, llm_slots: int) -> list:
        return [(self.pool, llm_slots)] + [(d.pool, d.slots_for(llm_slots)) for d in self.drafters]

    def abort(self, seq_id: int) -> bool:
        """Stop a request now and free its KV; False if it is unknown or already finished."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.status == Status.FINISHED or self.scheduler.remove(seq_id) is None:
            return False
        self._finish(seq, "abort")
        return True

    def sequence(self, seq_id: int) -> Sequence:
        return self._seqs[seq_id]

    def forget(self, seq_id: int) -> None:
        """Drop a finished request's record (a kept KV stays kept: ``release`` frees it)."""
        seq = self._seqs.get(seq_id)
        if seq is not None and seq.status == Status.FINISHED and seq.kv is None:
            del self._seqs[seq_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.unfinished > 0

    def _allocate(self, seq: Sequence) -> bool:
        """Give a request its KV in every pool, if every pool has room (a continued one holds it already)."""
        if seq.kv is not None:
            return True
        if not all(pool.blocks.can_allocate(need) for pool, need in self._needs(seq.llm_slots)):
            return False
        seq.kv = self.pool.allocate(seq.llm_slots)
        seq.drafts = [d.admit(seq.llm_slots, seq.prompt) for d in self.drafters]
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if not seq.keep_kv:
            self._free(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.kv is not None:
            self.pool.free(seq.kv)
            seq.kv = None
        for d, st in zip(self.drafters, seq.drafts):
            d.release(st)
        seq.drafts = []

    # ---- one step ----------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One LLM pass for every running request; returns each request's new tokens and whether it ended."""
        self.scheduler.admit(self._allocate)
        if not self.scheduler.running:
            if self.scheduler.waiting:
                raise AssertionError("nothing runs although requests wait: the pool cannot hold the first")
            return []
        budget = (self.auto.choose() if self.auto else self.tree_cfg.budget) if self.drafters else 0
        want = 1 + (self.spec_nodes if self.tree_cfg.expansion else len(self.drafters) * budget)
        plan = self.scheduler.schedule(want)
        room = (plan.tree_tokens - 1) // max(1, len(self.drafters))  # speculated nodes per SSM that fit
        if self.tree_cfg.expansion:
            budget = budget if room * len(self.drafters) >= self.spec_nodes else 0
        else:
            budget = min(budget, room)

        self.llm.weights.layers.prefetch()  # the first streamed layers load while the SSMs draft
        t0 = time.perf_counter()
        trees = [TokenTree.root(s.root) for s in plan.decode]
        depths = [s.limit - len(s.output) - 1 for s in plan.decode]  # the bonus token takes the last place
        captured = sum(d.graphs_captured for d in self.drafters)
        for s in plan.decode:  # a step without drafting makes no SSM calls
            for st in s.drafts:
                st.calls = 0
        if budget > 0 and plan.decode:
            for j, d in enumerate(self.drafters):
                grown = d.draft([s.drafts[j] for s in plan.decode], depths, [budget] * len(plan.decode),
                                level_cost=self.costs.level_cost(budget) if self.costs else None)
                for tree, g in zip(trees, grown):
                    tree.merge(g)
        t1 = time.perf_counter()

        parts, tokens, positions, rows = [], [], [], []
        offset = 0
        for s, tree in zip(plan.decode, trees):
            past = s.kv.end
            parts.append(Part(s.kv, len(tree), ancestors=None if len(tree) == 1 else tree.ancestor_mask()))
            tokens.append(tree.token_tensor())
            positions.append(past + tree.depth_tensor())
            rows.append(torch.arange(offset, offset + len(tree)))
            offset += len(tree)
        for s, n in plan.prefill:
            parts.append(Part(s.kv, n))
            tokens.append(torch.tensor(s.prompt[s.prefilled: s.prefilled + n]))
            positions.append(torch.arange(s.prefilled, s.prefilled + n))
            if s.prefilled + n == len(s.prompt):
                rows.append(torch.tensor([offset + n - 1]))  # the prompt's last token gives the first output
            offset += n
        batch = self.pool.batch(parts)
        batch.logit_rows = torch.cat(rows).to(self.pool.device) if rows else torch.zeros(0, dtype=torch.long).to(
            self.pool.device)
        try:
            logits = self._llm_pass(torch.cat(tokens), torch.cat(positions), batch, plan.decode, budget)  # [M, V]
        except BaseException:
            for p in parts:
                p.seq.pending -= p.n
            raise
        self.steps += 1
        self.batch_sizes.append(len(parts))

        fresh = sum(d.graphs_captured for d in self.drafters) > captured  # a one-time cost: not timed
        outputs = self._verify_and_commit(plan.decode, trees, logits, budget, depths, t0, t1, not fresh)
        row = sum(len(t) for t in trees)
        self.pool.commit([(s.kv, list(range(n))) for s, n in plan.prefill])
        for s, n in plan.prefill:
            s.prefilled += n
            s.stats.llm_passes += 1
            if s.prefilled == len(s.prompt):
                s.root = select(logits[row], s.params.sampling, s.generator, set(s.prompt))
                row += 1
                s.first_token_s = time.perf_counter() - s.arrival
                for st in s.drafts:
                    st.backlog.append(s.root)
                outputs.append(self._emit(s, [s.root]))
        t2 = time.perf_counter()
        for s in plan.decode:
            s.stats.ssm_time_s += t1 - t0
            s.stats.llm_time_s += t2 - t1
        for s, _ in plan.prefill:
            s.stats.llm_time_s += t2 - t1
        if self.auto and plan.decode and budget == 0 and not plan.prefill:
            self.auto.observe_plain(t2 - t0)
        if budget > 0 and plan.decode and not plan.prefill:
            notice = self._spec_check.observe(sum(len(o.new_tokens) for o in outputs), len(plan.decode), t2 - t0,
                                              t2 - t1, auto=self.auto is not None)
            if notice:
                self.notices.append(notice)
        return outputs

    def _ahead_rounds(self, decode: list[Sequence], budget: int) -> int:
        """SSM forwards that may draft ahead during this step's LLM pass (0: none; see ``_llm_pass``)."""
        rounds = self.tree_cfg.draft_ahead
        if budget <= 0 or not decode or self.tree_cfg.expansion or rounds == 0:
            return 0
        if rounds is None:  # by default only where the pass leaves the GPU idle: streamed layers
            if (self.llm.device.type != "cuda" or isinstance(self.llm.weights.layers, ResidentLayers)
                    or self._ssm_is_llm or any(d.stream is None for d in self.drafters)):
                return 0
            rounds = self.tree_cfg.max_processed()
        return rounds

    def _llm_pass(self, tokens: torch.Tensor, positions: torch.Tensor, batch, decode: list[Sequence],
                  budget: int) -> torch.Tensor:
        """The LLM's forward of this step (logits ``[M, V]``). When drafting ahead, the SSMs go on growing
        the trees it verifies meanwhile, on their own streams: what lies under the LLM's next token is
        kept for the next tree, so the next drafting starts part grown (speculate.py,
        ``Drafter.draft_ahead``). Enqueuing a streamed pass keeps the host busy for about half of the
        pass, so drafting does not wait for it: between two layers, while the layer copies already
        issued keep the copy engine busy, the SSMs' round in flight is taken in and the next one
        started (``between``); once the pass is enqueued they draft until it is done."""
        rounds = self._ahead_rounds(decode, budget)
        if not rounds:
            return self.llm.forward_batch(tokens, positions, batch)
        layers = self.llm.weights.layers
        gpu = self.llm.device.type == "cuda"
        done: list[torch.cuda.Event] = []  # recorded once the pass is enqueued
        # on a GPU, draft until the pass is done; elsewhere (tests) exactly ``rounds``, between its layers
        stop = (lambda: bool(done) and done[0].query()) if gpu else (lambda: False)
        runs = [d.start_ahead([s.drafts[j] for s in decode], rounds, stop) for j, d in enumerate(self.drafters)]
        busy = getattr(layers, "copies_in_flight", lambda: True)

        def between() -> None:
            if busy():  # the LLM's copies come first: draft only while they cannot run dry
                with torch.inference_mode(False):  # the drafting state outlives the LLM's forward
                    for r in runs:
                        r.poll()

        shared = self._ssm_is_llm  # an SSM that is the LLM itself drafts after the pass, not inside it
        if not shared:
            layers.between = between
        try:
            logits = self.llm.forward_batch(tokens, positions, batch)
        finally:
            if not shared:
                layers.between = None
        if gpu:
            done.append(torch.cuda.Event())
            done[0].record()
        for r in runs:
            r.finish()
        for s in decode:
            s.stats.ahead_calls.append(sum(st.ahead for st in s.drafts))
        return logits

    def _verify_and_commit(self, decode: list[Sequence], trees: list[TokenTree], logits: torch.Tensor, budget: int,
                           depths: list[int], t0: float, t1: float, timed: bool) -> list[StepOutput]:
        if not decode:
            return []
        n = sum(len(t) for t in trees)
        greedy_choice = logits[:n].argmax(-1).tolist()  # one transfer for every greedy request
        host = logits[:n].cpu() if any(not s.params.sampling.greedy for s in decode) else None
        gained, llm_commits = [], []
        per_ssm: list[list] = [[] for _ in self.drafters]
        row = 0
        t2 = time.perf_counter()
        for s, tree, depth in zip(decode, trees, depths):
            sampling = s.params.sampling
            span = slice(row, row + len(tree))
            if sampling.repetition_penalty != 1.0:
                rows = host[span] if host is not None else logits[span]
                path, nxt = verify(tree, rows, sampling, s.generator, seen=set(s.prompt) | set(s.output))
            elif sampling.greedy:
                path, nxt = verify(tree, None, sampling, choice=greedy_choice[span])
            else:
                path, nxt = verify(tree, host[span], sampling, s.generator)
            row += len(tree)
            llm_commits.append((s.kv, path))
            accepted = [tree.tokens[i] for i in path[1:]]
            for j in range(len(self.drafters)):
                per_ssm[j].append((s.drafts[j], accepted, nxt))
            s.stats.llm_passes += 1
            if self.drafters:
                s.stats.budgets.append(budget)
                s.stats.ssm_calls.append(sum(st.calls for st in s.drafts))
            if self.costs and budget > 0 and depth >= 1:
                # one timed record per step (the step's time is shared); a request's first drafting
                # forwards its whole prompt through the SSMs, a one-time cost
                first = len(s.output) == 1
                self.costs.observe(budget, tree, path, t2 - t0, t1 - t0, timed=timed and not first)
                timed = False
            s.root = nxt
            gained.append((s, accepted + [nxt], tree, path))
        self.pool.commit(llm_commits)
        for d, items in zip(self.drafters, per_ssm):
            d.commit(items)
        return [self._emit(s, new, tree, path) for s, new, tree, path in gained]

    def _emit(self, s: Sequence, new: list[int], tree: TokenTree | None = None, path: list[int] | None = None
              ) -> StepOutput:
        """Append ``new`` to the request's output, cut at a stop token, a stop string or its limit."""
        new, reason = cut_at_stops(s, new, self.detokenize)
        if tree is not None:
            s.stats.record(tree, path, len(new))
        s.output.extend(new)
        if reason is not None:
            self.scheduler.remove(s.id)
            self._finish(s, reason)
        return StepOutput(s.id, new, reason is not None, reason)

    # ---- one request -------------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[list[int]]:
        """Yields the tokens each LLM pass produces for one request, stopping at EOS (yielded),
        ``max_new_tokens`` or the maximum sequence length: a batch of one over ``step()``."""
        self.check_prompt(prompt_ids)
        if max_new_tokens < 1:
            return
        params = SamplingParams(max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p, seed)
        sid = self.add_request(prompt_ids, params)
        seq = self._seqs[sid]
        if stats is not None:
            seq.stats = stats
        try:
            while seq.status != Status.FINISHED:
                for out in self.step():
                    if out.id == sid and out.new_tokens:
                        yield out.new_tokens
        finally:
            if seq.status != Status.FINISHED:
                self.abort(sid)
            self.forget(sid)
