"""Triton kernels that dequantize stored formats on the GPU in one pass: each program reads a run of
blocks (or a tile of packed ints) once and writes its fp16/bf16/fp32 weights, with no temporaries.

The arithmetic is quant/gguf_blocks.py's and quant/int4_groups.py's, element for element, in fp32
with floating-point contraction off (``enable_fp_fusion=False``), so fp32 results equal the PyTorch
code's to the bit and lower precisions differ by their final rounding only. Layouts: ggml's
``ggml-common.h``; AutoAWQ's gemm packing.

``available()`` says whether Triton can run here (a CUDA device and the ``triton`` package).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch code runs instead
    triton = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


_OUT = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

if triton is not None:

    @triton.jit
    def _f16_at(p, off, ok):
        """The little-endian fp16 at byte pointers ``p + off`` (and ``off + 1``), as fp32."""
        lo = tl.load(p + off, mask=ok, other=0).to(tl.uint16)
        hi = tl.load(p + off + 1, mask=ok, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _store(out, idx, v, mask, OUT: tl.constexpr):
        if OUT == 0:
            tl.store(out + idx, v.to(tl.float16), mask=mask)
        elif OUT == 1:
            tl.store(out + idx, v.to(tl.bfloat16), mask=mask)
        else:
            tl.store(out + idx, v, mask=mask)

    @triton.jit
    def _scale_min(s, j, ok):
        """ggml's get_scale_min_k4: the six-bit scale and min of sub-block ``j`` (0..7) from 12 bytes ``s``."""
        lo = j < 4
        a = tl.load(s + j, mask=ok, other=0).to(tl.int32)
        b = tl.load(s + j + 4, mask=ok, other=0).to(tl.int32)
        c = tl.load(s + tl.where(lo, j, j - 4), mask=ok, other=0).to(tl.int32)
        sc = tl.where(lo, a & 63, (b & 0x0F) | ((c >> 2) & 0x30))
        mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 2) & 0x30))
        return sc, mn

    @triton.jit
    def _k_quant(src, out, n_blocks, KIND: tl.constexpr, BB: tl.constexpr, BLOCKS: tl.constexpr, OUT: tl.constexpr):
        """Q4_K (KIND 0), Q5_K (1) and Q6_K (2): ``BLOCKS`` super-blocks of 256 weights per program."""
        pid = tl.program_id(0)
        blk = pid * BLOCKS + tl.arange(0, BLOCKS)[:, None]  # [BLOCKS, 1]
        e = tl.arange(0, 256)[None, :]  # [1, 256]: element within the super-block
        ok = (blk < n_blocks) & (e >= 0)
        base = src + blk.to(tl.int64) * BB
        if KIND == 2:
            g = e // 128
            r = e % 128
            ql = tl.load(base + g * 64 + (r % 64), mask=ok, other=0).to(tl.int32)
            ql = (ql >> (4 * (r // 64))) & 0x0F
            qh = tl.load(base + 128 + g * 32 + (r % 32), mask=ok, other=0).to(tl.int32)
            qh = (qh >> (2 * (r // 32))) & 0x03
            q = (ql | (qh << 4)) - 32
            sc = tl.load(base + 192 + e // 16, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            d = _f16_at(base, 208, ok)
            v = (d * sc) * q.to(tl.float32)
        else:
            d = _f16_at(base, 0, ok)
            dmin = _f16_at(base, 2, ok)
            j = e // 32  # sub-block
            sc, mn = _scale_min(base + 4, j, ok)
            QS: tl.constexpr = 16 if KIND == 0 else 48
            byte = tl.load(base + QS + (j // 2) * 32 + (e % 32), mask=ok, other=0).to(tl.int32)
            q = (byte >> (4 * (j % 2))) & 0x0F
            if KIND == 1:
                hb = tl.load(base + 16 + (e % 32), mask=ok, other=0).to(tl.int32)
                q = q | (((hb >> j) & 1) << 4)
            v = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        _store(out, blk.to(tl.int64) * 256 + e, v, ok, OUT)

    @triton.jit
    def _legacy(src, out, n_blocks, KIND: tl.constexpr, BB: tl.constexpr, BLOCKS: tl.constexpr, OUT: tl.constexpr):
        """Q4_0 (0), Q4_1 (1), Q5_0 (2), Q8_0 (3): blocks of 32 weights."""
        pid = tl.program_id(0)
        blk = pid * BLOCKS + tl.arange(0, BLOCKS)[:, None]
        e = tl.arange(0, 32)[None, :]
        ok = (blk < n_blocks) & (e >= 0)
        base = src + blk.to(tl.int64) * BB
        d = _f16_at(base, 0, ok)
        if KIND == 3:
            q = tl.load(base + 2 + e, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            v = q * d
        else:
            QS: tl.constexpr = 4 if KIND == 1 else (6 if KIND == 2 else 2)
            byte = tl.load(base + QS + (e % 16), mask=ok, other=0).to(tl.int32)
            q = (byte >> (4 * (e // 16))) & 0x0F
            if KIND == 0:
                v = d * (q - 8).to(tl.float32)
            elif KIND == 1:
                v = d * q.to(tl.float32) + _f16_at(base, 2, ok)
            else:
                hb = tl.load(base + 2 + e // 8, mask=ok, other=0).to(tl.int32)  # bit e of the 32-bit qh
                v = d * ((q | (((hb >> (e % 8)) & 1) << 4)) - 16).to(tl.float32)
        _store(out, blk.to(tl.int64) * 32 + e, v, ok, OUT)

    @triton.jit
    def _awq(qw, qz, sc, out, n_in, n_out, group, BI: tl.constexpr, BO: tl.constexpr, OUT: tl.constexpr):
        """AWQ gemm layout -> ``out[o, i]``: a tile of ``BO`` output rows by ``BI`` input columns."""
        i = tl.program_id(0) * BI + tl.arange(0, BI)[None, :]  # [1, BI]
        o = tl.program_id(1) * BO + tl.arange(0, BO)[:, None]  # [BO, 1]
        ok = (i < n_in) & (o < n_out)
        shift = 4 * ((o % 8) % 2 * 4 + (o % 8) // 2)  # the nibble AWQ keeps column o % 8 in
        packed_cols = n_out // 8
        q = (tl.load(qw + i.to(tl.int64) * packed_cols + o // 8, mask=ok, other=0) >> shift) & 0x0F
        g = i // group
        z = (tl.load(qz + g * packed_cols + o // 8, mask=ok, other=0) >> shift) & 0x0F
        s = tl.load(sc + g * n_out + o, mask=ok, other=0).to(tl.float32)
        _store(out, o.to(tl.int64) * n_in + i, (q - z).to(tl.float32) * s, ok, OUT)


    @triton.jit
    def _gptq(qw, qz, sc, gi, out, n_in, n_out, group, zero_offset, BITS: tl.constexpr, HAS_G: tl.constexpr,
              BI: tl.constexpr, BO: tl.constexpr, OUT: tl.constexpr):
        """GPTQ -> ``out[o, i]``: ``qweight`` packed along the input rows, ``qzeros`` along the outputs."""
        PER: tl.constexpr = 32 // BITS
        MASK: tl.constexpr = (1 << BITS) - 1
        i = tl.program_id(0) * BI + tl.arange(0, BI)[None, :]  # [1, BI]
        o = tl.program_id(1) * BO + tl.arange(0, BO)[:, None]  # [BO, 1]
        ok = (i < n_in) & (o < n_out)
        q = (tl.load(qw + (i // PER).to(tl.int64) * n_out + o, mask=ok, other=0) >> (BITS * (i % PER))) & MASK
        if HAS_G:
            g = tl.load(gi + i, mask=i < n_in, other=0)
        else:
            g = i // group
        z = tl.load(qz + g * (n_out // PER) + o // PER, mask=ok, other=0)
        z = (((z >> (BITS * (o % PER))) & MASK) + zero_offset) & MASK
        s = tl.load(sc + g * n_out + o, mask=ok, other=0).to(tl.float32)
        _store(out, o.to(tl.int64) * n_in + i, (q - z).to(tl.float32) * s, ok, OUT)


_K = {"Q4_K": 0, "Q5_K": 1, "Q6_K": 2}
_LEGACY = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q8_0": 3}
GGUF_TYPES = frozenset(_K) | frozenset(_LEGACY)


def gguf(blocks: Tensor, type_name: str, block_bytes: int, rows: int, dtype: torch.dtype) -> Tensor:
    """GGUF blocks (uint8, contiguous, on a GPU) of ``type_name`` -> ``[rows, cols]`` ``dtype``."""
    n = blocks.numel() // block_bytes
    k = type_name in _K
    per = 256 if k else 32
    out = torch.empty(n * per, dtype=dtype, device=blocks.device)
    per_prog = 8 if k else 64
    grid = (triton.cdiv(n, per_prog),)
    kernel = _k_quant if k else _legacy
    kernel[grid](blocks, out, n, (_K if k else _LEGACY)[type_name], block_bytes, per_prog, _OUT[dtype],
                 enable_fp_fusion=False)
    return out.view(rows, -1)


def awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    """AWQ int4 (gemm layout, on a GPU) -> ``[out, in]`` ``dtype``."""
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty(n_out, n_in, dtype=dtype, device=qweight.device)
    bi, bo = 64, 64
    grid = (triton.cdiv(n_in, bi), triton.cdiv(n_out, bo))
    _awq[grid](qweight, qzeros, scales, out, n_in, n_out, group, bi, bo, _OUT[dtype], enable_fp_fusion=False)
    return out


def gptq(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor | None, bits: int, group: int,
         zero_offset: int, dtype: torch.dtype) -> Tensor:
    """GPTQ (on a GPU) -> ``[out, in]`` ``dtype``; ``g_idx`` None: rows grouped in order."""
    n_in, n_out = qweight.shape[0] * (32 // bits), qweight.shape[1]
    out = torch.empty(n_out, n_in, dtype=dtype, device=qweight.device)
    bi, bo = 64, 64
    grid = (triton.cdiv(n_in, bi), triton.cdiv(n_out, bo))
    g = g_idx if g_idx is not None else qweight  # not read without HAS_G
    _gptq[grid](qweight, qzeros, scales, g, out, n_in, n_out, group, zero_offset, bits, g_idx is not None, bi, bo,
                _OUT[dtype], enable_fp_fusion=False)
    return out


def warm_up(device: torch.device | str, dtype: torch.dtype = torch.float16) -> None:
    """Compile every kernel for ``dtype`` now (Triton compiles on first use, which costs seconds and
    host memory): benchmarks call this so that neither is counted as the model's."""
    if not available():
        return
    import gguf as _gguf

    for name in GGUF_TYPES:
        per, nbytes = _gguf.GGML_QUANT_SIZES[_gguf.GGMLQuantizationType[name]]
        blocks = torch.zeros(256 // per * nbytes, dtype=torch.uint8, device=device)
        gguf(blocks, name, nbytes, 1, dtype)
    q = torch.zeros(128, 8, dtype=torch.int32, device=device)
    awq(q, q[:1], torch.zeros(1, 64, dtype=torch.float16, device=device), 128, dtype)
    gptq(q, q[:1], torch.zeros(1, 8, dtype=torch.float16, device=device), None, 4, 1024, 1, dtype)
    torch.cuda.synchronize(device)
