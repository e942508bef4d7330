"""The benchmarked configuration and its inputs, identical for every implementation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from cube_kernels.spec import PARAM_SHAPES

from . import flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Config:
    depth: int = 11
    height: int = 15
    width: int = 15
    channels: int = 64
    hidden: int = 128
    neighbourhood: str = "von_neumann"
    boundary: str = "zero"
    fire_rate: float = 1.0
    alive_channel: int | None = None  # Growing-NCA alive masking on this channel (None: off)
    steps: int = 12
    batch: int = 8
    dtype: str = "float32"
    seed: int = 1234

    @property
    def cells(self) -> int:
        return self.depth * self.height * self.width

    @property
    def tokens(self) -> int:
        from cube_kernels.neighbourhood import num_tokens
        return num_tokens(self.neighbourhood)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def lattice(self) -> str:
        return f"{self.depth}x{self.height}x{self.width}"

    def flops(self) -> flops.StepFlops:
        return flops.rollout(self.channels, self.hidden, self.tokens, self.cells, self.batch, self.steps)

    def cell_steps(self) -> int:
        return self.cells * self.batch * self.steps

    def with_(self, **kw) -> "Config":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)


def make_inputs(cfg: Config):
    """``(params, x, grad_out)``: the cell parameters (leaf tensors that require grad), the
    initial state and the gradient fed to backward, all drawn from ``cfg.seed``.

    The parameters are random rather than the gMLP initialisation (w_sp ~ 1e-3, b_sp = 1): with
    near-zero spatial weights a backend that got the neighbour gather wrong would still match
    the reference, and the correctness check must be able to catch that."""
    g = torch.Generator().manual_seed(cfg.seed)
    sizes = {"C": cfg.channels, "F": cfg.hidden, "2F": 2 * cfg.hidden, "K": cfg.tokens}
    params = {}
    for name, dims in PARAM_SHAPES.items():
        shape = tuple(sizes[d] for d in dims)
        if name.endswith("_weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name == "w_in":
            t = torch.randn(shape, generator=g) / math.sqrt(cfg.channels)
        elif name == "w_sp":
            t = 0.3 * torch.randn(shape, generator=g)
        elif name == "w_out":
            # Small, as in GMLPCell: a 12-step rollout stays well-conditioned.
            t = 0.3 * torch.randn(shape, generator=g) / math.sqrt(cfg.hidden)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        params[name] = t.to(cfg.torch_dtype).requires_grad_(True)
    state = (cfg.batch, cfg.depth, cfg.height, cfg.width, cfg.channels)
    x = torch.randn(state, generator=g).to(cfg.torch_dtype)
    if cfg.alive_channel is not None:
        # As in growth, the shape fills part of the lattice: beyond it no cell has alpha, and the
        # alive masking keeps those cells empty.
        x[:, (cfg.depth + 1) // 2:, ..., cfg.alive_channel] = 0
    grad_out = torch.randn(state, generator=g).to(cfg.torch_dtype)
    return params, x, grad_out
