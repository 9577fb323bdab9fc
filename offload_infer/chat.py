"""A multi-turn conversation over the engine whose KV cache lives on between turns: each turn
prefills only the tokens after what the cache already holds (the template's end of the previous
answer and the new message), as llama.cpp's and ollama's chats do.

A turn's tokens are the previous turn's tokens (prompt and answer, as generated) followed by the
tokenized rest of the template's text, when the template's rendering of the conversation starts with
what those tokens spell; otherwise (a template that rewrites history) the whole conversation is
tokenized again and the engine reuses the longest common prefix of the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from offload_infer.detok import TextStream
from offload_infer.engine import Engine
from offload_infer.sampling import SamplingParams

if TYPE_CHECKING:
    from weights.tokenizer import Tokenizer


class ChatSession:
    def __init__(self, engine: Engine, tokenizer: Tokenizer, params: SamplingParams = SamplingParams(),
                 system: str | None = None) -> None:
        if not tokenizer.chat_template:
            raise ValueError("this model has no chat template: chat needs one")
        self.engine, self.tok, self.params, self.system = engine, tokenizer, params, system
        self.messages: list[dict[str, str]] = []
        self._last: int | None = None  # the finished request whose KV the next turn continues
        self._spelled = ""  # the text the last turn's tokens (prompt and answer) spell
        self.last_ids: list[int] = []  # the last turn's prompt tokens
        self.prefilled_last = 0  # prompt tokens the last turn actually ran through the LLM
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and free its KV."""
        if self._last is not None:
            self.engine.release(self._last)
            self._last = None
        self._spelled = ""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, on_text: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None) -> str:
        """One turn: the reply to ``text``, streamed through ``on_text``. ``should_stop()`` true (checked
        every step, as Ctrl-C sets it) ends the reply early; what was said so far stays in the history."""
        msgs = self.messages + [{"role": "user", "content": text}]
        rendered = self.tok.apply_chat_template(msgs)
        if self._last is not None and self._spelled and rendered.startswith(self._spelled):
            prev = self.engine.sequence(self._last)
            ids = prev.prompt + prev.output + self.tok.encode(rendered[len(self._spelled):], add_special_tokens=False)
        else:
            ids = self.tok.encode(rendered, add_special_tokens=False)
        self.last_ids = ids
        if self._last is None:
            sid = self.engine.add_request(ids, self.params, keep_kv=True)
        else:
            sid = self.engine.continue_request(self._last, ids, self.params)
        seq = self.engine.sequence(sid)
        self.prefilled_last = len(ids) - seq.prefilled
        self._last = sid
        stream = TextStream(self.tok, self.params.stop)
        while self.engine.has_unfinished():
            if should_stop is not None and should_stop():
                self.engine.abort(sid)
                break
            for out in self.engine.step():
                piece = stream.push(out.new_tokens, out.finished, seq.stop_text if out.finished else None)
                if piece and on_text:
                    on_text(piece)
        if seq.finish_reason == "abort":
            tail = stream.push([], True)
            if tail and on_text:
                on_text(tail)
        reply = stream.text
        self.messages = msgs + [{"role": "assistant", "content": reply}]
        self._spelled = rendered + self.tok.decode(seq.output, skip_special_tokens=False)
        return reply
