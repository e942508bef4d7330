"""The question -> answer model: adapter, lattice, inverse adapter.

    question embedding [B, T] --adapter_in--> surface [B, H*W*E] (rescaled to unit RMS)
      -> the first E channels of the front face (d = 0), re-injected before every lattice step
      -> ``steps`` steps of the gMLP lattice from a learned initial cell state
      -> back face (d = D-1), first E channels, minus those of a rollout with an empty surface,
         at unit length [B, H*W*E] --adapter_out--> prediction [B, T] (+ the question if residual)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cube_kernels import CubeLattice, reference
from cube_kernels.neighbourhood import offsets

from .config import ModelConfig


class CubeModel(nn.Module):
    def __init__(self, teacher_dim: int, cfg: ModelConfig):
        super().__init__()
        if teacher_dim < 1:
            raise ValueError(f"teacher_dim must be >= 1, got {teacher_dim}")
        self.cfg, self.teacher_dim = cfg, teacher_dim
        self.surface_dim = cfg.height * cfg.width * cfg.surface_channels
        self.adapter_in = nn.Linear(teacher_dim, self.surface_dim)
        self.adapter_out = nn.Linear(self.surface_dim, teacher_dim)
        self.lattice = CubeLattice(cfg.depth, cfg.height, cfg.width, cfg.channels, cfg.hidden,
                                   neighbourhood=cfg.neighbourhood, boundary=cfg.boundary,
                                   fire_rate=cfg.fire_rate, alive_channel=cfg.alive_channel,
                                   alive_threshold=cfg.alive_threshold, backend=cfg.backend,
                                   checkpoint=cfg.checkpoint)
        # Every cell starts from this learned state. Not zero: the all-zero state is a dead fixed
        # point (u = 0 there, so no neighbour's signal can enter a cell).
        self.init_state = nn.Parameter(torch.zeros(cfg.channels))
        self.reset_parameters()

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
        cfg, cell = self.cfg, self.lattice.cell
        for adapter in (self.adapter_in, self.adapter_out):
            adapter.reset_parameters()
            adapter.bias.zero_()
        if cfg.residual:  # start as the identity q -> q; the lattice learns the change
            self.adapter_out.weight.zero_()
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

    def forward(self, question_emb: torch.Tensor, *, seed: int, start: torch.Tensor | None = None,
                use_start: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Returns ``input_surface``, ``output_surface`` ([B, H*W*E]), ``final_output`` (the
        prediction in teacher space, [B, T]), ``final_cube_state`` and ``previous_cube_state``
        (the states after the last two steps, for the internal loss).

        One extra sample runs with an empty (zero) surface from the initial state, and the
        read-out is the difference of the back faces: what the question changed there. The
        lattice's own drift (its boundaries, its dynamics from the initial state) is the same
        with and without a question, and would otherwise swamp the signal."""
        B = question_emb.shape[0]
        D, H, W = self.lattice.shape
        E = self.cfg.surface_channels
        surface = self.surface(question_emb)
        inject = torch.cat([surface, surface.new_zeros(1, self.surface_dim)]).view(B + 1, H, W, E)
        x0 = torch.cat([self.initial_state(B, start, use_start), self.initial_state(1)])
        states = self.lattice(x0, self.cfg.steps, seed=seed, inject=inject, return_states=True)
        final = states[-1]
        back = final[:, -1, :, :, :E].reshape(B + 1, self.surface_dim)
        # Unit length, like a teacher embedding: the residual adapter then starts at the scale of q.
        out_surface = F.normalize(back[:B] - back[B:], dim=-1)
        previous = states[-2] if len(states) > 1 else x0
        return {"input_surface": surface, "output_surface": out_surface,
                "final_output": self.adapter_out(out_surface) + (question_emb if self.cfg.residual else 0.0),
                "final_cube_state": final[:B], "previous_cube_state": previous[:B]}
