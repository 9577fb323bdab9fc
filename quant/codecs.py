"""Weight codecs on bitsandbytes: 4-bit (NF4, FP4) block-wise and 8-bit (row-wise or block-wise).

``quantize(w, codec, block_size) -> (packed, QuantState)`` and ``dequantize(packed, state) -> w`` run the
same code on CPU and CUDA. A state is a handful of small tensors plus metadata strings, so it fits a
safetensors file (``state.tensors()`` / ``QuantState.from_tensors``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

CODECS = ("nf4", "fp4", "int8-row", "int8-block")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CODE_CACHE: dict[tuple[str, str], Tensor] = {}


def _bnb():
    import bitsandbytes.functional as F

    return F


def load_backend() -> None:
    """Import bitsandbytes now (it takes seconds), so that the first decompression does not pay for it."""
    _bnb()


@dataclass(frozen=True)
class QuantState:
    codec: str  # one of CODECS
    shape: tuple[int, ...]  # of the original weight
    dtype: torch.dtype  # of the original weight, and of what dequantize returns
    block_size: int  # elements per absmax scale (block codecs); 0 for int8-row
    scales: Tensor  # fp32 absmax per block (4-bit, int8-block) or per row (int8-row)

    def tensors(self) -> dict[str, Tensor]:
        return {"scales": self.scales}

    def metadata(self) -> dict[str, str]:
        return {"codec": self.codec, "shape": ",".join(map(str, self.shape)),
                "dtype": str(self.dtype).removeprefix("torch."), "block_size": str(self.block_size)}

    @classmethod
    def from_tensors(cls, meta: dict[str, str], tensors: dict[str, Tensor]) -> "QuantState":
        if meta.get("codec") not in CODECS:
            raise ValueError(f"unknown codec {meta.get('codec')!r}; supported: {', '.join(CODECS)}")
        return cls(meta["codec"], tuple(int(x) for x in meta["shape"].split(",")), _DTYPES[meta["dtype"]],
                   int(meta["block_size"]), tensors["scales"])

    def with_scales(self, scales: Tensor) -> "QuantState":
        return QuantState(self.codec, self.shape, self.dtype, self.block_size, scales)


def _check(codec: str, block_size: int) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; supported: {', '.join(CODECS)}")
    if codec != "int8-row" and block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"invalid block size {block_size}: expected a power of two from 32 to 4096")


def packed_nbytes(numel: int, codec: str, block_size: int, rows: int) -> tuple[int, int]:
    """(packed bytes, scale bytes) of a weight with ``numel`` elements."""
    if codec in ("nf4", "fp4"):
        return (numel + 1) // 2, 4 * -(-numel // block_size)
    if codec == "int8-block":
        return numel, 4 * -(-numel // block_size)
    return numel, 4 * rows


def quantize(w: Tensor, codec: str = "nf4", block_size: int = 64) -> tuple[Tensor, QuantState]:
    """Pack ``w`` (2-D, float); the result lives on ``w``'s device."""
    _check(codec, block_size)
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize expects a 2-D float weight, got {tuple(w.shape)} {w.dtype}")
    F = _bnb()
    x = w.contiguous()
    if codec in ("nf4", "fp4"):
        packed, qs = F.quantize_4bit(x, blocksize=block_size, quant_type=codec, compress_statistics=False)
        scales = qs.absmax.float()
    elif codec == "int8-block":
        packed, qs = F.quantize_blockwise(x.float(), blocksize=block_size)
        scales = qs.absmax.float()
    else:
        packed, scales, _ = F.int8_vectorwise_quant(x.half() if x.device.type == "cuda" else x, threshold=0.0)
        scales = scales.float()
        block_size = 0
    return packed.reshape(-1).view(torch.uint8), QuantState(codec, tuple(w.shape), w.dtype, block_size, scales)


def _code(kind: str, device: torch.device) -> Tensor:
    key = (kind, str(device))
    if key not in _CODE_CACHE:
        F = _bnb()
        code = F.get_4bit_type(kind, device="cpu") if kind in ("nf4", "fp4") else F.create_dynamic_map()
        _CODE_CACHE[key] = code.to(device)
    return _CODE_CACHE[key]


def dequantize(packed: Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Tensor:
    """The weight back, shape ``state.shape``, in ``dtype`` (default: the original dtype)."""
    F = _bnb()
    from bitsandbytes.functional import QuantState as BnbState

    dtype = dtype or state.dtype
    dev = packed.device
    if state.codec in ("nf4", "fp4"):
        qs = BnbState(absmax=state.scales, shape=torch.Size(state.shape), code=_code(state.codec, dev),
                      blocksize=state.block_size, quant_type=state.codec, dtype=dtype)
        out = F.dequantize_4bit(packed.view(-1, 1), qs)
    elif state.codec == "int8-block":
        qs = BnbState(absmax=state.scales, code=_code("dynamic", dev), blocksize=state.block_size,
                      dtype=torch.float32)
        out = F.dequantize_blockwise(packed, qs).reshape(state.shape)
    else:
        q = packed.view(torch.int8).view(state.shape)
        # int8 values are exact in fp16/bf16, so the product can run at the target precision
        out = q.to(dtype) * (state.scales[:, None] / 127.0).to(dtype)
    return out.to(dtype).reshape(state.shape)
