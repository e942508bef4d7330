"""The reference itself against independent, loop-by-loop readings of SPEC.md."""
import itertools

import pytest
import torch

from cube_kernels import reference
from cube_kernels.neighbourhood import offsets
from cube_kernels.philox import fire_mask, philox_uniform


@pytest.mark.parametrize("boundary", ["zero", "periodic"])
@pytest.mark.parametrize("neighbourhood", ["von_neumann", "moore"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (3, 2, 4)])
def test_gather_gate_matches_cell_by_cell_loop(shape, neighbourhood, boundary):
    D, H, W = shape
    K, Fh = len(offsets(neighbourhood)), 3
    g = torch.Generator().manual_seed(1)
    u, vn = torch.randn(2, D, H, W, Fh, generator=g), torch.randn(2, D, H, W, Fh, generator=g)
    w_sp, b_sp = torch.randn(K, Fh, generator=g), torch.randn(Fh, generator=g)
    h = reference.gather_gate(u, vn, w_sp, b_sp, neighbourhood, boundary)
    for b, d, i, j in itertools.product(range(2), range(D), range(H), range(W)):
        gate = b_sp.clone()
        for k, (dd, dh, dw) in enumerate(offsets(neighbourhood)):
            nd, nh, nw = d + dd, i + dh, j + dw
            if boundary == "periodic":
                nd, nh, nw = nd % D, nh % H, nw % W
            elif not (0 <= nd < D and 0 <= nh < H and 0 <= nw < W):
                continue
            gate += w_sp[k] * vn[b, nd, nh, nw]
        torch.testing.assert_close(h[b, d, i, j], u[b, d, i, j] * gate)


def test_neighbourhood_offsets():
    vn, moore = offsets("von_neumann"), offsets("moore")
    assert vn[0] == moore[0] == (0, 0, 0)
    assert vn[1:] == ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))
    assert list(moore[1:]) == sorted(set(itertools.product((-1, 0, 1), repeat=3)) - {(0, 0, 0)})
    with pytest.raises(ValueError, match="neighbourhood"):
        offsets("hex")


def test_philox_matches_triton_rand_bit_for_bit():
    """Compiled on a GPU, in the interpreter (on CPU tensors) without one."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    from cube_kernels import triton_ops
    dev = "cpu" if triton_ops.interpreting() else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU, and triton was imported without TRITON_INTERPRET=1")

    @triton.jit
    def rand_kernel(out_ptr, off_ptr, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tl.rand(seed, tl.load(off_ptr + i)))

    g = torch.Generator().manual_seed(0)
    off = torch.randint(0, 2**62, (1024,), generator=g, dtype=torch.int64)
    off[:64] = torch.arange(64)  # small offsets: the hi word is zero
    for seed in (0, 7, 2**33 + 5, 2**63 - 1):
        out = torch.empty(1024, device=dev)
        rand_kernel[(1,)](out, off.to(dev), seed, N=1024)
        assert torch.equal(out.cpu(), philox_uniform(seed, off)), seed


def test_fire_mask_rate_and_dependence_on_step():
    B, N = 4, 32 * 32 * 32
    for rate in (0.1, 0.5, 0.9):
        m = fire_mask(3, 0, B, N, rate)
        assert abs(m.float().mean().item() - rate) < 0.01
    assert torch.equal(fire_mask(3, 5, B, N, 0.5), fire_mask(3, 5, B, N, 0.5))
    assert not torch.equal(fire_mask(3, 5, B, N, 0.5), fire_mask(3, 6, B, N, 0.5))
    assert not torch.equal(fire_mask(3, 5, B, N, 0.5), fire_mask(4, 5, B, N, 0.5))
    assert fire_mask(3, 0, B, N, 0.0).sum() == 0
    with pytest.raises(ValueError, match="seed"):
        philox_uniform(-1, torch.zeros(1, dtype=torch.int64))


def test_update_fire_rate_and_alive():
    x = torch.randn(2, 3, 4, 5, 6)
    h, w_out, b_out = torch.randn(2, 3, 4, 5, 7), torch.randn(7, 6), torch.randn(6)
    full = reference.update(x, h, w_out, b_out, seed=1, step=0, fire_rate=1.0)
    torch.testing.assert_close(full, x + h @ w_out + b_out)
    torch.testing.assert_close(reference.update(x, h, w_out, b_out, seed=1, step=0, fire_rate=0.0), x)
    half = reference.update(x, h, w_out, b_out, seed=1, step=0, fire_rate=0.5)
    m = fire_mask(1, 0, 2, 60, 0.5).view(2, 3, 4, 5, 1)
    torch.testing.assert_close(half, torch.where(m, full, x))
    h[..., 0] = float("inf")  # every update is Inf or NaN: the cells that do not fire keep x exactly
    x[..., 1] = -0.0
    half = reference.update(x, h, w_out, b_out, seed=1, step=0, fire_rate=0.5)
    keep = ~m.expand_as(x)
    assert torch.equal(half[keep].view(torch.int32), x[keep].view(torch.int32))
    assert not half[~keep].isfinite().any()
    a = torch.zeros(1, 3, 3, 3, 2)
    a[0, 0, 0, 0, 1] = 1.0
    alive = reference.alive(a, channel=1)
    assert alive[0, :2, :2, :2].all() and alive.sum() == 8
