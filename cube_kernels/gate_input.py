"""``cube::gate_input``: the GELU and gate LayerNorm between the in-projection and the gather of
SPEC.md, fused per row, with its fake implementation (torch.compile) and its autograd formula.

With ``proj = y @ w_in`` (``[N, 2F]``, one row per cell) and ``z_pre = proj + b_in``:
``u = gelu(z_pre[:, :F])``, ``vn = layer_norm(gelu(z_pre[:, F:]), [F], ln2_weight, ln2_bias,
eps=1e-5)``, both ``[N, F]``. The bias is added here, per row, so the GEMM need not broadcast it
into its output first (``addmm`` does, a full extra pass). The backward recomputes gelu, the row
statistics and vhat from ``proj`` (the forward saves nothing) and returns ``dz_pre`` (the
gradient of ``proj`` as well) and ``db_in = dz_pre.sum(0)``.

CPU tensors with the extension built run the C++ op; anything else (CUDA tensors, no extension)
runs the same math as an ATen composition (``gate_input_aten``, ``gate_input_backward_aten``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _extension

_AVAILABLE = _extension.load()
EPS = 1e-5


def _use_op(proj: torch.Tensor) -> bool:
    return _AVAILABLE and proj.device.type == "cpu"


def gate_input(proj: torch.Tensor, b_in: torch.Tensor, ln2_weight: torch.Tensor,
               ln2_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, vn)``; differentiable in proj, b_in, ln2_weight and ln2_bias."""
    if _use_op(proj):
        return torch.ops.cube.gate_input(proj, b_in, ln2_weight, ln2_bias)
    return gate_input_aten(proj, b_in, ln2_weight, ln2_bias)


def gate_input_backward(grad_u: torch.Tensor, grad_vn: torch.Tensor, proj: torch.Tensor,
                        b_in: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dz_pre, dln2_weight, dln2_bias, db_in)`` for the gradients of ``u`` and ``vn``."""
    if _use_op(proj):
        return torch.ops.cube.gate_input_backward(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias)
    return gate_input_backward_aten(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias)


def _check(op: str, proj, b_in, ln2_weight, ln2_bias, grad_u=None, grad_vn=None) -> int:
    """The C++ op's input checks (same messages) for the ATen path; returns F."""
    if proj.dim() != 2 or proj.shape[1] == 0 or proj.shape[1] % 2:
        raise RuntimeError(f"{op}: proj must be [N, 2F] (the GELU half, then the gate half) "
                           f"with an even, positive last dim, got shape {tuple(proj.shape)}")
    n, f = proj.shape[0], proj.shape[1] // 2
    named = [("b_in", b_in, (2 * f,)), ("ln2_weight", ln2_weight, (f,)), ("ln2_bias", ln2_bias, (f,)),
             ("grad_u", grad_u, (n, f)), ("grad_vn", grad_vn, (n, f))]
    for name, t, shape in named:
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise RuntimeError(f"{op}: {name} must have shape {list(shape)} (proj is [N, 2F] = "
                               f"{list(proj.shape)}), got {list(t.shape)}")
        if t.dtype != proj.dtype:
            raise RuntimeError(f"{op}: {name} has dtype {t.dtype} but proj has {proj.dtype} "
                               "(all tensors of one call share a dtype)")
    return f


def gate_input_aten(proj: torch.Tensor, b_in: torch.Tensor, ln2_weight: torch.Tensor,
                    ln2_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gate_input`` as an ATen composition (any device; autograd works through it)."""
    f = _check("cube::gate_input", proj, b_in, ln2_weight, ln2_bias)
    a, b = (proj + b_in).split(f, dim=1)
    # contiguous(): the op's outputs are fresh [N, F] tensors; gelu keeps a's strides.
    return F.gelu(a).contiguous(), F.layer_norm(F.gelu(b), (f,), ln2_weight, ln2_bias, EPS)


def gate_input_backward_aten(grad_u: torch.Tensor, grad_vn: torch.Tensor, proj: torch.Tensor,
                             b_in: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``gate_input_backward`` as an ATen composition (any device)."""
    f = _check("cube::gate_input_backward", proj, b_in, ln2_weight, ln2_bias, grad_u, grad_vn)
    aten = torch.ops.aten
    a, b = (proj + b_in).split(f, dim=1)
    v = F.gelu(b)
    _, mean, rstd = aten.native_layer_norm(v, [f], ln2_weight, ln2_bias, EPS)
    dv, dln2_weight, dln2_bias = aten.native_layer_norm_backward(
        grad_vn, v, [f], mean, rstd, ln2_weight, ln2_bias, [True, True, True])
    dz_pre = torch.cat([aten.gelu_backward(grad_u, a), aten.gelu_backward(dv, b)], dim=1)
    return dz_pre, dln2_weight, dln2_bias, dz_pre.sum(0)


if _AVAILABLE:
    # The kernels return fresh contiguous tensors; so do the fakes.
    @torch.library.register_fake("cube::gate_input")
    def _gate_input_fake(proj, b_in, ln2_weight, ln2_bias):
        n, f = proj.shape[0], proj.shape[1] // 2
        return proj.new_empty(n, f), proj.new_empty(n, f)

    @torch.library.register_fake("cube::gate_input_backward")
    def _gate_input_backward_fake(grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias):
        return (proj.new_empty(proj.shape), ln2_weight.new_empty(ln2_weight.shape),
                ln2_bias.new_empty(ln2_bias.shape), proj.new_empty(proj.shape[1]))

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # proj, b_in and the LayerNorm parameters: all it recomputes from

    def _backward(ctx, grad_u, grad_vn):
        proj, b_in, ln2_weight, ln2_bias = ctx.saved_tensors
        dz_pre, dln2_weight, dln2_bias, db_in = torch.ops.cube.gate_input_backward(
            grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias)
        return dz_pre, db_in, dln2_weight, dln2_bias

    torch.library.register_autograd("cube::gate_input", _backward, setup_context=_setup_context)
