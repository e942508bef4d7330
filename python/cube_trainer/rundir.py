"""The run directory (``out_dir``): a run is never replaced unless asked, and a resumed run is
tied to the data it trained on by a fingerprint of its splits."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from . import checkpoint as ckpt
from .atomic import remove_stale_temporaries
from .config import ConfigError
from .data import PairSet

# What a run writes into out_dir besides checkpoints/ (removed with it by --overwrite).
RUN_FILES = ("config.yaml", "metrics.jsonl", "training.png", "answer_bank.safetensors", "eval_*.json", "eval_*.txt",
             "best.json", "best.safetensors")
RUN_DIRS = ("ablations",)  # runs of their own, trained after the model


class RunDirectoryError(ConfigError):
    """An out_dir that holds another run (or is not a directory)."""


def prepare_run_dir(out: str | Path, *, step: int, source: str | Path | None, overwrite: bool,
                    files: tuple[str, ...] = RUN_FILES, log=print):
    """Makes ``out`` ready for a run at ``step`` that was restored from (or last saved) the
    checkpoint ``source``. A directory holding another run (checkpoints or metrics) is refused
    unless ``overwrite``, which deletes that run's checkpoints and ``files`` (glob patterns). Continuing the run of ``out`` itself
    drops its checkpoints after ``step`` (a future that will be trained again, like the metrics
    after it). Temporary files of killed writers go."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"out_dir {out} is a file, not a directory")
    ck_dir = out / "checkpoints"
    found = ckpt.list_checkpoints(ck_dir)
    own = source is not None and Path(source).resolve().parent == ck_dir.resolve()
    if own:
        later = [p for p in found if ckpt.step_of(p) > step]
        if later:
            log(f"dropping {len(later)} checkpoint(s) of {out} after step {step}: {', '.join(p.name for p in later)}")
        for path in later:
            ckpt.remove_checkpoint(path)
    elif found or (out / "metrics.jsonl").exists():
        held = f"checkpoints up to {found[-1].name}" if found else "metrics but no checkpoint"
        if not overwrite:
            resume = f"--resume {out} continues it, " if found else ""
            raise RunDirectoryError(f"out_dir {out} holds a run ({held}): {resume}--overwrite replaces it, "
                                    f"or give another --out-dir")
        log(f"replacing the earlier run in {out} ({held})")
        for path in found:
            ckpt.remove_checkpoint(path)
        for pattern in files:
            for path in out.glob(pattern):
                path.unlink()
        for name in RUN_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    ck_dir.mkdir(parents=True, exist_ok=True)
    for directory in (out, ck_dir):
        remove_stale_temporaries(directory)


def data_fingerprint(pairs: PairSet) -> str:
    """SHA-256 of a split's pairs in their order (the order the data position indexes into)."""
    h = hashlib.sha256()
    for q, a in zip(pairs.questions, pairs.answers):
        h.update(q.encode("utf-8") + b"\0" + a.encode("utf-8") + b"\n")
    return h.hexdigest()
