"""gather_gate: the fused neighbour gather + spatial gate of SPEC.md, and its contract.

``h = u * (b_sp + sum_k w_sp[k] * vn[nbr(i, k)])``; u, vn, h: ``[B, D, H, W, F]``,
w_sp: ``[K, F]``, b_sp: ``[F]``; the backward op gives ``(du, dvn, dw_sp, db_sp)`` and
recomputes ``g`` instead of storing it.

This module holds what every implementation shares (``GATHER_GATE``: input checks, fake
kernels, autograd) and the Python entry of the C++ op ``cube::gather_gate`` (CPU:
csrc/cpu/gather_gate.cpp, CUDA: csrc/cuda/gather_gate.cu). The Triton op is
cube_kernels/triton_ops/gather_gate.py, the reference ``cube_kernels.reference.gather_gate``.
Without the extension this module still imports and its functions raise ``RuntimeError``.
"""
from __future__ import annotations

import torch

from .. import _extension
from .checks import check_rows, check_shape, check_stencil, check_tensor
from .registry import FusedOp


def check(u, vn, w_sp, b_sp, neighbourhood, boundary, grad_h=None) -> None:
    K = check_stencil(neighbourhood, boundary)
    check_tensor("u", u, 5)
    check_rows("u", u)
    check_tensor("vn", vn, 5, u, "u")
    check_shape("vn", vn, u.shape, "the shape of u, [B, D, H, W, F]")
    F = u.shape[-1]
    check_tensor("w_sp", w_sp, 2, u, "u")
    check_shape("w_sp", w_sp, (K, F), f"[K, F] with K={K} tokens of {neighbourhood}")
    check_tensor("b_sp", b_sp, 1, u, "u")
    check_shape("b_sp", b_sp, (F,), "[F]")
    if grad_h is not None:
        check_tensor("grad_h", grad_h, 5, u, "u")
        check_shape("grad_h", grad_h, u.shape, "the shape of u")


def _check_backward(grad_h, u, vn, w_sp, b_sp, neighbourhood, boundary) -> None:
    check(u, vn, w_sp, b_sp, neighbourhood, boundary, grad_h)


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _fake(u, vn, w_sp, b_sp, neighbourhood, boundary):
    return _fresh(u)


def _fake_backward(grad_h, u, vn, w_sp, b_sp, neighbourhood, boundary):
    return _fresh(u), _fresh(vn), _fresh(w_sp), _fresh(b_sp)


def _setup_context(ctx, inputs, output):
    u, vn, w_sp, b_sp, neighbourhood, boundary = inputs
    ctx.save_for_backward(u, vn, w_sp, b_sp)  # g is recomputed in backward, not stored
    ctx.neighbourhood, ctx.boundary = neighbourhood, boundary


def _backward(ctx, backward_op, grad_h):
    du, dvn, dw_sp, db_sp = backward_op(grad_h, *ctx.saved_tensors, ctx.neighbourhood, ctx.boundary)
    return du, dvn, dw_sp, db_sp, None, None


GATHER_GATE = FusedOp("gather_gate", check, _check_backward, _fake, _fake_backward,
                      _setup_context, _backward)

if _extension.load():
    GATHER_GATE.register("cube")


def gather_gate(u: torch.Tensor, vn: torch.Tensor, w_sp: torch.Tensor, b_sp: torch.Tensor,
                neighbourhood: str, boundary: str) -> torch.Tensor:
    """``h``; differentiable in u, vn, w_sp and b_sp."""
    _extension.require("gather_gate")
    check(u, vn, w_sp, b_sp, neighbourhood, boundary)
    return torch.ops.cube.gather_gate(u, vn, w_sp, b_sp, neighbourhood, boundary)


def gather_gate_backward(grad_h: torch.Tensor, u: torch.Tensor, vn: torch.Tensor,
                         w_sp: torch.Tensor, b_sp: torch.Tensor, neighbourhood: str,
                         boundary: str) -> tuple[torch.Tensor, ...]:
    """``(du, dvn, dw_sp, db_sp)`` for the gradient ``grad_h`` of ``h``."""
    _extension.require("gather_gate_backward")
    check(u, vn, w_sp, b_sp, neighbourhood, boundary, grad_h)
    return torch.ops.cube.gather_gate_backward(grad_h, u, vn, w_sp, b_sp, neighbourhood, boundary)
