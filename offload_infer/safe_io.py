"""Writing the user's files without ever destroying one: outputs are checked before any work (never an
input, in a directory that exists and can be written) and written under a temporary name, then renamed
into place, so a crash or Ctrl-C leaves the old file or none, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def _inside(path: Path, d: Path) -> bool:
    try:
        path.relative_to(d)
        return True
    except ValueError:
        return False


def check_output(path: Path, inputs: list[Path], flag: str) -> Path:
    """The resolved output path; ValueError (naming ``flag``) if it would overwrite an input (a file
    given, or a file inside a directory given) or cannot be written."""
    out = Path(path).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src or (src.is_dir() and _inside(out, src) and out.exists()):
            raise ValueError(f"{flag} {path} would overwrite an input ({src}); choose another file")
    if out.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{flag} {path}: the directory {parent} is not writable")
    return out


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def model_inputs(*names: str | Path | None) -> list[Path]:
    """The paths among model arguments (hub ids and offline names are not paths and are skipped)."""
    return [Path(n).expanduser() for n in names if n and Path(n).expanduser().exists()]
