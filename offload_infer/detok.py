"""Streaming detokenization that never emits a broken UTF-8 sequence.

Text is decoded from a short window of recent tokens; new text is released only once it no longer
ends in a replacement character (an incomplete multi-byte sequence) — the approach of TGI/vLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runtime does not import the weights package
    from weights.tokenizer import Tokenizer


class StreamDecoder:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window whose text was already emitted in part
        self.read = 0  # tokens up to here are fully emitted

    def push(self, ids: list[int]) -> str:
        """Text newly completed by ``ids``, possibly empty."""
        self.ids.extend(ids)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (a truly invalid sequence comes out as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        after = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]


class TextStream:
    """A request's output text as it grows: decoded without broken UTF-8, and passed on only where it can
    no longer turn out to be the start of a stop string (the engine cuts the text at a stop string, so
    what was passed on is never taken back)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.hold = max((len(s) for s in stop), default=1) - 1  # characters kept back while running
        self.text = ""  # decoded so far
        self.shown = ""  # passed on so far

    def push(self, ids: list[int], finished: bool = False, stop_text: str | None = None) -> str:
        """The text newly safe to show after ``ids``; at the end, with the engine's cut (``stop_text``)."""
        self.text += self.decoder.push(ids)
        if finished:
            self.text += self.decoder.flush()
            if stop_text is not None:
                self.text = stop_text
        upto = max(len(self.shown), len(self.text) - (0 if finished else self.hold))
        new = self.text[len(self.shown): upto]
        self.shown += new
        return new
