"""The implementations the benchmark compares, behind one interface.

Each ``Impl`` says why it cannot run (``unavailable``) or builds a ``Runner`` that does one
T-step rollout forward (autograd recording, as in training) and its backward on fixed inputs.
The optional ones (PyG, JAX) import their package only when asked.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from .config import Config


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One rollout, forward then backward, on inputs fixed at construction."""

    def forward(self):
        raise NotImplementedError

    def backward(self):
        raise NotImplementedError

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The last forward's output and backward's parameter gradients, as CPU tensors."""
        raise NotImplementedError

    def release(self):
        """Drop the last output and gradients (before a memory baseline is taken)."""
        raise NotImplementedError


class TorchRunner(Runner):
    def __init__(self, fn, params, x, grad_out, device):
        self.fn, self.params, self.x, self.grad_out, self.device = fn, params, x, grad_out, device
        self.out = None

    def forward(self):
        for p in self.params.values():
            p.grad = None
        self.out = None  # drop the previous output before the next graph is built
        self.out = self.fn(self.x, self.params)
        sync(self.device)

    def backward(self):
        self.out.backward(self.grad_out)
        sync(self.device)

    def result(self):
        return self.out.detach().cpu(), {n: p.grad.cpu() for n, p in self.params.items()}

    def release(self):
        self.out = None
        for p in self.params.values():
            p.grad = None


@dataclass(frozen=True)
class Impl:
    name: str
    label: str
    device: str = "cpu"
    ours: bool = False

    @property
    def key(self) -> str:
        return self.name if self.device == "cpu" else f"{self.name}@{self.device}"

    def unavailable(self, cfg: Config) -> str | None:
        """Why this implementation cannot run here, or None."""
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def rollout_fn(self, cfg: Config):
        raise NotImplementedError

    def runner(self, cfg: Config, params, x, grad_out) -> Runner:
        return TorchRunner(self.rollout_fn(cfg), params, x, grad_out, self.device)


def _step_kwargs(cfg: Config) -> dict:
    return dict(neighbourhood=cfg.neighbourhood, boundary=cfg.boundary, fire_rate=cfg.fire_rate,
                alive_channel=cfg.alive_channel)


class Fused(Impl):
    """Our fused kernels through the public module (``CubeLattice``) with a fixed backend."""

    def unavailable(self, cfg):
        reason = super().unavailable(cfg)
        if reason:
            return reason
        from cube_kernels import backends
        try:
            backends.resolve(self.name, self.device)
        except (RuntimeError, ImportError) as e:
            return str(e)
        return None

    def rollout_fn(self, cfg):
        from cube_kernels.step import fused_step
        kw = _step_kwargs(cfg)

        def rollout(x, params):
            for t in range(cfg.steps):
                x = fused_step(x, params, backend=self.name, seed=cfg.seed, step=t, **kw)
            return x
        return rollout


class FusedRollout(Fused):
    """Our whole-rollout op (``cube::rollout``: the T steps in one call, one autograd node), what
    ``CubeLattice`` runs on the CPU backend."""

    @property
    def key(self) -> str:
        return "cpu_rollout"  # its backend is "cpu", but its row must not be taken for the per-step one

    def rollout_fn(self, cfg):
        from cube_kernels.ops.rollout import rollout as rollout_op
        kw = _step_kwargs(cfg)

        def rollout(x, params):
            return rollout_op(x, None, params, cfg.steps, seed=cfg.seed, all_states=False, **kw)[-1]
        return rollout


class Eager(Impl):
    """``cube_kernels.reference.rollout``: the SPEC in plain PyTorch."""

    checkpoint = False

    def rollout_fn(self, cfg):
        from cube_kernels import reference
        kw = _step_kwargs(cfg)
        if not self.checkpoint:
            return lambda x, params: reference.rollout(x, params, cfg.steps, seed=cfg.seed, **kw)
        from torch.utils.checkpoint import checkpoint

        def rollout(x, params):
            for t in range(cfg.steps):
                x = checkpoint(lambda s, p, t=t: reference.step(s, p, seed=cfg.seed, step=t, **kw),
                               x, params, use_reentrant=False)
            return x
        return rollout


class EagerCheckpoint(Eager):
    """The reference with ``torch.utils.checkpoint`` per step: the same memory profile as the
    fused backend (only each step's input kept), so memory compares like with like."""

    checkpoint = True


class Compiled(Eager):
    """``torch.compile`` of the reference rollout: one graph for the T unrolled steps."""

    def rollout_fn(self, cfg):
        return torch.compile(super().rollout_fn(cfg), fullgraph=True)


class PyG(Impl):
    def unavailable(self, cfg):
        reason = super().unavailable(cfg)
        if reason:
            return reason
        if cfg.alive_channel is not None:
            return "alive masking is not implemented here"
        if importlib.util.find_spec("torch_geometric") is None:
            return "torch_geometric is not installed (pip install torch-geometric, or the 'bench' extra)"
        return None

    def rollout_fn(self, cfg):
        from .pyg_impl import make_rollout
        return make_rollout(cfg, self.device)


class Jax(Impl):
    def unavailable(self, cfg):
        reason = super().unavailable(cfg)
        if reason:
            return reason
        if cfg.alive_channel is not None:
            return "alive masking is not implemented here"
        if importlib.util.find_spec("jax") is None:
            return "jax is not installed (pip install jax, or the 'bench' extra)"
        if self.device != "cpu":
            return "only the CPU build of jax is benchmarked"
        return None

    def runner(self, cfg, params, x, grad_out):
        from .jax_impl import JaxRunner
        return JaxRunner(cfg, params, x, grad_out)


IMPLS = {
    "cpu": Fused("cpu", "fused CPU kernels (ours)", ours=True),
    "cpu_rollout": FusedRollout("cpu", "fused CPU rollout op (ours)", ours=True),
    "cuda": Fused("cuda", "fused CUDA kernels (ours)", device="cuda", ours=True),
    "triton": Fused("triton", "fused Triton kernels (ours)", device="cuda", ours=True),
    "eager": Eager("eager", "PyTorch eager reference"),
    "eager_ckpt": EagerCheckpoint("eager_ckpt", "eager reference + checkpoint per step"),
    "compile": Compiled("compile", "torch.compile(reference)"),
    "pyg": PyG("pyg", "PyG MessagePassing"),
    "jax": Jax("jax", "JAX jit"),
    "eager@cuda": Eager("eager", "PyTorch eager reference (CUDA)", device="cuda"),
    "compile@cuda": Compiled("compile", "torch.compile(reference) (CUDA)", device="cuda"),
    "pyg@cuda": PyG("pyg", "PyG MessagePassing (CUDA)", device="cuda"),
}
# The baselines the targets are measured against.
BASELINE, COMPILED = "eager", "compile"


def get(key: str) -> Impl:
    if key not in IMPLS:
        raise ValueError(f"unknown implementation {key!r}; expected one of {sorted(IMPLS)}")
    return IMPLS[key]
