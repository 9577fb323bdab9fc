"""Shared pieces of decoder attention: rotary embeddings, masks, and attention over a KV cache."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from offload_infer.kv_cache import KVCache
from offload_infer.kv_pool import BatchAttention, grouped_attention


def causal_mask(start: int, n: int, device: torch.device) -> Tensor:
    """``[n, start + n]`` bool: token ``i`` sees every earlier slot and the new tokens up to itself."""
    cols = torch.arange(start + n, device=device)
    rows = torch.arange(n, device=device) + start
    return cols[None, :] <= rows[:, None]


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> Tensor:
    """Inverse frequencies ``[head_dim/2]`` (fp32), with the ``linear`` and ``llama3`` scalings."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = None if not scaling else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv.float()
    if kind == "linear":
        return (inv / float(scaling["factor"])).float()
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")


@lru_cache(maxsize=32)
def rope_inv_freq_on(head_dim: int, theta: float, scaling: tuple | None, device: torch.device) -> Tensor:
    """``rope_inv_freq`` computed once per model shape and device (it sits on every forward's path)."""
    return rope_inv_freq(head_dim, theta, dict(scaling) if scaling else None).to(device)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin ``[N, 1, D]`` for the half-rotation (Hugging Face) layout."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[N, H, D]`` by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def signed_sin(sin: Tensor) -> Tensor:
    """``sin`` with its first half negated, for ``apply_rope_rolled``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rope_rolled(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """``apply_rope`` in three kernels instead of five (the half-rotation is a roll with the first half
    negated, folded into ``sin_signed``); last-bit differences, so for drafting models only."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


# Every backend but cuDNN's. cuDNN attention builds an execution plan for each new (query, key) length,
# tens of milliseconds of host time, and ours change every pass (the cache grows, trees vary): measured
# on an H100/H200, that alone made offloaded passes up to 60% slower in the decoding loop than the
# same pass repeated. The memory-efficient kernel takes the same masks with no per-shape set-up.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device) -> AbstractContextManager:
    """Wrap a whole forward in this (entering it costs ~10 us, too much to pay per layer)."""
    return sdpa_kernel(_BACKENDS) if device.type == "cuda" else nullcontext()


def attend(
    q: Tensor, k: Tensor, v: Tensor, cache: KVCache | BatchAttention, layer: int, start: int, mask: Tensor | None
) -> Tensor:
    """Attention of new tokens over cache slots ``[0, start + N)``, or of a batch of requests over
    their own slots in a shared pool (``BatchAttention``, which holds its own masks).

    q ``[N, H, D]``, k/v ``[N, KV, D]`` (stored into the cache at ``start``), mask ``[N, start + N]``
    bool (True = visible). Returns ``[N, H * D]``.
    """
    if isinstance(cache, BatchAttention):
        return cache.attend(layer, q, k, v)
    n, n_heads, head_dim = q.shape
    keys, values = cache.write(layer, start, k.transpose(0, 1), v.transpose(0, 1))  # [KV, S, D]
    out = grouped_attention(
        q.transpose(0, 1)[None],  # [1, H, N, D]
        keys[None],  # [1, KV, S, D]
        values[None],
        mask[None, None],  # [1, 1, N, S]
    )  # [1, H, N, D]
    return out[0].transpose(0, 1).reshape(n, n_heads * head_dim)


def head_rows(cache: KVCache | BatchAttention, x: Tensor) -> Tensor:
    """The rows of ``x`` ``[N, h]`` whose logits the forward returns (a batch may want only some)."""
    return cache.head_rows(x) if isinstance(cache, BatchAttention) else x
