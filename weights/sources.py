"""Named-tensor sources over checkpoint files: safetensors (mmap), legacy ``pytorch_model.bin`` and GGUF.

Each source opens lazily, validates what it can up front (a truncated safetensors file is caught
from its header before any tensor is read) and names the file in every error.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from offload_infer.pinned import host_pages
from quant.formats import FileSlice
from weights.gguf_reader import GGUFFile, GGUFFormatError


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not match the model config."""


class TensorSource(Protocol):
    def keys(self) -> frozenset[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, name: str) -> Tensor: ...

    def where(self, name: str) -> str: ...


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: Path) -> dict:
    """The JSON header, after checking that the file holds every byte the header promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or corrupt safetensors header ({n} header bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list) and all(type(d) is int and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(type(o) is int and o >= 0 for o in info["data_offsets"])
              and info["data_offsets"][0] <= info["data_offsets"][1])
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}: {str(info)[:200]}")
        lo, hi = info["data_offsets"]
        numel = int(np.prod(info["shape"], dtype=np.float64)) if info["shape"] else 1
        if info["dtype"] in _ST_DTYPES and hi - lo != numel * _ST_DTYPES[info["dtype"]]:
            raise CheckpointError(f"{path}: tensor {name!r} has {hi - lo} bytes for shape {info['shape']}")
        end = max(end, hi)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header needs {8 + n + end} bytes, the file has {size}"
        )
    return header


class SafetensorsSource:
    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._nbytes: dict[str, int] = {}
        self._handles = {}
        self.file_metadata: dict[Path, dict[str, str]] = {}
        for path in files:
            if not path.exists():
                raise CheckpointError(f"missing checkpoint file {path}")
            header = read_safetensors_header(path)
            self.file_metadata[path] = header.get("__metadata__") or {}
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = path
                    self._shapes[name] = tuple(info["shape"])
                    self._nbytes[name] = info["data_offsets"][1] - info["data_offsets"][0]
            try:
                self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - the safetensors library's own checks, past ours
                raise CheckpointError(f"{path}: corrupt safetensors file ({type(e).__name__}: {e})") from None
        self._keys = frozenset(self._where)  # asked for once per tensor while planning: made once

    def keys(self) -> frozenset[str]:
        return self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def nbytes(self, name: str) -> int:
        return self._nbytes[name]

    def where(self, name: str) -> str:
        return str(self._where[name])

    def load(self, name: str) -> Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{self._where[name]}: cannot read tensor {name!r}: {e}") from None


class TorchBinSource:
    """Legacy ``pytorch_model*.bin``, read only with ``torch.load(weights_only=True)``."""

    def __init__(self, files: list[Path]) -> None:
        self._tensors: dict[str, Tensor] = {}
        self._where: dict[str, Path] = {}
        for path in files:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read legacy checkpoint: {e}") from None
            for name, t in sd.items():
                self._tensors[name] = t
                self._where[name] = path
        self._keys = frozenset(self._tensors)

    def keys(self) -> frozenset[str]:
        return self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def where(self, name: str) -> str:
        return str(self._where[name])

    def load(self, name: str) -> Tensor:
        return self._tensors[name]


_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path) -> GGUFFile:
    try:
        return GGUFFile(path)
    except GGUFFormatError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the parser trip on
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_field(reader: GGUFFile, key: str, default=None):
    return reader.values.get(key, default)


class GGUFSource:
    """GGUF tensors under Hugging Face names, dequantized with the ``gguf`` package.

    llama.cpp permutes the rows of ``attn_q``/``attn_k`` for LLaMA-architecture files; that is undone
    here (Qwen2 files are written unpermuted).
    """

    def __init__(self, path: Path, reader=None) -> None:
        self.path = path
        self.reader = reader if reader is not None else open_gguf(path)
        self.arch = gguf_field(self.reader, "general.architecture")
        self.n_head = int(gguf_field(self.reader, f"{self.arch}.attention.head_count", 0))
        self.n_kv = int(gguf_field(self.reader, f"{self.arch}.attention.head_count_kv", self.n_head))
        self._tensors = {}
        for t in self.reader.tensors:
            self._tensors[self._hf_name(t.name)] = t
        self._keys = frozenset(self._tensors)

    @staticmethod
    def _hf_name(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER:
            return f"model.layers.{parts[1]}.{_GGUF_LAYER[parts[2]]}.{parts[3]}"
        if len(parts) == 2 and parts[0] in _GGUF_GLOBAL:
            return f"{_GGUF_GLOBAL[parts[0]]}.{parts[1]}"
        return name

    def keys(self) -> frozenset[str]:
        return self._keys

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def where(self, name: str) -> str:
        return f"{self.path} ({self._tensors[name].name})"

    def load(self, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """The tensor dequantized (in fp32, then rounded to ``dtype`` for the k-quant and legacy block types),
        on ``device`` (the block types are dequantized there; others are made on the host and moved)."""
        import gguf
        from gguf.quants import dequantize

        from quant.gguf_blocks import dequantize as dequantize_torch

        t = self._tensors[name]
        if t.tensor_type.name in ("F32", "F16"):  # read as stored, converted once where it goes
            kind = torch.float32 if t.tensor_type.name == "F32" else torch.float16
            piece = FileSlice(str(self.path), t.offset, int(t.data.nbytes), kind, self.shape(name))
            # on its way to a GPU, read into huge pages of its own (fewer faults; freed once copied)
            w = self._read(piece, name, host_pages(piece.nbytes) if torch.device(device).type == "cuda" else None)
            w = w.to(device=device, dtype=dtype)
        else:
            try:
                w = dequantize_torch(t.data, t.tensor_type.name, gguf.GGML_QUANT_SIZES[t.tensor_type][1],
                                     self.shape(name), dtype, device)
                if w is None:  # a type quant/gguf_blocks.py does not handle: the gguf package's numpy code
                    arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
                    if not arr.flags.writeable or not arr.flags.c_contiguous:  # memory-mapped: copy out of the file
                        arr = arr.copy(order="C")
                    w = torch.from_numpy(arr).reshape(self.shape(name))
            except Exception as e:
                raise CheckpointError(f"{self.where(name)}: cannot dequantize {t.tensor_type.name}: {e}") from None
        return self._hf_rows(w, name).to(device)

    def _permuted(self, name: str) -> bool:
        """Whether llama.cpp stored the tensor's rows permuted (LLaMA's attn_q and attn_k)."""
        return self.arch == "llama" and (".q_proj." in name or ".k_proj." in name)

    def _hf_rows(self, w: Tensor, name: str) -> Tensor:
        """``w``'s rows in Hugging Face order."""
        return _unpermute_rows(w, self.n_head if ".q_proj." in name else self.n_kv) if self._permuted(name) else w

    def matrix_type(self, name: str) -> str | None:
        """The GGUF type name of a 2-D tensor (None: no such matrix)."""
        t = self._tensors.get(name)
        return t.tensor_type.name if t is not None and len(t.shape) == 2 else None

    def blocks(self, name: str) -> Tensor | FileSlice:
        """A matrix's blocks as stored, uint8 ``[rows, bytes per row]``, rows in Hugging Face order: a
        slice of the file to be read where it goes, or, where llama.cpp's rotary permutation has to be
        undone on whole rows of blocks, the rows read and reordered."""
        t = self._tensors[name]
        rows = int(t.shape[1])
        piece = FileSlice(str(self.path), t.offset, int(t.data.nbytes), torch.uint8, (rows, int(t.data.nbytes) // rows))
        return self._hf_rows(self._read(piece, name), name) if self._permuted(name) else piece

    def _read(self, piece: FileSlice, name: str, out: Tensor | None = None) -> Tensor:
        try:
            return piece.read(out)
        except OSError as e:
            raise CheckpointError(f"{self.where(name)}: {e}") from None

    def nbytes(self, name: str) -> int:
        return int(self._tensors[name].data.nbytes)


def _unpermute_rows(w: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's interleaved rotary row order (weights ``[rows, cols]`` or biases ``[rows]``)."""
    rows = w.shape[0]
    tail = w.shape[1:]
    # [H, 2, rows/H/2, ...] -> [H, rows/H/2, 2, ...]: the GGUF order interleaves the two halves
    return w.reshape(n_heads, rows // n_heads // 2, 2, *tail).transpose(1, 2).reshape(rows, *tail).contiguous()


def gguf_config(reader, path: Path) -> dict:
    """A ``config.json``-style dict from GGUF metadata."""
    arch = gguf_field(reader, "general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF file has no general.architecture")

    def get(key, default=None):
        return gguf_field(reader, f"{arch}.{key}", default)

    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": int(get("attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "vocab_size": int(get("vocab_size", len(tokens) if tokens else 0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise CheckpointError(f"{path}: unsupported GGUF rope scaling {scaling_type!r}")
    return cfg
