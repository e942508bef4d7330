"""One lattice step of every implementation (harness.STEP_IMPLS: the fused step on each backend)
against cube_kernels.reference.step: values and every gradient, gradcheck, autocast, and the
fused ops composed under torch.compile."""
from __future__ import annotations

import pytest
import torch

import harness
from cube_kernels import reference
from cube_kernels.spec import PARAM_NAMES

C, F = 13, 19
# (lattice, neighbourhood, boundary, fire_rate, alive_channel)
CASES = [(harness.Lattice(2, 2, 3, 5), "von_neumann", "zero", 1.0, None),
         (harness.Lattice(2, 3, 4, 2), "moore", "periodic", 0.5, None),
         (harness.Lattice(2, 1, 1, 1), "von_neumann", "periodic", 0.0, None),
         (harness.Lattice(2, 4, 3, 3), "moore", "zero", 0.5, 2),
         (harness.Lattice(2, 4, 4, 3), "von_neumann", "periodic", 1.0, 0)]


def _inputs(case, dev, dtype=torch.float32):
    lattice, neighbourhood, boundary, fire_rate, alive_channel = case
    params = harness.random_params(C, F, neighbourhood, dtype=torch.float64)
    x = harness.randn(*lattice.shape, C, seed=4)
    if alive_channel is not None:  # some cells dead, some alive
        x[..., alive_channel] = torch.rand(lattice.shape, generator=torch.Generator().manual_seed(5)) * 0.3
    kw = dict(seed=11, step=3, neighbourhood=neighbourhood, boundary=boundary, fire_rate=fire_rate,
              alive_channel=alive_channel)
    names = ("x",) + PARAM_NAMES
    fast, ref = harness.leaves([x] + [params[n] for n in PARAM_NAMES], dtype, dev)
    return names, fast, ref, kw


def _run(step_fn, leaves, kw):
    return step_fn(leaves[0], dict(zip(PARAM_NAMES, leaves[1:])), **kw)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-fire{c[3]}-alive{c[4]}")
@pytest.mark.parametrize("impl", harness.step_params())
def test_matches_reference(impl, case):
    names, fast, ref, kw = _inputs(case, harness.device(impl.backend))
    out, out_ref = _run(impl.step, fast, kw), _run(reference.step, ref, kw)
    harness.assert_close(out, out_ref, torch.float32, "x_new")
    grad = harness.randn(*out.shape, seed=9)
    grads = torch.autograd.grad(out, fast, grad.float().to(out.device))
    grads_ref = torch.autograd.grad(out_ref, ref, grad)
    for name, g, g_ref in zip(names, grads, grads_ref):
        # a gradient runs through two LayerNorm backwards: 1e-5 of the output scale is too tight
        torch.testing.assert_close(g.cpu(), g_ref.float(), atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "zero"), ("moore", "periodic")])
@pytest.mark.parametrize("impl", harness.step_params())
def test_gradcheck_float64(impl, neighbourhood, boundary):
    params = harness.random_params(3, 4, neighbourhood, dtype=torch.float64)
    x = harness.randn(1, 2, 2, 3, 3, seed=1)
    leaves, _ = harness.leaves([x] + [params[n] for n in PARAM_NAMES], torch.float64,
                               harness.device(impl.backend))
    kw = dict(seed=2, step=1, neighbourhood=neighbourhood, boundary=boundary, fire_rate=0.5)
    assert torch.autograd.gradcheck(lambda *t: _run(impl.step, t, kw), leaves,
                                    fast_mode=impl.backend == "triton")


@pytest.mark.parametrize("impl", harness.step_params())
def test_bf16_autocast_step_close_to_reference(impl):
    dev = harness.device(impl.backend)
    params = {n: p.float().to(dev) for n, p in harness.random_params(16, 32).items()}
    x = harness.randn(2, 3, 4, 5, 16, seed=0).float().to(dev)
    kw = dict(seed=1, step=0, neighbourhood="von_neumann", boundary="zero", fire_rate=0.5)
    ref = reference.step(x, params, **kw)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        out = impl.step(x, params, **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("backend", harness.backend_params())
def test_fused_ops_compile_fullgraph(backend):
    """gather_gate and update traced by torch.compile(fullgraph=True), forward and backward."""
    k, dev = harness.ops(backend), harness.device(backend)

    def step(u, vn, w_sp, b_sp, x, w_out, b_out):
        h = k.gather_gate(u, vn, w_sp, b_sp, "moore", "periodic")
        return k.update(x, h, w_out, b_out, 3, 1, 0.5)

    lattice = harness.Lattice(1, 2, 3, 2)
    gg, _ = harness.leaves(harness.gather_gate_inputs(lattice, 4, "moore"), torch.float32, dev)
    (x, _, w_out, b_out), _ = harness.leaves(harness.update_inputs(lattice, 4, 5), torch.float32, dev)
    inputs = [*gg, x, w_out, b_out]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    grad = torch.randn(x.shape, device=dev)
    out = step(*inputs)
    out_c = compiled(*inputs)
    assert torch.equal(out_c, out)
    for g_c, g in zip(torch.autograd.grad(out_c, inputs, grad), torch.autograd.grad(out, inputs, grad)):
        assert torch.equal(g_c, g)

