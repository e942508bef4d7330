"""update (out-projection + stochastic residual update) of every backend against
cube_kernels.reference.update: values and every gradient over lattices, dtypes and fire rates,
the fire mask bit for bit, gradcheck, determinism, opcheck, strides, empty batches and the input
checks."""
from __future__ import annotations

import pytest
import torch

import harness
from cube_kernels import reference
from cube_kernels.philox import fire_mask

NAMES = ("x", "h", "w_out", "b_out")
MEDIUM = harness.Lattice(2, 3, 4, 5)
SEED, STEP = 2**40 + 7, 3  # a seed with a non-zero high word keys both halves of Philox


@pytest.mark.parametrize("fire_rate", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype,lattice", harness.cases())
@pytest.mark.parametrize("backend", harness.backend_params())
def test_matches_reference(backend, dtype, lattice, fire_rate):
    fast_in, ref_in = harness.leaves(harness.update_inputs(lattice, harness.F_, harness.C_), dtype,
                                     harness.device(backend))
    harness.check_op(backend, harness.ops(backend).update, reference.update, fast_in, ref_in,
                     (SEED, STEP, fire_rate), NAMES)


@pytest.mark.parametrize("backend", harness.backend_params(("cpu", "cuda")))
def test_default_lattice_matches_reference(backend):
    fast_in, ref_in = harness.leaves(harness.update_inputs(harness.LARGE, 128, 64), torch.float32,
                                     harness.device(backend))
    harness.check_op(backend, harness.ops(backend).update, reference.update, fast_in, ref_in,
                     (SEED, STEP, 0.5), NAMES)


def _masks(backend, B, lattice, seed, step, fire_rate):
    """The forward and backward fire masks of ``backend``'s ops, read off exactly: with x = 0,
    w_out = 0 and b_out = 1, x_new = m; with grad = 1 and w_out = I, dh = m and db_out = sum m."""
    dev, k, n = harness.device(backend), harness.ops(backend), 16
    x = torch.zeros(B, *lattice, n, device=dev)
    eye = torch.eye(n, device=dev)
    fwd = k.update(x, x, torch.zeros_like(eye), torch.ones(n, device=dev), seed, step, fire_rate)
    dh, _, db = k.update_backward(torch.ones_like(x), x, eye, seed, step, fire_rate)
    assert torch.equal(db.cpu(), dh.sum((0, 1, 2, 3)).cpu())
    return fwd[..., 0].reshape(B, -1).cpu(), dh[..., 0].reshape(B, -1).cpu()


@pytest.mark.parametrize("fire_rate", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed,step", [(0, 0), (2**40 + 7, 35791394), (2**63 - 1, 100)])
@pytest.mark.parametrize("backend", harness.backend_params())
def test_fire_mask_is_philox_bit_for_bit(backend, seed, step, fire_rate):
    # step 35791394 with B*N = 120 puts the Philox counter across 2**32 (its hi word); the seeds
    # above 2**32 use the key's hi word.
    B, lattice = 2, (5, 4, 3)
    expected = fire_mask(seed, step, B, 60, fire_rate).float()
    fwd, bwd = _masks(backend, B, lattice, seed, step, fire_rate)
    assert torch.equal(fwd, expected) and torch.equal(bwd, expected)
    if 0.0 < fire_rate < 1.0:  # the mask really is stochastic here, not all or nothing
        assert 0 < expected.sum() < expected.numel()
        assert not torch.equal(_masks(backend, B, lattice, seed, step + 1, fire_rate)[0], expected)


@pytest.mark.parametrize("fire_rate", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("backend", harness.backend_params(("cpu", "cuda")))
def test_fire_fraction(backend, fire_rate):
    fwd, _ = _masks(backend, 10, (20, 20, 25), 2024, 1, fire_rate)
    assert abs(fwd.mean().item() - fire_rate) < 0.01


@pytest.mark.parametrize("fire_rate", [0.5, 1.0])
@pytest.mark.parametrize("backend", harness.backend_params())
def test_gradcheck(backend, fire_rate):
    inputs, _ = harness.leaves(harness.update_inputs(harness.Lattice(2, 1, 2, 3), 3, 2), torch.float64,
                               harness.device(backend))
    op = harness.ops(backend).update
    assert torch.autograd.gradcheck(lambda *t: op(*t, 11, 2, fire_rate), inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", harness.backend_params())
def test_backward_is_deterministic(backend):
    dev = harness.device(backend)
    x, h, w_out, _ = harness.on(harness.update_inputs(harness.SMALL[2], harness.F_, harness.C_), dev)
    op = harness.ops(backend).update_backward
    first, again = op(x, h, w_out, 9, 2, 0.5), op(x, h, w_out, 9, 2, 0.5)
    for name, a, b in zip(("dh", "dw_out", "db_out"), first, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend", harness.backend_params(("cpu",)))
def test_backward_independent_of_thread_count(backend, restore_threads):
    x, h, w_out, _ = harness.on(harness.update_inputs(harness.LARGE, harness.F_, harness.C_), "cpu")
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(harness.ops(backend).update_backward(x, h, w_out, 5, 1, 0.5))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", harness.backend_params())
def test_opcheck(backend):
    dev = harness.device(backend)
    (x, h, w_out, b_out), _ = harness.leaves(harness.update_inputs(harness.Lattice(2, 2, 3, 4), 5, 3),
                                             torch.float32, dev)
    ns = torch.ops.cube_triton if backend == "triton" else torch.ops.cube
    torch.library.opcheck(ns.update.default, (x, h, w_out, b_out, 7, 2, 0.5))
    torch.library.opcheck(ns.update_backward.default,
                          (torch.randn_like(x.detach()), h.detach(), w_out.detach(), 7, 2, 0.5))


@pytest.mark.parametrize("backend", harness.backend_params())
def test_non_contiguous_inputs(backend):
    dev = harness.device(backend)
    x, h, w_out, b_out = harness.on(harness.update_inputs(MEDIUM, harness.F_, harness.C_), dev)
    h_nc = h.transpose(1, 3).contiguous().transpose(1, 3)
    w_nc = w_out.t().contiguous().t()
    assert not (h_nc.is_contiguous() or w_nc.is_contiguous())
    k = harness.ops(backend)
    assert torch.equal(k.update(x, h_nc, w_nc, b_out, 1, 0, 0.5), k.update(x, h, w_out, b_out, 1, 0, 0.5))
    for a, b in zip(k.update_backward(x.transpose(2, 3).contiguous().transpose(2, 3), h_nc, w_nc, 1, 0, 0.5),
                    k.update_backward(x, h, w_out, 1, 0, 0.5)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", harness.backend_params())
def test_empty_batch(backend):
    dev = harness.device(backend)
    u = torch.zeros(0, 2, 3, 2, 4, device=dev)
    k = harness.ops(backend)
    assert k.update(u, u, torch.ones(4, 4, device=dev), torch.ones(4, device=dev), 0, 0, 0.5).shape == u.shape
    dh, dw_out, db_out = k.update_backward(u, u, torch.ones(4, 4, device=dev), 0, 0, 0.5)
    assert dh.shape == u.shape and not dw_out.any() and not db_out.any()


def _args(dev, **change):
    x, h, w_out, b_out = harness.on(harness.update_inputs(MEDIUM, harness.F_, harness.C_), dev)
    args = dict(x=x, h=h, w_out=w_out, b_out=b_out, seed=1, step=0, fire_rate=0.5)
    args.update({k: v(args) if callable(v) else v for k, v in change.items()})
    return args


BAD = [
    (dict(x=lambda a: a["x"][0]), ValueError, r"x must have 5 dimensions"),
    (dict(h=lambda a: a["h"][:, :, :, :4]), ValueError, r"h must have the cells of x"),
    (dict(w_out=lambda a: torch.zeros(harness.F_, harness.C_ + 1)), ValueError, r"w_out must have shape \(19, 13\)"),
    (dict(b_out=lambda a: a["b_out"][:-1]), ValueError, r"b_out must have shape \(13,\)"),
    (dict(w_out=lambda a: a["w_out"].bfloat16()), TypeError, r"w_out has dtype torch.bfloat16 but x has torch.float32"),
    (dict(fire_rate=1.5), ValueError, r"fire_rate must be in \[0, 1\], got 1.5"),
    (dict(fire_rate=-0.1), ValueError, r"fire_rate must be in \[0, 1\]"),
    (dict(fire_rate=float("nan")), ValueError, r"fire_rate must be in \[0, 1\]"),
    (dict(fire_rate="0.5"), TypeError, r"fire_rate must be a number"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(seed=2**64), ValueError, r"seed must be an int in \[0, 2\*\*63\), got 18446744073709551616"),
    (dict(seed=1.0), TypeError, r"seed must be an int"),
    (dict(step=-1), ValueError, r"step must be a non-negative int, got -1"),
    (dict(step=True), TypeError, r"step must be a non-negative int, got True"),
    (dict(step=2**62), ValueError, r"step \* B \* D \* H \* W must fit in int64"),
]


@pytest.mark.parametrize("change,exc,message", BAD)
@pytest.mark.parametrize("backend", harness.backend_params())
def test_bad_input_names_the_argument(backend, change, exc, message):
    """One validation for every backend: the same exception type and message."""
    with pytest.raises(exc, match=message):
        harness.ops(backend).update(**_args(harness.device(backend), **change))


@pytest.mark.parametrize("backend", harness.backend_params())
def test_backward_rejects_bad_grad(backend):
    a = _args(harness.device(backend))
    with pytest.raises(ValueError, match=r"grad must have 5 dimensions"):
        harness.ops(backend).update_backward(a["x"][0], a["h"], a["w_out"], 1, 0, 0.5)
    with pytest.raises(ValueError, match=r"grad must have shape \(2, 3, 4, 5, 13\)"):
        harness.ops(backend).update_backward(a["x"][..., :-2], a["h"], a["w_out"], 1, 0, 0.5)


@pytest.mark.parametrize("change,message", [
    (dict(x=lambda a: a["x"][0]), r"x must be a 5-D tensor, got 4-D"),
    (dict(w_out=lambda a: torch.zeros(harness.F_, harness.C_ + 1)), r"w_out must be \[F, C\] = \[19, 13\]"),
    (dict(fire_rate=1.5), r"fire_rate must be in \[0, 1\], got 1.5"),
    (dict(seed=-1), r"seed must be >= 0"),
])
@pytest.mark.parametrize("backend", harness.backend_params(("cpu", "cuda")))
def test_cpp_checks_behind_the_python_ones(backend, change, message):
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.cube.update(*_args(harness.device(backend), **change).values())



@pytest.mark.parametrize("backend", harness.backend_params())
def test_double_backward_raises(backend):
    (x, h, w_out, b_out), _ = harness.leaves(harness.update_inputs(harness.Lattice(1, 2, 2, 2), 3, 2),
                                             torch.float32, harness.device(backend))
    out = harness.ops(backend).update(x, h, w_out, b_out, 1, 0, 0.5)
    grads = torch.autograd.grad(out.square().sum(), (h, w_out), create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward through cube(_triton)?::update is not supported"):
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("backend", harness.backend_params())
def test_cells_that_do_not_fire_keep_x_bit_for_bit(backend):
    """SPEC: where(m, x + delta, x). Rows of h hold Inf and NaN, x holds -0.0: a cell that does
    not fire is x exactly (not x + 0 * delta, which is NaN there and +0.0 for -0.0); a cell that
    fires is Inf or NaN exactly where the reference is."""
    dev, k = harness.device(backend), harness.ops(backend)
    lattice = MEDIUM
    x, h, w_out, b_out = harness.on(harness.update_inputs(lattice, harness.F_, harness.C_), "cpu")
    x[..., 0] = -0.0
    h[0, 0, :, :, 0] = float("inf")
    h[1, 1, :, :, 1] = float("nan")
    m = fire_mask(SEED, STEP, lattice.B, lattice.rows // lattice.B, 0.5).view(*lattice.shape, 1)
    ref = reference.update(x, h, w_out, b_out, SEED, STEP, 0.5)
    out = k.update(*(t.to(dev) for t in (x, h, w_out, b_out)), SEED, STEP, 0.5).cpu()
    assert torch.equal(ref.view(torch.int32)[~m.expand_as(ref)], x.view(torch.int32)[~m.expand_as(x)])
    assert torch.equal(out.view(torch.int32)[~m.expand_as(out)], x.view(torch.int32)[~m.expand_as(x)])
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out.isnan().any() and not out[~m.expand_as(out)].isnan().any()


@pytest.mark.parametrize("backend", harness.backend_params())
def test_gradient_of_cells_that_do_not_fire_is_dropped(backend):
    """d_delta = where(m, grad, 0): NaN in the gradient of cells that did not fire reaches none
    of dh, dw_out, db_out."""
    dev, k = harness.device(backend), harness.ops(backend)
    lattice = MEDIUM
    grad, h, w_out, _ = harness.on(harness.update_inputs(lattice, harness.F_, harness.C_), "cpu")
    m = fire_mask(SEED, STEP, lattice.B, lattice.rows // lattice.B, 0.5).view(*lattice.shape, 1)
    poisoned = torch.where(m, grad, float("nan"))
    zeroed = torch.where(m, grad, 0.0)
    for a, b in zip(k.update_backward(*(t.to(dev) for t in (poisoned, h, w_out)), SEED, STEP, 0.5),
                    k.update_backward(*(t.to(dev) for t in (zeroed, h, w_out)), SEED, STEP, 0.5)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", harness.backend_params())
def test_only_x_needs_grad_skips_the_backward_op(backend):
    """With h, w_out and b_out frozen, dx = grad and the backward op does not run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    dev = harness.device(backend)
    x, h, w_out, b_out = harness.on(harness.update_inputs(harness.Lattice(1, 2, 2, 2), 3, 2), dev)
    x.requires_grad_()
    out = harness.ops(backend).update(x, h, w_out, b_out, 1, 0, 0.5)
    grad = torch.randn_like(out)
    with Calls() as calls:
        (dx,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(dx, grad)
    assert not any("update_backward" in n for n in calls.names), calls.names


@pytest.mark.parametrize("backend", harness.backend_params(("cuda",)))
def test_fp32_gemms_ignore_the_global_tf32_setting(backend, monkeypatch):
    """SPEC's 1e-5 holds with TF32 switched on for the whole process (cuBLAS would otherwise run
    the fp32 GEMMs with 10-bit mantissas)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    fast_in, ref_in = harness.leaves(harness.update_inputs(harness.LARGE, 128, 64), torch.float32, "cuda")
    harness.check_op(backend, harness.ops(backend).update, reference.update, fast_in, ref_in, (SEED, STEP, 0.5), NAMES)
    assert torch.backends.cuda.matmul.allow_tf32  # restored after the op


@pytest.mark.parametrize("backend", harness.backend_params(("triton",)))
def test_every_autotune_config_matches_reference(backend):
    """Each config of the three update kernels, forced in turn (see test_gather_gate.py)."""
    from cube_kernels.triton_ops.update import _update_bwd_dh_kernel, _update_bwd_dw_kernel, _update_fwd_kernel
    lattice = harness.Lattice(1, 2, 4, 33)  # 264 rows: more than any config's row block
    fast_in, ref_in = harness.leaves(harness.update_inputs(lattice, 40, 24), torch.float32,
                                     harness.device(backend))
    for _ in harness.every_triton_config((_update_fwd_kernel, _update_bwd_dh_kernel, _update_bwd_dw_kernel)):
        harness.check_op(backend, harness.ops(backend).update, reference.update, fast_in, ref_in,
                         (SEED, STEP, 0.5), NAMES)
