"""Which code dequantizes on which device: on CUDA, hand-written Triton kernels (triton_kernels.py) for
the formats they cover, else ``torch.compile`` turning the PyTorch code of quant/ into fused kernels;
on the CPU, and wherever compilation is unavailable or fails, the same PyTorch code runs eagerly.

Set ``OFFLOAD_INFER_EAGER_DEQUANT=1`` to run eagerly on CUDA too (benchmarks compare the two).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

F = TypeVar("F", bound=Callable)

_compiled: dict[Callable, Callable] = {}
_failed: set[Callable] = set()


def eager_only() -> bool:
    return os.environ.get("OFFLOAD_INFER_EAGER_DEQUANT", "") not in ("", "0")


def use_triton(like: Tensor) -> bool:
    """Whether the hand-written Triton kernels (triton_kernels.py) dequantize tensors on ``like``'s device."""
    if like.device.type != "cuda" or eager_only():
        return False
    from quant import triton_kernels

    return triton_kernels.available()


def device_kernel(fn: F, like: Tensor) -> F:
    """``fn`` as it should run on ``like``'s device: compiled on CUDA (once per function), else as is."""
    if like.device.type != "cuda" or fn in _failed or eager_only():
        return fn
    compiled = _compiled.get(fn)
    if compiled is None:
        try:
            import torch

            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        except Exception as e:  # noqa: BLE001 - no Triton, unsupported platform: eager works everywhere
            return _give_up(fn, e)
        _compiled[fn] = compiled

    def run(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not stop a model from running
            _give_up(fn, e)
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def _give_up(fn: Callable, e: Exception) -> Callable:
    _failed.add(fn)
    print(f"note: compiled dequantization of {fn.__name__} unavailable ({type(e).__name__}: {str(e)[:120]}); "
          "running it eagerly", file=sys.stderr)
    return fn
