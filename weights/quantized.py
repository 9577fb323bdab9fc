"""Checkpoints whose layer matrices are already quantized, read without re-quantizing.

A ``Scheme`` says which of a checkpoint's matrices it keeps compressed, which tensors hold each one's
pieces, and reads them as a ``quant.formats.Stored`` (pieces as stored, plus their format). Schemes:

- GGUF blocks of the types ``quant/gguf_blocks.py`` dequantizes (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K,
  Q6_K); other GGUF types are dequantized at load, with a one-line notice;
- this project's own compressed safetensors (``offload-infer compress``);
- AutoAWQ int4 (gemm layout) and GPTQ 2/4/8-bit (v1 or v2 zeros, activation order through ``g_idx``),
  from ``config.json``'s ``quantization_config``;
- bitsandbytes pre-quantized 4-bit (nf4/fp4, with or without double quantization) and LLM.int8.

Any other ``quantization_config`` is refused with a clear error.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Protocol

import torch
from torch import Tensor

from quant.codecs import CODECS, QuantState, packed_nbytes
from quant.gguf_blocks import DEQUANTIZE
from quant.formats import (AWQFormat, Bnb4Format, Bnb8Format, CodecFormat, GGUFFormat, GPTQFormat, Stored)
from weights.compress import compression_of
from weights.sources import CheckpointError, GGUFSource, TensorSource

_SIZES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.int32: 4, torch.uint8: 1, torch.int8: 1}


class Scheme(Protocol):
    def covers(self, name: str) -> bool:
        """Whether the matrix the layout calls ``name`` (``...q_proj.weight``) is stored compressed."""
        ...

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Raise a CheckpointError unless its pieces hold a matrix of ``shape``."""
        ...

    def piece_names(self, name: str) -> list[str]: ...

    def piece_nbytes(self, name: str) -> list[int]: ...

    def read(self, name: str, shape: tuple[int, ...]) -> Stored: ...

    def dense(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """The matrix dequantized on the CPU."""
        ...


class _Dense:
    """The default ``dense``: read the pieces, dequantize them on the CPU."""

    def dense(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return self.read(name, shape).dense(dtype, "cpu")  # type: ignore[attr-defined]


def _nbytes(source: TensorSource, name: str, dtype: torch.dtype) -> int:
    """A tensor's stored bytes: from the file's header where it says (safetensors), else shape x ``dtype``."""
    nbytes = getattr(source, "nbytes", None)
    return nbytes(name) if nbytes is not None else math.prod(source.shape(name)) * _SIZES[dtype]


class GGUFScheme:
    """GGUF matrices of a block type dequantized on the device, streamed as their blocks."""

    def __init__(self, source: GGUFSource) -> None:
        self.source = source
        self._noted: set[str] = set()

    def covers(self, name: str) -> bool:
        kind = self.source.matrix_type(name)
        if kind is None:
            return False
        if kind not in DEQUANTIZE and kind not in ("F32", "F16", "BF16") and kind not in self._noted:
            self._noted.add(kind)
            print(f"note: GGUF type {kind} is dequantized at load (streamed as stored: Q4_0, Q4_1, "
                  "Q5_0, Q8_0, Q4_K, Q5_K, Q6_K)", file=sys.stderr)
        return kind in DEQUANTIZE

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if tuple(self.source.shape(name)) != tuple(shape):
            raise CheckpointError(f"{self.source.where(name)}: tensor has shape {self.source.shape(name)}, "
                                  f"the config needs {tuple(shape)}")

    def piece_names(self, name: str) -> list[str]:
        return [name]

    def piece_nbytes(self, name: str) -> list[int]:
        return [self.source.nbytes(name)]

    def read(self, name: str, shape: tuple[int, ...]) -> Stored:
        import gguf

        kind = self.source.matrix_type(name)
        assert kind in DEQUANTIZE
        block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
        return Stored(GGUFFormat(kind, block_bytes, (shape[0], shape[1])), {"blocks": self.source.blocks(name)})

    def dense(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return self.source.load(name, dtype)  # a chunk of blocks at a time: small temporaries


class PackedScheme(_Dense):
    """This project's compressed safetensors: ``W.qdata`` (uint8) and ``W.scales`` (fp32) per matrix."""

    def __init__(self, source: TensorSource, meta: dict[str, str]) -> None:
        self.source, self.codec, self.block_size = source, meta["codec"], int(meta["block_size"])
        if self.codec not in CODECS:
            raise CheckpointError(f"unknown codec {self.codec!r} in a compressed checkpoint; supported: {', '.join(CODECS)}")

    def covers(self, name: str) -> bool:
        return name + ".qdata" in self.source.keys()

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        qbytes, sbytes = packed_nbytes(math.prod(shape), self.codec, self.block_size, shape[0])
        for part, nbytes in ((".qdata", qbytes), (".scales", sbytes)):
            have = math.prod(self.source.shape(name + part)) * (1 if part == ".qdata" else 4) \
                if name + part in self.source.keys() else 0
            if have != nbytes:
                raise CheckpointError(f"{self.source.where(name + '.qdata')}: packed tensor {name + part!r} has "
                                      f"{have} bytes, {self.codec} of shape {tuple(shape)} needs {nbytes}")

    def piece_names(self, name: str) -> list[str]:
        return [name + ".qdata", name + ".scales"]

    def piece_nbytes(self, name: str) -> list[int]:
        return [_nbytes(self.source, name + ".qdata", torch.uint8), _nbytes(self.source, name + ".scales", torch.float32)]

    def read(self, name: str, shape: tuple[int, ...]) -> Stored:
        state = QuantState(self.codec, tuple(shape), torch.float32, self.block_size, torch.empty(0))
        return Stored(CodecFormat(state), {"qdata": self.source.load(name + ".qdata").reshape(-1).view(torch.uint8),
                                           "scales": self.source.load(name + ".scales").float()})


def _base(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


class _GroupScheme(_Dense):
    """AWQ and GPTQ: ``qweight``/``qzeros``/``scales`` (+ GPTQ's ``g_idx``) beside where ``weight`` would be."""

    parts = ("qweight", "qzeros", "scales")

    def __init__(self, source: TensorSource, where: str) -> None:
        self.source, self.where = source, where

    def covers(self, name: str) -> bool:
        return name.endswith(".weight") and _base(name) + ".qweight" in self.source.keys()

    def _shapes(self, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        out, n_in = shape
        keys = self.source.keys()
        for part, want in self._shapes(out, n_in).items():
            key = f"{_base(name)}.{part}"
            if key not in keys:
                raise CheckpointError(f"{self.where}: quantized matrix {_base(name)!r} has no {part!r} tensor")
            got = tuple(self.source.shape(key))
            if got != want:
                raise CheckpointError(f"{self.source.where(key)}: {key!r} has shape {got}; a {out}x{n_in} weight "
                                      f"quantized as {self.describe()} needs {want}")

    def describe(self) -> str:
        raise NotImplementedError

    def piece_names(self, name: str) -> list[str]:
        keys = self.source.keys()
        return [f"{_base(name)}.{p}" for p in (*self.parts, "g_idx") if f"{_base(name)}.{p}" in keys]

    def piece_nbytes(self, name: str) -> list[int]:
        kinds = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32}
        keys = self.source.keys()
        return [_nbytes(self.source, f"{_base(name)}.{p}", kinds[p]) for p in (*self.parts, "g_idx")
                if f"{_base(name)}.{p}" in keys]

    def _load(self, name: str, part: str) -> Tensor:
        return self.source.load(f"{_base(name)}.{part}")


def _quant_int(qcfg: dict, key: str, default: int, where: str) -> int:
    v = qcfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool):
        raise CheckpointError(f"{where}: quantization_config.{key} must be an integer, got {v!r}")
    return v


class AWQScheme(_GroupScheme):
    def __init__(self, source: TensorSource, qcfg: dict, where: str) -> None:
        super().__init__(source, where)
        bits = _quant_int(qcfg, "bits", qcfg.get("w_bit", 4), where)
        self.group = _quant_int(qcfg, "group_size", qcfg.get("q_group_size", 128), where)
        version = str(qcfg.get("version", "gemm")).lower()
        if bits != 4:
            raise CheckpointError(f"{where}: AWQ with {bits} bits is not supported (int4 only)")
        if version != "gemm":
            raise CheckpointError(f"{where}: AWQ version {version!r} is not supported (the 'gemm' layout only; "
                                  "re-export the model with AutoAWQ's default GEMM version)")
        if qcfg.get("zero_point", True) is not True:
            raise CheckpointError(f"{where}: AWQ without zero points is not supported")
        if self.group < 1:
            raise CheckpointError(f"{where}: AWQ group_size must be positive, got {self.group}")

    def describe(self) -> str:
        return f"AWQ int4 group {self.group}"

    def _shapes(self, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
        if n_in % self.group or out % 8:
            raise CheckpointError(f"{self.where}: a {out}x{n_in} weight does not split into AWQ groups of {self.group}")
        return {"qweight": (n_in, out // 8), "qzeros": (n_in // self.group, out // 8), "scales": (n_in // self.group, out)}

    def read(self, name: str, shape: tuple[int, ...]) -> Stored:
        return Stored(AWQFormat(self.group, (shape[0], shape[1])),
                      {p: self._load(name, p) for p in self.parts})


class GPTQScheme(_GroupScheme):
    def __init__(self, source: TensorSource, qcfg: dict, where: str) -> None:
        super().__init__(source, where)
        self.bits = _quant_int(qcfg, "bits", 4, where)
        self.group = _quant_int(qcfg, "group_size", 128, where)
        fmt = str(qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))).lower()
        if self.bits not in (2, 4, 8):
            raise CheckpointError(f"{where}: GPTQ with {self.bits} bits is not supported (2, 4 or 8)")
        if fmt not in ("gptq", "gptq_v2"):
            raise CheckpointError(f"{where}: GPTQ checkpoint format {fmt!r} is not supported ('gptq' or 'gptq_v2')")
        if self.group == 0 or self.group < -1:
            raise CheckpointError(f"{where}: GPTQ group_size must be positive or -1, got {self.group}")
        self.zero_offset = 1 if fmt == "gptq" else 0

    def describe(self) -> str:
        return f"GPTQ int{self.bits} group {self.group}"

    def _group_of(self, n_in: int) -> int:
        return n_in if self.group == -1 else self.group

    def _shapes(self, out: int, n_in: int) -> dict[str, tuple[int, ...]]:
        per, g = 32 // self.bits, self._group_of(n_in)
        if n_in % per or out % per:
            raise CheckpointError(f"{self.where}: a {out}x{n_in} weight does not pack into {self.bits}-bit GPTQ ints")
        groups = -(-n_in // g)
        shapes = {"qweight": (n_in // per, out), "qzeros": (groups, out // per), "scales": (groups, out)}
        return shapes

    def read(self, name: str, shape: tuple[int, ...]) -> Stored:
        out, n_in = shape
        g = self._group_of(n_in)
        pieces = {p: self._load(name, p) for p in self.parts}
        act_order = False
        if f"{_base(name)}.g_idx" in self.source.keys():
            g_idx = self._load(name, "g_idx").to(torch.int32)
            if g_idx.shape != (n_in,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= pieces["scales"].shape[0]:
                raise CheckpointError(f"{self.source.where(_base(name) + '.g_idx')}: g_idx does not map {n_in} rows "
                                      f"to {pieces['scales'].shape[0]} groups")
            pieces["g_idx"] = g_idx  # kept as stored (the plan counted it); gathered by only in activation order
            act_order = not torch.equal(g_idx, torch.arange(n_in, dtype=torch.int32) // g)
        elif n_in % g:
            raise CheckpointError(f"{self.where}: {n_in} rows do not split into GPTQ groups of {g} and there is no g_idx")
        return Stored(GPTQFormat(self.bits, g, self.zero_offset, (out, n_in), act_order), pieces)


class Bnb4Scheme(_Dense):
    """bitsandbytes ``Linear4bit`` serialization: ``W.weight`` packed, beside ``W.weight.absmax``,
    ``.quant_map``, optionally ``.nested_absmax``/``.nested_quant_map``, and
    ``.quant_state.bitsandbytes__nf4`` (or ``__fp4``): the rest of the state as JSON bytes."""

    tensor_parts = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")

    def __init__(self, source: TensorSource, where: str) -> None:
        self.source, self.where = source, where

    def covers(self, name: str) -> bool:
        return name + ".absmax" in self.source.keys()

    def _state_key(self, name: str) -> str:
        keys = self.source.keys()
        found = [f"{name}.quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4")
                 if f"{name}.quant_state.bitsandbytes__{t}" in keys]
        if len(found) != 1:
            raise CheckpointError(f"{self.where}: 4-bit matrix {name!r} has no bitsandbytes quant_state entry")
        return found[0]

    def _state(self, name: str) -> dict:
        raw = self.source.load(self._state_key(name))
        try:
            return json.loads(bytes(raw.to(torch.uint8).numpy()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.source.where(self._state_key(name))}: corrupt quant_state ({e})") from None

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        st = self._state(name)
        if tuple(st.get("shape", ())) != tuple(shape) or st.get("quant_type") not in ("nf4", "fp4"):
            raise CheckpointError(f"{self.source.where(name)}: 4-bit state of shape {st.get('shape')} and type "
                                  f"{st.get('quant_type')!r}; the config needs {tuple(shape)}, nf4 or fp4")
        if math.prod(self.source.shape(name)) * 2 < math.prod(shape):
            raise CheckpointError(f"{self.source.where(name)}: packed 4-bit tensor is too small for {tuple(shape)}")

    def piece_names(self, name: str) -> list[str]:
        keys = self.source.keys()
        return [name, self._state_key(name)] + [f"{name}.{p}" for p in self.tensor_parts if f"{name}.{p}" in keys]

    def piece_nbytes(self, name: str) -> list[int]:
        keys = self.source.keys()
        return [_nbytes(self.source, name, torch.uint8)] + [_nbytes(self.source, f"{name}.{p}", torch.float32)
                                                            for p in self.tensor_parts if f"{name}.{p}" in keys]

    def read(self, name: str, shape: tuple[int, ...]) -> Stored:
        st = self._state(name)
        keys = self.source.keys()
        pieces = {"weight": self.source.load(name).reshape(-1).view(torch.uint8)}
        for p in self.tensor_parts:
            if f"{name}.{p}" in keys:
                pieces[p] = self.source.load(f"{name}.{p}")
        fmt = Bnb4Format(st["quant_type"], int(st["blocksize"]), int(st.get("nested_blocksize", 0)),
                         float(st.get("nested_offset", 0.0)), (shape[0], shape[1]))
        return Stored(fmt, pieces)


class Bnb8Scheme(_Dense):
    """bitsandbytes ``Linear8bitLt`` serialization: ``W.weight`` int8 and ``W.SCB`` (fp32 row absmax)."""

    def __init__(self, source: TensorSource, where: str) -> None:
        self.source, self.where = source, where

    def covers(self, name: str) -> bool:
        return name.endswith(".weight") and _base(name) + ".SCB" in self.source.keys()

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        if tuple(self.source.shape(name)) != tuple(shape) or tuple(self.source.shape(_base(name) + ".SCB")) != (shape[0],):
            raise CheckpointError(f"{self.source.where(name)}: int8 weight {self.source.shape(name)} with SCB "
                                  f"{self.source.shape(_base(name) + '.SCB')}; the config needs {tuple(shape)}")

    def piece_names(self, name: str) -> list[str]:
        extra = [_base(name) + ".weight_format"] if _base(name) + ".weight_format" in self.source.keys() else []
        return [name, _base(name) + ".SCB", *extra]

    def piece_nbytes(self, name: str) -> list[int]:
        return [_nbytes(self.source, name, torch.int8), _nbytes(self.source, _base(name) + ".SCB", torch.float32)]

    def read(self, name: str, shape: tuple[int, ...]) -> Stored:
        return Stored(Bnb8Format((shape[0], shape[1])),
                      {"weight": self.source.load(name).view(torch.int8), "SCB": self.source.load(_base(name) + ".SCB").float()})


def scheme_for(source: TensorSource, cfg: dict, where: str) -> Scheme | None:
    """How a checkpoint keeps its matrices compressed (None: it does not)."""
    if isinstance(source, GGUFSource):
        return GGUFScheme(source)
    packed_meta = compression_of(source)
    if packed_meta is not None:
        return PackedScheme(source, packed_meta)
    qcfg = cfg.get("quantization_config")
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object")
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "awq":
        return AWQScheme(source, qcfg, where)
    if method == "gptq":
        return GPTQScheme(source, qcfg, where)
    if method == "bitsandbytes":
        if qcfg.get("load_in_4bit"):
            return Bnb4Scheme(source, where)
        if qcfg.get("load_in_8bit"):
            return Bnb8Scheme(source, where)
        raise CheckpointError(f"{where}: a bitsandbytes quantization_config with neither load_in_4bit nor load_in_8bit")
    raise CheckpointError(f"{where}: quantization method {qcfg.get('quant_method')!r} is not supported (supported: "
                          "GGUF files, awq, gptq, bitsandbytes 4-bit/8-bit, offload-infer compress)")
