"""Atomic file replacement: write a temporary file next to the target, flush it to disk, rename,
flush the directory (so that the rename itself survives a crash of the machine)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

TMP_MARK = ".tmp-"


def fsync_dir(directory: str | Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yields a temporary path to write; on success it replaces ``path`` in one rename, so a
    reader sees the old file or the new one, never a partial one. On error the temp file goes;
    a process killed meanwhile leaves it behind (``remove_stale_temporaries``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | Path, text: str):
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def remove_stale_temporaries(directory: str | Path):
    """Deletes the temporary files of writes whose process died (SIGKILL, power loss) before the
    rename; those of live processes stay."""
    for tmp in Path(directory).glob(f".*{TMP_MARK}*"):
        pid = tmp.name.rpartition(TMP_MARK)[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
