"""``GMLPCell`` (the parameters every cell shares) and ``CubeLattice`` (a T-step rollout)."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from . import backends, reference
from .neighbourhood import check_boundary, num_tokens
from .ops.checks import check_fire_rate, check_seed, check_tensor
from .ops.rollout import rollout as rollout_op, rollout_states
from .spec import ALIVE_THRESHOLD, PARAM_NAMES, param_shapes
from .step import check_step, fused_step


class GMLPCell(nn.Module):
    """The cell of SPEC.md. Defaults (C=64, F=128, von Neumann) give 26,304 parameters."""

    def __init__(self, channels: int = 64, hidden: int = 128, neighbourhood: str = "von_neumann"):
        super().__init__()
        if channels < 1 or hidden < 1:
            raise ValueError(f"channels and hidden must be >= 1, got {channels} and {hidden}")
        self.channels, self.hidden, self.neighbourhood = channels, hidden, neighbourhood
        for name, shape in param_shapes(channels, hidden, num_tokens(neighbourhood)).items():
            setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            nn.init.uniform_(self.w_in, -1 / math.sqrt(self.channels), 1 / math.sqrt(self.channels))
            # gMLP: spatial weights near zero and b_sp = 1, so a new cell is a plain MLP.
            nn.init.uniform_(self.w_sp, -1e-3, 1e-3)
            self.b_sp.fill_(1.0)
            # Small out-projection: the first updates are gentle and a long rollout stays stable.
            nn.init.uniform_(self.w_out, -0.1 / math.sqrt(self.hidden), 0.1 / math.sqrt(self.hidden))
            self.b_out.zero_()
            for p in (self.ln1_weight, self.ln2_weight):
                p.fill_(1.0)
            for p in (self.ln1_bias, self.b_in, self.ln2_bias):
                p.zero_()

    def params(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in PARAM_NAMES}


class CubeLattice(nn.Module):
    """A ``depth x height x width`` lattice of one shared ``GMLPCell`` on ``[B, D, H, W, C]``
    states, run for ``steps`` stochastic steps.

    ``backend``: ``auto`` (fused CPU or CUDA kernels, Triton on a GPU without them, else the
    reference; the ``CUBE_BACKEND`` environment variable overrides that choice), ``reference``,
    ``cpu``, ``cuda`` or ``triton``. The fused backends keep only each step's state for backward
    (on ``cpu`` the rollout is one ``cube::rollout`` call);
    ``checkpoint=True`` gives the reference the same memory profile with torch.utils.checkpoint.
    """

    def __init__(self, depth: int = 11, height: int = 15, width: int = 15, channels: int = 64,
                 hidden: int = 128, neighbourhood: str = "von_neumann", boundary: str = "zero",
                 fire_rate: float = 1.0, alive_channel: int | None = None,
                 alive_threshold: float = ALIVE_THRESHOLD, backend: str = "auto",
                 checkpoint: bool = False):
        super().__init__()
        for name, n in (("depth", depth), ("height", height), ("width", width)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        if alive_channel is not None and not 0 <= alive_channel < channels:
            raise ValueError(f"alive_channel must be in [0, {channels}), got {alive_channel}")
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be one of {backends.BACKENDS}, got {backend!r}")
        self.shape = (depth, height, width)
        self.cell = GMLPCell(channels, hidden, neighbourhood)
        self.boundary = check_boundary(boundary)
        self.fire_rate = fire_rate  # checked by the property's setter
        self.alive_channel, self.alive_threshold = alive_channel, alive_threshold
        self.backend, self.checkpoint = backend, checkpoint

    @property
    def channels(self) -> int:
        return self.cell.channels

    @property
    def fire_rate(self) -> float:
        return self._fire_rate

    @fire_rate.setter
    def fire_rate(self, value: float) -> None:
        check_fire_rate(value)
        self._fire_rate = float(value)

    def extra_repr(self) -> str:
        D, H, W = self.shape
        return (f"lattice={D}x{H}x{W}, neighbourhood={self.cell.neighbourhood}, boundary={self.boundary}, "
                f"fire_rate={self.fire_rate}, backend={self.backend}")

    def _check_state(self, x: torch.Tensor):
        want = (*self.shape, self.channels)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x must be a [B, D, H, W, C] = [B, {', '.join(map(str, want))}] tensor, "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        w = self.cell.w_in
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the lattice's parameters are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the lattice's parameters have {w.dtype}: convert "
                            f"one (lattice.to({x.dtype}) or x.to({w.dtype})), or run under torch.autocast")

    def _step_config(self) -> dict:
        """The step's arguments other than the state, the parameters, the seed and the step."""
        return dict(neighbourhood=self.cell.neighbourhood, boundary=self.boundary,
                    fire_rate=self.fire_rate, alive_channel=self.alive_channel,
                    alive_threshold=self.alive_threshold)

    def step(self, x: torch.Tensor, *, seed: int, step: int) -> torch.Tensor:
        """One step of SPEC.md, its fire mask drawn from ``(seed, step)``."""
        kw = dict(seed=seed, step=step, **self._step_config())
        name = backends.resolve(self.backend, x.device)
        check_step(x, self.cell.params(), **kw)  # every backend rejects bad input alike
        if name != "reference":
            return fused_step(x, self.cell.params(), backend=name, **kw)
        if self.checkpoint and torch.is_grad_enabled():
            return torch_checkpoint(lambda s, p: reference.step(s, p, **kw), x, self.cell.params(),
                                    use_reentrant=False)
        return reference.step(x, self.cell.params(), **kw)

    def forward(self, x: torch.Tensor, steps: int, seed: int | None = None,
                inject: torch.Tensor | None = None, return_states: bool = False):
        """Run ``steps`` steps from ``x``. ``seed`` picks the fire masks (drawn from torch's
        generator when None). ``inject`` (``[B, H, W, E]``) overwrites the first E channels of the
        front face (d = 0) before every step. Returns the final state, or the list of the
        ``steps`` states after each step with ``return_states``."""
        self._check_state(x)
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be a non-negative int, got {steps!r}")
        if steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {steps!r}")
        if inject is not None:
            B, (_, H, W) = x.shape[0], self.shape
            check_tensor("inject", inject, 4, x, "x", same_dtype=False)
            if tuple(inject.shape[:3]) != (B, H, W) or not 1 <= inject.shape[3] <= self.channels:
                raise ValueError(f"inject must be [B, H, W, E] = [{B}, {H}, {W}, E<= {self.channels}], "
                                 f"got {tuple(inject.shape)}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        check_seed(seed)
        if steps > 0 and backends.resolve(self.backend, x.device) == "cpu":
            return self._rollout_op(x, steps, seed, inject, return_states)
        states = []
        for t in range(steps):
            if inject is not None:
                x = self.inject(x, inject)
            x = self.step(x, seed=seed, step=t)
            states.append(x)
        return states if return_states else x

    def _rollout_op(self, x, steps, seed, inject, return_states):
        """The rollout as one op call (``cube::rollout``: no Python or autograd node per step),
        computing in the autocast dtype under autocast."""
        params = self.cell.params()
        kw = self._step_config()
        check_step(x, params, seed=seed, step=steps - 1, **kw)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            if return_states:
                states = rollout_states(x.to(dtype), inject, params, steps, seed=seed, **kw)
                return [s.to(x.dtype) for s in states]
            outs = rollout_op(x.to(dtype), inject, params, steps, seed=seed, all_states=False, **kw)
        return outs[0].to(x.dtype)

    @staticmethod
    def inject(x: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
        """``x`` with ``surface`` ([B, H, W, E]) as the first E channels of its front face."""
        E = surface.shape[-1]
        front = torch.cat([surface.to(x.dtype).unsqueeze(1), x[:, :1, :, :, E:]], dim=-1)
        return torch.cat([front, x[:, 1:]], dim=1)
