"""A resident model's forward at fixed shapes, replayed from CUDA graphs (the SSMs' drafting rounds).

A small SSM's forward is bound by kernel launches, not by the GPU (hundreds of small kernels, each
with Python and launch overhead), so it costs about the same for 1 or 64 tokens. Here the forward is
recast so that every tensor has a fixed shape and every index lives on the device:

- the ``n`` new tokens are padded to a bucket size ``B`` (1, 2, 4, ...); the padding rows are valid
  tokens that see slot 0 only, so they stay finite, and their results are dropped;
- attention runs over a span of the cache ``[0, L)``, ``L`` the smallest of 256, 512, 1024, ... (and
  the cache's length) that holds the new tokens' padded slots, with the mask padded by False columns:
  a forward pays for the context it has, not for the longest the cache allows;
- keys and values are written at slot indices held in a device tensor (``index_copy_``): the ``n``
  reserved slots, then ``B - n`` slots after them that nothing can see and the next forward overwrites.

Each (bucket, span)'s forward is captured once into a CUDA graph and then replayed after copying the
inputs into its static buffers. Without CUDA (or with ``graphs=False``) the same padded forward runs eagerly,
which is what the CPU tests check against the plain forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from offload_infer.kv_cache import KVCache
from offload_infer.models import CausalLM, ResidentLayers
from offload_infer.models.attention import attention_backends

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # padded token counts; each gets its own graph when first used
MIN_SPAN = 256  # shortest attention span; spans double up to the cache's length


class _SlotWriter:
    """Stands in for the KV cache inside a family's forward: writes at device-held slot indices and
    returns the span's slots (the mask hides what a token may not see)."""

    def __init__(self, cache: KVCache, slots: Tensor, span: int) -> None:
        self.cache = cache
        self.slots = slots  # [B] long, on the device
        self.span = span

    def write(self, layer: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v: [KV, B, D] -> cache [KV, max_len, D] at self.slots; returns [KV, span, D] views
        self.cache.k[layer].index_copy_(1, self.slots, k)
        self.cache.v[layer].index_copy_(1, self.slots, v)
        return self.cache.k[layer][:, : self.span], self.cache.v[layer][:, : self.span]


class _Bucket:
    """Static input/output buffers of one padded size and attention span, and its graph once captured."""

    def __init__(self, size: int, span: int, device: torch.device) -> None:
        self.size = size
        self.span = span
        self.tokens = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slots = torch.zeros(size, dtype=torch.long, device=device)
        self.mask = torch.zeros(size, span, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None


def can_use_graphs(model: CausalLM) -> bool:
    """Graphs need every weight resident on a CUDA device (a streamed model copies between passes)."""
    return model.device.type == "cuda" and isinstance(model.weights.layers, ResidentLayers)


class StaticForward:
    """``forward(tokens, positions, mask)`` for ``model`` over ``cache``, with the tokens padded to the
    smallest bucket that holds them. Token counts above the largest bucket, or too close to the end of
    the cache for their padding, fall back to the plain forward."""

    def __init__(
        self,
        model: CausalLM,
        cache: KVCache,
        buckets: tuple[int, ...] = BUCKETS,
        graphs: bool | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.sizes = tuple(sorted(buckets))
        self.graphs = can_use_graphs(model) if graphs is None else graphs
        if self.graphs and not can_use_graphs(model):
            raise ValueError("CUDA graphs need a model resident on a CUDA device")
        self.spans = tuple(sorted({min(MIN_SPAN << i, cache.max_len)
                                   for i in range(max(1, cache.max_len.bit_length()))}))
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.replays = 0  # forwards served by a bucket (graph replays on CUDA)
        self.captures = 0  # graphs captured so far (a one-time cost on a bucket's first use)

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def _bucket(self, size: int, end: int) -> _Bucket:
        """The bucket of padded ``size`` whose slots end at ``end`` (``end`` <= the cache's length)."""
        span = next(L for L in self.spans if L >= max(end, size))
        b = self._buckets.get((size, span))
        if b is None:
            b = self._buckets[(size, span)] = _Bucket(size, span, self.model.device)
        return b

    def _run(self, b: _Bucket) -> Tensor:
        cfg, weights = self.model.config, self.model.weights
        with attention_backends(self.model.device):  # the kernel picked at capture is the one replayed
            return cfg.forward(weights, b.tokens, b.positions, _SlotWriter(self.cache, b.slots, b.span), 0, b.mask)

    def _capture(self, b: _Bucket) -> None:
        assert b.size <= self.cache.max_len, "a bucket larger than the cache is never used"
        # the warm-up and the capture write padding at slots beyond the cache's end: nothing sees them
        b.slots.copy_(torch.arange(self.cache.max_len - b.size, self.cache.max_len))
        b.mask.zero_()
        b.mask[:, 0] = True
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # lets cuBLAS and the attention kernels pick and allocate their workspaces
                self._run(b)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        self.captures += 1
        b.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(b.graph, pool=self._pool):
            b.logits = self._run(b)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every usable (bucket, span)'s graph now (otherwise each is captured on first use)."""
        if self.graphs:
            for size in (s for s in self.sizes if s <= self.cache.max_len):
                for span in (L for L in self.spans if L >= size):
                    b = self._bucket(size, span)
                    if b.graph is None:
                        self._capture(b)

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """Logits ``[n, V]`` (fp32) for ``n`` new tokens after the cache's pending tail, like
        ``CausalLM.forward``; ``mask`` ``[n, past + n]`` bool on the CPU (True = visible)."""
        n = tokens.numel()
        cache = self.cache
        start = cache.end
        size = next((s for s in self.sizes if s >= n), None) if n > 0 else None
        if size is None or start + size > cache.max_len:
            return self.model.forward(tokens, positions, cache, mask)
        b = self._bucket(size, start + size)
        if int(positions.max()) >= self.model.config.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} is beyond the model's context of "
                             f"{self.model.config.max_position_embeddings} tokens")
        assert mask.shape == (n, start + n), f"mask {tuple(mask.shape)} for {n} tokens after {start}"
        if self.graphs and b.graph is None:
            self._capture(b)
        # [B] inputs: padding rows repeat token 0 / position 0 and see slot 0 alone
        host_tokens = torch.zeros(b.size, dtype=torch.long)
        host_tokens[:n] = tokens
        host_pos = torch.zeros(b.size, dtype=torch.long)
        host_pos[:n] = positions
        host_mask = torch.zeros(b.size, b.span, dtype=torch.bool)  # [B, span]
        host_mask[:n, : start + n] = mask
        host_mask[n:, 0] = True
        b.tokens.copy_(host_tokens, non_blocking=True)
        b.positions.copy_(host_pos, non_blocking=True)
        b.slots.copy_(torch.arange(start, start + b.size), non_blocking=True)
        b.mask.copy_(host_mask, non_blocking=True)
        cache.reserve(n)
        self.replays += 1
        if self.graphs:
            b.graph.replay()
            return b.logits[:n].to(torch.float32, copy=True)  # the static buffer is overwritten next replay
        return self._run(b)[:n].float()
