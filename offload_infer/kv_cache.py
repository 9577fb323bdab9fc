"""Preallocated key/value cache with a committed prefix and a pending (speculative) tail.

Layout per model: ``k``/``v`` are ``[n_layers, n_kv_heads, max_len, head_dim]``. Slots ``[0, length)``
hold the committed sequence; slots ``[length, length + pending)`` hold tokens processed since the
last commit (a token tree, or an incremental step). ``commit(indices)`` moves the chosen pending
entries into place right after the committed prefix and forgets the rest, so nothing of a rejected
tree node can be seen by a later pass.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ContextOverflowError(ValueError):
    """A forward would write past the cache's maximum sequence length."""


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        shape = (n_layers, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # committed tokens
        self.pending = 0  # tokens written since the last commit

    @property
    def end(self) -> int:
        """First free slot: a forward writes its tokens from here."""
        return self.length + self.pending

    def reserve(self, n: int) -> int:
        """Claim ``n`` slots after the pending tail; returns the first. Layers write there."""
        start = self.end
        if start + n > self.max_len:
            raise ContextOverflowError(
                f"sequence of {start + n} tokens exceeds the maximum sequence length {self.max_len}"
            )
        self.pending += n
        return start

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``/``v`` ``[KV, N, D]`` at ``start`` and return views of slots ``[0, start + N)``."""
        n = k.shape[1]
        self.k[layer, :, start : start + n] = k
        self.v[layer, :, start : start + n] = v
        return self.k[layer, :, : start + n], self.v[layer, :, : start + n]

    def commit(self, indices: list[int] | Tensor) -> None:
        """Keep the pending entries at ``indices`` (relative to the pending tail), in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        m = idx.numel()
        assert m <= self.pending, f"committing {m} of {self.pending} pending entries"
        if m and bool((idx >= self.pending).any()):
            raise AssertionError(f"commit index out of the pending range {self.pending}: {idx.tolist()}")
        expected = torch.arange(m)
        if not torch.equal(idx, expected):
            src = (idx + self.length).to(self.k.device)
            dst = slice(self.length, self.length + m)
            # index_select copies, so overlapping source and destination ranges are safe
            self.k[:, :, dst] = self.k.index_select(2, src)
            self.v[:, :, dst] = self.v.index_select(2, src)
        self.length += m
        self.pending = 0

    def commit_all(self) -> None:
        self.length += self.pending
        self.pending = 0

    def rollback(self) -> None:
        self.pending = 0

    def reset(self) -> None:
        self.length = 0
        self.pending = 0
