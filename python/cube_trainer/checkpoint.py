"""Checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

A checkpoint ``step_00000100`` is two files: ``step_00000100.safetensors`` (model, optimizer
moments, RNG states, sample pool) and ``step_00000100.json`` (format, config, step, data position,
optimizer hyper-parameters, scheduler and scaler state, and the size, SHA-256 and tensor index of
the safetensors file). Each is written to a temporary file and renamed; the JSON goes last, so it
only ever points at a complete tensor file. Reading checks all of it and names what is wrong.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, write_text_atomic

FORMAT = "cube-trainer-checkpoint"
VERSION = 1
_STEM = re.compile(r"step_(\d+)$")
# Required JSON fields and their types: those of every checkpoint, then the question-answer trainer's.
BASE_FIELDS = {"format": str, "version": int, "step": int, "config": dict, "tensors_file": str,
               "tensors_bytes": int, "tensors_sha256": str, "tensor_index": dict}
_FIELDS = {**BASE_FIELDS, "teacher_dim": int, "optimizer": dict, "scheduler": dict, "scaler": dict,
           "data_position": dict}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupted or does not fit."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_stem(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def _with_ext(stem: Path, ext: str) -> Path:
    return stem.with_name(stem.name + ext)


def stem_of(path: str | Path) -> Path:
    """``a/b`` for ``a/b``, ``a/b.json`` and ``a/b.safetensors``."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".json", ".safetensors") else path


def write_checkpoint(stem: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Writes ``stem.safetensors`` then ``stem.json`` atomically; returns the JSON path."""
    stem = stem_of(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    st_path = _with_ext(stem, ".safetensors")
    with atomic_write(st_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        size, digest = tmp.stat().st_size, _sha256(tmp)
    meta = dict(meta, format=FORMAT, version=VERSION, tensors_file=st_path.name, tensors_bytes=size,
                tensors_sha256=digest,
                tensor_index={k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()})
    json_path = _with_ext(stem, ".json")
    write_text_atomic(json_path, json.dumps(meta, indent=1, sort_keys=True))
    return json_path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoint JSON files of ``directory``, oldest step first."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("step_*.json") if (m := _STEM.match(p.stem))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(directory: str | Path, keep: int):
    """Deletes all but the newest ``keep`` checkpoints (JSON first, so none is left half there)
    and tensor files whose JSON was never written (a save that was interrupted)."""
    for path in list_checkpoints(directory)[:-keep]:
        path.unlink()
        path.with_suffix(".safetensors").unlink(missing_ok=True)
    for path in Path(directory).glob("step_*.safetensors"):
        if not path.with_suffix(".json").exists():
            path.unlink()


def resolve_checkpoint(path: str | Path) -> Path:
    """The JSON file of a checkpoint given as its JSON, its safetensors, its stem, a directory of
    checkpoints or a run directory (its ``checkpoints/``); the newest one for a directory."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"no checkpoint (step_*.json) in {path} or {path / 'checkpoints'}")
        return found[-1]
    candidate = _with_ext(stem_of(path), ".json")
    if not candidate.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return candidate


def read_checkpoint(path: str | Path, fields: dict[str, type] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint, after checking its structure, size and hash.
    ``fields``: the JSON fields it must have and their types (default: the trainer's)."""
    json_path = resolve_checkpoint(path)
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {json_path} is not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{json_path} has format version {meta.get('version')!r}; this trainer reads {VERSION}")
    for key, tp in (fields or _FIELDS).items():
        if not isinstance(meta.get(key), tp) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"checkpoint {json_path}: field '{key}' is missing or not a {tp.__name__}")
    st_path = json_path.with_name(meta["tensors_file"])
    if st_path.parent != json_path.parent or not st_path.is_file():
        raise CheckpointError(f"checkpoint {json_path}: its tensor file {st_path} is missing")
    size = st_path.stat().st_size
    if size != meta["tensors_bytes"]:
        raise CheckpointError(f"checkpoint tensor file {st_path} is {size} bytes, expected {meta['tensors_bytes']} "
                              f"(truncated or replaced)")
    if _sha256(st_path) != meta["tensors_sha256"]:
        raise CheckpointError(f"checkpoint tensor file {st_path} fails its SHA-256 check (corrupted)")
    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint tensor file {st_path} cannot be read: {exc}") from None
    index = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}
    if index != meta["tensor_index"]:
        missing = sorted(set(meta["tensor_index"]) - set(index))
        raise CheckpointError(f"checkpoint {st_path} does not match its index in {json_path.name}"
                              + (f"; missing tensors: {missing[:5]}" if missing else ""))
    meta["path"] = str(json_path)
    return meta, tensors


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict split for a checkpoint: its tensors as ``optimizer/<param id>/<name>``,
    and the rest (``{"param_groups": ..., "state": {param id: {name: value}}}``) for the JSON."""
    opt = optimizer.state_dict()
    tensors, rest = {}, {}
    for pid, state in opt["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{pid}/{k}"] = v
            else:
                rest.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": opt["param_groups"], "state": rest}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, tensors: dict[str, torch.Tensor],
                         where: str):
    """Restores what ``optimizer_state`` split (``saved``: its JSON part) into ``optimizer``."""
    groups = saved["param_groups"]
    if [len(g.get("params", [])) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"checkpoint {where}: its optimizer state does not fit this model")
    state: dict[int, dict] = defaultdict(dict)
    for k, v in tensors.items():
        if k.startswith("optimizer/"):
            _, pid, name = k.split("/", 2)
            state[int(pid)][name] = v
    for pid, extra in saved["state"].items():
        state[int(pid)].update(extra)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in groups]
    try:
        optimizer.load_state_dict({"state": dict(state), "param_groups": groups})
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {where}: cannot restore the optimizer state: {exc}") from None
