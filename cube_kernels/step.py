"""One lattice step on the fused kernels, with a hand-written backward that keeps only ``x``.

Forward runs LayerNorm and the in-projection GEMM with ATen, GELU and the gate's LayerNorm fused
per row (``gate_input``), then the fused ``gather_gate`` and ``update`` ops. Backward recomputes
``u``, ``vn`` and ``h`` from the saved ``x`` (SPEC.md: a rollout's memory grows with C per step,
not with the gate's width 2F) and runs the fused backward ops, then the in-projection and
LayerNorm backward.
"""
from __future__ import annotations

import torch

from . import backends, reference
from .ops.gate_input import gate_input, gate_input_backward
from .spec import ALIVE_THRESHOLD, LN_EPS, PARAM_NAMES


def _cell_input(x2, ln1_weight, ln1_bias, w_in, b_in, ln2_weight, ln2_bias):
    """Rows ``x2 = [cells, C]`` to ``(u, vn)`` and what their backward needs: one GEMM, then
    the bias, GELU and the gate's LayerNorm fused per row (``gate_input``)."""
    y, mean1, rstd1 = torch.native_layer_norm(x2, [x2.shape[1]], ln1_weight, ln1_bias, LN_EPS)
    proj = torch.mm(y, w_in)
    u, vn = gate_input(proj, b_in, ln2_weight, ln2_bias)
    return u, vn, (y, mean1, rstd1, proj)


class _FusedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln1_weight, ln1_bias, w_in, b_in, ln2_weight, ln2_bias, w_sp, b_sp,
                w_out, b_out, backend, seed, step, neighbourhood, boundary, fire_rate,
                alive_channel, alive_threshold):
        k = backends.kernels(backend)
        C, Fh = x.shape[-1], w_in.shape[1] // 2
        u, vn, _ = _cell_input(x.reshape(-1, C), ln1_weight, ln1_bias, w_in, b_in, ln2_weight, ln2_bias)
        cells = x.shape[:-1]
        h = k.gather_gate(u.view(*cells, Fh), vn.view(*cells, Fh), w_sp, b_sp, neighbourhood, boundary)
        x_new = k.update(x, h, w_out, b_out, seed, step, fire_rate)
        keep = None
        if alive_channel is not None:
            keep = (reference.alive(x, alive_channel, alive_threshold)
                    & reference.alive(x_new, alive_channel, alive_threshold)).unsqueeze(-1)
            x_new = x_new * keep
        ctx.save_for_backward(x, ln1_weight, ln1_bias, w_in, b_in, ln2_weight, ln2_bias, w_sp, b_sp,
                              w_out, keep)
        ctx.cfg = (backend, seed, step, neighbourhood, boundary, fire_rate)
        return x_new

    @staticmethod
    def backward(ctx, grad):
        x, ln1_weight, ln1_bias, w_in, b_in, ln2_weight, ln2_bias, w_sp, b_sp, w_out, keep = ctx.saved_tensors
        backend, seed, step, neighbourhood, boundary, fire_rate = ctx.cfg
        k = backends.kernels(backend)
        if keep is not None:
            grad = grad * keep
        grad = grad.contiguous()
        C, Fh = x.shape[-1], w_in.shape[1] // 2
        cells = x.shape[:-1]
        x2 = x.reshape(-1, C)
        u, vn, (y, mean1, rstd1, proj) = _cell_input(x2, ln1_weight, ln1_bias, w_in, b_in,
                                                      ln2_weight, ln2_bias)
        u, vn = u.view(*cells, Fh), vn.view(*cells, Fh)
        h = k.gather_gate(u, vn, w_sp, b_sp, neighbourhood, boundary)
        dh, dw_out, db_out = k.update_backward(grad, h, w_out, seed, step, fire_rate)
        du, dvn, dw_sp, db_sp = k.gather_gate_backward(dh, u, vn, w_sp, b_sp, neighbourhood, boundary)
        dz_pre, dln2_weight, dln2_bias, db_in = gate_input_backward(
            du.view(-1, Fh), dvn.view(-1, Fh), proj, b_in, ln2_weight, ln2_bias)
        dy = dz_pre.mm(w_in.t())
        dw_in = y.t().mm(dz_pre)
        dx, dln1_weight, dln1_bias = torch.ops.aten.native_layer_norm_backward(
            dy, x2, [C], mean1, rstd1, ln1_weight, ln1_bias, [True, True, True])
        dx = dx.view_as(grad).add_(grad)
        return (dx, dln1_weight, dln1_bias, dw_in, db_in, dln2_weight, dln2_bias, dw_sp, db_sp,
                dw_out, db_out) + (None,) * 8


def fused_step(x, params: dict, *, backend: str, seed: int, step: int, neighbourhood: str,
               boundary: str, fire_rate: float, alive_channel: int | None = None,
               alive_threshold: float = ALIVE_THRESHOLD):
    """One SPEC step on the fused ``backend`` (``cpu``, ``cuda`` or ``triton``). Under autocast
    the step computes in the autocast dtype and returns ``x``'s dtype, like the reference."""
    device_type = x.device.type
    tensors = [params[n] for n in PARAM_NAMES]
    state_dtype = x.dtype
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, tensors = x.to(dtype), [t.to(dtype) for t in tensors]
    with torch.autocast(device_type, enabled=False):
        x_new = _FusedStep.apply(x.contiguous(), *tensors, backend, seed, step, neighbourhood, boundary,
                                 fire_rate, alive_channel, alive_threshold)
    return x_new.to(state_dtype)
