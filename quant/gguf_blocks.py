"""GGUF block formats dequantized with PyTorch: the same arithmetic as the ``gguf`` package's numpy code
(so fp32 results are bit-identical, as tests/test_gguf_blocks.py checks), but vectorized over the whole
tensor and runnable on any device. Layouts: ggml's ``ggml-common.h`` (block sizes 32 and, for the
k-quants, 256 = QK_K).

Each function takes the blocks as a uint8 tensor ``[n_blocks, bytes_per_block]`` and returns fp32
``[n_blocks, elements_per_block]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

QK_K = 256


def _f16(b: Tensor) -> Tensor:
    """Little-endian fp16 bytes ``[n, 2]`` -> fp32 ``[n, 1]``."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, groups: int, width: int) -> Tensor:
    """``[n, groups * width]`` bytes -> ``[n, groups, 2, width]`` low then high nibbles."""
    q = qs.reshape(qs.shape[0], groups, 1, width)
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).view(1, 1, 2, 1)
    return (q >> shifts) & 0x0F


def q8_0(b: Tensor) -> Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).float() * d


def q4_0(b: Tensor) -> Tensor:
    n = b.shape[0]
    q = _nibbles(b[:, 2:], 1, 16).reshape(n, 32).to(torch.int8) - 8
    return _f16(b[:, :2]) * q.float()


def q4_1(b: Tensor) -> Tensor:
    n = b.shape[0]
    q = _nibbles(b[:, 4:], 1, 16).reshape(n, 32).float()
    return (_f16(b[:, :2]) * q) + _f16(b[:, 2:4])


def q5_0(b: Tensor) -> Tensor:
    n = b.shape[0]
    qh = b[:, 2:6].contiguous().view(torch.int32)  # [n, 1]: bit i is the fifth bit of element i
    bits = (qh >> torch.arange(32, dtype=torch.int32, device=b.device).view(1, 32)) & 1
    ql = _nibbles(b[:, 6:], 1, 16).reshape(n, 32)
    q = (ql | (bits.to(torch.uint8) << 4)).to(torch.int8) - 16
    return _f16(b[:, :2]) * q.float()


def _scale_min_k4(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4)."""
    s = scales.reshape(scales.shape[0], 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn  # [n, 8] each


def q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144], 4, 32).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    d = (_f16(b[:, :2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(b[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    qh = b[:, 16:48].reshape(n, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 1, 8, 1)
    ql = _nibbles(b[:, 48:176], 4, 32).reshape(n, 8, 32)
    q = (ql | ((qh & 1).reshape(n, 8, 32) << 4)).float()
    return (d * q - dm).reshape(n, QK_K)


def q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b[:, 208:210]) * scales).reshape(n, QK_K // 16, 1)
    ql = _nibbles(b[:, :128], 2, 64).reshape(n, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)
    qh = ((b[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 0x03).reshape(n, 8, 32)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, QK_K // 16, 16).float()
    return (d * q).reshape(n, QK_K)


DEQUANTIZE = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1, "Q5_0": q5_0, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}


CHUNK_BYTES = 2 << 20  # blocks dequantized at a time: bounds the temporaries to a few times this


def dequantize(data: np.ndarray, type_name: str, block_bytes: int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor | None:
    """A GGUF tensor's blocks (``data`` as the reader maps them) as ``dtype`` of ``shape`` (computed in
    fp32, then rounded); None for a type not handled here (the ``gguf`` package's numpy code then does it).
    The blocks are copied out of the file and dequantized a chunk at a time, straight into the result,
    so a large tensor (an embedding) costs little more than its result in memory; with ``device`` the
    result is made there (a chunk of blocks at a time crosses, no host copy of the whole)."""
    fn = DEQUANTIZE.get(type_name)
    if fn is None:
        return None
    flat = np.asarray(data, dtype=np.uint8).reshape(-1)
    n_blocks = flat.size // block_bytes
    per_block = math.prod(shape) // n_blocks
    out = torch.empty(n_blocks, per_block, dtype=dtype, device=device)  # [n_blocks, elements_per_block]
    step = max(1, CHUNK_BYTES // block_bytes)
    for a in range(0, n_blocks, step):
        b = min(n_blocks, a + step)
        chunk = torch.from_numpy(np.array(flat[a * block_bytes : b * block_bytes], copy=True))
        blocks = chunk.to(device).reshape(-1, block_bytes)
        out[a:b] = fn(blocks)
    return out.reshape(shape)
