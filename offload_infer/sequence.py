"""A request as the engine tracks it: prompt, settings, output so far, and where its caches are.

Bookkeeping only: the KV places (``kv``, ``drafts``) are handles the engine's pools gave out.
"""

from __future__ import annotations

import time
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
