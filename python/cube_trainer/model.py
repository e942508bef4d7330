"""The question -> answer model: adapter, lattice, inverse adapter.

    question embedding [B, T] --adapter_in--> surface [B, H*W*E] (rescaled to unit RMS)
      -> the first E channels of the front face (d = 0), re-injected before every lattice step
      -> ``steps`` steps of the gMLP lattice from a learned initial cell state
      -> back face (d = D-1), first E channels, minus those of a rollout with an empty surface,
         at unit length [B, H*W*E] --adapter_out--> prediction [B, T] (+ the question if residual)

``model.lattice`` selects the two ablations that measure what the lattice adds: ``frozen`` keeps
the cell and the initial state at their initialisation (only the adapters train), ``none``
replaces the lattice by the direct map front face -> back face (the surface itself is read out).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cube_kernels import CubeLattice, reference
from cube_kernels.neighbourhood import offsets

from .config import ModelConfig

# Floor of the read-out's mean square: below it the read-out shrinks instead of being rescaled to
# unit length, so a back face that barely responds cannot blow the gradient up (1 / its norm).
READOUT_EPS = 1e-4


def unit_length(x: torch.Tensor, eps: float = READOUT_EPS) -> torch.Tensor:
    """``x / |x|`` along the last dimension for any ``x`` whose mean square is well above ``eps``;
    smoothly smaller than unit length below it, with gradients bounded by ``1 / sqrt(n * eps)``."""
    return x * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + x.shape[-1] * eps).to(x.dtype)


class CubeModel(nn.Module):
    def __init__(self, teacher_dim: int, cfg: ModelConfig):
        super().__init__()
        if teacher_dim < 1:
            raise ValueError(f"teacher_dim must be >= 1, got {teacher_dim}")
        self.cfg, self.teacher_dim = cfg, teacher_dim
        self.surface_dim = cfg.height * cfg.width * cfg.surface_channels
        self.adapter_in = nn.Linear(teacher_dim, self.surface_dim)
        self.adapter_out = nn.Linear(self.surface_dim, teacher_dim)
        self.lattice = self.init_state = None
        if cfg.lattice != "none":
            self.lattice = CubeLattice(cfg.depth, cfg.height, cfg.width, cfg.channels, cfg.hidden,
                                       neighbourhood=cfg.neighbourhood, boundary=cfg.boundary,
                                       fire_rate=cfg.fire_rate, alive_channel=cfg.alive_channel,
                                       alive_threshold=cfg.alive_threshold, backend=cfg.backend,
                                       checkpoint=cfg.checkpoint)
            # Every cell starts from this learned state. Not zero: the all-zero state is a dead
            # fixed point (u = 0 there, so no neighbour's signal can enter a cell).
            self.init_state = nn.Parameter(torch.zeros(cfg.channels))
        self.reset_parameters()
        if cfg.lattice == "frozen":
            self.lattice.requires_grad_(False)
            self.init_state.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self):
        """``model.init: propagate`` (default) starts the lattice as a carrier of the surface from
        front to back; ``gmlp`` keeps the cell's own initialisation. Under the gMLP init (spatial
        weights ~1e-3, a small out-projection) a signal loses orders of magnitude per cell and
        nothing reaches the back face of a deep lattice, so nothing can be learned. ``propagate``:

        * the spatial weight of the neighbour in front (offset (-1, 0, 0)) is ``init_gate``: the
          gate of each cell opens with the state of the cell before it;
        * the out-projection has the usual 1/sqrt(F) scale instead of a tenth of it;
        * the initial state is drawn with std ``init_state_scale``;
        * ``b_out`` makes that initial state a fixed point of a cell whose neighbours are in it,
          so the lattice does not drift by itself and what moves is the surface's signal.

        With the defaults (4.0, 1.0) the back face of the 15x15x11 lattice keeps the similarity
        structure of the questions (the pairwise cosines of 48 chatterbot questions at the back
        face correlate at 0.95 with those of their surfaces) and responds smoothly to them.
        """
        cfg = self.cfg
        for adapter in (self.adapter_in, self.adapter_out):
            adapter.reset_parameters()
            adapter.bias.zero_()
        if cfg.residual:  # start as the identity q -> q; the lattice learns the change
            self.adapter_out.weight.zero_()
        if self.lattice is None:
            return
        cell = self.lattice.cell
        if cfg.init == "gmlp":
            self.init_state.normal_(0.0, 0.5)
            return
        cell.reset_parameters()
        cell.w_sp[offsets(cfg.neighbourhood).index((-1, 0, 0))] = cfg.init_gate
        bound = 1.0 / math.sqrt(cfg.hidden)
        cell.w_out.uniform_(-bound, bound)
        self.init_state.normal_(0.0, cfg.init_state_scale)
        u, vn = reference.cell_input(self.init_state, cell.ln1_weight, cell.ln1_bias, cell.w_in, cell.b_in,
                                     cell.ln2_weight, cell.ln2_bias)
        cell.b_out.copy_(-(u * (cell.b_sp + cell.w_sp.sum(0) * vn)) @ cell.w_out)

    def surface(self, emb: torch.Tensor) -> torch.Tensor:
        """Teacher embeddings ``[B, T]`` to surfaces ``[B, H*W*E]`` with unit RMS, so that the
        injected values have a fixed scale whatever the teacher."""
        return F.normalize(self.adapter_in(emb), dim=-1) * math.sqrt(self.surface_dim)

    def initial_state(self, batch: int, start: torch.Tensor | None = None,
                      use_start: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, D, H, W, C]``: the learned initial state, or ``start[b]`` where ``use_start[b]``
        (the NCA sample pool)."""
        D, H, W = self.lattice.shape
        x = self.init_state.view(1, 1, 1, 1, -1).expand(batch, D, H, W, -1)
        if start is None:
            return x
        # torch.where keeps init_state in the graph even when every sample comes from the pool
        # (DDP expects a gradient for every parameter).
        return torch.where(use_start.view(-1, 1, 1, 1, 1), start.to(x.dtype), x)

    def rollout(self, surface: torch.Tensor, *, seed: int, start: torch.Tensor | None = None,
                use_start: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The initial state and the states after every step, ``steps + 1`` tensors
        ``[B + 1, D, H, W, C]``: the surfaces ``[B, H*W*E]`` and, last, one extra sample with an
        empty (zero) surface from the initial state (the reference of ``read_out``)."""
        B = surface.shape[0]
        D, H, W = self.lattice.shape
        inject = torch.cat([surface, surface.new_zeros(1, self.surface_dim)]).view(B + 1, H, W, -1)
        x0 = torch.cat([self.initial_state(B, start, use_start), self.initial_state(1)])
        states = self.lattice(x0, self.cfg.steps, seed=seed, inject=inject, return_states=True)
        return [x0, *states]

    def read_out(self, final_state: torch.Tensor) -> torch.Tensor:
        """``[B, H*W*E]``: the back face's first E channels of the ``B`` questions of a rollout's
        final state ``[B + 1, ...]`` minus those of its empty sample (what the question changed
        there; the lattice's own drift is the same with and without a question and would swamp
        it), at unit length like a teacher embedding (``unit_length``: numerically safe where
        the difference vanishes)."""
        back = final_state[:, -1, :, :, :self.cfg.surface_channels].reshape(final_state.shape[0], self.surface_dim)
        return unit_length(back[:-1] - back[-1:])

    def answer(self, out_surface: torch.Tensor, question_emb: torch.Tensor) -> torch.Tensor:
        """The prediction in teacher space ``[B, T]`` from the read-out."""
        return self.adapter_out(out_surface) + (question_emb if self.cfg.residual else 0.0)

    def forward(self, question_emb: torch.Tensor, *, seed: int, start: torch.Tensor | None = None,
                use_start: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Returns ``input_surface``, ``output_surface`` ([B, H*W*E], ``read_out``),
        ``final_output`` (the prediction in teacher space, [B, T]), ``final_cube_state`` and
        ``previous_cube_state`` (the states after the last two steps, for the internal loss; None
        without a lattice, where the surface itself is the read-out)."""
        surface = self.surface(question_emb)
        if self.lattice is None:
            out_surface, final, previous = unit_length(surface), None, None
        else:
            states = self.rollout(surface, seed=seed, start=start, use_start=use_start)
            out_surface, final, previous = self.read_out(states[-1]), states[-1][:-1], states[-2][:-1]
        return {"input_surface": surface, "output_surface": out_surface,
                "final_output": self.answer(out_surface, question_emb),
                "final_cube_state": final, "previous_cube_state": previous}
