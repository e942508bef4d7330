"""The C++ CPU ops (cube::gather_gate, cube::update and their backwards) against
cube_kernels.reference: values, every gradient, the fire mask, determinism, torch.compile and
the input checks."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from cube_kernels import _extension
from cube_kernels import reference as R
from cube_kernels.neighbourhood import num_tokens
from cube_kernels.philox import fire_mask

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a missing _C skips this module; a broken one fails it
    if not _extension.load():
        pytest.skip("cube_kernels._C is not built", allow_module_level=True)

from cube_kernels.gather_gate import gather_gate, gather_gate_backward  # noqa: E402
from cube_kernels.update import update, update_backward  # noqa: E402

F_, C_ = 19, 13  # not multiples of any vector width or channel tile
LATTICES = [(3, (1, 1, 1)), (2, (2, 3, 5)), (1, (11, 15, 15))]  # (B, (D, H, W))
NEIGHBOURHOODS = ["von_neumann", "moore"]
BOUNDARIES = ["zero", "periodic"]
FIRE_RATES = [0.0, 0.5, 1.0]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gather_gate_inputs(B, lattice, F, neighbourhood, dtype=torch.float32, seed=0):
    g = _gen(seed)
    K = num_tokens(neighbourhood)
    u = torch.randn(B, *lattice, F, generator=g)
    vn = torch.randn(B, *lattice, F, generator=g)
    w_sp = torch.randn(K, F, generator=g) * 0.5
    b_sp = 1.0 + 0.1 * torch.randn(F, generator=g)
    return [t.to(dtype).requires_grad_() for t in (u, vn, w_sp, b_sp)]


def update_inputs(B, lattice, F, C, dtype=torch.float32, seed=0):
    g = _gen(seed)
    x = torch.randn(B, *lattice, C, generator=g)
    h = torch.randn(B, *lattice, F, generator=g)
    w_out = torch.randn(F, C, generator=g) / math.sqrt(F)
    b_out = torch.randn(C, generator=g)
    return [t.to(dtype).requires_grad_() for t in (x, h, w_out, b_out)]


def assert_close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max |expected| (exact where expected is all zero)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * scale {scale:.3g}"


def fwd_bwd(fn, inputs, args, grad_seed=1):
    out = fn(*inputs, *args)
    grad = torch.randn(out.shape, generator=_gen(grad_seed)).to(out.dtype)
    return out, torch.autograd.grad(out, inputs, grad)


def compare(fast, ref, inputs, args, tol, names):
    """Forward and every gradient of ``fast`` vs ``ref``; the reference runs in fp32 (or fp64)
    on the same (rounded) inputs."""
    ref_dtype = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32
    ref_inputs = [t.detach().to(ref_dtype).requires_grad_() for t in inputs]
    out, grads = fwd_bwd(fast, inputs, args)
    out_ref, grads_ref = fwd_bwd(ref, ref_inputs, args)
    assert_close(out, out_ref.to(out.dtype), tol, "output")
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref.to(g.dtype), tol, f"d{name}")


@pytest.mark.parametrize("B,lattice", LATTICES)
@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gather_gate_matches_reference(B, lattice, neighbourhood, boundary):
    inputs = gather_gate_inputs(B, lattice, F_, neighbourhood)
    compare(gather_gate, R.gather_gate, inputs, (neighbourhood, boundary), TOL[torch.float32],
            ["u", "vn", "w_sp", "b_sp"])


@pytest.mark.parametrize("F", [32, 77])  # whole 32-channel register tiles, then tiles + remainder
@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "zero"), ("moore", "periodic")])
def test_gather_gate_channel_tiles_matches_reference(F, neighbourhood, boundary):
    inputs = gather_gate_inputs(2, (3, 4, 5), F, neighbourhood)
    compare(gather_gate, R.gather_gate, inputs, (neighbourhood, boundary), TOL[torch.float32],
            ["u", "vn", "w_sp", "b_sp"])


@pytest.mark.parametrize("B,lattice", LATTICES)
@pytest.mark.parametrize("fire_rate", FIRE_RATES)
def test_update_matches_reference(B, lattice, fire_rate):
    inputs = update_inputs(B, lattice, F_, C_)
    compare(update, R.update, inputs, (5, 3, fire_rate), TOL[torch.float32],
            ["x", "h", "w_out", "b_out"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "zero"), ("moore", "periodic")])
def test_gather_gate_low_precision(dtype, neighbourhood, boundary):
    inputs = gather_gate_inputs(2, (4, 5, 6), 45, neighbourhood, dtype)
    compare(gather_gate, R.gather_gate, inputs, (neighbourhood, boundary), TOL[dtype],
            ["u", "vn", "w_sp", "b_sp"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
def test_update_low_precision(dtype, fire_rate):
    inputs = update_inputs(2, (4, 5, 6), F_, C_, dtype)
    compare(update, R.update, inputs, (5, 3, fire_rate), TOL[dtype], ["x", "h", "w_out", "b_out"])


@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_gather_gate_gradcheck(neighbourhood, boundary):
    inputs = gather_gate_inputs(2, (2, 3, 2), 3, neighbourhood, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: gather_gate(*t, neighbourhood, boundary), inputs)


@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
def test_update_gradcheck(fire_rate):
    inputs = update_inputs(2, (1, 2, 3), 3, 2, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: update(*t, 11, 2, fire_rate), inputs)


def _mask_of_update(B, lattice, seed, step, fire_rate):
    """The op's fire mask: with x = 0, w_out = 0, b_out = 1, x_new is exactly m."""
    x = torch.zeros(B, *lattice, 1)
    h = torch.randn(B, *lattice, 1)
    x_new = update(x, h, torch.zeros(1, 1), torch.ones(1), seed, step, fire_rate)
    assert set(x_new.unique().tolist()) <= {0.0, 1.0}
    return x_new[..., 0].reshape(B, -1) == 1


def _mask_of_update_backward(B, lattice, seed, step, fire_rate):
    """The mask backward regenerates: with grad = 1 and w_out = [[1]], dh is exactly m."""
    dh, _, _ = update_backward(torch.ones(B, *lattice, 1), torch.randn(B, *lattice, 1),
                               torch.ones(1, 1), seed, step, fire_rate)
    return dh[..., 0].reshape(B, -1) == 1


@pytest.mark.parametrize("seed,step", [(1234, 0), (2**40 + 7, 3), (99, 2**33 // 630 + 5)])
def test_fire_mask_is_philox(seed, step):
    # The last step puts the Philox counter above 2**32, the second seed uses the key's high word.
    B, lattice = 3, (5, 6, 7)
    cells = math.prod(lattice)
    expected = fire_mask(seed, step, B, cells, 0.5)
    assert torch.equal(_mask_of_update(B, lattice, seed, step, 0.5), expected)
    assert torch.equal(_mask_of_update_backward(B, lattice, seed, step, 0.5), expected)
    assert not torch.equal(_mask_of_update(B, lattice, seed, step + 1, 0.5), expected)


def test_fire_mask_extremes():
    assert not _mask_of_update(2, (3, 4, 5), 1, 0, 0.0).any()
    assert _mask_of_update(2, (3, 4, 5), 1, 0, 1.0).all()


@pytest.mark.parametrize("fire_rate", [0.1, 0.5, 0.9])
def test_fire_fraction(fire_rate):
    m = _mask_of_update(10, (20, 20, 25), 2024, 1, fire_rate)
    assert abs(m.float().mean().item() - fire_rate) < 0.01


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("B,lattice", [(2, (2, 3, 5)), (2, (11, 15, 15))])
def test_backward_independent_of_thread_count(B, lattice, restore_threads):
    u, vn, w_sp, b_sp = (t.detach() for t in gather_gate_inputs(B, lattice, F_, "moore"))
    x, h, w_out, _ = (t.detach() for t in update_inputs(B, lattice, F_, C_))
    grad_h = torch.randn(u.shape, generator=_gen(3))
    grad_x = torch.randn(x.shape, generator=_gen(4))
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(gather_gate_backward(grad_h, u, vn, w_sp, b_sp, "moore", "periodic")
                       + update_backward(grad_x, h, w_out, 5, 1, 0.5))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_opcheck():
    # opcheck runs the schema, fake-tensor, autograd-registration and AOT-dispatch tests.
    inputs = gather_gate_inputs(2, (2, 3, 4), 5, "moore")
    torch.library.opcheck(torch.ops.cube.gather_gate.default, (*inputs, "moore", "periodic"))
    plain = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.cube.gather_gate_backward.default,
                          (torch.randn_like(plain[0]), *plain, "moore", "periodic"))
    x, h, w_out, b_out = update_inputs(2, (2, 3, 4), 5, 3)
    torch.library.opcheck(torch.ops.cube.update.default, (x, h, w_out, b_out, 7, 2, 0.5))
    torch.library.opcheck(torch.ops.cube.update_backward.default,
                          (torch.randn_like(x.detach()), h.detach(), w_out.detach(), 7, 2, 0.5))


def test_torch_compile_fullgraph_matches_eager():
    def step(u, vn, w_sp, b_sp, x, w_out, b_out):
        h = gather_gate(u, vn, w_sp, b_sp, "moore", "periodic")
        return update(x, h, w_out, b_out, 3, 1, 0.5)

    gg = gather_gate_inputs(2, (3, 4, 5), F_, "moore")
    x, _, w_out, b_out = update_inputs(2, (3, 4, 5), F_, C_)
    inputs = [*gg, x, w_out, b_out]
    compiled = torch.compile(step, fullgraph=True)
    out, grads = fwd_bwd(step, inputs, ())
    out_c, grads_c = fwd_bwd(compiled, inputs, ())
    assert torch.equal(out_c, out)
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g, rtol=0, atol=0)


def test_non_contiguous_inputs():
    u, vn, w_sp, b_sp = (t.detach() for t in gather_gate_inputs(2, (3, 4, 5), F_, "von_neumann"))
    wide = torch.randn(2, 3, 4, 5, 2 * F_)
    u_nc = wide[..., ::2]  # every other channel: not contiguous
    vn_nc = vn.transpose(1, 3).contiguous().transpose(1, 3)  # same values, other strides
    assert not u_nc.is_contiguous() and not vn_nc.is_contiguous()
    args = ("von_neumann", "zero")
    assert torch.equal(gather_gate(u_nc, vn_nc, w_sp, b_sp, *args),
                       gather_gate(u_nc.contiguous(), vn, w_sp, b_sp, *args))
    grad_nc = torch.randn(2, 3, 4, 5, F_).transpose(2, 3).contiguous().transpose(2, 3)
    for a, b in zip(gather_gate_backward(grad_nc, u_nc, vn_nc, w_sp, b_sp, *args),
                    gather_gate_backward(grad_nc.contiguous(), u_nc.contiguous(), vn, w_sp, b_sp, *args)):
        assert torch.equal(a, b)
    x, h, w_out, b_out = (t.detach() for t in update_inputs(2, (3, 4, 5), F_, C_))
    w_out_nc = w_out.t().contiguous().t()
    assert not w_out_nc.is_contiguous()
    torch.testing.assert_close(update(x, u_nc, w_out_nc, b_out, 1, 0, 0.5),
                               update(x, u_nc.contiguous(), w_out, b_out, 1, 0, 0.5))


def _gg_args(**change):
    u, vn, w_sp, b_sp = (t.detach() for t in gather_gate_inputs(2, (3, 4, 5), F_, "von_neumann"))
    args = dict(u=u, vn=vn, w_sp=w_sp, b_sp=b_sp, neighbourhood="von_neumann", boundary="zero")
    args.update(change)
    return args


def _up_args(**change):
    x, h, w_out, b_out = (t.detach() for t in update_inputs(2, (3, 4, 5), F_, C_))
    args = dict(x=x, h=h, w_out=w_out, b_out=b_out, seed=1, step=0, fire_rate=0.5)
    args.update(change)
    return args


_x = torch.zeros(2, 3, 4, 5, F_)


@pytest.mark.parametrize("change,message", [
    (dict(u=_x[0]), r"u must be a 5-D tensor, got 4-D"),
    (dict(vn=_x[:, :2]), r"vn must have the shape of u"),
    (dict(w_sp=torch.zeros(7, F_ + 1)), r"w_sp.size\(1\) must be F"),
    (dict(w_sp=torch.zeros(7, F_), neighbourhood="moore"), r"w_sp must be \[K, F\] with K = 27"),
    (dict(b_sp=torch.zeros(F_, 1)), r"b_sp must be a 1-D tensor"),
    (dict(b_sp=torch.zeros(F_ - 1)), r"b_sp.size\(0\) must be F"),
    (dict(vn=_x.double()), r"vn has dtype Double but u has Float"),
    (dict(u=_x.int(), vn=_x.int()), r"u must be float32, float64, bfloat16 or float16"),
    (dict(neighbourhood="hex"), r"neighbourhood must be \"von_neumann\" or \"moore\""),
    (dict(boundary="reflect"), r"boundary must be \"zero\" or \"periodic\""),
])
def test_gather_gate_rejects_bad_input(change, message):
    with pytest.raises(RuntimeError, match=message):
        gather_gate(**_gg_args(**change))


def test_gather_gate_backward_rejects_bad_grad():
    args = _gg_args()
    with pytest.raises(RuntimeError, match=r"grad_h must have the shape of u"):
        gather_gate_backward(torch.zeros(2, 3, 4, 5, F_ + 1), *args.values())


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.zeros(3, 4, 5, C_)), r"x must be a 5-D tensor, got 4-D"),
    (dict(h=torch.zeros(2, 3, 4, 6, F_)), r"h must have the \[B, D, H, W\] of x"),
    (dict(w_out=torch.zeros(F_, C_ + 1)), r"w_out must be \[F, C\] = \[19, 13\]"),
    (dict(b_out=torch.zeros(C_ + 1)), r"b_out.size\(0\) must be C"),
    (dict(w_out=torch.zeros(F_, C_, dtype=torch.bfloat16)), r"w_out has dtype BFloat16 but x has Float"),
    (dict(fire_rate=1.5), r"fire_rate must be in \[0, 1\], got 1.5"),
    (dict(fire_rate=-0.1), r"fire_rate must be in \[0, 1\]"),
    (dict(fire_rate=float("nan")), r"fire_rate must be in \[0, 1\]"),
    (dict(seed=-1), r"seed must be >= 0"),
    (dict(step=-1), r"step must be >= 0"),
])
def test_update_rejects_bad_input(change, message):
    with pytest.raises(RuntimeError, match=message):
        update(**_up_args(**change))


def test_update_backward_rejects_bad_grad():
    a = _up_args()
    with pytest.raises(RuntimeError, match=r"grad must be a 5-D tensor"):
        update_backward(a["x"][0], a["h"], a["w_out"], 1, 0, 0.5)
    with pytest.raises(RuntimeError, match=r"C: last dim of grad"):
        update_backward(torch.zeros(2, 3, 4, 5, C_ + 2), a["h"], a["w_out"], 1, 0, 0.5)


def test_isa_in_use():
    isa = _extension.build_info()["cpu_isa"]
    assert isa in ("avx2", "baseline")
    if os.environ.get("CUBE_CPU_ISA") == "baseline":
        assert isa == "baseline"


def test_baseline_isa_matches_reference():
    """Where the AVX2 loops run, the portable baseline ones (SSE2 on x86-64) are hidden: the
    reference comparisons again, in a process with CUBE_CPU_ISA=baseline."""
    if os.environ.get("CUBE_CPU_ISA") == "baseline" or _extension.build_info()["cpu_isa"] == "baseline":
        pytest.skip("the other tests already run the baseline loops")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "matches_reference or low_precision or gradcheck or isa_in_use"],
        env=dict(os.environ, CUBE_CPU_ISA="baseline"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:]
