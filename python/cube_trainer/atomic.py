"""Atomic file replacement: write a temporary file next to the target, flush it to disk, rename."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yields a temporary path to write; on success it replaces ``path`` in one rename, so a
    reader sees the old file or the new one, never a partial one. On error the temp file goes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str):
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)
