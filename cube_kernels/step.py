"""One lattice step on the fused kernels, with a hand-written backward that keeps only ``x``.

Forward runs LayerNorm and the in-projection GEMM with ATen, GELU and the gate's LayerNorm fused
per row (``gate_input``), then the fused ``gather_gate`` and ``update`` ops. Backward recomputes
``u``, ``vn`` and ``h`` from the saved ``x`` (SPEC.md: a rollout's memory grows with C per step,
not with the gate's width 2F) and runs the fused backward ops, then the in-projection and
LayerNorm backward, skipping what no input that needs a gradient depends on. It is not itself
differentiable: a second backward through it raises.
"""
from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

from . import backends, reference
from .ops.checks import check_alive, check_mask_args, check_rows, check_shape, check_stencil, check_tensor
from .ops.gate_input import gate_input, gate_input_backward
from .spec import ALIVE_THRESHOLD, LN_EPS, PARAM_NAMES, param_shapes

FUSED_BACKENDS = ("cpu", "cuda", "triton")


def check_step(x, params: dict, *, seed, step, neighbourhood, boundary, fire_rate,
               alive_channel=None, alive_threshold=ALIVE_THRESHOLD) -> None:
    """The arguments of one step (``reference.step``'s), with the messages every backend gives:
    ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong shape, device or value."""
    check_tensor("x", x, 5)
    K = check_stencil(neighbourhood, boundary)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of the cell parameters by name, got {type(params).__name__}")
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise ValueError(f"params lacks {missing} (expected {list(PARAM_NAMES)})")
    # Under autocast x and the parameters are cast to one dtype; without it they must share x's.
    same_dtype = not torch.is_autocast_enabled(x.device.type)
    check_tensor("w_in", params["w_in"], 2, x, "x", same_dtype)
    C, F = x.shape[-1], params["w_in"].shape[1] // 2
    for name, shape in param_shapes(C, F, K).items():
        check_tensor(name, params[name], len(shape), x, "x", same_dtype)
        check_shape(name, params[name], shape, f"C={C} from x, F={F} from w_in, K={K} tokens")
    check_mask_args(seed, step, fire_rate, check_rows("x", x))
    check_alive(alive_channel, alive_threshold, C)


@contextlib.contextmanager
def full_fp32_matmuls(t: torch.Tensor):
    """fp32 GEMMs on CUDA in full fp32 whatever ``torch.backends.cuda.matmul`` allows (TF32
    would break SPEC's 1e-5). The setting is process-wide: off for the step, restored after."""
    matmul = torch.backends.cuda.matmul
    if t.device.type != "cuda" or t.dtype != torch.float32 or not matmul.allow_tf32:
        yield
        return
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = True


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
        with full_fp32_matmuls(x):
            u, vn, _ = _cell_input(x.reshape(-1, C), ln1_weight, ln1_bias, w_in, b_in, ln2_weight,
                                   ln2_bias)
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
    @once_differentiable
    def backward(ctx, grad):
        x = ctx.saved_tensors[0]
        # The backward of an fp32 step is fp32 even when it runs inside an autocast region.
        with torch.autocast(x.device.type, enabled=False), full_fp32_matmuls(x):
            return _FusedStep._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x, ln1_weight, ln1_bias, w_in, b_in, ln2_weight, ln2_bias, w_sp, b_sp, w_out, keep = ctx.saved_tensors
        backend, seed, step, neighbourhood, boundary, fire_rate = ctx.cfg
        needs = ctx.needs_input_grad
        need_ln1 = needs[0] or needs[1] or needs[2]  # the path into the first LayerNorm
        need_dz = need_ln1 or any(needs[3:7])  # the in-projection and gate_input
        need_dh = need_dz or needs[7] or needs[8]  # gather_gate
        grads = dict.fromkeys(("x",) + PARAM_NAMES)
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
        dh, grads["w_out"], grads["b_out"] = k.update_backward(grad, h, w_out, seed, step, fire_rate)
        if need_dh:
            du, dvn, grads["w_sp"], grads["b_sp"] = k.gather_gate_backward(
                dh, u, vn, w_sp, b_sp, neighbourhood, boundary)
        if need_dz:
            dz_pre, grads["ln2_weight"], grads["ln2_bias"], grads["b_in"] = gate_input_backward(
                du.view(-1, Fh), dvn.view(-1, Fh), proj, b_in, ln2_weight, ln2_bias)
            if needs[3]:
                grads["w_in"] = y.t().mm(dz_pre)
        if need_ln1:
            dx, grads["ln1_weight"], grads["ln1_bias"] = torch.ops.aten.native_layer_norm_backward(
                dz_pre.mm(w_in.t()), x2, [C], mean1, rstd1, ln1_weight, ln1_bias, list(needs[:3]))
            if needs[0]:
                grads["x"] = dx.view_as(grad).add_(grad)
        elif needs[0]:
            grads["x"] = grad
        return tuple(g if need else None for g, need in zip(grads.values(), needs)) + (None,) * 8


def fused_step(x, params: dict, *, backend: str, seed: int, step: int, neighbourhood: str,
               boundary: str, fire_rate: float, alive_channel: int | None = None,
               alive_threshold: float = ALIVE_THRESHOLD):
    """One SPEC step on the fused ``backend`` (``cpu``, ``cuda`` or ``triton``; for ``auto``
    and the reference use ``CubeLattice`` or ``reference.step``). The arguments are checked like
    ``check_step``; a backend that cannot run on ``x``'s device is a ``RuntimeError`` that says
    why. Under autocast the step computes in the autocast dtype and returns ``x``'s dtype, like
    the reference."""
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"backend must be one of {FUSED_BACKENDS} for fused_step, got {backend!r} "
                         "(CubeLattice resolves 'auto'; reference.step is the reference)")
    check_step(x, params, seed=seed, step=step, neighbourhood=neighbourhood, boundary=boundary,
               fire_rate=fire_rate, alive_channel=alive_channel, alive_threshold=alive_threshold)
    backends.resolve(backend, x.device)
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
