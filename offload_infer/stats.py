"""Per-request decoding statistics: passes, tokens per pass, tree sizes, acceptance per depth, times."""

from __future__ import annotations

from dataclasses import dataclass, field

from offload_infer.tree import TokenTree


@dataclass
class GenerationStats:
    llm_passes: int = 0  # prefill included
    tokens_per_pass: list[int] = field(default_factory=list)  # tokens produced by each decoding pass
    tree_sizes: list[int] = field(default_factory=list)  # speculated nodes per pass (root excluded)
    budgets: list[int] = field(default_factory=list)  # tree budget used per pass (auto budget: its choices)
    ssm_calls: list[int] = field(default_factory=list)  # SSM forwards per pass (drafting rounds, all SSMs)
    ahead_calls: list[int] = field(default_factory=list)  # SSM forwards drafting ahead during each LLM pass
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
            "ahead_calls_mean": sum(self.ahead_calls) / len(self.ahead_calls) if self.ahead_calls else 0.0,
            "ssm_time_s": self.ssm_time_s,
            "llm_time_s": self.llm_time_s,
        }


class SpeculationCheck:
    """Tells once when, over the last ``steps`` drafting steps, the trees made fewer tokens per second
    than plain decoding would (one token per request per LLM pass, at the measured pass time: a generous
    estimate, as a pass without a tree is never slower)."""

    def __init__(self, steps: int = 8) -> None:
        self.steps = steps
        self._window: list[tuple[int, int, float, float]] = []  # tokens, requests, step s, LLM s
        self.told = False

    def observe(self, tokens: int, requests: int, seconds: float, llm_seconds: float, auto: bool) -> str | None:
        w = self._window
        w.append((tokens, requests, seconds, llm_seconds))
        del w[:-self.steps]
        if len(w) < self.steps or self.told:
            return None
        with_trees = sum(x[0] for x in w) / sum(x[2] for x in w)
        plain = sum(x[1] for x in w) / sum(x[3] for x in w)
        if with_trees >= plain:
            return None
        self.told = True
        advice = ("--tree-budget auto has switched drafting off" if auto else
                  "try --tree-budget auto (it drafts only when that pays) or leave out --ssm")
        return (f"speculation is slower than plain decoding here: {with_trees:.1f} tokens/s with the SSMs over the "
                f"last {self.steps} passes, about {plain:.1f} without them (from the LLM pass time alone); {advice}")
