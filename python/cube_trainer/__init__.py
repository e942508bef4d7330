"""cube_trainer: train the cube lattice to answer questions in a teacher's embedding space.

    from cube_trainer import CubeTrainer, load_config
    trainer = CubeTrainer(load_config("configs/default.yaml"))
    losses = trainer.train_step(question_emb, answer_emb)    # {"total_loss": ..., ...}

The earlier trainer's names (``EmergentCubeTrainer``, ``EmergentTrainingConfig``,
``create_emergent_trainer``) are here too; see docs/trainer.md.
"""
import os

# 2 MB pages for CPU tensors of 2 MB and more: PyTorch reads THP_MEM_ALLOC_ENABLE at its first CPU
# allocation of that size, which under cube-train comes later than this. A training step
# allocates tens of MB afresh, and with 4 KB pages the default config's step took about 3%
# longer (docs/performance.md). THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .bank import AnswerBank
from .checkpoint import CheckpointError
from .compat import EmergentCubeTrainer, EmergentTrainingConfig, create_emergent_trainer
from .config import Config, ConfigError, load_config
from .data import DataError, Pair, PairSet, build_splits, load_pairs
from .evaluate import HeldOut, compare
from .report import format_report
from .losses import compute_losses
from .model import CubeModel
from .rundir import RunDirectoryError
from .teacher import Teacher, TeacherError
from .trainer import CubeTrainer, NonFiniteLossError

__all__ = ["AnswerBank", "CheckpointError", "Config", "ConfigError", "CubeModel", "CubeTrainer", "DataError",
           "EmergentCubeTrainer", "EmergentTrainingConfig", "HeldOut", "NonFiniteLossError", "Pair", "PairSet",
           "RunDirectoryError", "Teacher", "TeacherError", "build_splits", "compare", "compute_losses",
           "create_emergent_trainer", "format_report", "load_config", "load_pairs"]
