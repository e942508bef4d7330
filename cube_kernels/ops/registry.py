"""One registration for every implementation of a fused op.

An op ``name`` comes as a pair, ``ns::name`` (differentiable) and ``ns::name_backward`` (its
gradient), in the namespace ``cube`` (the C++ CPU and CUDA kernels, schemas in csrc/ops.cpp)
and, for gather_gate and update, ``cube_triton`` (the Triton kernels). ``FusedOp`` holds what
all of them share (the input checks, the fake kernels for torch.compile, what backward saves
and how it calls the backward op) and ``FusedOp.register(ns)`` attaches it to one namespace.
The backward ops are not differentiable: a double backward through them raises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class FusedOp:
    name: str
    check: Callable[..., None]  # the forward op's arguments
    check_backward: Callable[..., None]  # the backward op's arguments
    fake: Callable  # the forward's outputs as new tensors (fresh and contiguous, like the kernels')
    fake_backward: Callable
    setup_context: Callable  # (ctx, inputs, output): save what backward needs
    backward: Callable  # (ctx, backward_op, *grad_outputs) -> a gradient (or None) per input

    def register(self, namespace: str) -> None:
        qualname = f"{namespace}::{self.name}"
        backward_op = getattr(getattr(torch.ops, namespace), f"{self.name}_backward").default

        def fake(*args):
            self.check(*args)
            return self.fake(*args)

        def fake_backward(*args):
            self.check_backward(*args)
            return self.fake_backward(*args)

        torch.library.register_fake(qualname)(fake)
        torch.library.register_fake(f"{qualname}_backward")(fake_backward)
        torch.library.register_autograd(
            qualname, lambda ctx, *grads: self.backward(ctx, backward_op, *grads),
            setup_context=self.setup_context)
        torch.library.register_autograd(f"{qualname}_backward", _no_double_backward(qualname),
                                        setup_context=_save_nothing)


def _save_nothing(ctx, inputs, output) -> None:
    pass


def _no_double_backward(qualname: str):
    """The backward of a backward op: an error, instead of autograd's warning and second-order
    gradients that are silently zero."""
    def backward(ctx, *grads):
        raise RuntimeError(f"double backward through {qualname} is not supported: its backward op "
                           f"{qualname}_backward has no derivative. Use cube_kernels.reference (or "
                           "CubeLattice(backend='reference')) for second-order gradients.")
    return backward
