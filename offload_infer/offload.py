"""Weight streaming (FlexGen-style): decoder layers in pinned host memory, one contiguous (optionally
int4/int8-compressed) buffer per layer, copied into a ring of device buffers on a side CUDA stream and
decompressed on the device just before use.

Pass structure on CUDA: while layer k computes on the default stream, the copy stream moves layer
k+R-1 into the slot that layer k-1 has just released (events order both ways). ``prefetch()`` issues
the first R copies of the next pass early, so they overlap the SSMs building the next tree. Without
CUDA the same plan runs on the CPU: each streamed layer is decompressed from its host buffer per pass.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor

from offload_infer.memory import (Footprint, OffloadPlanError, check_footprint,  # noqa: F401 (OffloadPlanError: re-export)
                                  kv_pool_bytes, layer_source_bytes)
from offload_infer.models.base import FamilyConfig, dense_layer
from offload_infer.pinned import PinnedRegion, caching_pinned_empty, host_pages, pin as pin_pages, pinned_empty
from quant.codecs import load_backend, packed_nbytes, quantize
from quant.formats import FileSlice, Format, Stored, codec_stored, piece_nbytes

ALIGN = 64  # byte alignment of every tensor inside a layer buffer (keeps dtype views legal and copies fast)


def parse_size(text: str | int) -> int:
    """Bytes from ``"4096"`` (MB), ``"512M"``, ``"4G"``, ``"100K"``."""
    if isinstance(text, int):
        return text * 2**20
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"invalid size {text!r}: expected a number of MB or one with a K/M/G/T suffix")
    unit = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def format_size(n: int) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _is_compressed(shape: tuple[int, ...], codec: str | None) -> bool:
    return codec is not None and len(shape) == 2


def layer_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, codec: str | None, block_size: int,
                stored: dict[str, list[int]] | None = None) -> int:
    """Bytes of one layer's packed buffer. ``stored``: the piece sizes of matrices the checkpoint keeps
    compressed (they go into the buffer as they are)."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if stored and name in stored:
            total += sum(_align(n) for n in stored[name])
        elif _is_compressed(shape, codec):
            packed, scales = packed_nbytes(numel, codec, block_size, shape[0])  # type: ignore[arg-type]
            total += _align(packed) + _align(scales)
        else:
            total += _align(numel * size)
    return total


@dataclass(frozen=True)
class OffloadPlan:
    codec: str | None  # compression of streamed layers: nf4 | fp4 | int8-row | int8-block | None (model dtype)
    block_size: int  # elements per scale for block codecs
    resident_layers: tuple[int, ...]  # decoder layers kept on the device
    resident_compressed: bool  # resident layers stay compressed on the device (decompressed per pass, no PCIe)
    streamed_layers: tuple[int, ...]  # decoder layers that stream from host memory every pass
    ring_slots: int  # device buffers the streamed layers rotate through
    dense_layer_bytes: int  # one decoder layer at the compute dtype
    packed_layer_bytes: int  # the largest decoder layer's host buffer (compressed when codec is set)
    global_bytes: int  # embeddings, final norm, lm_head: always on the device
    reserve_bytes: int  # the user's cap on device memory for the LLM's weights
    layer_packed: tuple[int, ...] = ()  # each layer's host buffer, where layers differ (a checkpoint's own formats)
    as_stored: bool = False  # some matrices stream in the checkpoint's own quantized format

    def packed_bytes_of(self, i: int) -> int:
        return self.layer_packed[i] if self.layer_packed else self.packed_layer_bytes

    @property
    def resident_layer_bytes(self) -> int:
        return self.packed_layer_bytes if self.resident_compressed else self.dense_layer_bytes

    @property
    def gpu_bytes(self) -> int:
        ring = self.ring_slots * self.packed_layer_bytes if self.streamed_layers else 0
        return self.global_bytes + len(self.resident_layers) * self.resident_layer_bytes + ring

    @property
    def pinned_bytes(self) -> int:
        return sum(self.packed_bytes_of(i) for i in self.streamed_layers)

    def _formats(self) -> str:
        if self.as_stored:
            return "quantized matrices as stored" + (f", others {self.codec}" if self.codec else "")
        return f"codec {self.codec or 'none'}"

    def describe(self) -> str:
        gb = 1e9
        kind = " (compressed)" if self.resident_compressed and self.resident_layers else ""
        return (f"offload plan: {len(self.resident_layers)} resident{kind} / {len(self.streamed_layers)} streamed layers, "
                f"{self._formats()}, {self.ring_slots} ring slots; device {self.gpu_bytes / gb:.2f} GB "
                f"(reserve {self.reserve_bytes / gb:.2f} GB), pinned host {self.pinned_bytes / gb:.2f} GB")


def make_plan(config: FamilyConfig, dtype: torch.dtype, reserve_bytes: int, codec: str | None = None,
              block_size: int = 64, ring_slots: int = 2, resident_compressed: bool = True,
              stored: list[dict[str, list[int]]] | None = None) -> OffloadPlan:
    """Which layers stay on the device and which stream. With a codec, resident layers stay compressed
    by default (2-4x more of them fit; decompressing costs far less than copying). ``stored``: per layer,
    the piece sizes of the matrices the checkpoint keeps compressed (GGUF blocks, AWQ, ...): they
    stream as stored, and resident layers keep them compressed too."""
    size = torch.tensor([], dtype=dtype).element_size()
    shapes = config.layer_shapes()
    dense = sum(math.prod(s) for s in shapes.values()) * size
    sizes = tuple(layer_bytes(shapes, dtype, codec, block_size, st) for st in stored) if stored else ()
    packed = max(sizes) if sizes else layer_bytes(shapes, dtype, codec, block_size)
    glob = sum(math.prod(s) for s in config.global_shapes().values()) * size
    n = config.n_layers
    compressed = resident_compressed and (codec is not None or any(stored or ()))
    per_resident = packed if compressed else dense
    if reserve_bytes >= glob + n * per_resident:
        resident = n
    else:
        need = glob + ring_slots * packed
        if reserve_bytes < need:
            raise OffloadPlanError(
                f"--offload-reserve-space-size of {format_size(reserve_bytes)} is too small: the embeddings and "
                f"head need {format_size(glob)} and {ring_slots} ring buffers of one streamed layer "
                f"{format_size(ring_slots * packed)}, at least {format_size(need)} in all"
            )
        resident = min(n - 1, (reserve_bytes - need) // per_resident)
    # spread resident layers between streamed ones: their compute then runs while the next copy is in flight
    keep = {int((j + 0.5) * n / resident) for j in range(resident)} if resident else set()
    return OffloadPlan(codec, block_size, tuple(sorted(keep)), compressed,
                       tuple(i for i in range(n) if i not in keep), ring_slots, dense, packed, glob, reserve_bytes,
                       sizes if len(set(sizes)) > 1 else (), any(stored or ()))


def plan_footprint(plan: OffloadPlan, device: torch.device, kv_bytes: int, activation_bytes: int = 256 * 2**20,
                   staging_bytes: int = 0) -> Footprint:
    """What an offloaded LLM allocates: its streamed layers pinned on the host, the layers being loaded
    (``staging_bytes``) on the host, the rest where the model runs (the ring only on a GPU)."""
    fp = Footprint(host={"pinned layers": plan.pinned_bytes, "loading": staging_bytes})
    on_device = plan.gpu_bytes
    if device.type != "cuda" and plan.streamed_layers:
        on_device -= plan.ring_slots * plan.packed_layer_bytes
    fp.add("LLM weights", on_device, device)
    fp.add("KV cache", kv_bytes, device)
    fp.add("activations", activation_bytes, device)
    return fp


def check_plan(plan: OffloadPlan, device: torch.device, kv_bytes: int, activation_bytes: int = 256 * 2**20,
               staging_bytes: int = 0, others: Footprint | None = None) -> Footprint:
    """Fail early, with numbers, when the plan (with ``others``: SSMs, their caches) cannot fit in host
    RAM or device memory; returns what was checked."""
    fp = plan_footprint(plan, device, kv_bytes, activation_bytes, staging_bytes)
    fp = fp.merged(others) if others else fp
    check_footprint(fp, device, " (use --4bit-quantization to shrink it)",
                    ". Lower --offload-reserve-space-size or --max-sequence-length")
    return fp


# -- packed layers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    key: str  # the format's name for it ("" for a raw tensor)
    offset: int  # in the layer buffer
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, buf: Tensor) -> Tensor:
        return buf[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class Entry:
    name: str
    pieces: list[Piece]
    fmt: Format | None = None  # compressed entries: turns the pieces into the weight; None: one raw tensor


@dataclass
class PackedLayer:
    buffer: Tensor  # uint8, pinned when possible: the layer in one piece
    entries: list[Entry] = field(default_factory=list)
    pinned: PinnedRegion | None = None  # keeps ``buffer``'s pages registered with CUDA while the layer lives


def host_buffer(nbytes: int, pin: bool, allocator: str = "registered") -> tuple[Tensor, PinnedRegion | None]:
    """A layer's host buffer: page-locked at its exact size (``registered``, see ``pinned.py``), from
    PyTorch's power-of-two caching allocator (``caching``: only for benchmarks comparing the two), or
    pageable when ``pin`` is off or there is no CUDA."""
    if pin and allocator == "caching" and torch.cuda.is_available():
        return caching_pinned_empty(nbytes), None
    if pin:
        return pinned_empty(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8), None


def _bytes(t: Tensor) -> Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def pack_layer(weights: dict[str, Tensor | Stored], codec: str | None, block_size: int, quant_device: torch.device,
               pin: bool = True, allocator: str = "registered", device: torch.device | None = None,
               ready: tuple[Tensor, PinnedRegion | None] | None = None) -> PackedLayer:
    """One buffer holding every tensor of a layer (on the host, or on ``device`` for a resident layer).
    Matrices the checkpoint keeps compressed (``Stored``) go in as they are; other 2-D weights are
    compressed when ``codec`` is set. Each piece is copied straight into the buffer from wherever it was
    made (no second host copy on the way)."""
    entries: list[Entry] = []
    sources: list[Tensor | FileSlice] = []
    offset = 0
    for name, t in weights.items():
        if isinstance(t, Tensor) and _is_compressed(tuple(t.shape), codec):
            t = codec_stored(*quantize(t.to(quant_device), codec, block_size))  # type: ignore[arg-type]
        parts = t.pieces if isinstance(t, Stored) else {"": t}
        pieces = []
        for key, p in parts.items():
            raw = p if isinstance(p, FileSlice) else _bytes(p)
            nbytes = piece_nbytes(raw)
            pieces.append(Piece(key, offset, nbytes, p.dtype, tuple(p.shape)))
            sources.append(raw)
            offset += _align(nbytes)
        entries.append(Entry(name, pieces, t.fmt if isinstance(t, Stored) else None))
    if device is not None and device.type != "cpu":
        buf, region = torch.empty(max(offset, ALIGN), dtype=torch.uint8, device=device), None
    elif ready is not None and ready[0].numel() == max(offset, ALIGN):
        buf, region = ready  # made for it by the caller (pinned after the read)
    else:
        buf, region = host_buffer(max(offset, ALIGN), pin, allocator)
    pieces = [p for e in entries for p in e.pieces]
    reads = []
    for piece, raw in zip(pieces, sources):
        dst = buf[piece.offset : piece.offset + piece.nbytes]
        if isinstance(raw, FileSlice) and dst.device.type == "cpu":
            reads.append((raw, dst))  # read from the file straight into the buffer
        else:
            dst.copy_(raw.read().view(-1).view(torch.uint8) if isinstance(raw, FileSlice) else raw)
    if reads:
        list(_readers().map(lambda r: r[0].read_into(r[1]), reads))
    return PackedLayer(buf, entries, region)


_pool: ThreadPoolExecutor | None = None
PIN_THREADS = 2  # threads registering layer buffers with CUDA while the next layers are read


def _readers() -> ThreadPoolExecutor:
    """Threads reading file slices into layer buffers (``pread`` releases the GIL: reads overlap)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(4, thread_name_prefix="offload-read")
    return _pool


def unpack_layer(buf: Tensor, layer: PackedLayer, dtype: torch.dtype) -> dict[str, Tensor]:
    """Dense weights from a layer buffer (host or device); compressed ones are decompressed where ``buf`` is."""
    out = {}
    for e in layer.entries:
        if e.fmt is None:
            out[e.name] = e.pieces[0].view(buf)
        else:
            out[e.name] = e.fmt.dequantize({p.key: p.view(buf) for p in e.pieces}, dtype)
    return out


class StreamedLayers:
    """A ``LayerSource`` whose non-resident layers stream from host buffers (see the module docstring)."""

    def __init__(self, n_layers: int, resident: dict[int, dict[str, Tensor] | PackedLayer], packed: dict[int, PackedLayer],
                 device: torch.device, dtype: torch.dtype, ring_slots: int) -> None:
        self.n_layers = n_layers
        self.resident = resident
        self.packed = packed
        self.device = device
        self.dtype = dtype
        self.order = sorted(packed)  # streamed layers in pass order
        self.ring = max(1, min(ring_slots, len(self.order)))
        self.bytes_streamed = 0  # host-to-device bytes since creation (benchmarks read it)
        self._issued: set[int] = set()  # positions in ``order`` whose copy is in flight for this pass
        self.cuda = device.type == "cuda" and bool(self.order)
        self.between: Callable[[], None] | None = None  # called before each layer (other host work)
        self._newest = -1  # ring slot of the copy issued last
        if self.cuda:
            size = max(p.buffer.numel() for p in packed.values())
            self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(self.ring)]
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(self.ring)]
            self.free = [torch.cuda.Event() for _ in range(self.ring)]
            for ev in self.free:
                ev.record()

    def _issue(self, pos: int) -> None:
        if pos in self._issued or pos >= len(self.order):
            return
        s = pos % self.ring
        buf = self.packed[self.order[pos]].buffer
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[s])  # the slot's previous layer is done with it
            self.slots[s][: buf.numel()].copy_(buf, non_blocking=True)
            self.ready[s].record(self.copy_stream)
        self._newest = s
        self.bytes_streamed += buf.numel()
        self._issued.add(pos)

    def prefetch(self) -> None:
        if self.cuda:
            for pos in range(self.ring):
                self._issue(pos)

    def copies_in_flight(self) -> bool:
        """Whether the layer copy issued last is still running (the host is ahead of the copy engine)."""
        return not self.cuda or self._newest < 0 or not self.ready[self._newest].query()

    def layers(self) -> Iterator[tuple[int, dict[str, Tensor]]]:
        pos = 0
        self.prefetch()  # no-op if already issued; otherwise the copies overlap the resident layers' compute
        for i in range(self.n_layers):
            if self.cuda and i not in self.resident:
                for ahead in range(pos, pos + self.ring):
                    self._issue(ahead)  # before any other host work: the copies stream meanwhile
            if self.between is not None:
                self.between()
            if i in self.resident:
                w = self.resident[i]
                yield i, (unpack_layer(w.buffer, w, self.dtype) if isinstance(w, PackedLayer) else w)
                continue
            layer = self.packed[i]
            if not self.cuda:
                yield i, unpack_layer(layer.buffer, layer, self.dtype)
                continue
            s = pos % self.ring
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])
            yield i, unpack_layer(self.slots[s], layer, self.dtype)
            self.free[s].record()  # everything using slot s has been enqueued
            pos += 1
        self._issued.clear()


class OffloadBuilder:
    """``load_model``'s layer builder for an offloaded LLM: plans first, then packs layer by layer
    straight from the checkpoint into pinned buffers (no second host copy of the weights)."""

    def __init__(self, reserve_bytes: int, codec: str | None = None, block_size: int = 64, ring_slots: int = 2,
                 kv_bytes: int = 0, pin: bool = True, verbose: bool = True, resident_compressed: bool = True,
                 kv_tokens: int = 0, pin_allocator: str = "registered", others: Footprint | None = None,
                 requantize: bool = False) -> None:
        self.requantize = requantize  # a quantized checkpoint's matrices: dequantized, then compressed with the
        # codec (or streamed dense without one)
        self.others = others  # what else the run allocates (SSMs, their KV pools), counted in the pre-flight
        self.pin_allocator = pin_allocator  # "registered" (exact size) or "caching" (PyTorch's; benchmarks)
        self.reserve_bytes, self.codec, self.block_size = reserve_bytes, codec, block_size
        self.resident_compressed = resident_compressed
        self.kv_tokens = kv_tokens  # KV cache slots the engine will allocate (counted in the device check)
        self.ring_slots, self.kv_bytes, self.pin, self.verbose = ring_slots, kv_bytes, pin, verbose
        self.plan: OffloadPlan | None = None
        self.footprint: Footprint | None = None  # what the pre-flight counted
        self.pin_wait_s = 0.0  # building: time spent, after the last read, waiting for buffers to be pinned

    def prepare(self, config: FamilyConfig, device: torch.device, dtype: torch.dtype,
                stored: list[dict[str, list[int]]] | None = None, staged_layers: int = 1) -> OffloadPlan:
        """Plan and check memory. ``stored``: per layer, the piece sizes of the matrices the checkpoint
        keeps compressed (they stream as stored; the codec applies to the others). ``staged_layers``:
        layers the loader holds on the host at once (2 when it reads ahead)."""
        if self.requantize:  # dequantized at load: compressed with the codec, or dense without one
            stored = None
        elif stored and any(stored) and self.codec and self.verbose:
            print(f"note: the checkpoint's quantized matrices stream as stored; {self.codec} applies to its other "
                  "matrices (--requantize nf4|int8 converts them)", file=sys.stderr)
        self.plan = make_plan(config, dtype, self.reserve_bytes, self.codec, self.block_size, self.ring_slots,
                              self.resident_compressed, stored)
        kv = self.kv_bytes + kv_pool_bytes(config, dtype, self.kv_tokens)
        # the layers being read, and on the CPU the compressed copy made before it goes into its buffer
        staging = staged_layers * layer_source_bytes(config, dtype)
        if self.plan.codec and device.type != "cuda":
            staging += self.plan.packed_layer_bytes
        self.footprint = check_plan(self.plan, device, kv, staging_bytes=staging, others=self.others)
        if self.verbose:
            print(self.plan.describe(), file=sys.stderr)
        return self.plan

    def __call__(self, config: FamilyConfig, layers: Iterator[dict[str, Tensor]], device: torch.device,
                 dtype: torch.dtype) -> StreamedLayers:
        plan = self.plan or self.prepare(config, device, dtype)
        if plan.codec:
            load_backend()
        resident: dict[int, dict[str, Tensor] | PackedLayer] = {}
        packed: dict[int, PackedLayer] = {}
        qdev = device if device.type == "cuda" else torch.device("cpu")
        # on CUDA, pinning a buffer (cudaHostRegister) costs about as much as reading its bytes: each
        # buffer is read first (its pages faulted in by the reading threads, huge pages advised), then
        # pinned on a thread while the next layers are read (H200, 7B Q4_K_M: 1.28-1.49x the read's time,
        # against 1.54-1.76x pinning each buffer ahead of its read). PyTorch's caching allocator
        # (benchmarks only) hands out buffers pinned already.
        pool = ThreadPoolExecutor(PIN_THREADS, thread_name_prefix="offload-pin") if device.type == "cuda" and self.pin \
            and self.pin_allocator == "registered" else None
        pinning = {}
        try:
            for i, w in enumerate(layers):
                if self.requantize:
                    w = {k: t.dense(dtype, qdev) if isinstance(t, Stored) else t for k, t in w.items()}
                if i in plan.resident_layers and not plan.resident_compressed:
                    resident[i] = dense_layer(w, device, dtype)
                elif i in plan.resident_layers:
                    resident[i] = pack_layer(w, plan.codec, plan.block_size, qdev, False, device=device)
                elif pool is not None:
                    packed[i] = pack_layer(w, plan.codec, plan.block_size, qdev, False,
                                           ready=(host_pages(plan.packed_bytes_of(i)), None))
                    pinning[i] = pool.submit(pin_pages, packed[i].buffer)
                else:
                    packed[i] = pack_layer(w, plan.codec, plan.block_size, qdev, self.pin, self.pin_allocator)
            t = time.perf_counter()
            for i, fut in pinning.items():
                packed[i].pinned = fut.result()
            self.pin_wait_s += time.perf_counter() - t
        finally:  # a load that fails part way leaves no thread behind
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return StreamedLayers(config.n_layers, resident, packed, device, dtype, plan.ring_slots)
