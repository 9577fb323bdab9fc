"""Build a ready model from resolved checkpoint files: check names and shapes against the family's
layout, then move each tensor once from the memory-mapped file to where it lives (no module is ever
materialised, so the model never exists twice in RAM)."""

from __future__ import annotations

import ctypes
import json
import re
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from offload_infer.models import CausalLM, FamilyConfig, ModelWeights, ResidentLayers, config_from_dict
from offload_infer.models.base import LayerSource, dense_layer
from quant.formats import Stored
from weights.quantized import Scheme, scheme_for
from weights.resolve import ResolvedModel
from weights.sources import CheckpointError, GGUFSource, SafetensorsSource, TensorSource, TorchBinSource, gguf_config
from weights.tokenizer import Tokenizer, has_tokenizer, load_tokenizer, tokenizer_error, tokenizer_from_gguf

# Buffers some checkpoints carry that the forward recomputes.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")

LayerBuilder = Callable[[FamilyConfig, Iterator[dict[str, Tensor]], torch.device, torch.dtype], LayerSource]


def resident_layers(
    config: FamilyConfig, layers: Iterator[dict[str, Tensor]], device: torch.device, dtype: torch.dtype
) -> ResidentLayers:
    return ResidentLayers([dense_layer(w, device, dtype) for w in layers])


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer | None  # None when the checkpoint carries none and none was given
    config_dict: dict  # config.json (or its GGUF equivalent), as read
    name: str
    phases: dict[str, float] = field(default_factory=dict)  # seconds: open and plan, tokenizer, globals, layers


def open_source(resolved: ResolvedModel) -> tuple[TensorSource, dict]:
    if resolved.kind == "gguf":
        src = GGUFSource(resolved.files[0])
        return src, gguf_config(src.reader, resolved.files[0])
    assert resolved.config_path is not None
    try:
        cfg = json.loads(Path(resolved.config_path).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{resolved.config_path}: invalid JSON ({e})") from None
    files = list(resolved.files)
    return (SafetensorsSource(files) if resolved.kind == "safetensors" else TorchBinSource(files)), cfg


def read_config(resolved: ResolvedModel, model_type: str | None = None) -> FamilyConfig:
    """A checkpoint's model configuration alone (config.json or the GGUF header; no tensor is read)."""
    return config_from_dict(open_source(resolved)[1], model_type)


def read_stored_sizes(resolved: ResolvedModel, config: FamilyConfig) -> list[dict[str, list[int]]]:
    """A checkpoint's ``stored_sizes`` (what ``make_plan`` needs to plan it as stored), read from its headers."""
    source, cfg = open_source(resolved)
    scheme = scheme_for(source, cfg, resolved.name)
    return stored_sizes(config, plan_names(config, source, scheme), scheme)


def plan_names(config: FamilyConfig, source: TensorSource, scheme: Scheme | None = None) -> dict[str, str]:
    """canonical name -> source name, after checking that every tensor is there with the right shape.

    With a ``scheme`` (a checkpoint that keeps its matrices quantized: GGUF blocks, AWQ, GPTQ, ...), a
    matrix the scheme covers maps to the name the scheme reads it under, after the scheme checks its pieces.
    """
    available = source.keys()
    expected = dict(config.global_shapes())
    for i in range(config.n_layers):
        expected |= {config.layer_prefix(i) + k: s for k, s in config.layer_shapes().items()}
    mapping, missing = {}, []
    used: set[str] = set()
    for name, shape in expected.items():
        candidates = (name, *config.aliases(name))
        stored = next((n for n in candidates if scheme is not None and len(shape) == 2 and scheme.covers(n)), None)
        if stored is not None:
            scheme.check(stored, shape)  # type: ignore[union-attr]
            used |= set(scheme.piece_names(stored))  # type: ignore[union-attr]
            mapping[name] = stored
            continue
        found = next((n for n in candidates if n in available), None)
        if found is None:
            missing.append(name)
            continue
        got = source.shape(found)
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"{source.where(found)}: tensor {found!r} has shape {tuple(got)}, "
                                  f"the config needs {tuple(shape)}")
        mapping[name] = found
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing tensors: {', '.join(missing[:5])}{more}")
    used |= set(mapping.values())
    tied_head = {"lm_head.weight", "decoder.lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in available - used - tied_head if not _IGNORED.match(n) and not _zero_bias(source, n))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"checkpoint has tensors the {config.model_type} layout does not use: "
            f"{', '.join(unexpected[:5])}{more} (first in {source.where(unexpected[0])})"
        )
    return mapping


def _zero_bias(source: TensorSource, name: str) -> bool:
    """AutoGPTQ and AutoAWQ write a bias for every quantized Linear, zeros where the model has none: those
    are not unexpected (a nonzero one is, and is refused)."""
    base = name[: -len(".bias")]
    return name.endswith(".bias") and base + ".qweight" in source.keys() and not bool(source.load(name).any())


def stored_sizes(config: FamilyConfig, mapping: dict[str, str], scheme: Scheme | None) -> list[dict[str, list[int]]]:
    """Per layer, the piece sizes of the matrices kept as stored (empty dicts: none are)."""
    out = []
    for i in range(config.n_layers):
        prefix = config.layer_prefix(i)
        out.append({k: scheme.piece_nbytes(mapping[prefix + k]) for k, shape in config.layer_shapes().items()
                    if scheme is not None and len(shape) == 2 and scheme.covers(mapping[prefix + k])})
    return out


def iter_layers(config: FamilyConfig, source: TensorSource, mapping: dict[str, str], dtype: torch.dtype,
                progress: bool, desc: str, scheme: Scheme | None = None,
                keep_stored: bool = True) -> Iterator[dict[str, Tensor | Stored]]:
    """Each layer's tensors on the CPU; the matrices ``scheme`` covers come as they are stored
    (``Stored``: a quantized checkpoint's pieces, not dequantized), or with ``keep_stored`` off,
    dequantized here to ``dtype`` on the reading threads (a model that stays on the CPU). A layer's tensors are read (and GGUF
    blocks of other types dequantized, which numpy does with the GIL released) on a few threads; for GGUF
    the next layer's while the caller handles this one. The bar shows on a terminal only and leaves no line
    behind (load_model prints one summary)."""
    from tqdm import tqdm

    def read(i: int) -> dict:
        prefix = config.layer_prefix(i)
        names = list(config.layer_shapes().items())
        return {k: pool.submit(_read_one, source, mapping[prefix + k], shape, dtype, scheme, keep_stored)
                for k, shape in names}

    workers = min(4, os.cpu_count() or 1)
    look_ahead = reads_ahead(source)
    with ThreadPoolExecutor(workers) as pool:
        ahead = read(0) if config.n_layers else {}
        bar = tqdm(range(config.n_layers), desc=desc, unit="layer", file=sys.stderr, leave=False,
                   disable=not progress or not sys.stderr.isatty())
        for i in bar:
            release_freed_memory()  # the last layer's temporaries: glibc would keep them for reuse
            if look_ahead:
                current, ahead = ahead, (read(i + 1) if i + 1 < config.n_layers else {})
            else:
                current, ahead = (ahead or read(i)), {}
            yield {k: fut.result() for k, fut in current.items()}


def reads_ahead(source: TensorSource) -> bool:
    """Whether ``iter_layers`` reads the next layer while the caller handles this one: it holds a second
    layer in host memory, worth it where dequantizing is the slow part (GGUF)."""
    return isinstance(source, GGUFSource)


def release_freed_memory() -> None:
    """Have glibc return freed heap to the system (``malloc_trim``). Loading frees many blocks of a few
    MB (below glibc's mmap threshold, which rises as large blocks are freed) that glibc would otherwise
    keep, per thread, for reuse: host memory would then peak well above what the model holds."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - not glibc (musl, macOS): no trimming
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def _read_one(source: TensorSource, src: str, shape: tuple[int, ...], dtype: torch.dtype,
              scheme: Scheme | None, keep_stored: bool = True) -> Tensor | Stored:
    if scheme is not None and len(shape) == 2 and scheme.covers(src):
        return scheme.read(src, shape) if keep_stored else scheme.dense(src, shape, dtype)
    return _load_as(source, src, dtype)


def _load_as(source: TensorSource, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """A tensor at ``dtype`` on ``device``. A GGUF source dequantizes straight into it, on the device: no
    fp32 copy, and no host copy of a whole embedding on its way to a GPU."""
    if isinstance(source, GGUFSource):
        return _cast(source.load(name, dtype, device), dtype)
    return _cast(source.load(name), dtype).to(device)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def load_tokenizer_for(resolved: ResolvedModel, source: TensorSource, cfg: dict) -> Tokenizer | None:
    if resolved.kind == "gguf":
        try:
            return tokenizer_from_gguf(source.reader, resolved.files[0])  # type: ignore[attr-defined]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged vocabulary or template in the file's metadata
            raise tokenizer_error(resolved.files[0], e) from None
    assert resolved.tokenizer_path is not None
    return load_tokenizer(resolved.tokenizer_path, cfg) if has_tokenizer(resolved.tokenizer_path) else None


def load_model(
    resolved: ResolvedModel,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_type: str | None = None,
    layer_builder: LayerBuilder = resident_layers,
    progress: bool = True,
) -> LoadedModel:
    device = torch.device(device)
    t0 = time.perf_counter()
    source, cfg = open_source(resolved)
    config = config_from_dict(cfg, model_type)
    scheme = scheme_for(source, cfg, resolved.name)
    mapping = plan_names(config, source, scheme)
    prepare = getattr(layer_builder, "prepare", None)
    if prepare is not None:  # plan (and check memory) before anything large is allocated
        prepare(config, device, dtype, stored_sizes(config, mapping, scheme), staged_layers=2 if reads_ahead(source) else 1)
    stamps = [time.perf_counter()]
    tokenizer = load_tokenizer_for(resolved, source, cfg)  # checked before any weight is read
    stamps.append(time.perf_counter())
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"{resolved.name}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                              f"embeddings only {config.vocab_size} rows: they do not belong together")
    globals_ = {}
    for n in config.global_shapes():
        globals_[n] = _load_as(source, mapping[n], dtype, device)
        release_freed_memory()
    stamps.append(time.perf_counter())
    # kept as stored for a streamed model (its buffers hold the blocks) and for a GPU (which dequantizes
    # faster); a model resident on the CPU is dequantized by the reading threads, several layers at a time
    keep_stored = prepare is not None or device.type != "cpu"
    layers = layer_builder(config, iter_layers(config, source, mapping, dtype, progress, f"loading {resolved.name}",
                                               scheme, keep_stored), device, dtype)
    model = CausalLM(config, ModelWeights(globals_, layers), device, dtype)
    stamps.append(time.perf_counter())
    phases = dict(zip(("open and plan", "tokenizer", "globals", "layers"), [b - a for a, b in zip([t0, *stamps], stamps)]))
    if progress:
        size = sum(f.stat().st_size for f in resolved.files if f.is_file())
        print(f"loaded {resolved.name} ({config.n_layers} layers, {size / 1e9:.2f} GB on disk) to {device} "
              f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return LoadedModel(model, tokenizer, cfg, resolved.name, phases)
