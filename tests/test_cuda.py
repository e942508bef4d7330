"""The CUDA kernels (csrc/cuda) against cube_kernels.reference: every op and gradient, the fire
mask bit for bit, gradcheck in float64, determinism and the input checks.

Skipped unless a GPU is visible and cube_kernels._C was built with CUDA
(``FORCE_CUDA=1 pip install --no-build-isolation .``). Run: ``pytest tests/test_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch

from cube_kernels import reference
from cube_kernels.neighbourhood import BOUNDARIES, NEIGHBOURHOODS, num_tokens
from cube_kernels.philox import fire_mask

OPS = ("gather_gate", "gather_gate_backward", "update", "update_backward")


def _cuda_kernels_registered() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cube_kernels._C  # noqa: F401  (registers torch.ops.cube)
    except ImportError:
        return False
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"cube::{op}", "CUDA") for op in OPS)


pytestmark = pytest.mark.skipif(
    not _cuda_kernels_registered(),
    reason="needs a CUDA GPU and cube_kernels._C built with CUDA (FORCE_CUDA=1)")

DEV = "cuda"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Max abs error allowed, relative to the largest magnitude of the float64 reference (SPEC.md:
# 1e-5 for fp32; bf16/fp16 are bounded by the rounding of the output, 2^-9 and 2^-11).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# ((B, D, H, W), F, C): a single cell, odd sizes smaller than a tile of 64 rows, and two
# 15x15x11 lattices whose 4,950 rows end mid-tile with a tile spanning both batch items. F = 40
# and C = 24 leave the last block of 32 channels partly empty; 128 and 64 are the defaults.
CASES = (((1, 1, 1, 1), 40, 24), ((2, 2, 3, 5), 40, 24), ((2, 15, 15, 11), 128, 64))
CASE_IDS = ("1x1x1", "2x3x5", "15x15x11")
FIRE_RATES = (0.0, 0.5, 1.0)
cube_ops = torch.ops.cube


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert out.device.type == "cuda", f"{name}: on {out.device}"
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= TOL[dtype] * scale, \
        f"{name}: max abs error {err:.3g} > {TOL[dtype]:g} * {scale:.3g}"


def randn(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float64) * scale).to(dtype)


def gather_gate_inputs(lattice, F, neighbourhood, dtype, seed=0):
    gen = torch.Generator(DEV).manual_seed(seed)
    K = num_tokens(neighbourhood)
    u = randn(*lattice, F, dtype=dtype, gen=gen)
    vn = randn(*lattice, F, dtype=dtype, gen=gen)
    # Weights of order one (not the near-zero init) so every neighbour visibly counts.
    w_sp = randn(K, F, dtype=dtype, gen=gen, scale=0.5)
    b_sp = randn(F, dtype=dtype, gen=gen)
    grad_h = randn(*lattice, F, dtype=dtype, gen=gen)
    return u, vn, w_sp, b_sp, grad_h


def update_inputs(lattice, F, C, dtype, seed=0):
    gen = torch.Generator(DEV).manual_seed(seed)
    x = randn(*lattice, C, dtype=dtype, gen=gen)
    h = randn(*lattice, F, dtype=dtype, gen=gen)
    w_out = randn(F, C, dtype=dtype, gen=gen, scale=F ** -0.5)
    b_out = randn(C, dtype=dtype, gen=gen)
    grad = randn(*lattice, C, dtype=dtype, gen=gen)
    return x, h, w_out, b_out, grad


def leaves(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_gate_matches_reference(dtype, neighbourhood, boundary, case):
    lattice, F, _ = case
    u, vn, w_sp, b_sp, grad_h = gather_gate_inputs(lattice, F, neighbourhood, dtype)
    h = cube_ops.gather_gate(u, vn, w_sp, b_sp, neighbourhood, boundary)
    du, dvn, dw_sp, db_sp = cube_ops.gather_gate_backward(grad_h, u, vn, w_sp, b_sp, neighbourhood,
                                                       boundary)

    ref_in = leaves(u, vn, w_sp, b_sp)
    ref_h = reference.gather_gate(*ref_in, neighbourhood, boundary)
    ref_grads = torch.autograd.grad(ref_h, ref_in, grad_h.double())
    assert_matches(h, ref_h.detach(), dtype, "h")
    for name, out, ref in zip(("du", "dvn", "dw_sp", "db_sp"), (du, dvn, dw_sp, db_sp), ref_grads):
        assert_matches(out, ref, dtype, name)


@pytest.mark.parametrize("fire_rate", FIRE_RATES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_update_matches_reference(dtype, case, fire_rate):
    lattice, F, C = case
    x, h, w_out, b_out, grad = update_inputs(lattice, F, C, dtype)
    seed, step = 2**40 + 7, 3  # a seed with a non-zero high word keys both halves of Philox
    x_new = cube_ops.update(x, h, w_out, b_out, seed, step, fire_rate)
    dh, dw_out, db_out = cube_ops.update_backward(grad, h, w_out, seed, step, fire_rate)

    ref_in = leaves(x, h, w_out, b_out)
    ref_x_new = reference.update(*ref_in, seed, step, fire_rate)
    ref_dx, ref_dh, ref_dw_out, ref_db_out = torch.autograd.grad(ref_x_new, ref_in, grad.double())
    assert torch.equal(ref_dx, grad.double()), "the reference's residual gradient is not grad"
    assert_matches(x_new, ref_x_new.detach(), dtype, "x_new")
    assert_matches(dh, ref_dh, dtype, "dh")
    assert_matches(dw_out, ref_dw_out, dtype, "dw_out")
    assert_matches(db_out, ref_db_out, dtype, "db_out")


def _mask_through_update(device, B, lattice, seed, step, fire_rate):
    """The fire mask read off the op: x = 0, h = 0, b_out = 1 gives x_new = m exactly."""
    shape = (B, *lattice)
    x = torch.zeros(*shape, 1, device=device)
    h = torch.zeros(*shape, 1, device=device)
    w_out = torch.zeros(1, 1, device=device)
    b_out = torch.ones(1, device=device)
    out = cube_ops.update(x, h, w_out, b_out, seed, step, fire_rate)
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    return out.view(B, -1) == 1


def _mask_through_update_backward(device, B, lattice, seed, step, fire_rate):
    """The mask read off the backward op: C = F = 1, w_out = 1, grad = 1 gives dh = m."""
    shape = (B, *lattice)
    grad = torch.ones(*shape, 1, device=device)
    h = torch.zeros(*shape, 1, device=device)
    w_out = torch.ones(1, 1, device=device)
    dh, _, db_out = cube_ops.update_backward(grad, h, w_out, seed, step, fire_rate)
    mask = dh.view(B, -1) == 1
    assert db_out.item() == mask.sum().item()
    return mask


@pytest.mark.parametrize("fire_rate", (0.0, 0.1, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("seed,step", ((0, 0), (1234, 5), (2**40 + 7, 3), (2**63 - 1, 100)))
def test_fire_mask_is_bit_identical_to_philox_and_cpu(seed, step, fire_rate):
    B, lattice = 3, (5, 7, 9)
    cells = 5 * 7 * 9
    expected = fire_mask(seed, step, B, cells, fire_rate).to(DEV)
    forward = _mask_through_update(DEV, B, lattice, seed, step, fire_rate)
    backward = _mask_through_update_backward(DEV, B, lattice, seed, step, fire_rate)
    cpu = _mask_through_update("cpu", B, lattice, seed, step, fire_rate).to(DEV)
    for name, mask in (("CUDA update", forward), ("CUDA update_backward", backward),
                       ("CPU update", cpu)):
        assert torch.equal(mask, expected), f"{name}'s mask differs from philox.fire_mask"
    if 0.0 < fire_rate < 1.0:  # the mask really is stochastic here, not all or nothing
        assert 0 < int(expected.sum()) < expected.numel()


class _GatherGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, vn, w_sp, b_sp, neighbourhood, boundary):
        ctx.save_for_backward(u, vn, w_sp, b_sp)
        ctx.config = (neighbourhood, boundary)
        return cube_ops.gather_gate(u, vn, w_sp, b_sp, neighbourhood, boundary)

    @staticmethod
    def backward(ctx, grad_h):
        grads = cube_ops.gather_gate_backward(grad_h.contiguous(), *ctx.saved_tensors, *ctx.config)
        return (*grads, None, None)


class _Update(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, w_out, b_out, seed, step, fire_rate):
        ctx.save_for_backward(h, w_out)
        ctx.config = (seed, step, fire_rate)
        return cube_ops.update(x, h, w_out, b_out, seed, step, fire_rate)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dh, dw_out, db_out = cube_ops.update_backward(grad, *ctx.saved_tensors, *ctx.config)
        return grad, dh, dw_out, db_out, None, None, None


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("neighbourhood", NEIGHBOURHOODS)
def test_gather_gate_gradcheck(neighbourhood, boundary):
    inputs = leaves(*gather_gate_inputs((2, 2, 3, 3), 3, neighbourhood, torch.float64)[:4])
    assert torch.autograd.gradcheck(
        lambda *t: _GatherGate.apply(*t, neighbourhood, boundary), inputs)


@pytest.mark.parametrize("fire_rate", FIRE_RATES)
def test_update_gradcheck(fire_rate):
    inputs = leaves(*update_inputs((2, 2, 3, 3), 3, 2, torch.float64)[:4])
    assert torch.autograd.gradcheck(lambda *t: _Update.apply(*t, 99, 1, fire_rate), inputs)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_backward_is_deterministic(dtype):
    lattice, F, C = (2, 11, 15, 15), 128, 64
    u, vn, w_sp, b_sp, grad_h = gather_gate_inputs(lattice, F, "moore", dtype)
    x, h, w_out, b_out, grad = update_inputs(lattice, F, C, dtype)

    def run():
        return (cube_ops.gather_gate(u, vn, w_sp, b_sp, "moore", "periodic"),
                *cube_ops.gather_gate_backward(grad_h, u, vn, w_sp, b_sp, "moore", "periodic"),
                cube_ops.update(x, h, w_out, b_out, 5, 2, 0.5),
                *cube_ops.update_backward(grad, h, w_out, 5, 2, 0.5))

    first, again = run(), run()
    for name, a, b in zip(("h", "du", "dvn", "dw_sp", "db_sp", "x_new", "dh", "dw_out", "db_out"),
                          first, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_input_checks_name_the_argument():
    u, vn, w_sp, b_sp, grad_h = gather_gate_inputs((1, 2, 3, 4), 8, "von_neumann", torch.float32)
    x, h, w_out, b_out, grad = update_inputs((1, 2, 3, 4), 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match="w_sp must be \\[K, F\\] with K = 27"):
        cube_ops.gather_gate(u, vn, w_sp, b_sp, "moore", "zero")
    with pytest.raises(RuntimeError, match="neighbourhood must be"):
        cube_ops.gather_gate(u, vn, w_sp, b_sp, "hex", "zero")
    with pytest.raises(RuntimeError, match="boundary must be"):
        cube_ops.gather_gate_backward(grad_h, u, vn, w_sp, b_sp, "von_neumann", "reflect")
    with pytest.raises(RuntimeError, match="vn is on cpu but u is on cuda"):
        cube_ops.gather_gate(u, vn.cpu(), w_sp, b_sp, "von_neumann", "zero")
    with pytest.raises(RuntimeError, match="b_sp has dtype Double but u has Float"):
        cube_ops.gather_gate(u, vn, w_sp, b_sp.double(), "von_neumann", "zero")
    with pytest.raises(RuntimeError, match="u must be float32, float64, bfloat16 or float16"):
        cube_ops.gather_gate(u.int(), vn.int(), w_sp.int(), b_sp.int(), "von_neumann", "zero")
    strided = grad_h.transpose(1, 2).contiguous().transpose(1, 2)  # same shape, not contiguous
    for a, b in zip(cube_ops.gather_gate_backward(strided, u, vn, w_sp, b_sp, "von_neumann", "zero"),
                    cube_ops.gather_gate_backward(grad_h, u, vn, w_sp, b_sp, "von_neumann", "zero")):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="u must be a 5-D tensor"):
        cube_ops.gather_gate(u[0], vn[0], w_sp, b_sp, "von_neumann", "zero")
    with pytest.raises(RuntimeError, match="h must have the \\[B, D, H, W\\] of x"):
        cube_ops.update(x, h[:, :1], w_out, b_out, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="w_out must be \\[F, C\\]"):
        cube_ops.update_backward(grad, h, w_out.t().contiguous(), 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="fire_rate must be in \\[0, 1\\]"):
        cube_ops.update(x, h, w_out, b_out, 0, 0, 1.5)
    with pytest.raises(RuntimeError, match="seed must be >= 0"):
        cube_ops.update(x, h, w_out, b_out, -1, 0, 0.5)
    with pytest.raises(RuntimeError, match="step must be >= 0"):
        cube_ops.update_backward(grad, h, w_out, 0, -2, 0.5)
