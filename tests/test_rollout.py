"""cube::rollout (T steps with the front-face injection in one op) against the reference: forward,
every gradient (x, inject, the ten parameters), gradcheck in float64, odd lattices, both
neighbourhoods and boundaries, fp32 and bf16 (bf16 parameters and autocast), alive masking, what
it keeps for backward, and its input errors."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import harness
from cube_kernels import CubeLattice, reference
from cube_kernels.ops.rollout import rollout, rollout_states
from cube_kernels.spec import PARAM_NAMES

pytestmark = pytest.mark.skipif(harness.unavailable("cpu") is not None,
                                reason=str(harness.unavailable("cpu")))
C, F = harness.C_, harness.F_


def reference_rollout(x, inject, params, steps, *, seed, **kw):
    """The T step outputs of the reference, each step's input injected first."""
    outs = []
    for t in range(steps):
        if inject is not None:
            x = CubeLattice.inject(x, inject)
        x = reference.step(x, params, seed=seed, step=t, **kw)
        outs.append(x)
    return torch.stack(outs)


def inputs(lattice, C, F, neighbourhood, E, alive_channel=None, empty_from=None):
    """With ``alive_channel``, the alive channel is nonzero only in the first half of the
    lattice's longest axis (like bench/config.py's front half of the depth): some cells die, some
    survive. With ``empty_from``, the planes from that depth on are all zeros (empty space)."""
    x = harness.randn(*lattice.shape, C, seed=1)
    if empty_from is not None:
        x[:, empty_from:] = 0
    if alive_channel is not None:
        sizes = lattice.shape[1:]
        axis = max(range(3), key=lambda i: sizes[i])
        part = torch.arange(sizes[axis]) < (sizes[axis] + 1) // 2
        x[..., alive_channel] *= 0.3 * part.view([-1 if i == axis else 1 for i in range(3)])
    inject = harness.randn(lattice.B, lattice.H, lattice.W, E, seed=2) if E else None
    params = harness.random_params(C, F, neighbourhood, torch.float64)
    return x, inject, params


def run_and_grads(x, inject, params, steps, kw, fn):
    leaves = [x, *([inject] if inject is not None else []), *params.values()]
    outs = fn(x, inject, params, steps, seed=7, **kw)
    grad = harness.randn(*outs.shape, seed=3).to(outs.dtype)
    return outs, torch.autograd.grad(outs, leaves, grad)


def check_against_reference(dtype, lattice, neighbourhood, boundary, E, fire_rate,
                            alive_channel=None, empty_from=None):
    """Every output state and every gradient of three steps; the states, with alive masking."""
    kw = dict(neighbourhood=neighbourhood, boundary=boundary, fire_rate=fire_rate,
              alive_channel=alive_channel)
    x, inject, params = inputs(lattice, C, F, neighbourhood, E, alive_channel, empty_from)
    low_x, low_inject = (None if t is None else t.to(dtype).requires_grad_() for t in (x, inject))
    low_params = {n: p.to(dtype).requires_grad_() for n, p in params.items()}
    exact_x, exact_inject = (None if t is None else t.detach().double().requires_grad_()
                             for t in (low_x, low_inject))
    exact_params = {n: p.detach().double().requires_grad_() for n, p in low_params.items()}
    fast = lambda x, s, p, T, **k: rollout(x, s, p, T, all_states=True, **k)  # noqa: E731
    outs, grads = run_and_grads(low_x, low_inject, low_params, 3, kw, fast)
    outs_ref, grads_ref = run_and_grads(exact_x, exact_inject, exact_params, 3, kw, reference_rollout)
    # bf16/fp16: each step rounds its state and intermediates, and the gradient runs back
    # through all of them: the step tolerance per step.
    tol = harness.STEP_TOLERANCE[dtype] * (1 if dtype == torch.float32 else 3)
    harness.assert_close(outs, outs_ref, dtype, "states", rel=tol)
    names = ["x"] + (["inject"] if E else []) + list(PARAM_NAMES)
    for name, g, g_ref in zip(names, grads, grads_ref):
        harness.assert_close(g, g_ref, dtype, f"d{name}", rel=tol)
    return outs


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("dtype,lattice", harness.cases())
@pytest.mark.parametrize("E", [0, 2])
def test_matches_reference(dtype, lattice, neighbourhood, boundary, E):
    """Three steps with half the cells firing."""
    check_against_reference(dtype, lattice, neighbourhood, boundary, E, fire_rate=0.5)


# Deeper than one chunk of planes of the fused cell (csrc/cpu/cell.cpp: batch 1 splits D into up
# to 4 chunks of >= 4 planes, batch 3 into 2), so chunks meet and recompute their halo planes;
# planes of 39 and 10 cells, no multiple of any tile.
DEEP = (harness.Lattice(1, 13, 3, 13), harness.Lattice(3, 9, 2, 5))


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("lattice", DEEP, ids=str)
@pytest.mark.parametrize("fire_rate", [1.0, 0.5])
def test_deep_lattices_match_reference(lattice, neighbourhood, boundary, fire_rate):
    check_against_reference(torch.float32, lattice, neighbourhood, boundary, 1, fire_rate)


# Planes of more than 1,024 cells, which the fused cell cuts into bands of rows that read each
# other's edge rows (csrc/cpu/cell.cpp, bands_per_plane): 37 rows in four bands of 9, 9, 9 and
# 10, and 2 rows of 600 in two bands of one row, whose halo rows above and below are the same row.
WIDE = (harness.Lattice(1, 3, 37, 29), harness.Lattice(2, 2, 2, 600))


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("lattice", WIDE, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_planes_match_reference(dtype, lattice, neighbourhood, boundary):
    check_against_reference(dtype, lattice, neighbourhood, boundary, 1, fire_rate=0.5)


# The bf16 micro-kernel reads K in pairs: bf16 states run their activation GEMMs on it where C
# and F are even (csrc/cpu/cell.h, bf16_gemm_for; on a CPU with AVX512-BF16), which the odd C, F
# of the other tests never are. Even, but not multiples of a vector width; one band and four.
# B is packed in blocks of 64 columns (csrc/cpu/cell.cpp, kBlockN): C = 66 and 2F = 72 take a
# full block and a padded one.
EVEN = ((14, 10), (66, 36))


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("lattice", harness.SMALL + WIDE[:1], ids=str)
@pytest.mark.parametrize("C,F", EVEN, ids=str)
def test_bf16_micro_kernel_matches_reference(C, F, lattice, neighbourhood, boundary):
    """Three steps with half the cells firing, bf16 states. Each gradient within the bf16 step
    tolerance of float64 or, where three steps amplify the GEMM inputs' roundings beyond it (the
    wide plane's dx and dinject, Moore periodic: 4% and 9%), no further from float64 than the
    reference itself run in bf16 (10% and 27% there)."""
    kw = dict(neighbourhood=neighbourhood, boundary=boundary, fire_rate=0.5)
    x, inject, params = inputs(lattice, C, F, neighbourhood, 2)
    low = [t.to(torch.bfloat16) for t in (x, inject, *params.values())]

    def run(fn, dtype):
        x, inject, *ps = (t.to(dtype).requires_grad_() for t in low)
        return run_and_grads(x, inject, dict(zip(params, ps)), 3, kw, fn)

    outs, grads = run(lambda *a, **k: rollout(*a, all_states=True, **k), torch.bfloat16)
    outs_ref, grads_ref = run(reference_rollout, torch.float64)
    _, grads_low = run(reference_rollout, torch.bfloat16)
    tol = harness.STEP_TOLERANCE[torch.bfloat16] * 3  # as check_against_reference's
    harness.assert_close(outs, outs_ref, torch.bfloat16, "states", rel=tol)
    for name, g, g_ref, g_low in zip(["x", "inject", *PARAM_NAMES], grads, grads_ref, grads_low):
        low_err = ((g_low.double() - g_ref).abs().max() / g_ref.abs().max()).item()
        harness.assert_close(g, g_ref, torch.bfloat16, f"d{name}", rel=max(tol, low_err))


# The alive channel is 1: the injection (E=2) overwrites it on the front face.
ALIVE_LATTICES = (harness.Lattice(2, 13, 1, 3), harness.Lattice(1, 2, 13, 4))


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("lattice", ALIVE_LATTICES, ids=str)
@pytest.mark.parametrize("fire_rate", [1.0, 0.5])
@pytest.mark.parametrize("E", [0, 2])
def test_alive_masking_matches_reference(lattice, neighbourhood, boundary, fire_rate, E):
    outs = check_against_reference(torch.float32, lattice, neighbourhood, boundary, E, fire_rate,
                                   alive_channel=1)
    dead = (outs == 0).all(-1)
    assert dead.any() and not dead.all(), "the test needs both dead and living cells"


# The planes the op skips (csrc/cpu/rollout.cpp, "Skipping quiet planes"): with alive masking,
# those whose neighbourhood holds only zeros; backward, those whose neighbourhood's output
# gradient is 0. Batch 2 of 13 planes: two chunks per item, so a chunk can be quiet in part.
QUIET = harness.Lattice(2, 13, 3, 2)


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_planes_match_reference(dtype, neighbourhood, boundary):
    """Growth's lattice: the planes from 7 on are empty, the alive channel nonzero up to 6."""
    outs = check_against_reference(dtype, QUIET, neighbourhood, boundary, 0, 0.5, alive_channel=1,
                                   empty_from=7)
    assert (outs[:, :, 10:] == 0).all() and outs[:, :, :7].ne(0).any()


@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "periodic"), ("moore", "zero")])
def test_gradcheck_float64_with_empty_planes(neighbourhood, boundary):
    lattice = harness.Lattice(1, 6, 2, 3)
    x, _, params = inputs(lattice, 3, 2, neighbourhood, 0, alive_channel=2, empty_from=3)
    names = list(params)

    def fn(x, *ps):
        return rollout(x, None, dict(zip(names, ps)), 2, seed=4, neighbourhood=neighbourhood,
                       boundary=boundary, fire_rate=0.7, all_states=True, alive_channel=2)

    leaves = [t.requires_grad_() for t in (x, *params.values())]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("poisoned", [False, True])
def test_a_back_face_readout_matches_reference(neighbourhood, boundary, poisoned):
    """A loss on the last state's back face only, as the trainer's readout: going back step by
    step, the gradient is 0 on the planes it has not reached, whose terms the backward skips.
    Poisoned: an Inf in plane 3's state spreads NaN over planes 0-6 where the gradient is 0, which
    makes the reference's dw_out NaN (h^T d_delta: NaN * 0), and the op must compute those planes
    to agree (gradient by gradient: where in dx the NaNs land differs between the two)."""
    x, inject, params = inputs(QUIET, C, F, neighbourhood, 2)
    if poisoned:
        x[1, 3, 1, 1, 3] = float("inf")
    kw = dict(neighbourhood=neighbourhood, boundary=boundary, fire_rate=0.5, seed=7)
    weight = harness.randn(QUIET.B, QUIET.H, QUIET.W, C, seed=3)
    grads = []
    for fn in (lambda *a: rollout(*a, all_states=True, **kw), lambda *a: reference_rollout(*a, **kw)):
        leaves = [t.clone().requires_grad_() for t in (x, inject, *params.values())]
        outs = fn(leaves[0], leaves[1], dict(zip(params, leaves[2:])), 3)
        grads.append(torch.autograd.grad((outs[-1, :, -1] * weight).sum(), leaves))
    for name, g, g_ref in zip(["x", "inject", *PARAM_NAMES], *grads):
        if poisoned:
            assert g.isnan().any() == g_ref.isnan().any(), f"d{name}"
        else:
            harness.assert_close(g, g_ref, torch.float64, f"d{name}")
    assert grads[0][PARAM_NAMES.index("w_out") + 2].isnan().any() == poisoned


class BackwardGrads(TorchDispatchMode):
    """Records the shape of the gradient each cube::rollout_backward call gets."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.cube.rollout_backward.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("alive_channel", [None, 1])
@pytest.mark.parametrize("read", [[1, 3], [0, 2], [3]], ids=str)
def test_the_states_read_alone_reach_the_backward_op(read, alive_channel):
    """rollout_states (and rollout without all_states, which returns the last state): autograd
    gives the states nothing read no gradient, and the backward op gets the gradients from the
    first state read on, [T', ...], instead of T stacked. The gradients are those of the stacked
    states' backward with zeros for the others, bit for bit."""
    T = 4
    x, inject, params = inputs(harness.Lattice(2, 5, 3, 4), C, F, "moore", 2, alive_channel)
    kw = dict(seed=7, neighbourhood="moore", boundary="zero", fire_rate=0.5, alive_channel=alive_channel)
    weights = [harness.randn(*x.shape, seed=10 + t) for t in range(T)]

    def grads(states_of):
        leaves = [t.clone().requires_grad_() for t in (x, inject, *params.values())]
        states = states_of(leaves[0], leaves[1], dict(zip(params, leaves[2:])))
        with BackwardGrads() as calls:
            g = torch.autograd.grad(sum((states[t] * weights[t]).sum() for t in read), leaves)
        return g, calls.shapes

    expected, shapes = grads(lambda *a: rollout(*a, T, all_states=True, **kw))
    assert shapes == [(T, *x.shape)]
    ways = [lambda *a: rollout_states(*a, T, **kw)]
    if read == [T - 1]:
        ways.append(lambda *a: {T - 1: rollout(*a, T, all_states=False, **kw)[0]})
    for states_of in ways:
        got, shapes = grads(states_of)
        assert shapes == [(T - read[0], *x.shape)]
        for name, g, g_ref in zip(["x", "inject", *PARAM_NAMES], got, expected):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=0, msg=f"d{name}")


def test_states_that_pass_on_no_gradient_run_no_backward():
    """A state read through an op whose gradient is None: the rollout's parameters get none,
    and the backward op is not called."""
    class Cut(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return a.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    x, inject, params = inputs(harness.Lattice(1, 3, 3, 4), C, F, "moore", 2)
    params = {n: p.clone().requires_grad_() for n, p in params.items()}
    states = rollout_states(x, inject, params, 3, seed=1, neighbourhood="moore", boundary="zero",
                            fire_rate=1.0)
    with BackwardGrads() as calls:
        (dw_in,) = torch.autograd.grad(Cut.apply(states[-1]).sum(), [params["w_in"]], allow_unused=True)
    assert dw_in is None and not calls.shapes


def test_the_backward_leaves_the_incoming_gradient_as_it_was():
    """With alive masking the backward scales the last step's gradient by its mask: on a copy of
    its own, not in the caller's tensor."""
    x, inject, params = inputs(harness.Lattice(1, 5, 3, 4), C, F, "moore", 2, alive_channel=1)
    ps, cfg = list(params.values()), (7, "moore", "zero", 0.5, 1, 0.1)
    outs, keep = torch.ops.cube.rollout(x, inject, *ps, 3, *cfg, True)
    assert not keep[-1].all()  # some cells of the last step are masked
    grad = harness.randn(*outs.shape, seed=3)
    before = grad.clone()
    torch.ops.cube.rollout_backward(grad, x, outs, keep, inject, *ps, *cfg)
    torch.testing.assert_close(grad, before, rtol=0, atol=0)


def test_non_finite_weights_leave_no_plane_skipped():
    """A quiet plane's output is 0 only for finite weights: with a NaN bias every firing cell's
    update is NaN, and the empty planes turn NaN (NaN * 0) as in the reference."""
    x, _, params = inputs(QUIET, C, F, "moore", 0, alive_channel=1, empty_from=7)
    params["b_out"][0] = float("nan")
    kw = dict(neighbourhood="moore", boundary="zero", fire_rate=1.0, alive_channel=1, seed=7)
    out = rollout(x, None, params, 2, all_states=True, **kw)
    torch.testing.assert_close(out, reference_rollout(x, None, params, 2, **kw), equal_nan=True)
    assert out[:, :, 10:].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_nan_in_a_block_kills_it_as_max_pool3d_does(dtype):
    """SPEC's alive() is max_pool3d(...) > t, and max_pool3d lets a NaN win its block: the cells
    whose block holds the NaN die (their state times 0) even where a neighbour is above t. With the
    von Neumann stencil the NaN reaches only the face neighbours in one step, so the block's
    corners show the rule: dead, and 0, not NaN."""
    lattice = harness.Lattice(1, 4, 5, 6)
    x, inject, params = inputs(lattice, C, F, "von_neumann", 0, alive_channel=1)
    x[..., 1] = 0.5  # every block alive but the NaN's
    x[0, 2, 2, 3, 1] = float("nan")
    x, params = x.to(dtype), {n: p.to(dtype) for n, p in params.items()}
    kw = dict(neighbourhood="von_neumann", boundary="zero", fire_rate=1.0, alive_channel=1, seed=7)
    out = rollout(x, None, params, 1, all_states=True, **kw)[0]
    ref = reference_rollout(x, None, params, 1, **kw)[0]
    torch.testing.assert_close(out, ref, equal_nan=True)
    assert (out[0, 1:4, 1:4, 2:5] == 0).all(-1).sum() == 27 - 7  # the block but the NaN and its faces
    assert out[0, 2, 2, 3].isnan().all()


@pytest.mark.parametrize("lattice", [DEEP[1], WIDE[0]], ids=str)
@pytest.mark.parametrize("dtype,channels", [(torch.float32, (C, F)), (torch.bfloat16, EVEN[1])],
                         ids=["float32", "bfloat16-even"])
def test_results_do_not_depend_on_the_thread_count(lattice, dtype, channels):
    """Forward and every gradient bit for bit the same on one thread and on two, with chunks of
    planes and with bands of rows (bf16 with even C, F: on the bf16 micro-kernel where it runs)."""
    kw = dict(neighbourhood="moore", boundary="periodic", fire_rate=0.5)
    x, inject, params = inputs(lattice, *channels, "moore", 1)
    x, inject = x.to(dtype).requires_grad_(), inject.to(dtype).requires_grad_()
    params = {n: p.to(dtype).requires_grad_() for n, p in params.items()}
    fn = lambda x, s, p, T, **k: rollout(x, s, p, T, all_states=True, **k)  # noqa: E731
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(run_and_grads(x, inject, params, 2, kw, fn))
    finally:
        torch.set_num_threads(threads)
    (outs1, grads1), (outs2, grads2) = results
    assert torch.equal(outs1, outs2)
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("lattice", [harness.Lattice(2, 2, 1, 3), harness.Lattice(1, 9, 2, 1)],
                         ids=str)
def test_gradcheck_float64(neighbourhood, boundary, lattice):
    x, inject, params = inputs(lattice, 3, 2, neighbourhood, 1)
    names = list(params)

    def fn(x, inject, *ps):
        return rollout(x, inject, dict(zip(names, ps)), 2, seed=4, neighbourhood=neighbourhood,
                       boundary=boundary, fire_rate=0.7, all_states=True)

    leaves = [t.requires_grad_() for t in (x, inject, *params.values())]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "periodic"), ("moore", "zero")])
def test_gradcheck_float64_with_alive_masking(neighbourhood, boundary):
    """Alphas of 0 or at least 0.3 (the threshold is 0.1): gradcheck's perturbation of 1e-6 moves
    no cell across it, so the masks are constant where the gradient is checked."""
    lattice = harness.Lattice(1, 4, 2, 3)
    x, inject, params = inputs(lattice, 3, 2, neighbourhood, 1)
    x[..., 2] = torch.tensor([0.0, 0.5]).repeat_interleave(12).view(lattice.shape)
    names = list(params)

    def fn(x, inject, *ps):
        return rollout(x, inject, dict(zip(names, ps)), 2, seed=4, neighbourhood=neighbourhood,
                       boundary=boundary, fire_rate=0.7, all_states=True, alive_channel=2)

    leaves = [t.requires_grad_() for t in (x, inject, *params.values())]
    dead = (fn(*leaves) == 0).all(-1)
    assert dead.any() and not dead.all()
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels", [(C, F), *EVEN], ids=["odd", "even", "even-blocks"])
def test_bf16_autocast_lattice_keeps_fp32_gradients_close(channels):
    """Under autocast the lattice runs the op in bf16 on fp32 master weights: the states are bf16
    values, the weight gradients fp32 and within the bf16 step tolerance of float64 (even C, F:
    on the bf16 micro-kernel where it runs)."""
    torch.manual_seed(0)
    kw = dict(channels=channels[0], hidden=channels[1], neighbourhood="moore", boundary="zero",
              fire_rate=0.5)
    fast = CubeLattice(2, 3, 13, backend="cpu", **kw)
    exact = CubeLattice(2, 3, 13, backend="reference", **kw).double()
    for p, q in zip(fast.parameters(), harness.random_params(*channels, "moore").values()):
        p.data.copy_(q)
    exact.load_state_dict(fast.state_dict())
    x = torch.randn(2, 2, 3, 13, channels[0])
    surface = torch.randn(2, 3, 13, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x, steps=3, seed=2, inject=surface)
    y_ref = exact(x.double(), steps=3, seed=2, inject=surface.double())
    assert y.dtype == torch.float32 and torch.equal(y, y.bfloat16().float())
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g.double()).sum().backward()
    tol = harness.STEP_TOLERANCE[torch.bfloat16] * 3  # per step, as in test_matches_reference
    harness.assert_close(y, y_ref, torch.float32, "states", rel=tol)
    for (name, p), q in zip(fast.named_parameters(), exact.parameters()):
        assert p.grad.dtype == torch.float32
        harness.assert_close(p.grad, q.grad, torch.float32, f"d{name}", rel=tol)


def test_a_non_finite_injection_leaves_the_front_face_computed():
    """The backward reads the front face's injected channels from `inject`, not from the state:
    with an Inf there and the gradient 0 on the front face (one step, a back-face loss), the
    reference's dw_out is NaN (h^T d_delta: NaN * 0), so the op must not skip that face."""
    x, inject, params = inputs(QUIET, C, F, "von_neumann", 2)
    inject[1, 1, 1, 0] = float("inf")
    kw = dict(neighbourhood="von_neumann", boundary="zero", fire_rate=1.0, seed=7)
    weight = harness.randn(QUIET.B, QUIET.H, QUIET.W, C, seed=3)
    for fn in (lambda *a: rollout(*a, all_states=True, **kw), lambda *a: reference_rollout(*a, **kw)):
        w_out = params["w_out"].clone().requires_grad_()
        outs = fn(x, inject, dict(params, w_out=w_out), 1)
        (dw_out,) = torch.autograd.grad((outs[-1, :, -1] * weight).sum(), [w_out])
        assert dw_out.isnan().any()


def test_saves_the_states_only_and_nothing_without_grad_or_in_inference_mode():
    x, inject, params = inputs(harness.Lattice(2, 2, 3, 4), 5, 6, "von_neumann", 1)
    params = {n: p.float().requires_grad_() for n, p in params.items()}
    x, inject = x.float(), inject.float()
    kw = dict(seed=1, neighbourhood="von_neumann", boundary="zero", fire_rate=0.5)
    modes = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}
    for mode, all_states, T in (("grad", False, 3), ("no_grad", False, 3), ("no_grad", True, 3),
                                ("inference", False, 3)):
        saved = []
        with modes[mode](), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            outs = rollout(x, inject, params, T, all_states=all_states, **kw)
        assert outs.shape == ((T if all_states else 1), *x.shape)
        states = [t for t in saved if not any(t is p for p in params.values())]
        if mode != "grad":
            assert not saved
        else:  # x, inject and the T step outputs: T + 1 states of C values per cell
            assert sum(t.numel() for t in states) == (T + 1) * x.numel() + inject.numel()
    last = rollout(x, inject, params, 3, all_states=False, **kw)
    torch.testing.assert_close(last, outs[-1:], rtol=0, atol=0)


@pytest.mark.parametrize("alive_channel", [None, 1])
@pytest.mark.parametrize("shape", [(1, 2, 0, 3), (0, 2, 3, 3)], ids=str)
def test_empty_lattice(shape, alive_channel):
    """No cells: empty states, an empty state gradient and zero weight gradients."""
    x, _, params = inputs(harness.Lattice(*shape), 5, 6, "von_neumann", 0)
    x = x.float().requires_grad_()
    params = {n: p.float().requires_grad_() for n, p in params.items()}
    outs = rollout(x, None, params, 2, all_states=True, seed=1, neighbourhood="von_neumann",
                   boundary="zero", fire_rate=1.0, alive_channel=alive_channel)
    assert outs.shape == (2, *x.shape)
    grads = torch.autograd.grad(outs.sum(), [x, *params.values()])
    assert grads[0].shape == x.shape
    assert all(not g.any() for g in grads[1:])


def test_bad_input_is_named():
    x, inject, params = inputs(harness.Lattice(1, 2, 3, 4), 5, 6, "von_neumann", 1)
    kw = dict(seed=1, neighbourhood="von_neumann", boundary="zero", fire_rate=1.0, all_states=True)
    with pytest.raises(ValueError, match="inject must be"):
        rollout(x, inject[:, :2], params, 2, **kw)
    with pytest.raises(ValueError, match="steps must be"):
        rollout(x, inject, params, 0, **kw)
    with pytest.raises(TypeError, match="w_out has dtype"):
        rollout(x, inject, dict(params, w_out=params["w_out"].float()), 2, **kw)
    with pytest.raises(ValueError, match="w_sp must have shape"):
        rollout(x, inject, dict(params, w_sp=params["w_sp"][:3]), 2, **kw)
    with pytest.raises(ValueError, match="neighbourhood"):
        rollout(x, inject, params, 2, **dict(kw, neighbourhood="hex"))
    # the C++ checks, behind the Python ones
    with pytest.raises(ValueError, match="inject must be"):
        torch.ops.cube.rollout(x, inject[:, :2], *params.values(), 2, 1, "von_neumann", "zero", 1.0,
                               None, 0.1, True)
    with pytest.raises(TypeError, match="x must be float32"):
        torch.ops.cube.rollout(x.long(), inject, *params.values(), 2, 1, "von_neumann", "zero", 1.0,
                               None, 0.1, True)


def test_bad_alive_channel_is_named():
    x, inject, params = inputs(harness.Lattice(1, 2, 3, 4), 5, 6, "von_neumann", 1)
    kw = dict(seed=1, neighbourhood="von_neumann", boundary="zero", fire_rate=1.0, all_states=True)
    with pytest.raises(ValueError, match=r"alive_channel must be in \[0, 5\)"):
        rollout(x, inject, params, 2, alive_channel=5, **kw)
    with pytest.raises(ValueError, match=r"alive_channel must be in \[0, 5\)"):
        rollout(x, inject, params, 2, alive_channel=-1, **kw)
    with pytest.raises(TypeError, match="alive_channel must be None or an int"):
        rollout(x, inject, params, 2, alive_channel=1.0, **kw)
    with pytest.raises(TypeError, match="alive_threshold must be a number"):
        rollout(x, inject, params, 2, alive_channel=1, alive_threshold="0.1", **kw)
    # the C++ checks, behind the Python ones
    ps, cfg = list(params.values()), (1, "von_neumann", "zero", 1.0)
    with pytest.raises(ValueError, match=r"alive_channel must be None or in \[0, 5\), got 5"):
        torch.ops.cube.rollout(x, inject, *ps, 2, *cfg, 5, 0.1, True)
    outs, keep = torch.ops.cube.rollout(x, inject, *ps, 2, *cfg, 1, 0.1, True)
    with pytest.raises(ValueError, match="keep .* is required with alive_channel"):
        torch.ops.cube.rollout_backward(outs, x, outs, None, inject, *ps, *cfg, 1, 0.1)
    with pytest.raises(ValueError, match=r"keep must be \[T, B, D, H, W\]"):
        torch.ops.cube.rollout_backward(outs, x, outs, keep[:1], inject, *ps, *cfg, 1, 0.1)
    for grad in (outs[:0], torch.cat([outs, outs[:1]]), outs[:, :, :1]):
        with pytest.raises(ValueError, match=r"grad must be \[T', \*x.shape\] with 1 <= T' <= T = 2"):
            torch.ops.cube.rollout_backward(grad, x, outs, keep, inject, *ps, *cfg, 1, 0.1)


def test_saves_one_mask_per_cell_and_step_with_alive_masking():
    """The one thing kept beyond the states: a bool per cell and step; nothing without grad."""
    lattice = harness.Lattice(2, 2, 3, 4)
    x, inject, params = inputs(lattice, 5, 6, "moore", 1, alive_channel=3)
    params = {n: p.float().requires_grad_() for n, p in params.items()}
    x, inject = x.float(), inject.float()
    kw = dict(seed=1, neighbourhood="moore", boundary="zero", fire_rate=0.5, alive_channel=3)
    for grad in (True, False):
        saved = []
        with torch.set_grad_enabled(grad), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t) or t, lambda t: t):
            rollout(x, inject, params, 3, all_states=False, **kw)
        masks = [t for t in saved if t.dtype == torch.bool]
        if grad:
            assert len(masks) == 1 and masks[0].shape == (3, *lattice.shape)
        else:
            assert not saved
