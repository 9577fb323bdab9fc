"""The decoding loop: SSMs grow a token tree, the LLM verifies it in one pass, caches are compacted.

Without SSMs the tree is the root alone, which is plain incremental decoding (one token per pass).
Invariant between passes: the LLM cache holds every committed token but the last (the root of the
next tree); each SSM holds a prefix of them and queues the rest in its backlog.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from offload_infer.autobudget import AutoBudget
from offload_infer.models import CausalLM
from offload_infer.sampling import SamplingConfig, select
from offload_infer.speculate import Drafter, TreeConfig
from offload_infer.tree import TokenTree
from offload_infer.verify import verify


class PromptTooLongError(ValueError):
    pass


@dataclass
class GenerationStats:
    llm_passes: int = 0  # prefill included
    tokens_per_pass: list[int] = field(default_factory=list)  # tokens produced by each decoding pass
    tree_sizes: list[int] = field(default_factory=list)  # speculated nodes per pass (root excluded)
    budgets: list[int] = field(default_factory=list)  # tree budget used per pass (auto budget: its choices)
    ssm_calls: list[int] = field(default_factory=list)  # SSM forwards per pass (drafting rounds, all SSMs)
    offered_at_depth: dict[int, int] = field(default_factory=dict)  # passes that could accept a depth-d token
    accepted_at_depth: dict[int, int] = field(default_factory=dict)
    ssm_time_s: float = 0.0
    llm_time_s: float = 0.0

    def record(self, tree: TokenTree, path: list[int], produced: int) -> None:
        self.tokens_per_pass.append(produced)
        self.tree_sizes.append(len(tree) - 1)
        for d in range(1, len(path)):
            self.offered_at_depth[d] = self.offered_at_depth.get(d, 0) + 1
            self.accepted_at_depth[d] = self.accepted_at_depth.get(d, 0) + 1
        if tree.children(path[-1]):
            d = len(path)
            self.offered_at_depth[d] = self.offered_at_depth.get(d, 0) + 1

    def as_dict(self) -> dict:
        tpp = self.tokens_per_pass
        hist: dict[int, int] = {}
        for t in tpp:
            hist[t] = hist.get(t, 0) + 1
        return {
            "llm_passes": self.llm_passes,
            "tokens_per_pass_mean": sum(tpp) / len(tpp) if tpp else 0.0,
            "tokens_per_pass_histogram": {str(k): hist[k] for k in sorted(hist)},
            "acceptance_per_depth": {
                str(d): self.accepted_at_depth.get(d, 0) / n for d, n in sorted(self.offered_at_depth.items())
            },
            "tree_size_mean": sum(self.tree_sizes) / len(self.tree_sizes) if self.tree_sizes else 0.0,
            "tree_budgets": self.budgets,
            "ssm_calls_mean": sum(self.ssm_calls) / len(self.ssm_calls) if self.ssm_calls else 0.0,
            "ssm_time_s": self.ssm_time_s,
            "llm_time_s": self.llm_time_s,
        }


class Engine:
    """Generates for one request at a time with an LLM and optional SSMs sharing its tokenizer."""

    def __init__(
        self,
        llm: CausalLM,
        ssms: list[CausalLM] | None = None,
        tree: TreeConfig | None = None,
        max_sequence_length: int = 2048,
        eos_ids: set[int] | None = None,
        valid_vocab: int | None = None,
        ssm_static: bool | None = None,
    ) -> None:
        """``ssm_static``: draft with padded fixed-shape SSM forwards (CUDA graphs on a GPU); default:
        whenever an SSM is resident on a CUDA device; False runs the SSMs eagerly."""
        self.llm = llm
        self.tree_cfg = tree or TreeConfig()
        limit = llm.config.max_position_embeddings
        if max_sequence_length > limit:
            raise ValueError(f"--max-sequence-length {max_sequence_length} exceeds the model's context of {limit}")
        self.max_sequence_length = max_sequence_length
        self.eos_ids = set(eos_ids or ())
        vocab = valid_vocab or llm.vocab_size
        ssms = ssms or []
        self.drafters = [Drafter(m, max_sequence_length, vocab, self.tree_cfg, ssm_static) for m in ssms]
        spec_nodes = self.tree_cfg.max_nodes * len(ssms)
        self.auto = AutoBudget(self.tree_cfg.budget) if self.tree_cfg.auto and ssms else None
        self.cache = llm.new_cache(max_sequence_length + spec_nodes + 1)

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) >= self.max_sequence_length:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens leaves no room to generate within the maximum sequence "
                f"length of {self.max_sequence_length} tokens"
            )

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        seed: int | None = None,
        stats: GenerationStats | None = None,
    ) -> Iterator[list[int]]:
        """Yields the tokens each LLM pass produces, stopping at EOS (yielded), ``max_new_tokens`` or
        the maximum sequence length."""
        self.check_prompt(prompt_ids)
        if max_new_tokens < 1:
            return
        stats = stats if stats is not None else GenerationStats()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        llm, cache = self.llm, self.cache
        cache.reset()
        limit = min(max_new_tokens, self.max_sequence_length - len(prompt_ids))

        t0 = time.perf_counter()
        logits = llm.forward(torch.tensor(prompt_ids), torch.arange(len(prompt_ids)), cache)
        cache.commit_all()
        root = select(logits[-1], sampling, gen)
        stats.llm_time_s += time.perf_counter() - t0
        stats.llm_passes += 1
        produced = 1
        yield [root]
        if root in self.eos_ids or produced >= limit:
            return
        for d in self.drafters:
            d.reset(prompt_ids + [root])

        first = True
        while True:
            depth = limit - produced - 1  # the bonus token takes the last place
            llm.weights.layers.prefetch()  # the LLM's first streamed layers load while the SSMs draft
            t0 = time.perf_counter()
            budget = self.auto.choose() if self.auto else self.tree_cfg.budget
            captured = sum(d.graphs_captured for d in self.drafters)
            tree = TokenTree.root(root)
            for d in self.drafters:
                tree.merge(d.draft(depth, budget))
            t1 = time.perf_counter()
            stats.ssm_time_s += t1 - t0
            past = cache.length
            mask = None if len(tree) == 1 else tree.attention_mask(past)
            logits = llm.forward(tree.token_tensor(), past + tree.depth_tensor(), cache, mask)
            path, nxt = verify(tree, logits, sampling, gen)
            cache.commit(path)
            t2 = time.perf_counter()
            stats.llm_time_s += t2 - t1
            stats.llm_passes += 1
            if self.drafters:
                stats.budgets.append(budget)
                stats.ssm_calls.append(sum(d.calls for d in self.drafters))
            if self.auto and depth >= 1:  # one-time costs are not timed: a graph captured, or the SSMs'
                # prefill of the prompt (the first drafting of a request forwards it)
                fresh = sum(d.graphs_captured for d in self.drafters) > captured
                self.auto.observe(budget, tree, path, t2 - t0, t1 - t0, timed=not fresh and not first)
            first = False
            accepted = [tree.tokens[i] for i in path[1:]]
            for d in self.drafters:
                d.commit(accepted, nxt)
            new = accepted + [nxt]
            for i, t in enumerate(new):  # stop inside the accepted path at EOS
                if t in self.eos_ids:
                    new = new[: i + 1]
                    break
            new = new[: limit - produced]
            stats.record(tree, path, len(new))
            produced += len(new)
            yield new
            if new[-1] in self.eos_ids or produced >= limit:
                return
            root = nxt
