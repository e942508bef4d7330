"""Checkpoints: tensors in safetensors, everything else in JSON; nothing is ever unpickled.

A checkpoint ``step_00000100`` is two files: ``step_00000100.safetensors`` (model, optimizer
moments, RNG states, sample pool) and ``step_00000100.json`` (format, config, step, data position
and fingerprint, optimizer hyper-parameters, scheduler and scaler state, library versions, and the
size, SHA-256 and tensor index of the safetensors file). Each is written to a temporary file and
renamed; the JSON goes last, so it only ever points at a complete tensor file. Reading checks all
of it and names what is wrong; a run directory resumes from its newest checkpoint that passes.
"""
from __future__ import annotations

import json
import platform
import re
import warnings
from collections import defaultdict
from pathlib import Path

import safetensors
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cube_kernels

from .atomic import atomic_write, remove_stale_temporaries, write_text_atomic
from .common import file_sha256

FORMAT = "cube-trainer-checkpoint"
VERSION = 1
_STEM = re.compile(r"step_(\d+)$")
# The structure of the JSON: a type, a tuple of types, or a dict of the fields of a nested object.
# Those of every checkpoint, then the question-answer trainer's (SCHEMA).
BASE_SCHEMA = {"format": str, "version": int, "step": int, "config": dict, "tensors_file": str,
               "tensors_bytes": int, "tensors_sha256": str, "tensor_index": dict,
               "optimizer": {"param_groups": list, "state": dict}, "scheduler": dict, "versions": dict}
SCHEMA = {**BASE_SCHEMA, "teacher_dim": int, "scaler": dict,
          "data_position": {"epoch": int, "cursor": int, "size": (int, type(None))},
          "data_fingerprint": (dict, type(None))}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupted or does not fit."""


def library_versions() -> dict[str, str]:
    """What a checkpoint records of the software that wrote it."""
    return {"python": platform.python_version(), "torch": torch.__version__, "safetensors": safetensors.__version__,
            "cube_kernels": cube_kernels.__version__}


def _mismatch(saved, template, name: str) -> str | None:
    """Where ``saved`` (read from JSON) does not have the structure of ``template``, as
    "field 'x.y' is missing" or "field 'x.y' is not ..."; None when it has. ``template`` is a type,
    a tuple of types, a dict of fields, or an example value (a list or tuple: that many items like
    its own; None: anything)."""
    if isinstance(template, type) or (isinstance(template, tuple) and all(isinstance(t, type) for t in template)):
        types_ = template if isinstance(template, tuple) else (template,)
        if isinstance(saved, types_) and (bool in types_ or not isinstance(saved, bool)):
            return None
        return f"field '{name}' is not {' or '.join(_TYPE_WORDS.get(t, t.__name__) for t in types_)}"
    if isinstance(template, dict):
        if not isinstance(saved, dict):
            return f"field '{name}' is not an object"
        for key, sub in template.items():
            path = f"{name}.{key}".lstrip(".")
            found = f"field '{path}' is missing" if key not in saved else _mismatch(saved[key], sub, path)
            if found:
                return found
        return None
    if isinstance(template, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(template):
            return f"field '{name}' is not a list of {len(template)}"
        return next(filter(None, (_mismatch(s, t, f"{name}[{i}]") for i, (s, t) in enumerate(zip(saved, template)))),
                    None)
    if template is None:
        return None
    # An example value: its type, where an int may stand for a float.
    return _mismatch(saved, (int, float) if type(template) is float else type(template), name)


_TYPE_WORDS = {str: "a string", int: "an int", float: "a number", bool: "a bool", dict: "an object", list: "a list",
               type(None): "null"}


def check_structure(saved, template, where, name: str = ""):
    """A ``CheckpointError`` naming the field when ``saved`` is not shaped like ``template``."""
    found = _mismatch(saved, template, name)
    if found:
        raise CheckpointError(f"checkpoint {where}: {found} (damaged or written by another program)")


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
        size, digest = tmp.stat().st_size, file_sha256(tmp)
    meta = dict(meta, format=FORMAT, version=VERSION, tensors_file=st_path.name, tensors_bytes=size,
                tensors_sha256=digest,
                tensor_index={k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()})
    json_path = _with_ext(stem, ".json")
    write_text_atomic(json_path, json.dumps(meta, indent=1, sort_keys=True))
    return json_path


def step_of(path: str | Path) -> int | None:
    """The step in a checkpoint's name (``step_00000100.json`` -> 100), None for other names."""
    m = _STEM.match(stem_of(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoint JSON files of ``directory``, oldest step first."""
    found = [(step_of(p), p) for p in Path(directory).glob("step_*.json") if step_of(p) is not None]
    return [p for _, p in sorted(found)]


def remove_checkpoint(json_path: Path):
    json_path.unlink()  # JSON first, so that none is left half there
    json_path.with_suffix(".safetensors").unlink(missing_ok=True)


def prune_checkpoints(directory: str | Path, keep: int):
    """Deletes all but the newest ``keep`` checkpoints, tensor files whose JSON was never written
    and the temporary files of dead processes (saves that were interrupted)."""
    for path in list_checkpoints(directory)[:-keep]:
        remove_checkpoint(path)
    for path in Path(directory).glob("step_*.safetensors"):
        if not path.with_suffix(".json").exists():
            path.unlink()
    remove_stale_temporaries(directory)


def _candidates(path: str | Path) -> list[Path]:
    """The checkpoint JSON files ``path`` names, newest first: one for a file or a stem, all of a
    directory of checkpoints or of a run directory (its ``checkpoints/``)."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise CheckpointError(f"no checkpoint (step_*.json) in {path} or {path / 'checkpoints'}")
        return found[::-1]
    candidate = _with_ext(stem_of(path), ".json")
    if not candidate.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return [candidate]


def resolve_checkpoint(path: str | Path) -> Path:
    """The JSON file of a checkpoint given as its JSON, its safetensors, its stem, a directory of
    checkpoints or a run directory; the newest one for a directory (readable or not)."""
    return _candidates(path)[0]


def read_checkpoint(path: str | Path, schema: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(meta, tensors)`` of a checkpoint, after checking its structure (``schema``, default the
    question-answer trainer's ``SCHEMA``), size and hash. For a directory, the newest checkpoint
    that passes; each damaged newer one gets a warning."""
    candidates = _candidates(path)
    damaged = []
    for json_path in candidates:
        try:
            meta, tensors = _read(json_path, schema or SCHEMA)
        except CheckpointError as exc:
            damaged.append(str(exc))
            continue
        for problem in damaged:
            warnings.warn(f"skipping a damaged checkpoint: {problem}; using {json_path} instead", stacklevel=2)
        _compare_versions(meta)
        return meta, tensors
    if len(candidates) == 1:
        raise CheckpointError(damaged[0])
    raise CheckpointError(f"no readable checkpoint in {path}: " + "; ".join(damaged))


def _compare_versions(meta: dict):
    saved, now = meta["versions"], library_versions()
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in now if k in saved and saved[k] != now[k]]
    if changed:
        warnings.warn(f"checkpoint {meta['path']} was written with other library versions ({', '.join(changed)}); "
                      f"a resumed run may not repeat the uninterrupted one bit for bit", stacklevel=3)


def _read(json_path: Path, schema: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {json_path} is not valid JSON (truncated or corrupted?): {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {json_path} cannot be read: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path} is not a {FORMAT} file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{json_path} has format version {meta.get('version')!r}; this trainer reads {VERSION}")
    check_structure(meta, schema, json_path)
    for i, group in enumerate(meta["optimizer"]["param_groups"]):
        check_structure(group, {"params": list}, json_path, f"optimizer.param_groups[{i}]")
    _require(meta["step"] >= 0 and meta.get("teacher_dim", 1) >= 1, json_path, "'step' or 'teacher_dim' out of range")
    _require(all(isinstance(v, str) for v in meta["versions"].values()), json_path, "'versions' are not strings")
    st_path = json_path.with_name(meta["tensors_file"])
    if st_path.parent != json_path.parent or not st_path.is_file():
        raise CheckpointError(f"checkpoint {json_path}: its tensor file {st_path} is missing")
    size = st_path.stat().st_size
    if size != meta["tensors_bytes"]:
        raise CheckpointError(f"checkpoint tensor file {st_path} is {size} bytes, expected {meta['tensors_bytes']} "
                              f"(truncated or replaced)")
    try:
        if file_sha256(st_path) != meta["tensors_sha256"]:
            raise CheckpointError(f"checkpoint tensor file {st_path} fails its SHA-256 check (corrupted)")
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint tensor file {st_path} cannot be read: {exc}") from None
    index = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in tensors.items()}
    if index != meta["tensor_index"]:
        missing = sorted(set(meta["tensor_index"]) - set(index))
        raise CheckpointError(f"checkpoint {st_path} does not match its index in {json_path.name}"
                              + (f"; missing tensors: {missing[:5]}" if missing else ""))
    meta["path"] = str(json_path)
    return meta, tensors


def _require(ok: bool, where, problem: str):
    if not ok:
        raise CheckpointError(f"checkpoint {where}: {problem} (damaged or written by another program)")


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
    """Restores what ``optimizer_state`` split (``saved``: its JSON part) into ``optimizer``.
    Nested fields are checked against what ``optimizer`` writes, so that damage is named here
    rather than met later as a KeyError or a TypeError in the middle of training."""
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError(f"checkpoint {where}: its optimizer state does not fit this model")
    check_structure(groups, optimizer.state_dict()["param_groups"], where, "optimizer.param_groups")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict] = defaultdict(dict)
    for k, v in tensors.items():
        if k.startswith("optimizer/"):
            _, pid, name = k.split("/", 2)
            if not pid.isdigit() or int(pid) >= len(params) or (v.dim() and v.shape != params[int(pid)].shape):
                raise CheckpointError(f"checkpoint {where}: optimizer tensor {k} {tuple(v.shape)} does not fit "
                                      f"this model")
            state[int(pid)][name] = v
    for pid, extra in saved["state"].items():
        check_structure(extra, dict, where, f"optimizer.state.{pid}")
        if not pid.isdigit() or int(pid) >= len(params):
            raise CheckpointError(f"checkpoint {where}: field 'optimizer.state.{pid}' names no parameter")
        state[int(pid)].update(extra)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in groups]
    try:
        optimizer.load_state_dict({"state": dict(state), "param_groups": groups})
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {where}: cannot restore the optimizer state: {exc}") from None
