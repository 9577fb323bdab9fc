"""FlexFlow Serve-style request API: register prompts, then serve them all and collect results."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from offload_infer.detok import StreamDecoder
from offload_infer.engine import Engine, GenerationStats
from offload_infer.sampling import SamplingConfig
from weights.tokenizer import Tokenizer


@dataclass
class Request:
    guid: int
    prompt: str | None
    prompt_token_ids: list[int]
    max_sequence_length: int
    max_new_tokens: int


class RequestManager:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        chat: bool = False,
        sampling: SamplingConfig = SamplingConfig(),
        max_new_tokens: int = 128,
        seed: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat = chat
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self._pending: list[Request] = []
        self._guids = itertools.count(1000000)

    def register_new_request(
        self, prompt: str | list[int], max_sequence_length: int | None = None, max_new_tokens: int | None = None
    ) -> int:
        """Queue a prompt (text, or token ids) and return its guid; the prompt is checked now."""
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode_prompt(prompt, self.chat)
        max_len = max_sequence_length or self.engine.max_sequence_length
        if max_len > self.engine.max_sequence_length:
            raise ValueError(f"max_sequence_length {max_len} exceeds the engine's {self.engine.max_sequence_length}")
        if len(ids) >= max_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit a maximum sequence length of {max_len}")
        req = Request(next(self._guids), prompt if isinstance(prompt, str) else None, ids, max_len,
                      max_new_tokens or self.max_new_tokens)
        self._pending.append(req)
        return req.guid

    @property
    def pending(self) -> int:
        return len(self._pending)

    def serve(self, on_text: Callable[[int, str], None] | None = None, limit: int | None = None) -> list[dict]:
        """Generate for the registered requests (all, or the first ``limit``), in order;
        ``on_text(guid, text)`` streams the output."""
        results = []
        while self._pending and (limit is None or len(results) < limit):
            req = self._pending.pop(0)
            results.append(self._run(req, on_text))
        return results

    def _run(self, req: Request, on_text: Callable[[int, str], None] | None) -> dict:
        stats = GenerationStats()
        stream = StreamDecoder(self.tokenizer)
        out: list[int] = []
        start = time.perf_counter()
        budget = min(req.max_new_tokens, req.max_sequence_length - len(req.prompt_token_ids))
        for new in self.engine.generate(req.prompt_token_ids, budget, self.sampling, self.seed, stats):
            out.extend(new)
            text = stream.push(new)
            if text and on_text:
                on_text(req.guid, text)
        tail = stream.flush()
        if tail and on_text:
            on_text(req.guid, tail)
        latency = time.perf_counter() - start
        return {
            "guid": req.guid,
            "prompt": req.prompt if req.prompt is not None else self.tokenizer.decode(req.prompt_token_ids),
            "prompt_token_ids": req.prompt_token_ids,
            "output_token_ids": out,
            "output_text": self.tokenizer.decode(out),
            "latency_s": latency,
            "tokens_per_s": len(out) / latency if latency > 0 else 0.0,
            **stats.as_dict(),
        }
