"""Which implementation runs a lattice step: ``auto``, ``reference``, ``cpu``, ``cuda`` or ``triton``.

``CUBE_BACKEND`` in the environment decides what ``auto`` means; a backend named in code wins
over it."""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from . import _extension

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
ENV_VAR = "CUBE_BACKEND"


def _triton_ok(device: torch.device) -> bool:
    from . import triton_ops
    return triton_ops.available() and (device.type == "cuda" or triton_ops.interpreting())


def resolve(backend: str, device: torch.device | str) -> str:
    """The concrete backend for tensors on ``device``; an unavailable explicit choice is an error."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    name, source = backend, f"backend={backend!r}"
    if backend == "auto" and os.environ.get(ENV_VAR):
        name = os.environ[ENV_VAR]
        source = f"{ENV_VAR}={name!r}"
        if name not in BACKENDS:
            raise ValueError(f"{source}: expected one of {BACKENDS}")
    if name == "auto":
        if device.type == "cuda":
            if _extension.load() and _extension.has_cuda():
                return "cuda"
            return "triton" if _triton_ok(device) else "reference"
        return "cpu" if device.type == "cpu" and _extension.load() else "reference"
    if name == "cpu" and not (device.type == "cpu" and _extension.load()):
        raise RuntimeError(f"{source} needs CPU tensors and the built extension cube_kernels._C "
                           f"(tensors are on {device}; build with: pip install --no-build-isolation .)")
    if name == "cuda" and not (device.type == "cuda" and _extension.load() and _extension.has_cuda()):
        raise RuntimeError(f"{source} needs CUDA tensors and cube_kernels._C built with CUDA "
                           f"(tensors are on {device}; build with: FORCE_CUDA=1 pip install --no-build-isolation .)")
    if name == "triton" and not _triton_ok(device):
        from . import triton_ops
        why = triton_ops.unavailable_reason() or f"tensors are on {device}"
        raise RuntimeError(f"{source} needs triton >= 3.4 and CUDA tensors (or TRITON_INTERPRET=1 "
                           f"on CPU tensors): {why}")
    return name


class Kernels(NamedTuple):
    gather_gate: Callable
    gather_gate_backward: Callable
    update: Callable
    update_backward: Callable


def kernels(name: str) -> Kernels:
    """The four fused ops of a concrete fused backend (``cpu``, ``cuda`` or ``triton``)."""
    if name == "triton":
        from . import triton_ops as gg
        up = gg
    else:
        from .ops import gather_gate as gg, update as up
    return Kernels(gg.gather_gate, gg.gather_gate_backward, up.update, up.update_backward)
