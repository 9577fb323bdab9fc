"""FlexFlow Serve-style request API: register prompts, then serve them all, batched, and collect results."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from offload_infer.detok import TextStream
from offload_infer.engine import Engine
from offload_infer.sampling import SamplingConfig, SamplingParams

if TYPE_CHECKING:  # the runtime does not import the weights package
    from weights.tokenizer import Tokenizer


@dataclass
class Request:
    guid: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class _Live:
    """A request being served: its engine id, its text so far, timing."""

    req: Request
    seq_id: int
    stream: TextStream
    start: float
    out: list[int] = field(default_factory=list)


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
        params: SamplingParams | None = None,
        system: str | None = None,
    ) -> None:
        """``params`` are every request's defaults (else built from ``sampling``, ``max_new_tokens``, ``seed``);
        ``system``: a system prompt before every text prompt (chat only)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat = chat
        if system is not None and not chat:
            raise ValueError("a system prompt needs the chat template (chat=True)")
        self.system = system
        self.params = params or SamplingParams(max_new_tokens, sampling.temperature, sampling.top_k, sampling.top_p,
                                               seed)
        if engine.detokenize is None:
            engine.detokenize = tokenizer.decode
        self._pending: list[Request] = []
        self._guids = itertools.count(1000000)
        self.batch_sizes: list[int] = []  # requests in each LLM pass of the last serve()
        self.completed: list[dict] = []  # results of the last serve() as they finish (kept if it is interrupted)
        self.wall_s = 0.0  # duration of the last serve()

    def register_new_request(
        self, prompt: str | list[int], max_sequence_length: int | None = None, max_new_tokens: int | None = None,
        params: SamplingParams | None = None,
    ) -> int:
        """Queue a prompt (text, or token ids) and return its guid; the prompt is checked now."""
        if isinstance(prompt, list):
            ids = list(prompt)
        elif self.system is not None:
            ids = self.tokenizer.encode_messages([{"role": "system", "content": self.system},
                                                  {"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode_prompt(prompt, self.chat)
        max_len = max_sequence_length or self.engine.max_sequence_length
        if max_len > self.engine.max_sequence_length:
            raise ValueError(f"max_sequence_length {max_len} exceeds the engine's {self.engine.max_sequence_length}")
        if len(ids) >= max_len:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit a maximum sequence length of {max_len}")
        self.engine.check_prompt(ids)
        p = params or self.params
        p = replace(p, max_new_tokens=min(max_new_tokens or p.max_new_tokens, max_len - len(ids)))
        req = Request(next(self._guids), prompt if isinstance(prompt, str) else None, ids, p)
        self._pending.append(req)
        return req.guid

    @property
    def pending(self) -> int:
        return len(self._pending)

    def serve(self, on_text: Callable[[int, str], None] | None = None, limit: int | None = None) -> list[dict]:
        """Generate for the registered requests (all, or the first ``limit``), batched by the engine;
        ``on_text(guid, text)`` streams each one's text as it comes. Results in registration order."""
        take = self._pending[: limit] if limit is not None else list(self._pending)
        self._pending = self._pending[len(take):]
        start = time.perf_counter()
        steps0 = len(self.engine.batch_sizes)
        live: dict[int, _Live] = {}
        for req in take:
            sid = self.engine.add_request(req.prompt_token_ids, req.params)
            live[sid] = _Live(req, sid, TextStream(self.tokenizer, req.params.stop), start)
        results: dict[int, dict] = {}
        self.completed = []
        try:
            while len(results) < len(take):
                for out in self.engine.step():
                    lv = live.get(out.id)
                    if lv is None:
                        continue  # another caller's request on the same engine
                    lv.out.extend(out.new_tokens)
                    stop_text = self.engine.sequence(out.id).stop_text if out.finished else None
                    text = lv.stream.push(out.new_tokens, out.finished, stop_text)
                    if text and on_text:
                        on_text(lv.req.guid, text)
                    if out.finished:
                        results[out.id] = self._result(lv)
                        self.completed.append(results[out.id])
                        self.engine.forget(out.id)
        finally:
            for sid in live:
                if sid not in results:
                    self.engine.abort(sid)
                    self.engine.forget(sid)
        self.wall_s = time.perf_counter() - start
        self.batch_sizes = self.engine.batch_sizes[steps0:]
        return [results[lv.seq_id] for lv in live.values()]

    def _result(self, lv: _Live) -> dict:
        req, seq = lv.req, self.engine.sequence(lv.seq_id)
        latency = time.perf_counter() - lv.start
        return {
            "guid": req.guid,
            "prompt": req.prompt if req.prompt is not None else self.tokenizer.decode(req.prompt_token_ids),
            "prompt_token_ids": req.prompt_token_ids,
            "output_token_ids": lv.out,
            "output_text": lv.stream.text,
            "finish_reason": seq.finish_reason,
            "latency_s": latency,
            "time_to_first_token_s": seq.first_token_s,
            "tokens_per_s": len(lv.out) / latency if latency > 0 else 0.0,
            **seq.stats.as_dict(),
        }
