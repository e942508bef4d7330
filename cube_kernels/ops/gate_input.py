"""gate_input: the in-projection's bias, GELU and the gate's LayerNorm of SPEC.md fused per row,
and its contract.

With ``proj = y @ w_in`` (``[N, 2F]``, one row per cell): ``(u, vn) = gate_input(proj, b_in,
ln2_weight, ln2_bias)``, both ``[N, F]`` (``cube_kernels.reference.gate_input`` is the math).
The bias is added here, per row, so the GEMM need not broadcast it into its output first
(``addmm`` does, a full extra pass). The backward op recomputes gelu, the row statistics and
vhat from ``proj`` (the forward saves nothing) and returns ``dz_pre`` (the gradient of ``proj``
as well), ``dln2_weight``, ``dln2_bias`` and ``db_in = dz_pre.sum(0)``.

CPU tensors with the extension built run the C++ op ``cube::gate_input``
(csrc/cpu/gate_input.cpp); anything else (CUDA tensors, no extension) runs the reference
forward and ``gate_input_backward_aten``, the same math as an ATen composition.
"""
from __future__ import annotations

import torch

from .. import _extension, reference
from ..spec import LN_EPS
from .checks import check_shape, check_tensor
from .registry import FusedOp


def check(proj, b_in, ln2_weight, ln2_bias, grad_u=None, grad_vn=None) -> int:
    """The inputs of ``gate_input`` (and of its backward, with the gradients); returns F."""
    check_tensor("proj", proj, 2)
    if proj.shape[1] == 0 or proj.shape[1] % 2:
        raise ValueError(f"proj must be [N, 2F] (the GELU half, then the gate half) with an even, "
                         f"positive last dim, got shape {tuple(proj.shape)}")
    n, f = proj.shape[0], proj.shape[1] // 2
    for name, t, shape in (("b_in", b_in, (2 * f,)), ("ln2_weight", ln2_weight, (f,)),
                           ("ln2_bias", ln2_bias, (f,)), ("grad_u", grad_u, (n, f)),
                           ("grad_vn", grad_vn, (n, f))):
        if t is not None or name in ("b_in", "ln2_weight", "ln2_bias"):
            check_tensor(name, t, len(shape), proj, "proj")
            check_shape(name, t, shape, f"proj is [N, 2F] = {list(proj.shape)}")
    return f


def _check_backward(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias) -> None:
    check(proj, b_in, ln2_weight, ln2_bias, grad_u, grad_vn)


def _fake(proj, b_in, ln2_weight, ln2_bias):
    n, f = proj.shape[0], proj.shape[1] // 2
    return proj.new_empty(n, f), proj.new_empty(n, f)


def _fake_backward(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias):
    return (proj.new_empty(proj.shape), ln2_weight.new_empty(ln2_weight.shape),
            ln2_bias.new_empty(ln2_bias.shape), proj.new_empty(proj.shape[1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # proj, b_in and the LayerNorm parameters: all it recomputes from


def _backward(ctx, backward_op, grad_u, grad_vn):
    proj, b_in, ln2_weight, ln2_bias = ctx.saved_tensors
    dz_pre, dln2_weight, dln2_bias, db_in = backward_op(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias)
    return dz_pre, db_in, dln2_weight, dln2_bias


GATE_INPUT = FusedOp("gate_input", check, _check_backward, _fake, _fake_backward, _setup_context,
                     _backward)

_AVAILABLE = _extension.load()
if _AVAILABLE:
    GATE_INPUT.register("cube")


def _use_op(proj: torch.Tensor) -> bool:
    return _AVAILABLE and proj.device.type == "cpu"


def gate_input(proj: torch.Tensor, b_in: torch.Tensor, ln2_weight: torch.Tensor,
               ln2_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, vn)``, fresh contiguous ``[N, F]`` tensors; differentiable in every input."""
    check(proj, b_in, ln2_weight, ln2_bias)
    if _use_op(proj):
        return torch.ops.cube.gate_input(proj, b_in, ln2_weight, ln2_bias)
    return gate_input_aten(proj, b_in, ln2_weight, ln2_bias)


def gate_input_backward(grad_u: torch.Tensor, grad_vn: torch.Tensor, proj: torch.Tensor,
                        b_in: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dz_pre, dln2_weight, dln2_bias, db_in)`` for the gradients of ``u`` and ``vn``."""
    check(proj, b_in, ln2_weight, ln2_bias, grad_u, grad_vn)
    if _use_op(proj):
        return torch.ops.cube.gate_input_backward(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias)
    return gate_input_backward_aten(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias)


def gate_input_aten(proj: torch.Tensor, b_in: torch.Tensor, ln2_weight: torch.Tensor,
                    ln2_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_input`` by the reference (any device; autograd works through it)."""
    check(proj, b_in, ln2_weight, ln2_bias)
    u, vn = reference.gate_input(proj, b_in, ln2_weight, ln2_bias)
    return u.contiguous(), vn  # the op's outputs are fresh [N, F] tensors


def gate_input_backward_aten(grad_u: torch.Tensor, grad_vn: torch.Tensor, proj: torch.Tensor,
                             b_in: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gate_input_backward`` as an ATen composition (any device)."""
    f = check(proj, b_in, ln2_weight, ln2_bias, grad_u, grad_vn)
    aten = torch.ops.aten
    a, b = (proj + b_in).split(f, dim=1)
    v = torch.nn.functional.gelu(b)
    _, mean, rstd = aten.native_layer_norm(v, [f], ln2_weight, ln2_bias, LN_EPS)
    dv, dln2_weight, dln2_bias = aten.native_layer_norm_backward(
        grad_vn, v, [f], mean, rstd, ln2_weight, ln2_bias, [True, True, True])
    dz_pre = torch.cat([aten.gelu_backward(grad_u, a), aten.gelu_backward(dv, b)], dim=1)
    return dz_pre, dln2_weight, dln2_bias, dz_pre.sum(0)
