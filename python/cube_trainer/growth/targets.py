"""Target shapes for growth: RGBA voxel grids ``[D, H, W, 4]`` in [0, 1].

The built-in targets are drawn in code at any lattice size, from shapes defined in coordinates
scaled to the lattice (``[-1, 1]`` across the central ``EXTENT`` of each axis, so they keep their
proportions at any size):

* ``torus``: a ring lying across the face (genus one: a loop with a hole through it);
* ``tree``: a trunk up the depth axis that forks into three branches (branching, no loops);
* ``shell``: a hollow sphere with a round opening at the top (a closed surface cut open: the
  cavity is connected to the outside).

Any ``[D, H, W, 4]`` ``.npy`` grid is a target too (its size must be the lattice's). A cell
counts as part of a shape where its alpha is above ``OPAQUE`` (0.5).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError

OPAQUE = 0.5
# The shapes fill the central three quarters of each axis: like the padding around the targets of
# Mordvintsev et al., the margin leaves room for growth to overshoot and be corrected.
EXTENT = 0.75


class TargetError(ConfigError):
    """A target that does not exist, cannot be read or does not fit the lattice (a user error:
    the commands report it in one line)."""


def _grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel centres ``[D, H, W, 3]`` in (d, h, w), each axis scaled so that [-1, 1] spans its
    central ``EXTENT``."""
    axes = [((np.arange(n) + 0.5) / n * 2 - 1) / EXTENT for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _thickness(shape, scaled: float, voxels: float) -> float:
    """A radius of ``scaled`` in lattice coordinates, but at least ``voxels`` voxels wide (on a
    small lattice the shapes would otherwise fall apart into single voxels)."""
    return max(scaled, voxels * 2.0 / (EXTENT * min(shape)))


def _hue(angle: np.ndarray) -> np.ndarray:
    """A colour wheel: ``angle`` in radians to RGB in [0.15, 0.95] (never black, never white)."""
    phase = angle[..., None] + np.array([0.0, 2.0, 4.0]) * math.pi / 3
    return 0.55 + 0.4 * np.cos(phase)


def _segment_distance(p: np.ndarray, a, b) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1)


def torus(shape: tuple[int, int, int]) -> np.ndarray:
    p = _grid(shape)
    d, h, w = p[..., 0], p[..., 1], p[..., 2]
    inside = np.hypot(np.hypot(h, w) - 0.58, d) <= _thickness(shape, 0.3, 1.5)
    return _rgba(inside, _hue(np.arctan2(h, w)))


FORK = (-0.05, 0.0, 0.0)


def tree(shape: tuple[int, int, int]) -> np.ndarray:
    """A trunk up the depth axis, forking into three branches that spread upwards."""
    p = _grid(shape)
    inside = _segment_distance(p, (-0.9, 0.0, 0.0), FORK) <= _thickness(shape, 0.3, 1.5)
    rgb = np.zeros(p.shape[:-1] + (3,))
    rgb[inside] = (0.5, 0.3, 0.1)  # a brown trunk
    for i in range(3):
        a = 2 * math.pi * i / 3 + 0.3
        end = (0.72, 0.58 * math.cos(a), 0.58 * math.sin(a))
        branch = _segment_distance(p, FORK, end) <= _thickness(shape, 0.27, 1.2)
        rgb[branch & ~inside] = (0.2, 0.7, 0.25)  # green branches
        inside |= branch
    return _rgba(inside, rgb)


def shell(shape: tuple[int, int, int]) -> np.ndarray:
    """A hollow sphere with a round opening at the top (+d)."""
    p = _grid(shape)
    r = np.linalg.norm(p, axis=-1)
    outer = 0.85
    inside = (r <= outer) & (r >= outer - _thickness(shape, 0.36, 1.5)) & (p[..., 0] < 0.5 * outer)
    rgb = np.stack([0.5 + 0.45 * p[..., 0], 0.35 + 0.3 * np.abs(p[..., 1]), 0.9 - 0.45 * (p[..., 0] + 1) / 2], -1)
    return _rgba(inside, np.clip(rgb, 0, 1))


def _rgba(inside: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    alpha = inside.astype(np.float32)
    return np.concatenate([np.broadcast_to(rgb, inside.shape + (3,)) * alpha[..., None], alpha[..., None]],
                          -1).astype(np.float32)


BUILTIN = {"torus": torus, "tree": tree, "shell": shell}


def load_target(name: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """The RGBA target ``[D, H, W, 4]`` (float32) for a lattice of ``shape``: a built-in name or
    the path of a ``.npy`` file."""
    if name in BUILTIN:
        grid = BUILTIN[name](tuple(shape))
    else:
        path = Path(name)
        if path.suffix != ".npy":
            raise TargetError(f"target {name!r} is neither a built-in target ({', '.join(BUILTIN)}) "
                              f"nor a .npy file")
        if not path.is_file():
            raise TargetError(f"target file not found: {path}")
        try:
            grid = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise TargetError(f"target file {path} cannot be read as a .npy array: {exc}") from None
        want = (*shape, 4)
        if grid.shape != want:
            raise TargetError(f"target {path} must be a [D, H, W, 4] = {list(want)} RGBA grid (the lattice's "
                              f"size), got shape {list(grid.shape)}")
        if not np.issubdtype(grid.dtype, np.number) or np.issubdtype(grid.dtype, np.complexfloating):
            raise TargetError(f"target {path} must hold real numbers, got dtype {grid.dtype}")
        grid = grid.astype(np.float32)
        if not np.isfinite(grid).all() or grid.min() < 0 or grid.max() > 1:
            raise TargetError(f"target {path}: every value must be finite and in [0, 1] "
                              f"(got min {np.nanmin(grid):.3g}, max {np.nanmax(grid):.3g})")
    target = torch.from_numpy(np.ascontiguousarray(grid))
    if not (target[..., 3] > OPAQUE).any():
        raise TargetError(f"target {name!r} has no opaque cell (alpha > {OPAQUE}) on a {'x'.join(map(str, shape))} "
                          f"lattice")
    return target


def seed_position(target: torch.Tensor) -> tuple[int, int, int]:
    """The opaque cell of ``target`` nearest the lattice's centre: where growth starts, so that
    the seed is part of the shape even where the centre is not (a ring, a hollow shell)."""
    shape = torch.tensor(target.shape[:3], dtype=torch.float32)
    cells = (target[..., 3] > OPAQUE).nonzero().float()
    dist = ((cells + 0.5 - shape / 2) ** 2).sum(-1)
    return tuple(int(v) for v in cells[dist.argmin()].long())


def occupied(state: torch.Tensor) -> torch.Tensor:
    """The opaque cells (alpha, channel 3, above ``OPAQUE``) of ``[..., C >= 4]`` states. With
    alive masking every such cell is alive: the alive threshold (0.1) is below ``OPAQUE``."""
    return state[..., 3] > OPAQUE


def iou(state: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Voxel IoU of the opaque cells of ``state`` ([B, D, H, W, C]) and ``target`` ([D, H, W, 4]),
    one value per sample."""
    pred, want = occupied(state), occupied(target).unsqueeze(0)
    inter = (pred & want).flatten(1).sum(1)
    union = (pred | want).flatten(1).sum(1)
    return inter.float() / union.clamp(min=1).float()
