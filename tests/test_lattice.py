"""CubeLattice and the fused step against the reference, end to end."""
import resource

import pytest
import torch

from conftest import random_params, requires_ext
from cube_kernels import CubeLattice, GMLPCell, fused_step, reference
from cube_kernels.step import PARAM_NAMES


def test_default_cell_has_the_spec_parameter_count():
    cell = GMLPCell()
    assert sum(p.numel() for p in cell.parameters()) == 26_304
    assert cell.w_sp.abs().max() <= 1e-3 and torch.equal(cell.b_sp, torch.ones(128))


def _step_and_grads(step_fn, x, params):
    x = x.clone().requires_grad_()
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = step_fn(x, params)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    (out * weight).sum().backward()
    return out, [x.grad] + [params[n].grad for n in PARAM_NAMES]


CASES = [((2, 3, 5), "von_neumann", "zero", 1.0, None),
         ((3, 4, 2), "moore", "periodic", 0.5, None),
         ((1, 1, 1), "von_neumann", "periodic", 0.0, None),
         ((4, 3, 3), "moore", "zero", 0.5, 2),
         ((4, 4, 3), "von_neumann", "periodic", 1.0, 0)]


@requires_ext
@pytest.mark.parametrize("shape,neighbourhood,boundary,fire_rate,alive_channel", CASES)
def test_fused_cpu_step_matches_reference(shape, neighbourhood, boundary, fire_rate, alive_channel):
    C, F = 13, 19
    params = random_params(C, F, neighbourhood)
    x = torch.randn(2, *shape, C, generator=torch.Generator().manual_seed(4))
    if alive_channel is not None:  # some cells dead, some alive
        x[..., alive_channel] = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(5)) * 0.3
    kw = dict(seed=11, step=3, neighbourhood=neighbourhood, boundary=boundary, fire_rate=fire_rate,
              alive_channel=alive_channel)
    ref, ref_grads = _step_and_grads(lambda s, p: reference.step(s, p, **kw), x, params)
    out, grads = _step_and_grads(lambda s, p: fused_step(s, p, backend="cpu", **kw), x, params)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for name, g, r in zip(("x",) + PARAM_NAMES, grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@requires_ext
@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "zero"), ("moore", "periodic")])
def test_fused_cpu_step_gradcheck_float64(neighbourhood, boundary):
    C, F = 3, 4
    params = random_params(C, F, neighbourhood, dtype=torch.float64)
    names = list(PARAM_NAMES)
    x = torch.randn(1, 2, 2, 3, C, dtype=torch.float64, requires_grad=True)
    leaves = [params[n].clone().requires_grad_() for n in names]

    def f(x, *ps):
        return fused_step(x, dict(zip(names, ps)), backend="cpu", seed=2, step=1, neighbourhood=neighbourhood,
                          boundary=boundary, fire_rate=0.5)

    assert torch.autograd.gradcheck(f, (x, *leaves))


@requires_ext
def test_bf16_autocast_step_close_to_reference():
    C, F = 16, 32
    params = random_params(C, F)
    x = torch.randn(2, 3, 4, 5, C)
    kw = dict(seed=1, step=0, neighbourhood="von_neumann", boundary="zero", fire_rate=0.5)
    ref = reference.step(x, params, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_step(x, params, backend="cpu", **kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)


@requires_ext
def test_rollout_with_injection_matches_reference_backend():
    torch.manual_seed(0)
    fused = CubeLattice(3, 4, 5, channels=8, hidden=12, fire_rate=0.5, backend="cpu")
    ref = CubeLattice(3, 4, 5, channels=8, hidden=12, fire_rate=0.5, backend="reference", checkpoint=True)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 4, 5, 8)
    surface = torch.randn(2, 4, 5, 1)
    outs = []
    for lattice in (fused, ref):
        lattice.zero_grad()
        y = lattice(x, steps=4, seed=5, inject=surface)
        y[:, -1].square().sum().backward()
        outs.append((y.detach(), [p.grad.clone() for p in lattice.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for g, r in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@requires_ext
def test_compiled_rollout_fullgraph_matches_eager():
    torch.manual_seed(0)
    lattice = CubeLattice(2, 3, 4, channels=8, hidden=8, fire_rate=0.5, backend="cpu")
    x = torch.randn(2, 2, 3, 4, 8)
    eager = lattice(x, steps=2, seed=3)
    compiled = torch.compile(lambda s: lattice(s, steps=2, seed=3), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager)


@pytest.mark.parametrize("backend", ["reference", pytest.param("auto", marks=requires_ext)])
def test_200_optimizer_steps_run_with_flat_memory(backend):
    torch.manual_seed(0)
    lattice = CubeLattice(4, 4, 4, channels=8, hidden=8, fire_rate=0.5, backend=backend)
    opt = torch.optim.AdamW(lattice.parameters(), lr=1e-3)
    x0 = torch.randn(2, 4, 4, 4, 8)
    rss = []
    for i in range(200):
        opt.zero_grad()
        loss = lattice(x0, steps=3).square().mean()
        loss.backward()
        opt.step()
        if i in (20, 199):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert torch.isfinite(loss)
    assert rss[1] - rss[0] < 20 * 1024, f"peak RSS grew by {rss[1] - rss[0]} KiB over 180 steps"


def test_bad_input_names_the_argument():
    lattice = CubeLattice(2, 3, 4, channels=8, hidden=8, backend="reference")
    with pytest.raises(ValueError, match=r"x must be a \[B, D, H, W, C\]"):
        lattice(torch.randn(2, 3, 4, 8), steps=1)
    with pytest.raises(ValueError, match="x must be"):
        lattice(torch.randn(1, 2, 3, 4, 7), steps=1)
    with pytest.raises(TypeError, match="floating-point"):
        lattice(torch.zeros(1, 2, 3, 4, 8, dtype=torch.int64), steps=1)
    with pytest.raises(ValueError, match="inject"):
        lattice(torch.randn(1, 2, 3, 4, 8), steps=1, inject=torch.randn(1, 3, 3, 1))
    with pytest.raises(ValueError, match="steps"):
        lattice(torch.randn(1, 2, 3, 4, 8), steps=-1)
    with pytest.raises(ValueError, match="fire_rate"):
        CubeLattice(fire_rate=1.5)
    with pytest.raises(ValueError, match="backend"):
        CubeLattice(backend="tpu")
    with pytest.raises(ValueError, match="depth"):
        CubeLattice(depth=0)


def test_backend_choice_and_environment_override(monkeypatch):
    lattice = CubeLattice(2, 2, 2, channels=4, hidden=4, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        lattice(torch.randn(1, 2, 2, 2, 4), steps=1)
    monkeypatch.setenv("CUBE_BACKEND", "reference")
    assert lattice(torch.randn(1, 2, 2, 2, 4), steps=1).shape == (1, 2, 2, 2, 4)
    monkeypatch.setenv("CUBE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="CUBE_BACKEND='gpu'"):
        lattice(torch.randn(1, 2, 2, 2, 4), steps=1)


def test_triton_backend_rollout_matches_reference():
    from cube_kernels import triton as triton_ops
    if not triton_ops.available():
        pytest.skip("triton is not installed")
    torch.manual_seed(0)
    fused = CubeLattice(2, 3, 4, channels=5, hidden=6, neighbourhood="moore", boundary="periodic",
                        fire_rate=0.5, backend="triton")
    ref = CubeLattice(2, 3, 4, channels=5, hidden=6, neighbourhood="moore", boundary="periodic",
                      fire_rate=0.5, backend="reference")
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 2, 3, 4, 5)
    results = []
    for lattice in (fused, ref):
        y = lattice(x, steps=2, seed=7)
        y.square().sum().backward()
        results.append((y.detach(), [p.grad for p in lattice.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for g, r in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
