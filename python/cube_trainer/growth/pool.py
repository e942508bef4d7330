"""The sample pool and damage of Growing NCA training.

Batches start from states drawn from a pool and their final states go back into it, so the
lattice learns to keep a grown shape, not only to reach it once. In each batch the sample
farthest from the target (highest loss) starts again from the seed, and the ``damaged`` closest
to it lose every cell on one side of a random plane through the shape, so the lattice learns to
regrow what was cut.
"""
from __future__ import annotations

import torch

from .targets import occupied


def cell_coords(shape: tuple[int, int, int], device=None) -> torch.Tensor:
    """``[D, H, W, 3]`` float coordinates (d, h, w) of the cell centres."""
    axes = [torch.arange(n, dtype=torch.float32, device=device) + 0.5 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


class Shape:
    """Where a target is: the centroid of its opaque cells and their largest distance from it."""

    def __init__(self, target: torch.Tensor):
        coords = cell_coords(tuple(target.shape[:3]), target.device)
        cells = coords[occupied(target)]
        self.centre = cells.mean(0)
        self.radius = float((cells - self.centre).norm(dim=-1).max().clamp(min=0.5))


def cut(states: torch.Tensor, centre: torch.Tensor, normals: torch.Tensor,
        offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``states`` ([B, D, H, W, C]) with every cell zeroed on the positive side of sample b's
    plane: the cells p with ``(p - centre) . normals[b] > offsets[b]`` (0 when None)."""
    B = states.shape[0]
    coords = cell_coords(tuple(states.shape[1:4]), states.device) - centre
    side = torch.einsum("dhwk,bk->bdhw", coords, normals.to(coords))
    if offsets is not None:
        side = side - offsets.to(side).view(B, 1, 1, 1)
    return states * (side <= 0).unsqueeze(-1).to(states.dtype)


def axis_normals(n: int) -> torch.Tensor:
    """``[n, 3]``: sample i is cut across axis ``i % 3`` (d, h, w), on the ``+`` side for even
    ``i // 3`` and the ``-`` side for odd, so six samples remove each half of the shape once."""
    normals = torch.zeros(n, 3)
    for i in range(n):
        normals[i, i % 3] = 1.0 if (i // 3) % 2 == 0 else -1.0
    return normals


def random_normals(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` unit vectors, uniform on the sphere."""
    v = torch.randn(n, 3, generator=generator)
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-6)


class SamplePool:
    """``size`` lattice states ``[size, D, H, W, C]``, all the seed state at first."""

    def __init__(self, seed_state: torch.Tensor, size: int):
        self.seed_state = seed_state
        self.states = seed_state.unsqueeze(0).repeat(size, 1, 1, 1, 1)

    def sample(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``batch`` distinct pool entries."""
        return torch.randperm(self.states.shape[0], generator=generator)[:batch].to(self.states.device)

    def start(self, idx: torch.Tensor, losses: torch.Tensor, damaged: int, shape: Shape,
              generator: torch.Generator) -> torch.Tensor:
        """The batch's starting states: the pool's entries ``idx``, the highest-``losses`` one
        replaced by the seed, the ``damaged`` lowest-loss ones cut by a random plane through
        the shape (shifted off its centroid by up to a quarter of its radius)."""
        x = self.states[idx].clone()
        order = losses.argsort(descending=True)
        x[order[0]] = self.seed_state
        if damaged:
            best = order[-damaged:]
            offsets = (torch.rand(damaged, generator=generator) - 0.5) * 0.5 * shape.radius
            x[best] = cut(x[best], shape.centre, random_normals(damaged, generator), offsets)
        return x

    def put(self, idx: torch.Tensor, states: torch.Tensor):
        self.states[idx] = states.detach()
