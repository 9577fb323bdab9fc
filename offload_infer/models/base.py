"""What every model family shares: weight containers, the family protocol and the causal LM wrapper."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from offload_infer.kv_cache import KVCache
from offload_infer.kv_pool import BatchAttention, KVPool
from offload_infer.models.attention import attention_backends, causal_mask
from quant.formats import Stored


class LayerSource(Protocol):
    """Gives each decoder layer's weights, on the compute device, in order."""

    n_layers: int
    between: Callable[[], None] | None  # called before each layer is used: other host work fits there

    def layers(self) -> Iterator[tuple[int, dict[str, Tensor]]]: ...

    def prefetch(self) -> None: ...


class ResidentLayers:
    """Every layer's weights already on the compute device."""

    def __init__(self, layers: list[dict[str, Tensor]]) -> None:
        self._layers = layers
        self.n_layers = len(layers)
        self.between: Callable[[], None] | None = None  # called before each layer (other host work)

    def layers(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        for i, w in enumerate(self._layers):
            if self.between is not None:
                self.between()
            yield i, w

    def prefetch(self) -> None:
        return None


def dense_layer(w: dict[str, Tensor | Stored], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
    """A layer from ``iter_layers`` as dense tensors on ``device``; matrices a checkpoint keeps compressed
    (``Stored``) are dequantized there."""
    return {k: t.dense(dtype, device) if isinstance(t, Stored) else t.to(device=device, dtype=dtype) for k, t in w.items()}


@dataclass
class ModelWeights:
    globals: dict[str, Tensor]  # embeddings, final norm, lm_head: always on the compute device
    layers: LayerSource


class FamilyConfig(Protocol):
    """A model family's frozen config; it also knows its checkpoint layout and its forward pass."""

    model_type: str
    vocab_size: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool

    def global_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def layer_shapes(self) -> dict[str, tuple[int, ...]]: ...

    def layer_prefix(self, i: int) -> str: ...

    def aliases(self, name: str) -> list[str]: ...

    def forward(
        self, weights: ModelWeights, tokens: Tensor, positions: Tensor, cache: KVCache, start: int, mask: Tensor
    ) -> Tensor: ...


class CausalLM:
    """A loaded model: config + weights on a device, with the forward used by every decoding mode."""

    def __init__(self, config: FamilyConfig, weights: ModelWeights, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.weights = weights
        self.device = device
        self.dtype = dtype

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def new_cache(self, max_len: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, max_len, self.device, self.dtype)

    def new_pool(self, n_blocks: int, block_size: int) -> KVPool:
        c = self.config
        return KVPool(c.n_layers, c.n_kv_heads, c.head_dim, n_blocks, block_size, self.device, self.dtype)

    def slot_bytes(self) -> int:
        """Bytes one token's keys and values take in a KV cache or pool."""
        c = self.config
        return KVPool.slot_bytes(c.n_layers, c.n_kv_heads, c.head_dim, self.dtype)

    @torch.inference_mode()
    def forward_batch(self, tokens: Tensor, positions: Tensor, batch: BatchAttention) -> Tensor:
        """Logits (fp32) for the new tokens of several requests flattened into ``tokens`` ``[N]``
        (``batch`` from ``KVPool.batch`` knows whose each is): ``[N, V]``, or ``[M, V]`` for the rows
        ``batch.logit_rows`` names."""
        if tokens.numel() == 0:
            raise ValueError("forward needs at least one token")
        if int(positions.max()) >= self.config.max_position_embeddings:
            raise ValueError(
                f"position {int(positions.max())} is beyond the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        tokens = tokens.to(self.device, non_blocking=True)
        positions = positions.to(self.device, non_blocking=True)
        with attention_backends(self.device):
            logits = self.config.forward(self.weights, tokens, positions, batch, 0, None)
        return logits.float()

    @torch.inference_mode()
    def forward(self, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor | None = None) -> Tensor:
        """Logits ``[N, V]`` (fp32) for ``N`` new tokens written after the cache's pending tail.

        ``mask`` ``[N, past + N]`` (True = visible) defaults to causal; ``past`` counts the committed
        and pending slots. The new entries stay pending until the cache is committed.
        """
        n = tokens.numel()
        if n == 0:
            raise ValueError("forward needs at least one token")
        if int(positions.max()) >= self.config.max_position_embeddings:  # checked before the copy: no device sync
            raise ValueError(
                f"position {int(positions.max())} is beyond the model's context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        tokens = tokens.to(self.device, non_blocking=True)
        positions = positions.to(self.device, non_blocking=True)
        start = cache.reserve(n)
        if mask is None:
            mask = causal_mask(start, n, self.device)
        else:
            mask = mask.to(self.device)
        assert mask.shape == (n, start + n), f"mask {tuple(mask.shape)} for {n} tokens after {start}"
        try:
            with attention_backends(self.device):
                logits = self.config.forward(self.weights, tokens, positions, cache, start, mask)
        except BaseException:
            cache.pending -= n
            raise
        return logits.float()
