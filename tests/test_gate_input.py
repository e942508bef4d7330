"""cube::gate_input / gate_input_backward (the fused GELU + gate LayerNorm) and their ATen
fallback against torch.nn.functional with autograd: values, every gradient, gradcheck, low
precision, thread-count determinism, opcheck, torch.compile, input checks. (The baseline-ISA
rerun is test_extension.py's.)"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from cube_kernels import _extension

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a missing _C skips this module; a broken one fails it
    if not _extension.load():
        pytest.skip("cube_kernels._C is not built", allow_module_level=True)

from cube_kernels.ops.gate_input import (  # noqa: E402
    gate_input, gate_input_aten, gate_input_backward, gate_input_backward_aten)
from cube_kernels.spec import LN_EPS as EPS  # noqa: E402
# (N rows, F): one row, odd row counts, F below / not a multiple of the 8-float vector, and the
# step's real size (B=8 x 15x15x11 cells = 19800 rows, F = 128).
SHAPES = [(1, 19), (13, 19), (13, 1), (70, 8), (19800, 128)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
BOTH = pytest.mark.parametrize("path", ["op", "aten"])
FORWARD = {"op": gate_input, "aten": gate_input_aten}
BACKWARD = {"op": gate_input_backward, "aten": gate_input_backward_aten}


def inputs(N, F_, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(N, 2 * F_, generator=g) * 2
    if N * F_ >= 8:  # the tails of the erf/exp approximations and their clamps
        proj.view(-1)[:8] = torch.tensor([0.0, -0.0, 6.0, -6.0, 13.5, -13.5, 40.0, -40.0])
    b_in = 0.5 * torch.randn(2 * F_, generator=g)
    w = 1.0 + 0.2 * torch.randn(F_, generator=g)
    b = 0.1 * torch.randn(F_, generator=g)
    grad_u = torch.randn(N, F_, generator=g)
    grad_vn = torch.randn(N, F_, generator=g)
    return [t.to(dtype) for t in (proj, b_in, w, b, grad_u, grad_vn)]


def expected(proj, b_in, w, b, grad_u, grad_vn):
    """Forward and (dz_pre, dln2_weight, dln2_bias, db_in) by torch.nn.functional + autograd, in
    float64."""
    proj, b_in, w, b = (t.detach().double().requires_grad_() for t in (proj, b_in, w, b))
    F_ = w.shape[0]
    z = proj + b_in
    u = F.gelu(z[:, :F_])
    vn = F.layer_norm(F.gelu(z[:, F_:]), (F_,), w, b, EPS)
    dz, db_in, dw, db = torch.autograd.grad((u, vn), (proj, b_in, w, b),
                                            (grad_u.double(), grad_vn.double()))
    return (u.detach(), vn.detach()), (dz, dw, db, db_in)


def assert_close(actual, expect, tol, what, floor=1e-6):
    """max |actual - expected| <= tol * max(max |expected|, floor): the floor is for gradients
    that vanish exactly (F = 1: vhat = 0) where float64 leaves rounding noise."""
    assert actual.shape == expect.shape and actual.is_contiguous(), what
    err = (actual.double() - expect.double()).abs().max().item() if actual.numel() else 0.0
    scale = max(expect.abs().max().item() if expect.numel() else 0.0, floor)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol} * {scale:.3g}"


@BOTH
@pytest.mark.parametrize("N,F_", SHAPES)
def test_matches_functional(path, N, F_):
    proj, b_in, w, b, grad_u, grad_vn = inputs(N, F_)
    (u_ref, vn_ref), grads_ref = expected(proj, b_in, w, b, grad_u, grad_vn)
    u, vn = FORWARD[path](proj, b_in, w, b)
    assert u.dtype == vn.dtype == torch.float32
    assert_close(u, u_ref, TOL[torch.float32], "u")
    assert_close(vn, vn_ref, TOL[torch.float32], "vn")
    grads = BACKWARD[path](grad_u, grad_vn, proj, b_in, w, b)
    # F = 1: vhat and dv are 0 in exact math; ATen's fp32 LayerNorm (the aten path) leaves
    # rounding noise times rstd = eps^-1/2 = 316 in them, so that case gets 1e-4 absolute.
    floor = 1.0 if (path, F_) == ("aten", 1) else 1e-6
    tol = 1e-4 if (path, F_) == ("aten", 1) else TOL[torch.float32]
    for got, ref, name in zip(grads, grads_ref, ["dz_pre", "dln2_weight", "dln2_bias", "db_in"]):
        assert got.dtype == torch.float32
        assert_close(got, ref, tol, name, floor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,F_", [(13, 19), (300, 128)])
def test_low_precision(dtype, N, F_):
    args = inputs(N, F_, dtype)
    fwd_ref, bwd_ref = expected(*args)  # the same (rounded) inputs in float64
    for got, ref in zip(gate_input(*args[:4]) + gate_input_backward(*args[4:], *args[:4]),
                        fwd_ref + bwd_ref):
        assert got.dtype == dtype
        assert_close(got, ref, TOL[dtype], f"{dtype}")


def test_zero_rows():
    proj, b_in, w, b, grad_u, grad_vn = inputs(0, 5)
    u, vn = gate_input(proj, b_in, w, b)
    assert u.shape == vn.shape == (0, 5)
    dz, dw, db, db_in = gate_input_backward(grad_u, grad_vn, proj, b_in, w, b)
    assert dz.shape == (0, 10) and not dw.any() and not db.any() and not db_in.any()


@BOTH
def test_gradcheck(path):
    args = [t.requires_grad_() for t in inputs(5, 7, torch.float64)[:4]]
    assert torch.autograd.gradcheck(FORWARD[path], args)


def test_autograd_through_op_matches_backward_op():
    proj, b_in, w, b, grad_u, grad_vn = inputs(13, 19)
    leaves = [t.requires_grad_() for t in (proj, b_in, w, b)]
    grads = torch.autograd.grad(gate_input(*leaves), leaves, (grad_u, grad_vn))
    dz, dw, db, db_in = gate_input_backward(grad_u, grad_vn, proj, b_in, w, b)
    for got, ref in zip(grads, (dz, db_in, dw, db)):
        assert torch.equal(got, ref)
    # Only vn used: autograd hands the op a zero grad_u.
    (dz,) = torch.autograd.grad(gate_input(*leaves)[1].sum(), leaves[0])
    assert not dz[:, :19].any() and dz[:, 19:].any()


def test_non_contiguous_inputs():
    proj, b_in, w, b, grad_u, grad_vn = inputs(13, 19)
    z_nc = torch.cat([proj, proj], dim=1)[:, ::2]  # proj's values at stride 2
    z_nc.copy_(proj)
    grad_nc = grad_u.t().contiguous().t()
    assert not z_nc.is_contiguous() and not grad_nc.is_contiguous()
    for a, b_ in zip(gate_input(z_nc, b_in, w, b), gate_input(proj, b_in, w, b)):
        assert torch.equal(a, b_)
    for a, b_ in zip(gate_input_backward(grad_nc, grad_vn, z_nc, b_in, w, b),
                     gate_input_backward(grad_u, grad_vn, proj, b_in, w, b)):
        assert torch.equal(a, b_)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_backward_independent_of_thread_count(restore_threads):
    args = inputs(1000, 19)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(gate_input(*args[:4]) + gate_input_backward(*args[4:], *args[:4]))
    for outs in zip(*results):
        assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_opcheck():
    # opcheck runs the schema, fake-tensor, autograd-registration and AOT-dispatch tests.
    args = inputs(6, 5)
    torch.library.opcheck(torch.ops.cube.gate_input.default,
                          tuple(t.clone().requires_grad_() for t in args[:4]))
    torch.library.opcheck(torch.ops.cube.gate_input_backward.default, (*args[4:], *args[:4]))


def test_torch_compile_fullgraph_matches_eager():
    def cell(y, w_in, b_in, w, b):
        u, vn = gate_input(y @ w_in, b_in, w, b)
        return u * vn

    g = torch.Generator().manual_seed(1)
    y, w_in, b_in = torch.randn(13, 6, generator=g), torch.randn(6, 38, generator=g), torch.randn(38, generator=g)
    _, _, w, b, _, _ = inputs(13, 19)
    leaves = [t.requires_grad_() for t in (y, w_in, b_in, w, b)]
    out = cell(*leaves)
    out_c = torch.compile(cell, fullgraph=True)(*leaves)
    assert torch.equal(out_c, out)
    grad = torch.randn(out.shape, generator=g)
    for g_c, g_e in zip(torch.autograd.grad(out_c, leaves, grad), torch.autograd.grad(out, leaves, grad)):
        torch.testing.assert_close(g_c, g_e, rtol=1e-6, atol=1e-6)


_z = torch.zeros(4, 10)


@BOTH
@pytest.mark.parametrize("change,exc,message", [
    (dict(proj=_z[0]), ValueError, r"proj must have 2 dimensions"),
    (dict(proj=torch.zeros(4, 9)), ValueError, r"proj must be \[N, 2F\] .* even, positive last dim"),
    (dict(b_in=torch.zeros(5)), ValueError, r"b_in must have shape \(10,\)"),
    (dict(ln2_weight=torch.zeros(6)), ValueError, r"ln2_weight must have shape \(5,\)"),
    (dict(ln2_bias=torch.zeros(5, 1)), ValueError, r"ln2_bias must have 1 dimensions"),
    (dict(ln2_weight=torch.zeros(5, dtype=torch.float64)), TypeError, r"ln2_weight has dtype"),
    (dict(grad_u=torch.zeros(4, 6)), ValueError, r"grad_u must have shape \(4, 5\)"),
    (dict(grad_vn=torch.zeros(3, 5)), ValueError, r"grad_vn must have shape \(4, 5\)"),
    (dict(proj=torch.zeros(4, 10, dtype=torch.int32)), TypeError, r"proj must be one of"),
])
def test_rejects_bad_input(path, change, exc, message):
    """The op and its ATen fallback validate alike: one exception type and message."""
    args = dict(grad_u=torch.zeros(4, 5), grad_vn=torch.zeros(4, 5), proj=_z, b_in=torch.zeros(10),
                ln2_weight=torch.ones(5), ln2_bias=torch.zeros(5))
    args.update(change)
    with pytest.raises(exc, match=message):
        BACKWARD[path](**args)
    if "grad" not in next(iter(change)):
        with pytest.raises(exc, match=message):
            FORWARD[path](args["proj"], args["b_in"], args["ln2_weight"], args["ln2_bias"])


def test_cpp_checks_behind_the_python_ones():
    with pytest.raises(ValueError, match=r"proj must be \[N, 2F\]"):
        torch.ops.cube.gate_input(torch.zeros(4, 9), torch.zeros(9), torch.ones(4), torch.zeros(4))
