"""``cube::gather_gate``: the fused neighbour gather + spatial gate of SPEC.md from the compiled
extension, with its fake implementation (torch.compile) and its autograd formula.

``h = u * (b_sp + sum_k w_sp[k] * vn[nbr(i, k)])``; u, vn, h: ``[B, D, H, W, F]``,
w_sp: ``[K, F]``, b_sp: ``[F]``. Without the extension this module still imports and its
functions raise ``RuntimeError``; ``cube_kernels.reference.gather_gate`` is the fallback.
"""
from __future__ import annotations

import torch

from . import _extension

_AVAILABLE = _extension.load()


def gather_gate(u: torch.Tensor, vn: torch.Tensor, w_sp: torch.Tensor, b_sp: torch.Tensor,
                neighbourhood: str, boundary: str) -> torch.Tensor:
    """``h``; differentiable in u, vn, w_sp and b_sp."""
    _extension.require("gather_gate")
    return torch.ops.cube.gather_gate(u, vn, w_sp, b_sp, neighbourhood, boundary)


def gather_gate_backward(grad_h: torch.Tensor, u: torch.Tensor, vn: torch.Tensor,
                         w_sp: torch.Tensor, b_sp: torch.Tensor, neighbourhood: str,
                         boundary: str) -> tuple[torch.Tensor, ...]:
    """``(du, dvn, dw_sp, db_sp)`` for the gradient ``grad_h`` of ``h``."""
    _extension.require("gather_gate_backward")
    return torch.ops.cube.gather_gate_backward(grad_h, u, vn, w_sp, b_sp, neighbourhood, boundary)


if _AVAILABLE:
    # The kernels return fresh contiguous tensors; so do the fakes.
    @torch.library.register_fake("cube::gather_gate")
    def _gather_gate_fake(u, vn, w_sp, b_sp, neighbourhood, boundary):
        return u.new_empty(u.shape)

    @torch.library.register_fake("cube::gather_gate_backward")
    def _gather_gate_backward_fake(grad_h, u, vn, w_sp, b_sp, neighbourhood, boundary):
        return (u.new_empty(u.shape), vn.new_empty(vn.shape), w_sp.new_empty(w_sp.shape),
                b_sp.new_empty(b_sp.shape))

    def _setup_context(ctx, inputs, output):
        u, vn, w_sp, b_sp, neighbourhood, boundary = inputs
        ctx.save_for_backward(u, vn, w_sp, b_sp)  # g is recomputed in backward, not stored
        ctx.neighbourhood, ctx.boundary = neighbourhood, boundary

    def _backward(ctx, grad_h):
        u, vn, w_sp, b_sp = ctx.saved_tensors
        du, dvn, dw_sp, db_sp = torch.ops.cube.gather_gate_backward(
            grad_h, u, vn, w_sp, b_sp, ctx.neighbourhood, ctx.boundary)
        return du, dvn, dw_sp, db_sp, None, None

    torch.library.register_autograd("cube::gather_gate", _backward, setup_context=_setup_context)
