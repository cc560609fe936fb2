"""Atomic file writes: a killed command never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    ensure_dir(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def ensure_dir(path: str | Path, what: str) -> Path:
    """`path` as an existing, writable directory (made if missing), or a UserError that says
    why not. Called before long work, so a bad output path fails at once, not at the end."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write {what} to {path}: it, or a folder above it, is a file") from None
    except OSError as exc:
        raise UserError(f"cannot write {what} to {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise UserError(f"cannot write {what} to {path}: it is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} to {path}: permission denied")
    return path


def unique_names(bases: Sequence[str], taken: Sequence[str] = ()) -> list[str]:
    """`bases` made distinct ignoring case (as file systems on macOS and Windows compare
    names), from each other and from the names `taken`: a repeat gets "_2", "_3"."""
    out: list[str] = []
    seen: set[str] = {t.lower() for t in taken}
    for base in bases:
        name, i = base, 1
        while name.lower() in seen:
            i += 1
            name = f"{base}_{i}"
        seen.add(name.lower())
        out.append(name)
    return out
