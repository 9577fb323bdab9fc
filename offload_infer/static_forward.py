"""The SSMs' batched drafting forward at fixed shapes, replayed from CUDA graphs.

A small SSM's forward is bound by kernel launches, not by the GPU (hundreds of small kernels, each
with Python and launch overhead), so it costs about the same for 1 or 1,000 tokens. Here a drafting
round (every request's next tree level) is recast so that every tensor has a fixed shape and every
index lives on the device:

- the ``B`` requests are padded to ``Bb`` (1, 2, 4, ...) and each request's new tokens to ``Nb`` (1, 2,
  4, ...), laid out as ``[Bb * Nb]`` rows (``KVPool.batch`` with a shape); padding rows write to the
  pool's scratch block and see one slot, so they stay finite, and their logits are dropped;
- attention runs over a span ``S`` of each request's slots, the smallest of 256, 512, 1024, ... that
  holds its context: a round pays for the context it has, not for the longest allowed.

Each (Bb, Nb, S) is captured once into a CUDA graph (on first use, or all at once by ``capture``) and
then replayed after copying the inputs into its static buffers. Rounds larger than ``max_tokens``
padded rows (a new request's prompt) run eagerly. Without CUDA the same padded forward runs eagerly,
which is what the CPU tests check against the plain batched forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from offload_infer.kv_pool import BatchAttention, KVPool, Part
from offload_infer.models import CausalLM, ResidentLayers
from offload_infer.models.attention import attention_backends

MAX_TOKENS = 1024  # most padded rows (Bb * Nb) of a replayed round
MIN_SPAN = 256  # shortest attention span; spans double from here


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def can_use_graphs(model: CausalLM) -> bool:
    """Graphs need every weight resident on a CUDA device (a streamed model copies between passes)."""
    return model.device.type == "cuda" and isinstance(model.weights.layers, ResidentLayers)


class _Bucket:
    """Static inputs of one padded shape, the attention over them, and its graph once captured."""

    def __init__(self, pool: KVPool, b: int, nb: int, span: int) -> None:
        dev = pool.device
        self.shape = (b, nb, span)
        self.tokens = torch.zeros(b * nb, dtype=torch.long, device=dev)
        self.positions = torch.zeros(b * nb, dtype=torch.long, device=dev)
        self.attn = BatchAttention(pool, torch.full((b * nb,), pool.scratch, dtype=torch.long, device=dev),
                                   torch.arange(b * nb, device=dev),
                                   torch.full((b, span), pool.scratch, dtype=torch.long, device=dev),
                                   torch.zeros(b, nb, span, dtype=torch.bool, device=dev), b, nb)
        self.attn.mask[..., 0] = True
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None


class StaticForward:
    """Batched forwards of ``model`` over ``pool`` at padded shapes (graphs on CUDA: ``graphs``)."""

    def __init__(self, model: CausalLM, pool: KVPool, graphs: bool | None = None, max_tokens: int = MAX_TOKENS) -> None:
        self.model, self.pool, self.max_tokens = model, pool, max_tokens
        self.graphs = can_use_graphs(model) if graphs is None else graphs
        if self.graphs and not can_use_graphs(model):
            raise ValueError("CUDA graphs need a model resident on a CUDA device")
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self.replays = 0  # rounds served by a bucket (graph replays on CUDA)
        self.captures = 0  # graphs captured so far (a one-time cost on a bucket's first use)

    def shape_for(self, parts: list[Part]) -> tuple[int, int, int] | None:
        """The padded (Bb, Nb, S) of a round, or None if it is too large to replay."""
        b, nb = _pow2(len(parts)), _pow2(max(p.n for p in parts))
        if b * nb > self.max_tokens:
            return None
        end = max(p.seq.end + p.n for p in parts)
        span = MIN_SPAN
        while span < end:
            span *= 2
        return b, nb, span

    def _run(self, bk: _Bucket) -> Tensor:
        cfg, weights = self.model.config, self.model.weights
        with attention_backends(self.model.device):  # the kernel picked at capture is the one replayed
            return cfg.forward(weights, bk.tokens, bk.positions, bk.attn, 0, None)

    def _capture(self, bk: _Bucket) -> None:
        dev = self.model.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # lets cuBLAS and the attention kernels pick and allocate their workspaces
                self._run(bk)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.captures += 1
        bk.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(bk.graph, pool=self._pool):
            bk.logits = self._run(bk)

    def _bucket(self, shape: tuple[int, int, int]) -> _Bucket:
        bk = self._buckets.get(shape)
        if bk is None:
            bk = self._buckets[shape] = _Bucket(self.pool, *shape)
        if self.graphs and bk.graph is None:
            self._capture(bk)
        return bk

    @torch.inference_mode()
    def capture(self, batch_sizes: list[int], tokens: list[int], spans: list[int]) -> None:
        """Capture the graphs of these padded shapes now rather than on first use (no-op without graphs)."""
        if self.graphs:
            for b in batch_sizes:
                for nb in tokens:
                    for s in spans:
                        if b * nb <= self.max_tokens:
                            self._bucket((_pow2(b), _pow2(nb), s))

    @torch.inference_mode()
    def forward(self, parts: list[Part], tokens: Tensor, positions: Tensor, keep: Tensor | None = None
                ) -> Tensor | None:
        """Logits ``[N, V]`` (fp32) for the parts' flattened new tokens, like ``CausalLM.forward_batch``
        (``keep``: the rows wanted, like its ``logit_rows``); None (nothing reserved) if the round is too
        large to pad."""
        shape = self.shape_for(parts)
        if shape is None:
            return None
        if int(positions.max()) >= self.model.config.max_position_embeddings:
            raise ValueError(f"position {int(positions.max())} is beyond the model's context of "
                             f"{self.model.config.max_position_embeddings} tokens")
        bk = self._bucket(shape)
        batch = self.pool.batch(parts, shape, on_host=True)  # index tensors copied straight into the bucket
        rows = batch.real_rows
        host_tokens = torch.zeros(bk.tokens.numel(), dtype=torch.long)
        host_tokens[rows] = tokens
        host_pos = torch.zeros(bk.positions.numel(), dtype=torch.long)
        host_pos[rows] = positions
        bk.tokens.copy_(host_tokens, non_blocking=True)
        bk.positions.copy_(host_pos, non_blocking=True)
        bk.attn.write_slots.copy_(batch.write_slots, non_blocking=True)
        bk.attn.gather.copy_(batch.gather, non_blocking=True)
        bk.attn.mask.copy_(batch.mask, non_blocking=True)
        # moved before the replay: a host-to-device copy waits for the stream, and it is idle now
        sel = (rows if keep is None else rows[keep]).to(bk.tokens.device)
        self.replays += 1
        if self.graphs:
            bk.graph.replay()
            logits = bk.logits
        else:
            logits = self._run(bk)
        return logits.index_select(0, sel).float()  # copies: the buffer is reused
