"""Host buffers for streamed layers, page-locked at their exact size.

``torch.empty(n, pin_memory=True)`` comes from PyTorch's caching host allocator, which rounds every
block up to a power of two: a 150 MB layer takes 256 MB of RAM (1.5-1.7x over a whole model). Here a
layer's buffer is an anonymous memory mapping (its bytes rounded up to whole pages) whose pages are
then registered with CUDA (``cudaHostRegister``), which makes them page-locked, so host-to-device
copies from them run asynchronously at full PCIe speed, at no extra memory. The registration is undone
before the memory is freed. Where pinning is refused (a locked-memory limit, a container), the buffer
stays pageable and one warning says copies will be slower.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import warnings

import torch
from torch import Tensor

_warned = False
PAGE = mmap.PAGESIZE
HUGE_PAGES = os.environ.get("OFFLOAD_INFER_NO_HUGEPAGES", "") in ("", "0")


def _cudart():
    """The CUDA runtime PyTorch loaded, called through ctypes (which releases the GIL, so a buffer can be
    registered on one thread while others read weights into another); None if it cannot be found."""
    global _lib
    if _lib is None:
        _lib = False
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libcudart.so" in line}
            if paths:
                lib = ctypes.CDLL(sorted(paths)[0])
                lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
                lib.cudaHostRegister.restype = ctypes.c_int
                _lib = lib
        except OSError:
            pass
    return _lib or None


_lib = None


def _register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister (flags: portable); the CUDA error code, 0 on success."""
    lib = _cudart()
    if lib is not None:
        return int(lib.cudaHostRegister(ptr, nbytes, 1))
    return int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))


def _unregister(ptr: int) -> int:
    return int(torch.cuda.cudart().cudaHostUnregister(ptr))


def _clear_cuda_error() -> None:
    """A failed runtime call leaves its error as CUDA's "last error", which the next kernel launch
    check in PyTorch would report as its own: launch a trivial kernel to consume it."""
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass


class PinnedRegion:
    """Keeps a host tensor's pages registered with CUDA for as long as this object lives; it holds the
    tensor, so the memory cannot be freed before it is unregistered."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.ptr = tensor.data_ptr()

    def __del__(self) -> None:
        try:
            _unregister(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown after CUDA went away: nothing left to undo
            pass


def host_pages(nbytes: int) -> Tensor:
    """``nbytes`` of uninitialised host memory (uint8) in whole pages of its own (an anonymous mapping,
    huge pages advised), ready to be registered with ``pin``; plain pageable memory without CUDA."""
    if not torch.cuda.is_available() or nbytes == 0:
        return torch.empty(nbytes, dtype=torch.uint8)
    # whole pages of our own: registering a page another buffer shares would fail as already
    # registered, and the tensor's storage then starts where the registration does
    span = -(-nbytes // PAGE) * PAGE
    pages = mmap.mmap(-1, span, flags=mmap.MAP_PRIVATE)  # private: counted as the process's anonymous memory
    if HUGE_PAGES and hasattr(mmap, "MADV_HUGEPAGE"):
        try:  # transparent huge pages: far fewer pages for cudaHostRegister to fault in and pin
            pages.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return torch.frombuffer(pages, dtype=torch.uint8, count=nbytes)  # holds the mapping while it lives


def pin(t: Tensor) -> PinnedRegion | None:
    """Page-lock a ``host_pages`` tensor for CUDA (its contents are kept). Returns the registration that
    must be kept alive with it, or None when the memory stays pageable (one warning says so)."""
    global _warned
    if not torch.cuda.is_available() or t.numel() == 0:
        return None
    err = _register(t.data_ptr(), -(-t.numel() // PAGE) * PAGE)
    if err == 0:
        return PinnedRegion(t)
    _clear_cuda_error()
    if not _warned:
        warnings.warn(f"pinning {t.numel() / 2**20:.0f} MB of host memory failed (CUDA error {err}); streamed layers "
                      "stay in pageable memory and copies will be slower (about 22 instead of 55 GB/s on PCIe 5)",
                      stacklevel=2)
        _warned = True
    return None


def pinned_empty(nbytes: int) -> tuple[Tensor, PinnedRegion | None]:
    """``nbytes`` of uninitialised host memory (uint8), page-locked for CUDA when it can be. Returns the
    tensor and the registration that must be kept alive with it (None when the memory stays pageable)."""
    t = host_pages(nbytes)
    return t, pin(t)


def caching_pinned_empty(nbytes: int) -> Tensor:
    """The old way, kept for benchmarks that compare against it: PyTorch's caching host allocator
    (sizes rounded up to a power of two)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
