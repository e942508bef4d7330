"""The earlier trainer's names, so that its scripts run after an import change:

    from training.embedding_trainer.emergent_training_stage_3_1_4_1 import (
        EmergentCubeTrainer, EmergentTrainingConfig, create_emergent_trainer)
becomes
    from cube_trainer import EmergentCubeTrainer, EmergentTrainingConfig, create_emergent_trainer
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, ConfigError, config_from_dict
from .teacher import model_dim
from .trainer import CubeTrainer

# Widths of the teachers the earlier trainer named without a local path.
KNOWN_TEACHER_DIMS = {"Meta-Llama-3-8B": 4096, "meta-llama/Meta-Llama-3-8B": 4096, "distilbert-base-uncased": 768,
                      "all-mpnet-base-v2": 768, "sentence-transformers/all-mpnet-base-v2": 768,
                      "all-MiniLM-L6-v2": 384, "sentence-transformers/all-MiniLM-L6-v2": 384}
_LOSS_NAMES = {"surface_reconstruction": "surface", "internal_consistency": "internal",
               "dialogue_similarity": "dialogue", "contrastive": "contrastive"}
_NEIGHBOURS = {6: "von_neumann", 26: "moore"}
# Options of the earlier trainer that have no counterpart here (its NCA / adaptive-weight paths).
_NO_EFFECT = ("enable_full_cube_gradient", "emergent_specialization", "adaptive_loss_weighting", "enable_nca",
              "nca_config")


@dataclass
class EmergentTrainingConfig:
    """The earlier trainer's config; ``to_config()`` maps it onto ``Config``. ``cube_dimensions``
    is (width, height, depth) as it was; ``epochs`` become ``epochs * steps_per_epoch`` steps."""
    teacher_model: str = "Meta-Llama-3-8B"
    teacher_embedding_dim: int | None = None
    cube_dimensions: tuple[int, int, int] = (15, 15, 11)
    enable_full_cube_gradient: bool = True
    spatial_propagation_depth: int = 11
    emergent_specialization: bool = True
    gmlp_config: dict[str, Any] | None = None
    loss_weights: dict[str, float] | None = None
    learning_rate: float = 0.001
    batch_size: int = 8
    epochs: int = 15
    warmup_epochs: int = 3
    steps_per_epoch: int = 100
    gradient_balancing: bool = True
    adaptive_loss_weighting: bool = True
    mixed_precision: bool = True
    gradient_checkpointing: bool = True
    gradient_accumulation_steps: int = 1
    enable_nca: bool = True
    nca_config: Any = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def teacher_dim(self) -> int:
        if self.teacher_embedding_dim is not None:
            return self.teacher_embedding_dim
        if self.teacher_model in KNOWN_TEACHER_DIMS:
            return KNOWN_TEACHER_DIMS[self.teacher_model]
        if Path(self.teacher_model).expanduser().is_dir():
            return model_dim(self.teacher_model)
        raise ConfigError(f"teacher_model {self.teacher_model!r} is neither a known teacher "
                          f"({', '.join(KNOWN_TEACHER_DIMS)}) nor a local model directory; set teacher_embedding_dim")

    def to_config(self) -> Config:
        defaults = EmergentTrainingConfig()
        ignored = [k for k in _NO_EFFECT if getattr(self, k) != getattr(defaults, k)]
        if ignored:
            warnings.warn(f"EmergentTrainingConfig options without effect in cube_trainer: {', '.join(ignored)}")
        if len(self.cube_dimensions) != 3:
            raise ConfigError(f"cube_dimensions must be (width, height, depth), got {self.cube_dimensions!r}")
        width, height, depth = self.cube_dimensions
        model = {"width": width, "height": height, "depth": depth, "steps": self.spatial_propagation_depth,
                 "checkpoint": self.gradient_checkpointing}
        gmlp = dict(self.gmlp_config or {})
        if "state_size" in gmlp:
            model["channels"] = gmlp.pop("state_size")
        if "hidden_dim" in gmlp:
            model["hidden"] = gmlp.pop("hidden_dim")
        if "neighbor_count" in gmlp:
            count = gmlp.pop("neighbor_count")
            if count not in _NEIGHBOURS:
                raise ConfigError(f"gmlp_config.neighbor_count must be 6 (von Neumann) or 26 (Moore), got {count}")
            model["neighbourhood"] = _NEIGHBOURS[count]
        if gmlp:
            warnings.warn(f"gmlp_config keys without effect in cube_trainer: {', '.join(gmlp)}")
        loss = {}
        for name, weight in (self.loss_weights or {}).items():
            if name not in _LOSS_NAMES:
                raise ConfigError(f"loss_weights: unknown term {name!r}; known: {', '.join(_LOSS_NAMES)}")
            loss[_LOSS_NAMES[name]] = weight
        teacher = {"model": self.teacher_model} if Path(self.teacher_model).expanduser().is_dir() else {}
        return config_from_dict({
            "teacher": teacher, "model": model, "loss": loss,
            "train": {"lr": self.learning_rate, "batch_size": self.batch_size,
                      "steps": self.epochs * self.steps_per_epoch,
                      "warmup_steps": self.warmup_epochs * self.steps_per_epoch,
                      "clip_grad_norm": 1.0 if self.gradient_balancing else None,
                      "amp": self.mixed_precision, "grad_accum": self.gradient_accumulation_steps}})


class EmergentCubeTrainer(CubeTrainer):
    """``CubeTrainer`` under the earlier name; also takes an ``EmergentTrainingConfig``."""

    def __init__(self, config=None, device=None):
        if isinstance(config, EmergentTrainingConfig):
            super().__init__(config.to_config(), config.teacher_dim(), device=device)
        else:
            super().__init__(config, device=device)

    @property
    def training_step(self) -> int:
        return self.global_step

    def get_system_info(self) -> dict:
        m = self.config.model
        cell = sum(p.numel() for p in self.model.lattice.cell.parameters())
        return {"architecture": "CubeTrainer", "cube_dimensions": (m.width, m.height, m.depth),
                "total_cells": m.depth * m.height * m.width, "params_per_cell": cell,
                "total_system_params": self.num_parameters(), "teacher_dim": self.teacher_dim,
                "spatial_propagation": m.steps, "loss_components": ["surface", "dialogue", "contrastive", "internal"],
                "step": self.global_step}


def create_emergent_trainer(cube_dimensions: tuple[int, int, int] = (15, 15, 11),
                            teacher_model: str = "Meta-Llama-3-8B", device: str = "cpu") -> EmergentCubeTrainer:
    config = EmergentTrainingConfig(teacher_model=teacher_model, cube_dimensions=cube_dimensions,
                                    spatial_propagation_depth=max(cube_dimensions[2], 1))
    return EmergentCubeTrainer(config, device)
