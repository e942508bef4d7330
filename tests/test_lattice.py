"""CubeLattice and GMLPCell: rollouts of every backend against the reference backend, the
parameter count, torch.compile, memory over many optimizer steps, input errors and the choice
of backend."""
import resource

import pytest
import torch

import harness
from cube_kernels import CubeLattice, GMLPCell, backends


def test_default_cell_has_the_spec_parameter_count():
    cell = GMLPCell()
    assert sum(p.numel() for p in cell.parameters()) == 26_304
    assert cell.w_sp.abs().max() <= 1e-3 and torch.equal(cell.b_sp, torch.ones(128))


def _rollout_and_grads(lattice, x, surface):
    lattice.zero_grad()
    y = lattice(x, steps=3, seed=5, inject=surface)
    y[:, -1].square().sum().backward()
    return y.detach().cpu(), [p.grad.cpu() for p in lattice.parameters()]


@pytest.mark.parametrize("impl", harness.step_params())
def test_rollout_with_injection_matches_reference_backend(impl):
    dev = harness.device(impl.backend)
    torch.manual_seed(0)
    kw = dict(channels=5, hidden=6, neighbourhood="moore", boundary="periodic", fire_rate=0.5)
    fused = CubeLattice(2, 3, 4, backend=impl.backend, **kw).to(dev)
    ref = CubeLattice(2, 3, 4, backend="reference", checkpoint=True, **kw)
    ref.load_state_dict(fused.state_dict())
    x, surface = torch.randn(2, 2, 3, 4, 5), torch.randn(2, 3, 4, 1)
    y, grads = _rollout_and_grads(fused, x.to(dev), surface.to(dev))
    y_ref, grads_ref = _rollout_and_grads(ref, x, surface)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", pytest.param("auto", marks=pytest.mark.skipif(
    harness.unavailable("cpu") is not None, reason=str(harness.unavailable("cpu"))))])
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


def test_settings_are_checked_after_construction_too():
    lattice = CubeLattice(2, 3, 4, channels=8, hidden=8, backend="reference")
    with pytest.raises(ValueError, match=r"fire_rate must be in \[0, 1\], got 2.0"):
        lattice.fire_rate = 2.0
    with pytest.raises(TypeError, match="fire_rate must be a number"):
        lattice.fire_rate = "0.5"
    lattice.fire_rate = 0.25
    assert lattice.fire_rate == 0.25


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    harness.unavailable("cpu") is not None, reason=str(harness.unavailable("cpu"))))])
def test_forward_arguments_are_checked_on_every_backend(backend):
    lattice = CubeLattice(2, 3, 4, channels=8, hidden=8, backend=backend)
    x = torch.randn(1, 2, 3, 4, 8)
    with pytest.raises(TypeError, match="steps must be a non-negative int, got True"):
        lattice(x, steps=True)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), got 18446744073709551616"):
        lattice(x, steps=1, seed=2**64)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63\), got -1"):
        lattice(x, steps=1, seed=-1)
    with pytest.raises(ValueError, match="inject is on meta but x is on cpu"):
        lattice(x, steps=1, inject=torch.zeros(1, 3, 4, 1, device="meta"))
    with pytest.raises(TypeError, match="inject must be a torch.Tensor"):
        lattice(x, steps=1, inject=[[0.0]])
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the lattice's parameters have torch.float32"):
        lattice(x.double(), steps=1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lattice(x.tolist(), steps=1)


def test_an_explicit_backend_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("CUBE_BACKEND", "reference")
    lattice = CubeLattice(2, 2, 2, channels=4, hidden=4, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' needs CUDA tensors"):
        lattice(torch.randn(1, 2, 2, 2, 4), steps=1)
    assert backends.resolve("auto", "cpu") == "reference"  # the environment decides what auto is
    monkeypatch.setenv("CUBE_BACKEND", "gpu")
    with pytest.raises(ValueError, match="CUBE_BACKEND='gpu'"):
        CubeLattice(2, 2, 2, channels=4, hidden=4)(torch.randn(1, 2, 2, 2, 4), steps=1)
    assert backends.resolve("reference", "cpu") == "reference"


@pytest.mark.parametrize("impl", harness.step_params())
def test_rollout_saves_only_each_steps_input_and_the_parameters(impl):
    """What autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks sees every
    saved tensor): the T states that enter the steps and the cell parameters, nothing 2F wide."""
    dev = harness.device(impl.backend)
    torch.manual_seed(0)
    lattice = CubeLattice(2, 3, 4, channels=5, hidden=6, fire_rate=0.5, backend=impl.backend).to(dev)
    x = torch.randn(2, 2, 3, 4, 5, device=dev, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        states = lattice(x, steps=3, seed=1, return_states=True)
    inputs = [x] + states[:-1]
    params = list(lattice.parameters())
    unexpected = [tuple(t.shape) for t in saved
                  if not any(t is s or (t.shape == s.shape and t.data_ptr() == s.data_ptr())
                             for s in inputs + params)]
    assert not unexpected, f"saved beyond the step inputs and the parameters: {unexpected}"
    assert sum(t.shape == x.shape for t in saved) == 3


@pytest.mark.parametrize("impl", harness.step_params(("cpu",)))
def test_inductor_compiles_the_fused_rollout_with_backward(impl):
    """torch.compile's default backend (inductor) traces the fused step, forward and backward."""
    torch.manual_seed(0)
    lattice = CubeLattice(2, 3, 4, channels=8, hidden=8, fire_rate=0.5, backend=impl.backend)
    x = torch.randn(2, 2, 3, 4, 8)

    def loss():
        lattice.zero_grad()
        lattice(x, steps=2, seed=3).square().sum().backward()
        return [p.grad.clone() for p in lattice.parameters()]

    eager = loss()
    compiled = torch.compile(lambda s: lattice(s, steps=2, seed=3), fullgraph=True)
    lattice.zero_grad()
    compiled(x).square().sum().backward()
    for p, g in zip(lattice.parameters(), eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
