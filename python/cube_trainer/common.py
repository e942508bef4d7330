"""Small deterministic helpers shared by the trainer and the baselines."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch


def derive_seed(*parts) -> int:
    """A seed in [0, 2**63) from any parts (config seed, purpose, step, ...), the same in every
    process and on every run."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the ``n`` training pairs in ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "data", epoch)))


def lr_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, not on biases, norms or the initial state."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
