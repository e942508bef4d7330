"""update: the out-projection with the stochastic residual update of SPEC.md, and its contract.

``x_new = where(m, x + (h @ w_out + b_out), x)`` with the Philox fire mask ``m`` of
``(seed, step)``, regenerated in backward; x: ``[B, D, H, W, C]``, h: ``[B, D, H, W, F]``,
w_out: ``[F, C]``, b_out: ``[C]``. The backward op gives ``(dh, dw_out, db_out)``; ``dx`` is
the incoming gradient itself (the residual).

This module holds what every implementation shares (``UPDATE``: input checks, fake kernels,
autograd) and the Python entry of the C++ op ``cube::update`` (CPU: csrc/cpu/update.cpp, CUDA:
csrc/cuda/update.cu). The Triton op is cube_kernels/triton_ops/update.py, the reference
``cube_kernels.reference.update``. Without the extension this module still imports and its
functions raise ``RuntimeError``.
"""
from __future__ import annotations

import torch

from .. import _extension
from .checks import check_mask_args, check_rows, check_shape, check_tensor
from .registry import FusedOp


def check(x, h, w_out, b_out, seed, step, fire_rate) -> None:
    check_tensor("x", x, 5)
    rows = check_rows("x", x)
    check_tensor("h", h, 5, x, "x")
    if h.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"h must have the cells of x, [B, D, H, W] = {tuple(x.shape[:-1])}, "
                         f"got shape {tuple(h.shape)}")
    F, C = h.shape[-1], x.shape[-1]
    check_tensor("w_out", w_out, 2, x, "x")
    check_shape("w_out", w_out, (F, C), "[F, C] with F from h and C from x")
    check_tensor("b_out", b_out, 1, x, "x")
    check_shape("b_out", b_out, (C,), "[C]")
    check_mask_args(seed, step, fire_rate, rows)


def check_backward(grad, h, w_out, seed, step, fire_rate) -> None:
    check_tensor("h", h, 5)
    rows = check_rows("h", h)
    F = h.shape[-1]
    check_tensor("w_out", w_out, 2, h, "h")
    if w_out.shape[0] != F:
        raise ValueError(f"w_out must have shape [F, C] with F={F} from h, got {tuple(w_out.shape)}")
    check_tensor("grad", grad, 5, h, "h")
    check_shape("grad", grad, tuple(h.shape[:-1]) + (w_out.shape[1],), "[B, D, H, W, C]")
    check_mask_args(seed, step, fire_rate, rows)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _fake(x, h, w_out, b_out, seed, step, fire_rate):
    return _fresh(x)


def _fake_backward(grad, h, w_out, seed, step, fire_rate):
    return _fresh(h), _fresh(w_out), w_out.new_empty(w_out.shape[1])


def _setup_context(ctx, inputs, output):
    x, h, w_out, b_out, seed, step, fire_rate = inputs
    ctx.save_for_backward(h, w_out)  # the fire mask is regenerated from (seed, step)
    ctx.mask = (seed, step, fire_rate)


def _backward(ctx, backward_op, grad):
    if not any(ctx.needs_input_grad[1:4]):  # only x: its gradient is grad itself
        return grad, None, None, None, None, None, None
    dh, dw_out, db_out = backward_op(grad, *ctx.saved_tensors, *ctx.mask)
    return grad, dh, dw_out, db_out, None, None, None  # dx = grad: the residual


UPDATE = FusedOp("update", check, check_backward, _fake, _fake_backward, _setup_context, _backward)

if _extension.load():
    UPDATE.register("cube")


def update(x: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
           seed: int, step: int, fire_rate: float) -> torch.Tensor:
    """``x_new``; differentiable in x, h, w_out and b_out."""
    _extension.require("update")
    check(x, h, w_out, b_out, seed, step, fire_rate)
    return torch.ops.cube.update(x, h, w_out, b_out, seed, step, fire_rate)


def update_backward(grad: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, seed: int,
                    step: int, fire_rate: float) -> tuple[torch.Tensor, ...]:
    """``(dh, dw_out, db_out)`` for the gradient ``grad`` of ``x_new`` (``dx`` is ``grad``)."""
    _extension.require("update_backward")
    check_backward(grad, h, w_out, seed, step, fire_rate)
    return torch.ops.cube.update_backward(grad, h, w_out, seed, step, fire_rate)
