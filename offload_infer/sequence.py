"""A request as the engine tracks it: prompt, settings, output so far, and where its caches are.

Bookkeeping only: the KV places (``kv``, ``drafts``) are handles the engine's pools gave out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from offload_infer.kv_pool import SeqKV
from offload_infer.sampling import SamplingParams
from offload_infer.speculate import DraftState
from offload_infer.stats import GenerationStats


class Status(Enum):
    WAITING = "waiting"  # queued: no KV yet
    RUNNING = "running"  # holds KV: prefilling its prompt, then decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: SamplingParams
    limit: int  # tokens it may produce: max_new_tokens, cut by the maximum sequence length
    llm_slots: int  # LLM KV slots it reserves: prompt, output and the largest tree
    stop_ids: frozenset[int]
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the LLM's cache
    root: int | None = None  # the last committed token, which the LLM has not processed yet
    kv: SeqKV | None = None
    drafts: list[DraftState] = field(default_factory=list)
    generator: torch.Generator | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)
    finish_reason: str | None = None  # "eos", "stop" (a stop id or string), "length", "abort"
    stop_text: str | None = None  # the output text cut before the stop string that ended it
    first_token_s: float | None = None  # seconds from arrival to the first token
    keep_kv: bool = False  # keep the KV when finished, for a next turn (Engine.continue_request)

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def decoding(self) -> bool:
        return self.root is not None

    @property
    def remaining_prompt(self) -> int:
        return len(self.prompt) - self.prefilled


def cut_at_stops(s: Sequence, new: list[int], detokenize: Callable[[list[int]], str] | None
                 ) -> tuple[list[int], str | None]:
    """``new`` cut at the first stop token (kept), at the request's limit, or at the token that completes a
    stop string (the text before it goes to ``s.stop_text``); and why the request ends, if it does."""
    reason = None
    for i, t in enumerate(new):
        if t in s.stop_ids:
            new, reason = new[: i + 1], "stop" if t in s.params.stop_token_ids else "eos"
            break
    if len(s.output) + len(new) >= s.limit:
        new = new[: s.limit - len(s.output)]
        reason = reason or "length"
    if s.params.stop:
        assert detokenize is not None
        tail = max(len(x) for x in s.params.stop)
        before = len(detokenize(s.output))
        for i in range(1, len(new) + 1):
            text = detokenize(s.output + new[:i])
            hits = [h for h in (text.find(x, max(0, before - tail)) for x in s.params.stop) if h >= 0]
            if hits:  # a stop string may start in text emitted earlier
                s.stop_text = text[: min(hits)]
                return new[:i], "stop"
    return new, reason
