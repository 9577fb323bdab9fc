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
