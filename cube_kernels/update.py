"""``cube::update``: the out-projection with the stochastic residual update of SPEC.md from the
compiled extension, with its fake implementation (torch.compile) and its autograd formula.

``x_new = x + m * (h @ w_out + b_out)`` with the Philox fire mask ``m`` of ``(seed, step)``,
regenerated in backward; x: ``[B, D, H, W, C]``, h: ``[B, D, H, W, F]``, w_out: ``[F, C]``,
b_out: ``[C]``. Without the extension this module still imports and its functions raise
``RuntimeError``; ``cube_kernels.reference.update`` is the fallback.
"""
from __future__ import annotations

import torch

from . import _extension

_AVAILABLE = _extension.load()


def update(x: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
           seed: int, step: int, fire_rate: float) -> torch.Tensor:
    """``x_new``; differentiable in x, h, w_out and b_out."""
    _extension.require("update")
    return torch.ops.cube.update(x, h, w_out, b_out, seed, step, fire_rate)


def update_backward(grad: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, seed: int,
                    step: int, fire_rate: float) -> tuple[torch.Tensor, ...]:
    """``(dh, dw_out, db_out)`` for the gradient ``grad`` of ``x_new`` (``dx`` is ``grad``)."""
    _extension.require("update_backward")
    return torch.ops.cube.update_backward(grad, h, w_out, seed, step, fire_rate)


if _AVAILABLE:
    @torch.library.register_fake("cube::update")
    def _update_fake(x, h, w_out, b_out, seed, step, fire_rate):
        return x.new_empty(x.shape)

    @torch.library.register_fake("cube::update_backward")
    def _update_backward_fake(grad, h, w_out, seed, step, fire_rate):
        return h.new_empty(h.shape), w_out.new_empty(w_out.shape), w_out.new_empty(w_out.shape[1:])

    def _setup_context(ctx, inputs, output):
        x, h, w_out, b_out, seed, step, fire_rate = inputs
        ctx.save_for_backward(h, w_out)  # the fire mask is regenerated from (seed, step)
        ctx.mask = (seed, step, fire_rate)

    def _backward(ctx, grad):
        h, w_out = ctx.saved_tensors
        dh, dw_out, db_out = torch.ops.cube.update_backward(grad, h, w_out, *ctx.mask)
        return grad, dh, dw_out, db_out, None, None, None  # dx = grad: the residual

    torch.library.register_autograd("cube::update", _backward, setup_context=_setup_context)
