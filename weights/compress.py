"""Ahead-of-time weight compression: a checkpoint whose decoder-layer matrices are stored packed
(int4/int8 with their scales), which ``generate`` streams without recompressing.

Layout of the output directory: ``config.json``, tokenizer files, ``model.safetensors.index.json``,
``model-globals.safetensors`` and one ``model-layer-NNNN.safetensors`` per decoder layer. A packed
matrix ``W`` is stored as ``W.qdata`` (uint8) and ``W.scales`` (fp32). Every file's metadata records
the format, its version, the codec, block size and dtype.
"""

from __future__ import annotations

import json
import os
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from offload_infer.models import config_from_dict
from quant.codecs import packed_nbytes, quantize
from quant.formats import Stored
from weights.resolve import ResolvedModel
from weights.sources import CheckpointError

FORMAT = "offload-infer-compressed"
FORMAT_VERSION = "1"
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def compressed_size(config, codec: str, block_size: int, dtype: torch.dtype) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    total = sum(math.prod(s) for s in config.global_shapes().values()) * size
    for shape in config.layer_shapes().values():
        n = math.prod(shape)
        total += config.n_layers * (sum(packed_nbytes(n, codec, block_size, shape[0])) if len(shape) == 2 else n * size)
    return total


def check_metadata(meta: dict[str, str], where: str) -> dict[str, str] | None:
    """The compression metadata of a file, None for an ordinary checkpoint; errors on a version we can't read."""
    if meta.get("format") != FORMAT:
        return None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: compressed format version {meta.get('format_version')!r} is not supported "
                              f"(this offload-infer reads version {FORMAT_VERSION}); recompress the model")
    return meta


def compression_of(source) -> dict[str, str] | None:
    """The compression metadata shared by every file of a source (None: not compressed)."""
    found = None
    for path, meta in getattr(source, "file_metadata", {}).items():
        m = check_metadata(meta, str(path))
        if found is not None and m is not None and (m["codec"], m["block_size"]) != (found["codec"], found["block_size"]):
            raise CheckpointError(f"{path}: compressed with {m['codec']}, other files with {found['codec']}")
        found = found or m
    return found


def compress(resolved: ResolvedModel, out: Path, codec: str, block_size: int = 64, dtype: torch.dtype = torch.float16,
             force: bool = False, device: torch.device | None = None, model_type: str | None = None,
             progress: bool = True) -> Path:
    out = Path(out).expanduser().resolve()
    for f in (*resolved.files, resolved.config_path, resolved.tokenizer_path):
        if f is not None and (out == Path(f).resolve() or Path(f).resolve().is_relative_to(out)):
            raise ValueError(f"--out {out} overlaps the model being compressed ({f}); choose another directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the directory {out.parent} does not exist")
    # built beside the target and swapped in only when complete: an interruption or a full disk leaves
    # the previous output (or nothing), never a mix of two models
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    try:
        _compress_into(work, resolved, codec, block_size, dtype, device, model_type, progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(work, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(work, out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def _compress_into(out: Path, resolved: ResolvedModel, codec: str, block_size: int, dtype: torch.dtype,
                   device: torch.device | None, model_type: str | None, progress: bool) -> None:
    from weights.load import iter_layers, load_tokenizer_for, open_source, plan_names

    from weights.quantized import PackedScheme, scheme_for

    source, cfg = open_source(resolved)
    scheme = scheme_for(source, cfg, resolved.name)
    if isinstance(scheme, PackedScheme):
        raise CheckpointError(f"{resolved.name} is already compressed")
    config = config_from_dict(cfg, model_type)
    mapping = plan_names(config, source, scheme)
    need = compressed_size(config, codec, block_size, dtype)
    free = shutil.disk_usage(out).free
    if free < need * 1.05:
        raise OSError(f"compressing needs about {need / 1e9:.2f} GB in {out}, {free / 1e9:.2f} GB is free")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "codec": codec, "block_size": str(block_size),
            "dtype": _DTYPE_NAMES[dtype]}
    weight_map: dict[str, str] = {}

    def write(tensors: dict[str, torch.Tensor], name: str) -> None:
        try:
            save_file(tensors, str(out / name), metadata=meta)
        except Exception as e:  # noqa: BLE001 - safetensors reports a full disk as its own error type
            raise OSError(f"cannot write {name} ({e}); nothing was changed in the output directory") from None
        weight_map.update({k: name for k in tensors})

    write({n: source.load(mapping[n]).to(dtype).contiguous() for n in config.global_shapes()}, "model-globals.safetensors")
    layers = iter_layers(config, source, mapping, dtype, progress, f"compressing to {codec}", scheme)
    for i, layer in enumerate(layers):
        prefix = config.layer_prefix(i)
        tensors = {}
        for k, w in layer.items():
            if isinstance(w, Stored):  # a quantized checkpoint's matrix: dequantized, then compressed again
                w = w.dense(dtype, device)
            if w.ndim == 2:
                packed, state = quantize(w.to(device), codec, block_size)
                tensors[prefix + k + ".qdata"] = packed.cpu()
                tensors[prefix + k + ".scales"] = state.scales.float().cpu()
            else:
                tensors[prefix + k] = w.contiguous()
        write(tensors, f"model-layer-{i:04d}.safetensors")
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=1))
    cfg_out = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg_out["model_type"] = config.model_type
    cfg_out["offload_infer_compression"] = meta
    (out / "config.json").write_text(json.dumps(cfg_out, indent=2))
    tok = load_tokenizer_for(resolved, source, cfg)
    if tok is not None:
        tok.save(out)
