"""The Triton kernels against cube_kernels.reference (SPEC.md): forward, every gradient, the fire
mask bit for bit, determinism, gradcheck, the custom-op registration and the input checks.

Without a GPU the kernels run in Triton's CPU interpreter, which has to be switched on before
triton decorates them, hence the environment variable before the imports below.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed")

import cube_kernels.triton as ct  # noqa: E402
from cube_kernels import reference as ref  # noqa: E402
from cube_kernels.neighbourhood import num_tokens  # noqa: E402
from cube_kernels.philox import fire_mask  # noqa: E402

if not (ct.interpreting() or torch.cuda.is_available()):
    pytest.skip("cube_kernels.triton was imported before this module without TRITON_INTERPRET=1 and "
                "there is no CUDA device; run with TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cpu" if ct.interpreting() else "cuda"
F_, C_ = 19, 13  # not multiples of any block size: every tile has a masked tail
NEIGHBOURHOODS = ("von_neumann", "moore")
BOUNDARIES = ("zero", "periodic")
SMALL = [(1, 1, 1, 1), (1, 2, 3, 5), (2, 5, 4, 3)]
FIRE_RATES = (0.0, 0.5, 1.0)
# fp32 is held to SPEC's 1e-5 of the output scale; bf16/fp16 to a few output roundings.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _inputs(shapes, dtype, seed):
    """Tensors of ``dtype`` for the kernels and float64 copies of the same values (the rounding
    of the inputs is not the kernels' error) as leaves for the reference."""
    low = [_randn(*s, seed=seed + i).to(dtype) for i, s in enumerate(shapes)]
    high = [t.double().requires_grad_() for t in low]
    return [t.to(DEVICE).requires_grad_() for t in low], high


def _assert_close(out, expected, dtype, what):
    expected = expected.detach().to(out.device, torch.float64)
    err = (out.detach().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]} x scale {scale:.3g}"


def _check_gather_gate(shape, neighbourhood, boundary, dtype, seed=0):
    B, D, H, W = shape
    K = num_tokens(neighbourhood)
    (u, vn, w, b), high = _inputs([(B, D, H, W, F_)] * 2 + [(K, F_), (F_,)], dtype, seed)
    h = ct.gather_gate(u, vn, w, b, neighbourhood, boundary)
    h_ref = ref.gather_gate(*high, neighbourhood, boundary)
    assert h.dtype == dtype and h.shape == h_ref.shape
    _assert_close(h, h_ref, dtype, "h")
    grad_h = _randn(B, D, H, W, F_, seed=seed + 9).to(dtype)
    h.backward(grad_h.to(DEVICE))
    h_ref.backward(grad_h.double())
    for name, t, t_ref in zip(("du", "dvn", "dw_sp", "db_sp"), (u, vn, w, b), high):
        assert t.grad.dtype == dtype
        _assert_close(t.grad, t_ref.grad, dtype, name)


def _check_update(shape, fire_rate, dtype, seed=0, step=3):
    B, D, H, W = shape
    (x, h, w, b), high = _inputs([(B, D, H, W, C_), (B, D, H, W, F_), (F_, C_), (C_,)], dtype, seed)
    out = ct.update(x, h, w, b, 1234, step, fire_rate)
    out_ref = ref.update(*high, 1234, step, fire_rate)
    assert out.dtype == dtype and out.shape == out_ref.shape
    _assert_close(out, out_ref, dtype, "x_new")
    grad = _randn(B, D, H, W, C_, seed=seed + 9).to(dtype)
    out.backward(grad.to(DEVICE))
    out_ref.backward(grad.double())
    for name, t, t_ref in zip(("dx", "dh", "dw_out", "db_out"), (x, h, w, b), high):
        assert t.grad.dtype == dtype
        _assert_close(t.grad, t_ref.grad, dtype, name)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s)))
def test_gather_gate_fp32(shape, neighbourhood, boundary):
    _check_gather_gate(shape, neighbourhood, boundary, torch.float32)


def test_gather_gate_default_lattice():
    # many row blocks and partials; the richest stencil (the small shapes cover the rest)
    _check_gather_gate((1, 11, 15, 15), "moore", "periodic", torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("neighbourhood,boundary", [("moore", "zero"), ("von_neumann", "periodic")])
def test_gather_gate_low_precision(neighbourhood, boundary, dtype):
    _check_gather_gate((2, 5, 4, 3), neighbourhood, boundary, dtype)


@pytest.mark.parametrize("fire_rate", FIRE_RATES)
@pytest.mark.parametrize("shape", SMALL, ids=lambda s: "x".join(map(str, s)))
def test_update_fp32(shape, fire_rate):
    _check_update(shape, fire_rate, torch.float32)


def test_update_default_lattice():
    _check_update((1, 11, 15, 15), 0.5, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
def test_update_low_precision(fire_rate, dtype):
    _check_update((2, 5, 4, 3), fire_rate, dtype)


def _mask_probe(B, shape, seed, step, fire_rate):
    """Forward and backward masks of the kernels, read through zero weights and a unit bias
    (forward: x_new = m) and an identity out-projection (backward: dh = m * grad)."""
    n = 16
    x = torch.zeros(B, *shape, n, device=DEVICE)
    w = torch.eye(n, device=DEVICE)
    fwd = ct.update(x, x, torch.zeros_like(w), torch.ones(n, device=DEVICE), seed, step, fire_rate)
    dh, _, db = ct.update_backward(torch.ones_like(x), x, w, seed, step, fire_rate)
    return fwd, dh, db


@pytest.mark.parametrize("seed,step", [(0, 0), (2**40 + 7, 35791394)])
@pytest.mark.parametrize("fire_rate", [0.5, 0.9])
def test_fire_mask_bit_identical(seed, step, fire_rate):
    # step 35791394 with B*N = 120 puts the offsets across 2**32 (the counter's hi word) and
    # the seed above 2**32 uses the key's hi word.
    B, shape = 2, (5, 4, 3)
    fwd, dh, db = _mask_probe(B, shape, seed, step, fire_rate)
    m = fire_mask(seed, step, B, 60, fire_rate).view(B, *shape, 1).to(torch.float32)
    assert 0 < m.sum() < m.numel()
    assert torch.equal(fwd.cpu(), m.expand_as(fwd))
    assert torch.equal(dh.cpu(), m.expand_as(dh))
    assert torch.equal(db.cpu(), m.sum().expand(16))


def test_fire_rate_one_fires_everywhere():
    fwd, dh, _ = _mask_probe(1, (2, 3, 5), 5, 1, 1.0)
    assert torch.equal(fwd, torch.ones_like(fwd)) and torch.equal(dh, torch.ones_like(dh))


def test_update_matches_cpu_op():
    from cube_kernels import _extension
    if not _extension.load():
        pytest.skip("the C++ extension cube_kernels._C is not built")
    (x, h, w, b), _ = _inputs([(2, 5, 4, 3, C_), (2, 5, 4, 3, F_), (F_, C_), (C_,)], torch.float32, 7)
    seed, step = 2**33 + 1, 35791394
    with torch.no_grad():
        out = ct.update(x, h, w, b, seed, step, 0.5).cpu()
        expected = torch.ops.cube.update(*(t.detach().cpu() for t in (x, h, w, b)), seed, step, 0.5)
    # the mask must agree cell for cell: a fired cell differs from x by delta, far above 1e-5
    _assert_close(out, expected, torch.float32, "x_new vs cube::update")


def test_backward_is_deterministic():
    """Weight gradients come from fixed partial sums, no atomics: two runs agree bit for bit
    (on a GPU this is what rules out atomics and races; in the interpreter it still catches a
    partial slot that no program wrote)."""
    (g, u, vn, w, b), _ = _inputs([(2, 5, 4, 3, F_)] * 3 + [(7, F_), (F_,)], torch.float32, 3)
    first = ct.gather_gate_backward(g, u, vn, w, b, "von_neumann", "periodic")
    second = ct.gather_gate_backward(g, u, vn, w, b, "von_neumann", "periodic")
    assert all(torch.equal(p, q) for p, q in zip(first, second))
    (grad, h, w), _ = _inputs([(2, 5, 4, 3, C_), (2, 5, 4, 3, F_), (F_, C_)], torch.float32, 4)
    first = ct.update_backward(grad, h, w, 9, 2, 0.5)
    second = ct.update_backward(grad, h, w, 9, 2, 0.5)
    assert all(torch.equal(p, q) for p, q in zip(first, second))


@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "zero"), ("moore", "periodic")])
def test_gather_gate_gradcheck(neighbourhood, boundary):
    # D=2 with the periodic boundary makes both d-neighbours the same cell.
    K = num_tokens(neighbourhood)
    args = [_randn(*s, seed=i).to(DEVICE).requires_grad_()
            for i, s in enumerate([(1, 2, 2, 3, 3), (1, 2, 2, 3, 3), (K, 3), (3,)])]
    # fast mode (random directional derivatives) keeps the interpreter's share small
    assert torch.autograd.gradcheck(lambda *a: ct.gather_gate(*a, neighbourhood, boundary), args,
                                    fast_mode=True)


def test_update_gradcheck():
    args = [_randn(*s, seed=i).to(DEVICE).requires_grad_()
            for i, s in enumerate([(2, 1, 2, 3, 2), (2, 1, 2, 3, 3), (3, 2), (2,)])]
    assert torch.autograd.gradcheck(lambda *a: ct.update(*a, 11, 4, 0.5), args)


def test_opcheck():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of both ops."""
    u, vn = _randn(1, 2, 3, 2, 4, seed=0).float(), _randn(1, 2, 3, 2, 4, seed=1).float()
    w, b = _randn(7, 4, seed=2).float(), _randn(4, seed=3).float()
    leaves = [t.to(DEVICE).requires_grad_() for t in (u, vn, w, b)]
    torch.library.opcheck(torch.ops.cube_triton.gather_gate, (*leaves, "von_neumann", "periodic"))
    x, w_out, b_out = (_randn(*s, seed=4 + i).float() for i, s in enumerate([(1, 2, 3, 2, 5), (4, 5), (5,)]))
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, u, w_out, b_out)]
    torch.library.opcheck(torch.ops.cube_triton.update, (*leaves, 3, 1, 0.5))


def test_compiles_without_graph_breaks():
    (x, u, vn, w_sp, b_sp, w_out, b_out), high = _inputs(
        [(1, 2, 3, 2, 5), (1, 2, 3, 2, 4), (1, 2, 3, 2, 4), (7, 4), (4,), (4, 5), (5,)], torch.float32, 5)

    def step(x, u, vn, w_sp, b_sp, w_out, b_out):
        h = ct.gather_gate(u, vn, w_sp, b_sp, "von_neumann", "zero")
        return ct.update(x, h, w_out, b_out, 1, 2, 0.5).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(x, u, vn, w_sp, b_sp, w_out, b_out).backward()
    x_r, u_r, vn_r, w_sp_r, b_sp_r, w_out_r, b_out_r = high
    h_r = ref.gather_gate(u_r, vn_r, w_sp_r, b_sp_r, "von_neumann", "zero")
    ref.update(x_r, h_r, w_out_r, b_out_r, 1, 2, 0.5).sum().backward()
    for t, t_ref in zip((x, u, vn, w_sp, b_sp, w_out, b_out), high):
        _assert_close(t.grad, t_ref.grad, torch.float32, "grad under torch.compile")


def test_empty_batch():
    u = torch.zeros(0, 2, 3, 2, 4, device=DEVICE)
    w, b = torch.ones(7, 4, device=DEVICE), torch.ones(4, device=DEVICE)
    assert ct.gather_gate(u, u, w, b, "von_neumann", "zero").shape == u.shape
    du, dvn, dw, db = ct.gather_gate_backward(u, u, u, w, b, "von_neumann", "zero")
    assert du.shape == dvn.shape == u.shape and not dw.any() and not db.any()
    dh, dw_out, db_out = ct.update_backward(u, u, torch.ones(4, 4, device=DEVICE), 0, 0, 0.5)
    assert dh.shape == u.shape and not dw_out.any() and not db_out.any()


def _bad(fn, match, *args):
    with pytest.raises((ValueError, TypeError), match=match):
        fn(*args)


def test_bad_input_names_the_argument():
    u = torch.zeros(1, 2, 3, 2, 4, device=DEVICE)
    w, b = torch.zeros(7, 4, device=DEVICE), torch.zeros(4, device=DEVICE)
    _bad(ct.gather_gate, "neighbourhood", u, u, w, b, "hex", "zero")
    _bad(ct.gather_gate, "boundary", u, u, w, b, "moore", "mirror")
    _bad(ct.gather_gate, "w_sp", u, u, w, b, "moore", "zero")  # K=7 weights for 27 tokens
    _bad(ct.gather_gate, "vn", u, u[..., :3], w, b, "von_neumann", "zero")
    _bad(ct.gather_gate, "b_sp", u, u, w, b.double(), "von_neumann", "zero")
    _bad(ct.gather_gate, "u", u[0], u[0], w, b, "von_neumann", "zero")
    _bad(ct.gather_gate, "u", u.long(), u.long(), w.long(), b.long(), "von_neumann", "zero")
    _bad(ct.gather_gate_backward, "grad_h", u[..., :2], u, u, w, b, "von_neumann", "zero")
    x = torch.zeros(1, 2, 3, 2, 5, device=DEVICE)
    w_out, b_out = torch.zeros(4, 5, device=DEVICE), torch.zeros(5, device=DEVICE)
    _bad(ct.update, "w_out", x, u, w_out.T, b_out, 0, 0, 0.5)
    _bad(ct.update, "b_out", x, u, w_out, b_out[:4], 0, 0, 0.5)
    _bad(ct.update, "h", x, u[:, :1], w_out, b_out, 0, 0, 0.5)
    _bad(ct.update, "seed", x, u, w_out, b_out, -1, 0, 0.5)
    _bad(ct.update, "step", x, u, w_out, b_out, 0, -2, 0.5)
    _bad(ct.update, "fire_rate", x, u, w_out, b_out, 0, 0, float("nan"))
    _bad(ct.update_backward, "grad", x[..., :3], u, w_out, 0, 0, 0.5)


def _run_python(*args):
    """A fresh interpreter on this checkout, without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


def test_package_imports_without_triton():
    res = _run_python("-c", (
        "import sys; sys.modules['triton'] = None  # import triton raises ImportError\n"
        "import cube_kernels.triton as t\n"
        "assert not t.available() and not t.interpreting()\n"
        "try:\n    from cube_kernels.triton import gather_gate\n"
        "except ImportError as e:\n    assert 'triton' in str(e)\n"
        "else:\n    raise SystemExit('no ImportError')\n"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_kernels_compile_for_gpu():
    """What the interpreter accepts the compiler may not: compile every kernel for sm_90 in bf16
    (the tensor-core path) ahead of time; this needs no GPU, only Triton's LLVM and ptxas."""
    res = _run_python("-m", "cube_kernels.triton.compile_check",
                      "--arch", "90", "--dtypes", "bf16", "--quick")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "compiled 12 kernel variants" in res.stdout
