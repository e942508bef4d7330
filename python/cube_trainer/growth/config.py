"""``cube-grow`` configuration: nested dataclasses loaded from YAML and validated with the
trainer's loader (``cube_trainer.config``): unknown keys, wrong types and impossible settings
are ``ConfigError``s that name the key. Every key has a default."""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from cube_kernels.backends import BACKENDS
from cube_kernels.neighbourhood import BOUNDARIES, NEIGHBOURHOODS

from ..config import (ConfigError, _choices, _require, apply_overrides, dataclass_from_dict, parse_override,
                      read_yaml)
from .targets import BUILTIN

RGBA = 4


@dataclass
class GrowModelConfig:
    depth: int = 16
    height: int = 16
    width: int = 16
    channels: int = 16                # RGBA + hidden channels per cell
    hidden: int = 48                  # F, the gate's width
    neighbourhood: str = _choices(*NEIGHBOURHOODS, default="moore")
    boundary: str = _choices(*BOUNDARIES, default="zero")
    fire_rate: float = 0.5
    alive_threshold: float = 0.1      # alive: some alpha in the 3x3x3 block above this
    init_spatial: float = 0.5         # spatial gating weights uniform in +-this (0: the gMLP init, ~1e-3)
    backend: str = _choices(*BACKENDS, default="auto")


@dataclass
class GrowTrainConfig:
    steps: int = 1000                 # optimizer steps per target
    batch_size: int = 8
    pool_size: int = 256              # sample pool of lattice states
    rollout_min: int = 24             # lattice steps per batch: uniform in [rollout_min, rollout_max]
    rollout_max: int = 40
    damaged: int = 2                  # samples per batch (the lowest-loss ones) that lose a random half-space
    damage_after: int = 0             # optimizer steps before damage starts
    lr: float = 2e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1         # cosine decay floor, as a fraction of lr
    alpha_weight: float = 1.0         # weight of alpha's squared error against each colour's (the IoU reads alpha)
    overflow: float = 1.0             # weight of the loss on state values outside [-1, 1]
    ema: float = 0.0                  # decay of the weights' moving average that evaluation uses (0: the last weights)
    loss_steps: int = 1               # the loss is the mean over the rollout's last loss_steps states
    checkpoint_every: int = 100       # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2
    log_every: int = 10
    progress: bool = True


@dataclass
class GrowEvalConfig:
    samples: int = 6                  # rollouts; sample i's cut removes half of the shape across axis i % 3
    horizon: int | None = None        # lattice steps from the seed; null: train.rollout_max
    pictures: bool = True             # growth.png, growth.gif and training.png per target


@dataclass
class GrowConfig:
    seed: int = 0
    device: str = "cpu"               # cpu | cuda | cuda:N
    out_dir: str = "runs/grow"
    targets: list[str] = field(default_factory=lambda: list(BUILTIN))
    # KEY=VALUE settings (model.*, train.*, eval.*) of one target, by its name: {tree: [train.damaged=2]}
    per_target: dict[str, list[str]] = field(default_factory=dict)
    model: GrowModelConfig = field(default_factory=GrowModelConfig)
    train: GrowTrainConfig = field(default_factory=GrowTrainConfig)
    eval: GrowEvalConfig = field(default_factory=GrowEvalConfig)

    @property
    def horizon(self) -> int:
        return self.eval.horizon or self.train.rollout_max


def validate(cfg: GrowConfig) -> GrowConfig:
    """Checks the settings that cannot work together; returns ``cfg``."""
    m, t, e = cfg.model, cfg.train, cfg.eval
    for key in ("depth", "height", "width", "hidden"):
        _require(getattr(m, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(m, key)}")
    _require(m.channels > RGBA, "model.channels", f"must be > {RGBA} (RGBA plus hidden channels), got {m.channels}")
    _require(0.0 < m.fire_rate <= 1.0, "model.fire_rate", f"must be in (0, 1], got {m.fire_rate}")
    _require(m.init_spatial >= 0, "model.init_spatial", f"must be >= 0, got {m.init_spatial}")
    _require(0.0 <= m.alive_threshold < 0.5, "model.alive_threshold",
             f"must be in [0, 0.5) (below the opacity threshold 0.5), got {m.alive_threshold}")
    for key in ("steps", "batch_size", "rollout_min", "loss_steps", "log_every", "keep_checkpoints"):
        _require(getattr(t, key) >= 1, f"train.{key}", f"must be >= 1, got {getattr(t, key)}")
    _require(t.rollout_max >= t.rollout_min, "train.rollout_max",
             f"must be >= train.rollout_min={t.rollout_min}, got {t.rollout_max}")
    _require(t.pool_size >= t.batch_size, "train.pool_size",
             f"must be >= train.batch_size={t.batch_size}, got {t.pool_size}")
    _require(0 <= t.damaged < t.batch_size, "train.damaged",
             f"must be in [0, train.batch_size={t.batch_size}) (the worst sample is reseeded, not cut), got {t.damaged}")
    for key in ("damage_after", "warmup_steps", "checkpoint_every"):
        _require(getattr(t, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _require(t.overflow >= 0, "train.overflow", f"must be >= 0, got {t.overflow}")
    _require(t.alpha_weight > 0, "train.alpha_weight", f"must be > 0, got {t.alpha_weight}")
    _require(0 <= t.ema < 1, "train.ema", f"must be in [0, 1), got {t.ema}")
    _require(e.samples >= 1, "eval.samples", f"must be >= 1, got {e.samples}")
    _require(e.horizon is None or e.horizon >= 1, "eval.horizon", f"must be null or >= 1, got {e.horizon}")
    _require(bool(cfg.targets), "targets", "must name at least one target")
    for i, name in enumerate(cfg.targets):
        _require(name in BUILTIN or name.endswith(".npy"), f"targets[{i}]",
                 f"must be a built-in target ({', '.join(BUILTIN)}) or a .npy file, got {name!r}")
    _require(len({target_name(n) for n in cfg.targets}) == len(cfg.targets), "targets",
             f"two targets share a name (each one's run directory): {cfg.targets}")
    _require(re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is not None, "device",
             f"must be cpu, cuda or cuda:N, got {cfg.device!r}")
    names = [target_name(n) for n in cfg.targets]
    for name, settings in cfg.per_target.items():
        _require(name in names, f"per_target.{name}", f"is not a target of the config ({', '.join(names)})")
        for text in settings:
            _require(parse_override(text)[0][0] in ("model", "train", "eval"), f"per_target.{name}",
                     f"{text!r}: a target's settings can change model.*, train.* and eval.* only")
        target_config(cfg, name)
    return cfg


def target_config(cfg: GrowConfig, name: str) -> GrowConfig:
    """The config that target ``name`` trains with: ``cfg`` with its ``per_target`` settings
    applied (and no ``per_target`` of its own)."""
    data = config_to_dict(cfg)
    settings = data.pop("per_target").get(name, [])
    try:
        return config_from_dict(apply_overrides(data, settings))
    except ConfigError as exc:
        raise ConfigError(f"per_target.{name}: {exc}") from None


def target_name(target: str) -> str:
    """The run sub-directory of a target: its built-in name or the .npy file's stem."""
    return target if target in BUILTIN else Path(target).stem


def config_from_dict(data: dict | None) -> GrowConfig:
    return validate(dataclass_from_dict(GrowConfig, copy.deepcopy(data)))


def config_to_dict(cfg: GrowConfig) -> dict:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides=()) -> GrowConfig:
    """The validated config of a YAML file (defaults when ``path`` is None) plus ``KEY=VALUE``
    overrides; ``.npy`` target paths are made absolute against the working directory."""
    data = read_yaml(path) if path is not None else {}
    try:
        cfg = config_from_dict(apply_overrides(data, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    cfg.targets = [t if t in BUILTIN else str(Path(t).expanduser().resolve()) for t in cfg.targets]
    return cfg
