"""cube_trainer: train the cube lattice to answer questions in a teacher's embedding space.

    from cube_trainer import CubeTrainer, load_config
    trainer = CubeTrainer(load_config("configs/default.yaml"))
    losses = trainer.train_step(question_emb, answer_emb)    # {"total_loss": ..., ...}

The earlier trainer's names (``EmergentCubeTrainer``, ``EmergentTrainingConfig``,
``create_emergent_trainer``) are here too; see docs/trainer.md.
"""
from .bank import AnswerBank
from .checkpoint import CheckpointError
from .compat import EmergentCubeTrainer, EmergentTrainingConfig, create_emergent_trainer
from .config import Config, ConfigError, load_config
from .data import DataError, Pair, PairSet, build_splits, load_pairs
from .evaluate import compare, format_table
from .losses import compute_losses
from .model import CubeModel
from .rundir import RunDirectoryError
from .teacher import Teacher, TeacherError
from .trainer import CubeTrainer, NonFiniteLossError

__all__ = ["AnswerBank", "CheckpointError", "Config", "ConfigError", "CubeModel", "CubeTrainer", "DataError",
           "EmergentCubeTrainer", "EmergentTrainingConfig", "NonFiniteLossError", "Pair", "PairSet",
           "RunDirectoryError", "Teacher", "TeacherError", "build_splits", "compare", "compute_losses",
           "create_emergent_trainer", "format_table", "load_config", "load_pairs"]
