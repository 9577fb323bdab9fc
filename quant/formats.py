"""Weight matrices kept in a compressed storage format until just before use.

A ``Stored`` is a matrix's named byte pieces (tensors as read from a checkpoint or made by a codec) and
the ``Format`` that turns them into the dense Linear weight ``[out, in]``. Offloaded layers copy the
pieces into their host buffer byte for byte and dequantize on the device after the copy (offload.py);
resident ones dequantize once at load (``Stored.dense``).

Formats: this project's codecs on bitsandbytes (``CodecFormat``), GGUF blocks (``GGUFFormat``), AWQ
and GPTQ group-quantized ints (``AWQFormat``, ``GPTQFormat``) and checkpoints pre-quantized by
bitsandbytes (``Bnb4Format``, ``Bnb8Format``). On CUDA the GGUF, AWQ and GPTQ arithmetic runs in the
Triton kernels of triton_kernels.py (the PyTorch code of gguf_blocks.py and int4_groups.py elsewhere, and
wherever Triton is missing).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from quant import gguf_blocks, int4_groups
from quant.codecs import QuantState, dequantize
from quant.kernels import use_triton


def _triton():
    """quant/triton_kernels.py, imported on first use on a GPU (importing Triton takes ~0.15 s)."""
    from quant import triton_kernels

    return triton_kernels


class Format(Protocol):
    shape: tuple[int, int]  # the dense weight's, [out, in]

    def dequantize(self, pieces: dict[str, Tensor], dtype: torch.dtype) -> Tensor: ...

    def describe(self) -> str: ...


def pread_into(path: str | os.PathLike, offset: int, out: Tensor) -> None:
    """Fill the host tensor ``out`` with the file's bytes from ``offset`` (``pread``: no memory map to
    fault in, and the GIL is released while the kernel copies)."""
    view = memoryview(out.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done : done + (64 << 20)]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: the file ends at {offset + done} bytes, before a tensor does (truncated?)")
            done += n
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FileSlice:
    """A piece not read yet: ``nbytes`` bytes of a file from ``offset``, holding ``dtype`` of ``shape``.
    Loading reads it straight into the layer buffer it belongs in (no intermediate copy)."""

    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def read_into(self, out: Tensor) -> None:
        """``out``: a host uint8 tensor of ``nbytes``."""
        pread_into(self.path, self.offset, out)

    def read(self, out: Tensor | None = None) -> Tensor:
        """The piece as a tensor, read into ``out`` (host uint8 of ``nbytes``) if given; a large piece
        (an embedding) is read in parallel chunks, so the page faults of its fresh memory are spread
        over several cores."""
        if out is None:
            out = torch.empty(self.nbytes, dtype=torch.uint8)
        step = -(-self.nbytes // (_CHUNKS * _CHUNK_ALIGN)) * _CHUNK_ALIGN  # a quarter, in whole 2 MB
        if self.nbytes < 2 * _PARALLEL_FROM:
            self.read_into(out)
        else:
            global _chunk_pool
            if _chunk_pool is None:
                _chunk_pool = ThreadPoolExecutor(_CHUNKS, thread_name_prefix="offload-read-chunk")
            spans = [(a, min(a + step, self.nbytes)) for a in range(0, self.nbytes, step)]
            list(_chunk_pool.map(lambda ab: pread_into(self.path, self.offset + ab[0], out[ab[0]: ab[1]]), spans))
        return out.view(self.dtype).view(self.shape)


_CHUNKS, _CHUNK_ALIGN, _PARALLEL_FROM = 4, 2 << 20, 32 << 20  # a piece of 64 MB or more is read by 4 threads
_chunk_pool: ThreadPoolExecutor | None = None


def piece_nbytes(p: Tensor | FileSlice) -> int:
    return p.nbytes if isinstance(p, FileSlice) else p.numel() * p.element_size()


@dataclass
class Stored:
    """A compressed matrix: its pieces (tensors on the host or wherever they were made, or file slices
    not read yet) and their format."""

    fmt: Format
    pieces: dict[str, Tensor | FileSlice]

    @property
    def nbytes(self) -> int:
        return sum(piece_nbytes(p) for p in self.pieces.values())

    def dense(self, dtype: torch.dtype, device: torch.device | str) -> Tensor:
        """The weight, dequantized on ``device``."""
        return self.fmt.dequantize({k: (p.read() if isinstance(p, FileSlice) else p).to(device)
                                    for k, p in self.pieces.items()}, dtype)


@dataclass(frozen=True)
class CodecFormat:
    """A matrix this project compressed (quant/codecs.py): pieces ``qdata`` (uint8) and ``scales`` (fp32)."""

    state: QuantState  # its ``scales`` are empty: they are a piece

    @property
    def shape(self) -> tuple[int, int]:
        return self.state.shape  # type: ignore[return-value]

    def dequantize(self, pieces: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return dequantize(pieces["qdata"], self.state.with_scales(pieces["scales"]), dtype)

    def describe(self) -> str:
        return self.state.codec


def codec_stored(packed: Tensor, state: QuantState) -> Stored:
    return Stored(CodecFormat(state.with_scales(torch.empty(0))), {"qdata": packed, "scales": state.scales.float()})


@dataclass(frozen=True)
class GGUFFormat:
    """GGUF blocks of one of ``gguf_blocks.DEQUANTIZE``'s types: piece ``blocks`` (uint8), rows in order."""

    type_name: str
    block_bytes: int
    shape: tuple[int, int]

    def dequantize(self, pieces: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        blocks = pieces["blocks"]
        if use_triton(blocks) and self.type_name in _triton().GGUF_TYPES:
            return _triton().gguf(blocks.contiguous(), self.type_name, self.block_bytes, self.shape[0], dtype)
        rows = gguf_blocks.DEQUANTIZE[self.type_name](blocks.reshape(-1, self.block_bytes))
        return rows.reshape(self.shape[0], -1).to(dtype)

    def describe(self) -> str:
        return self.type_name


@dataclass(frozen=True)
class AWQFormat:
    """AutoAWQ int4, gemm layout: pieces ``qweight``, ``qzeros``, ``scales``."""

    group: int
    shape: tuple[int, int]

    def dequantize(self, pieces: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        p = pieces
        if use_triton(p["qweight"]):
            return _triton().awq(p["qweight"].contiguous(), p["qzeros"].contiguous(), p["scales"].contiguous(),
                                 self.group, dtype)
        return int4_groups.awq(p["qweight"], p["qzeros"], p["scales"], self.group).to(dtype).contiguous()

    def describe(self) -> str:
        return f"awq int4 g{self.group}"


@dataclass(frozen=True)
class GPTQFormat:
    """GPTQ: pieces ``qweight``, ``qzeros``, ``scales`` and, where the checkpoint has one, ``g_idx``."""

    bits: int
    group: int
    zero_offset: int  # 1: the v1 format, zeros stored minus one; 0: v2
    shape: tuple[int, int]
    act_order: bool = False  # rows gathered by ``g_idx`` (quantized in activation order); else grouped in order

    def dequantize(self, pieces: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        p = {k: v for k, v in pieces.items() if k != "g_idx" or self.act_order}
        if use_triton(p["qweight"]):
            g = p.get("g_idx")
            return _triton().gptq(p["qweight"].contiguous(), p["qzeros"].contiguous(), p["scales"].contiguous(),
                                  g.contiguous() if g is not None else None, self.bits, self.group, self.zero_offset,
                                  dtype)
        return int4_groups.gptq(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), self.bits, self.group,
                                self.zero_offset).to(dtype).contiguous()

    def describe(self) -> str:
        return f"gptq int{self.bits} g{self.group}"


@dataclass(frozen=True)
class Bnb4Format:
    """A bitsandbytes 4-bit checkpoint's matrix (``Linear4bit`` serialization): pieces ``weight`` (packed),
    ``absmax``, ``quant_map`` and, with double quantization, ``nested_absmax`` and ``nested_quant_map``;
    the rest of its quantization state (types, block sizes, offset) is fixed at load."""

    quant_type: str  # nf4 | fp4
    blocksize: int
    nested_blocksize: int
    nested_offset: float
    shape: tuple[int, int]

    def dequantize(self, pieces: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        import bitsandbytes.functional as F

        p = pieces
        nested = None
        offset = None
        if "nested_absmax" in p:
            nested = F.QuantState(absmax=p["nested_absmax"], blocksize=self.nested_blocksize,
                                  code=p["nested_quant_map"], dtype=torch.float32)
            offset = torch.tensor(self.nested_offset, device=p["weight"].device)
        qs = F.QuantState(absmax=p["absmax"], shape=torch.Size(self.shape), code=p["quant_map"], blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=dtype, offset=offset, state2=nested)
        return F.dequantize_4bit(p["weight"].reshape(-1, 1), qs).to(dtype).reshape(self.shape)

    def describe(self) -> str:
        return f"bnb {self.quant_type}"


@dataclass(frozen=True)
class Bnb8Format:
    """A bitsandbytes LLM.int8 checkpoint's matrix: pieces ``weight`` (int8 ``[out, in]``) and ``SCB`` (the
    fp32 absmax of each row): ``w = weight * SCB / 127``."""

    shape: tuple[int, int]

    def dequantize(self, pieces: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        scale = (pieces["SCB"].float() / 127.0).unsqueeze(1)
        return (pieces["weight"].float() * scale).to(dtype)

    def describe(self) -> str:
        return "bnb int8"
