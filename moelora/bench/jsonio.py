"""Atomic file writes: a reader (or a killed run) sees the old file or the new one, never half a file.

``atomic_open(path)`` writes into a temporary file in the same folder and moves it over ``path``
with ``os.replace`` (atomic on POSIX and Windows when both are on one file system, which the same
folder guarantees) only once everything is written and flushed to disk; if anything fails on the
way, the temporary file is removed and ``path`` keeps its old content. ``write_json`` is the one
JSON writer of ``moelora.bench`` and of ``kernels/benchmarks/``. Standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_NEW_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's file is 0600)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """A text file to write ``path`` through: it replaces ``path`` when the block ends without an
    exception (the folder is created if needed); on an exception ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline=newline, encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else _NEW_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (values JSON does not know, e.g. a Path or a
    torch.dtype, are written as ``str(value)``); returns the path."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, default=str)
        f.write("\n")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
