"""Which code dequantizes on which device: on CUDA, the Triton kernels of triton_kernels.py; on the CPU,
and on a GPU without Triton, the PyTorch code of gguf_blocks.py and int4_groups.py (the same arithmetic).

Set ``OFFLOAD_INFER_EAGER_DEQUANT=1`` to use the PyTorch code on CUDA too (benchmarks compare the two).
"""

from __future__ import annotations

import os

from torch import Tensor


def eager_only() -> bool:
    return os.environ.get("OFFLOAD_INFER_EAGER_DEQUANT", "") not in ("", "0")


def use_triton(like: Tensor) -> bool:
    """Whether the Triton kernels dequantize tensors on ``like``'s device."""
    if like.device.type != "cuda" or eager_only():
        return False
    from quant import triton_kernels

    return triton_kernels.available()
