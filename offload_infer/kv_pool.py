"""A paged key/value pool shared by every running request, and the batched attention over it.

Storage per model: ``kv`` ``[n_layers, slots, 2, n_kv_heads, head_dim]`` (a slot's keys, then its
values), the slots cut into blocks (block_manager.py). Slot-major, keys and values together: a batch's
slots are gathered, and pending entries committed, by one row indexing over whole slots. A request's
``SeqKV`` maps its logical positions to pool slots and keeps the same committed prefix / pending tail as
``KVCache``: slots ``[0, length)`` hold committed tokens, ``[length, length + pending)`` what was processed
since the last commit (a token tree, a prefill chunk). ``commit`` keeps chosen pending entries right after
the committed prefix.

One forward serves many requests: their new tokens are flattened into one ``[N]`` sequence (the dense
layers see only real tokens) and ``BatchAttention`` stands in for the cache in a family's forward: it
writes each token's key/value at its request's slot, then attends per request in one padded
``[B, H, Nb, S]`` call (``Nb`` the most new tokens of any request, ``S`` its longest context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from offload_infer.block_manager import BlockManager
from offload_infer.kv_cache import ContextOverflowError


@dataclass
class SeqKV:
    """One request's place in a pool."""

    blocks: list[int]
    slots: Tensor  # [capacity] long: the pool slot of each logical position
    length: int = 0  # committed tokens
    pending: int = 0  # tokens written since the last commit

    @property
    def capacity(self) -> int:
        return self.slots.numel()

    @property
    def end(self) -> int:
        return self.length + self.pending

    def commit_all(self) -> None:
        self.length += self.pending
        self.pending = 0

    def reserve(self, n: int) -> int:
        start = self.end
        if start + n > self.capacity:
            raise ContextOverflowError(f"sequence of {start + n} tokens exceeds its reserved {self.capacity} slots")
        self.pending += n
        return start


@dataclass
class Part:
    """One request's share of a batched forward: ``n`` new tokens after its pending tail, and what they
    see: ``mask`` ``[n, end + n]`` bool (True = visible); or every earlier slot and, among themselves,
    ``ancestors`` ``[n, n]`` (a token tree); or, when both are None, causal."""

    seq: SeqKV
    n: int
    mask: Tensor | None = None
    ancestors: Tensor | None = None
    start: int = field(default=-1, init=False)


class KVPool:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_blocks: int, block_size: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.blocks = BlockManager(n_blocks, block_size)
        # one block more than the manager hands out: padding rows of a static forward write there
        self.kv = torch.zeros(n_layers, (n_blocks + 1) * block_size, 2, n_kv_heads, head_dim, device=device,
                              dtype=dtype)  # [layers, slots, k|v, KV, D]
        self.device = torch.device(device)
        self.scratch = n_blocks * block_size  # first slot of the scratch block
        self._kv_heads: dict[tuple[int, int], Tensor] = {}
        self.repeat_kv = self.device.type == "cuda"  # grouped-query attention repeats KV heads (grouped_attention)
        # attention by two batched matrix products and a softmax, query heads grouped by their KV head
        # (``BatchAttention.attend_by_matmul``): for a drafting SSM on a GPU, whose rounds are short; scores
        # are kept in the model dtype, so not for an LLM (its numbers must not change)
        self.matmul_attention = False

    def kv_head_of(self, n_heads: int, n_kv: int) -> Tensor:
        """``[H]``: the KV head each query head reads (grouped-query attention), on the pool's device."""
        key = (n_heads, n_kv)
        if key not in self._kv_heads:
            self._kv_heads[key] = (torch.arange(n_heads) // (n_heads // n_kv)).to(self.device)
        return self._kv_heads[key]

    @staticmethod
    def slot_bytes(n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one slot (key and value, every layer)."""
        return 2 * n_layers * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def _slot_map(self, blocks: list[int], capacity: int) -> Tensor:
        bs = self.blocks.block_size
        return (torch.tensor(blocks)[:, None] * bs + torch.arange(bs)[None, :]).flatten()[:capacity]  # [capacity]

    def allocate(self, capacity: int) -> SeqKV:
        blocks = self.blocks.allocate(capacity)
        return SeqKV(blocks, self._slot_map(blocks, capacity))

    def can_extend(self, seq: SeqKV, capacity: int) -> bool:
        return self.blocks.blocks_for(capacity) - len(seq.blocks) <= self.blocks.free_blocks

    def extend(self, seq: SeqKV, capacity: int) -> None:
        """Grow a sequence's reservation to ``capacity`` slots (more blocks at the end of its slot map)."""
        need = self.blocks.blocks_for(capacity) - len(seq.blocks)
        if need > 0:
            seq.blocks = seq.blocks + self.blocks.allocate(need * self.blocks.block_size)
        if capacity > seq.capacity:
            seq.slots = self._slot_map(seq.blocks, capacity)

    def free(self, seq: SeqKV) -> None:
        self.blocks.free(seq.blocks)
        seq.blocks = []

    def commit(self, items: list[tuple[SeqKV, list[int]]]) -> None:
        """Keep, for each sequence, its pending entries at ``indices`` (relative to its pending tail), in
        that order, right after its committed prefix; one copy over every layer for all of them."""
        src, dst = [], []
        for seq, indices in items:
            m = len(indices)
            assert m <= seq.pending, f"committing {m} of {seq.pending} pending entries"
            assert all(0 <= i < seq.pending for i in indices), f"commit index out of range: {indices}"
            if list(indices) != list(range(m)):
                src.append(seq.slots[seq.length + torch.tensor(indices, dtype=torch.long)])
                dst.append(seq.slots[seq.length: seq.length + m])
            seq.length += m
            seq.pending = 0
        if src:
            s, d = torch.cat(src).to(self.device), torch.cat(dst).to(self.device)
            # index_select copies first, so a source slot that is also a destination is read intact
            self.kv[:, d] = self.kv.index_select(1, s)

    def batch(self, parts: list[Part], shape: tuple[int, int, int] | None = None, on_host: bool = False
              ) -> "BatchAttention":
        """Reserve each part's slots and build the index tensors of one batched forward. With ``shape``
        ``(B, Nb, S)`` (at least the parts' own) the layout is padded to it, as a replayed CUDA graph needs:
        the new tokens go in as ``[B * Nb]`` rows, request ``i``'s at rows ``i * Nb + r``; padding rows
        write to the scratch block and see one slot, so they stay finite and are dropped."""
        for p in parts:
            p.start = p.seq.reserve(p.n)
        b, nb, s = len(parts), max(p.n for p in parts), max(p.start + p.n for p in parts)
        if shape is not None:
            assert shape[0] >= b and shape[1] >= nb and shape[2] >= s, f"padded shape {shape} < {(b, nb, s)}"
            b, nb, s = shape
        real_rows = torch.cat([i * nb + torch.arange(p.n) for i, p in enumerate(parts)])  # [N] -> padded row
        new_slots = torch.cat([p.seq.slots[p.start: p.start + p.n] for p in parts])  # [N]
        if shape is None:
            write, rows = new_slots, real_rows
        else:
            write = torch.full((b * nb,), self.scratch, dtype=torch.long)
            write[real_rows] = new_slots
            rows = torch.arange(b * nb)
        gather = torch.full((b, s), self.scratch, dtype=torch.long)  # [B, S] slots each request attends over
        mask = torch.zeros(b, nb, s, dtype=torch.bool)  # [B, Nb, S]
        for i, p in enumerate(parts):
            end = p.start + p.n
            gather[i, :end] = p.seq.slots[:end]
            if p.ancestors is not None:
                mask[i, : p.n, : p.start] = True
                mask[i, : p.n, p.start: end] = p.ancestors
            elif p.mask is None:
                mask[i, : p.n, :end] = torch.arange(end)[None, :] <= (p.start + torch.arange(p.n))[:, None]
            else:
                assert p.mask.shape == (p.n, end), f"mask {tuple(p.mask.shape)} for {p.n} tokens after {p.start}"
                mask[i, : p.n, :end] = p.mask
        mask[..., 0] |= ~mask.any(-1)  # padding rows see one slot: finite, and dropped
        dev = torch.device("cpu") if on_host else self.device  # on the host: a static forward copies them in
        out = BatchAttention(self, write.to(dev), rows.to(dev), gather.to(dev), mask.to(dev), b, nb)
        out.real_rows = real_rows
        return out


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, repeat_kv: bool | None = None) -> Tensor:
    """Attention of q ``[B, H, N, D]`` over k/v ``[B, KV, S, D]`` (``H`` a multiple of ``KV``) with a bool
    ``mask`` ``[B or 1, 1, N, S]``. ``repeat_kv`` (default: on CUDA) repeats each KV head for its query
    heads first: PyTorch's memory-efficient kernel takes masks but not grouped heads, and ``enable_gqa``
    falls back to the unfused path (some ten kernels a layer, what a small drafting model pays most)."""
    h, kv = q.shape[1], k.shape[1]
    if h != kv and (q.device.type == "cuda" if repeat_kv is None else repeat_kv):
        b, _, s, d = k.shape
        k = k[:, :, None].expand(b, kv, h // kv, s, d).reshape(b, h, s, d)  # [B, H, S, D]: head i uses i // (H/KV)
        v = v[:, :, None].expand(b, kv, h // kv, s, d).reshape(b, h, s, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != h)


class BatchAttention:
    """Stands in for the KV cache inside a family's forward when it serves a batch of requests."""

    def __init__(self, pool: KVPool, write: Tensor, rows: Tensor, gather: Tensor, mask: Tensor, b: int,
                 nb: int, logit_rows: Tensor | None = None) -> None:
        self.pool = pool
        self.write_slots = write  # [N] pool slot of each new token
        self.rows = rows  # [N] its row in the padded [B * Nb] query layout
        self.gather = gather  # [B, S] pool slots each request attends over
        self.mask = mask  # [B, Nb, S] bool
        self.b, self.nb = b, nb
        self.logit_rows = logit_rows  # [M] rows whose logits are wanted (None: all)
        self.padded = rows.numel() == b * nb  # every request has Nb new tokens: no scatter needed
        self.real_rows: Tensor | None = None  # [N] (host) padded row of each real token, when built by batch()
        self._bias: Tensor | None = None  # the mask as 0 / -inf, made by a forward's first layer for all of them
        self._grouped_bias: Tensor | None = None  # the same for ``attend_by_matmul``'s layout

    def _additive_mask(self, dtype: torch.dtype) -> Tensor:
        """``mask`` as an additive bias ``[B, Nb, S]`` (0 where visible, -inf elsewhere), its rows laid out
        16 elements apart: converted once per forward rather than by every layer's attention call (a bool
        mask is converted, and an unaligned one padded, on each call)."""
        b, nb, s = self.mask.shape
        full = torch.empty(b, nb, -(-s // 16) * 16, dtype=dtype, device=self.mask.device)[..., :s]
        zero = torch.zeros((), dtype=dtype, device=self.mask.device)
        return full.copy_(torch.where(self.mask, zero, zero - torch.inf))

    def _padded(self, q: Tensor) -> Tensor:
        """The new tokens' queries ``[N, H, D]`` in the padded ``[B*Nb, H, D]`` layout (zeros in padding rows)."""
        if self.padded:
            return q
        return q.new_zeros(self.b * self.nb, *q.shape[1:]).index_copy_(0, self.rows, q)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q ``[N, H, D]``, k/v ``[N, KV, D]`` (stored at the tokens' slots). Returns ``[N, H * D]``."""
        n, n_heads, head_dim = q.shape
        kvl = self.pool.kv[layer]  # [slots, 2, KV, D]
        kvl[:, 0].index_copy_(0, self.write_slots, k)
        kvl[:, 1].index_copy_(0, self.write_slots, v)
        b, nb, s = self.b, self.nb, self.gather.shape[1]
        n_kv = kvl.shape[2]
        seen = kvl.index_select(0, self.gather.flatten())  # [B*S, 2, KV, D]: every request's slots, one kernel
        if self.pool.matmul_attention:
            return self.attend_by_matmul(layer, q, seen)
        seen = seen.view(b, s, 2, n_kv, head_dim)
        if n_kv != n_heads and self.pool.repeat_kv:  # each KV head repeated for its query heads (see
            # grouped_attention), in one indexing kernel
            seen = seen[:, :, :, self.pool.kv_head_of(n_heads, n_kv)]  # [B, S, 2, H, D]
        keys, values = seen[:, :, 0].transpose(1, 2), seen[:, :, 1].transpose(1, 2)  # [B, H or KV, S, D]
        qp = self._padded(q).view(b, nb, n_heads, head_dim).transpose(1, 2)  # [B, H, Nb, D]
        if layer == 0 or self._bias is None or self._bias.dtype != q.dtype:
            self._bias = self._additive_mask(q.dtype)
        out = grouped_attention(qp, keys, values, self._bias[:, None])  # [B, H, Nb, D]
        out = out.transpose(1, 2).reshape(b * nb, n_heads * head_dim)  # [B*Nb, H*D]
        return out if self.padded else out.index_select(0, self.rows)

    def attend_by_matmul(self, layer: int, q: Tensor, seen: Tensor) -> Tensor:
        """Attention as ``softmax(q k^T / sqrt(D) + bias) v`` in three batched kernels, each KV head's query
        heads stacked as rows of one product (no repeated keys): for short rounds, where the fused
        kernels' launch grid is a handful of blocks. q ``[N, H, D]``, seen ``[B*S, 2, KV, D]`` (the
        gathered slots); returns ``[N, H * D]``."""
        n, n_heads, head_dim = q.shape
        b, nb, s = self.b, self.nb, self.gather.shape[1]
        n_kv = seen.shape[2]
        g = n_heads // n_kv
        kv = seen.view(b, s, 2, n_kv, head_dim).permute(2, 3, 0, 1, 4)  # [2, KV, B, S, D] (a view)
        keys, values = kv[0].reshape(n_kv * b, s, head_dim), kv[1].reshape(n_kv * b, s, head_dim)  # [KV*B, S, D]
        # query head h reads KV head h // G: rows of KV head j are its G heads for each new token
        qg = self._padded(q).view(b, nb, n_kv, g, head_dim).permute(2, 0, 1, 3, 4).reshape(n_kv * b, nb * g, head_dim)  # [KV*B, Nb*G, D]
        if layer == 0 or self._grouped_bias is None or self._grouped_bias.dtype != q.dtype:
            bias = self._additive_mask(q.dtype)  # [B, Nb, S]
            self._grouped_bias = bias[None, :, :, None, :].expand(n_kv, b, nb, g, s).reshape(n_kv * b, nb * g, s)
        scores = torch.baddbmm(self._grouped_bias, qg, keys.transpose(1, 2), alpha=head_dim ** -0.5)  # [KV*B, Nb*G, S]
        out = torch.bmm(torch.softmax(scores, dim=-1), values)  # [KV*B, Nb*G, D]
        out = out.view(n_kv, b, nb, g, head_dim).permute(1, 2, 0, 3, 4).reshape(b * nb, n_heads * head_dim)  # [B*Nb, H*D]
        return out if self.padded else out.index_select(0, self.rows)

    def head_rows(self, x: Tensor) -> Tensor:
        """The hidden states whose logits are wanted, ``[M, h]`` of ``[N, h]``."""
        return x if self.logit_rows is None else x.index_select(0, self.logit_rows)
