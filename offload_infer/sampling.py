"""Next-token selection: greedy, or sampling after temperature, top-k and top-p (in that order, as transformers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL's rule, as transformers)

    def __post_init__(self) -> None:
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: Tensor, seen: set[int] | None, penalty: float) -> Tensor:
    """Logits ``[V]`` with the repetition penalty applied to the ``seen`` tokens: a positive logit is
    divided by it, a negative one multiplied (transformers' RepetitionPenaltyLogitsProcessor). It comes
    before temperature, top-k and top-p, and it is part of the target distribution: verification applies
    it at every tree node with that node's own context, so speculation stays exact."""
    if penalty == 1.0 or not seen:
        return logits
    idx = torch.tensor(sorted(seen), device=logits.device)
    vals = logits.index_select(-1, idx)
    return logits.index_copy(-1, idx, torch.where(vals > 0, vals / penalty, vals * penalty))


def probs_from_logits(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """The distribution actually sampled from, ``[..., V]`` fp32 (one-hot at the argmax when greedy)."""
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already reach top_p; the first always stays
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def select(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None, seen: set[int] | None = None) -> int:
    """One token from logits ``[V]`` (``seen``: the context's tokens, for the repetition penalty)."""
    logits = penalize(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return int(logits.argmax())
    probs = probs_from_logits(logits.cpu(), cfg)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(frozen=True)
class SamplingParams:
    """One request's generation settings (vLLM's names). Greedy when ``temperature`` is 0."""

    max_new_tokens: int = 128  # most tokens generated (the context may end the request earlier)
    temperature: float = 0.0
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0  # 1 = all tokens
    seed: int | None = None  # seeds this request's own generator: its draws do not depend on the batch
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    stop_token_ids: tuple[int, ...] = ()  # end the request after any of these (added to the engine's EOS ids)
    stop: tuple[str, ...] = ()  # end the request once its text contains one of these (excluded from the text)
    ignore_eos: bool = False  # keep going past the engine's EOS ids (benchmarks)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        self.sampling  # validates temperature, top_k and top_p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p, self.repetition_penalty)
