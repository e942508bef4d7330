"""pytest-benchmark timings of the fused ops and one step, against the reference on the same
inputs (the default lattice, batch 8). Run with ``pytest bench --benchmark-only``; the default
test run (``pytest tests``) does not collect them. Every benchmark also checks its result
against the reference, so a fast wrong kernel fails here.

Backward benchmarks time only the backward: the fused ops' backward functions directly, the
reference's ``torch.autograd.grad`` on a graph built (and retained) outside the timed call.
"""
from __future__ import annotations

import pytest
import torch

from cube_kernels import backends, reference
from cube_kernels.neighbourhood import num_tokens
from cube_kernels.spec import PARAM_NAMES
from cube_kernels.step import fused_step

from .config import Config, make_inputs

CFG = Config()  # 11x15x15, C=64, F=128, batch 8
SEED, STEP, FIRE_RATE = 7, 3, 0.5


def _fused_backends():
    out = [("cpu", "cpu")]
    if torch.cuda.is_available():
        out += [("cuda", "cuda"), ("triton", "cuda")]
    return out


BACKENDS = [("reference", "cpu")] + _fused_backends()
IDS = [b for b, _ in BACKENDS]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _require(backend: str, device: str):
    if backend == "reference":
        return None
    try:
        backends.resolve(backend, device)
    except (RuntimeError, ImportError) as e:
        pytest.skip(str(e))
    return backends.kernels(backend)


def _close(got, want, tol=1e-4):
    got, want = got.float().cpu(), want.float().cpu()
    scale = want.abs().max().clamp_min(1e-12)
    assert ((got - want).abs().max() / scale).item() <= tol


def _gate_inputs(neighbourhood: str, device: str):
    g = torch.Generator().manual_seed(0)
    shape = (CFG.batch, CFG.depth, CFG.height, CFG.width, CFG.hidden)
    K = num_tokens(neighbourhood)
    u, vn, dh = (torch.randn(shape, generator=g).to(device) for _ in range(3))
    w_sp = (0.3 * torch.randn(K, CFG.hidden, generator=g)).to(device)
    b_sp = (1 + 0.1 * torch.randn(CFG.hidden, generator=g)).to(device)
    return u, vn, w_sp, b_sp, dh


def _update_inputs(device: str):
    g = torch.Generator().manual_seed(1)
    cells = (CFG.batch, CFG.depth, CFG.height, CFG.width)
    x = torch.randn(*cells, CFG.channels, generator=g).to(device)
    h = torch.randn(*cells, CFG.hidden, generator=g).to(device)
    w_out = (torch.randn(CFG.hidden, CFG.channels, generator=g) / CFG.hidden ** 0.5).to(device)
    b_out = (0.1 * torch.randn(CFG.channels, generator=g)).to(device)
    grad = torch.randn(*cells, CFG.channels, generator=g).to(device)
    return x, h, w_out, b_out, grad


@pytest.mark.parametrize("neighbourhood", ["von_neumann", "moore"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_gather_gate_forward(benchmark, backend, device, neighbourhood):
    k = _require(backend, device)
    u, vn, w_sp, b_sp, _ = _gate_inputs(neighbourhood, device)
    fn = reference.gather_gate if k is None else k.gather_gate

    def run():
        h = fn(u, vn, w_sp, b_sp, neighbourhood, "zero")
        _sync(device)
        return h

    h = benchmark(run)
    _close(h, reference.gather_gate(u.cpu(), vn.cpu(), w_sp.cpu(), b_sp.cpu(), neighbourhood, "zero"))


def _reference_gate_grads(u, vn, w_sp, b_sp, neighbourhood):
    leaves = [t.detach().requires_grad_(True) for t in (u, vn, w_sp, b_sp)]
    h = reference.gather_gate(*leaves, neighbourhood, "zero")
    return h, leaves


@pytest.mark.parametrize("neighbourhood", ["von_neumann", "moore"])
@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_gather_gate_backward(benchmark, backend, device, neighbourhood):
    k = _require(backend, device)
    u, vn, w_sp, b_sp, dh = _gate_inputs(neighbourhood, device)
    if k is None:
        h, leaves = _reference_gate_grads(u, vn, w_sp, b_sp, neighbourhood)

        def run():
            return torch.autograd.grad(h, leaves, dh, retain_graph=True)
    else:
        def run():
            grads = k.gather_gate_backward(dh, u, vn, w_sp, b_sp, neighbourhood, "zero")
            _sync(device)
            return grads

    grads = benchmark(run)
    h, leaves = _reference_gate_grads(u.cpu(), vn.cpu(), w_sp.cpu(), b_sp.cpu(), neighbourhood)
    for got, want in zip(grads, torch.autograd.grad(h, leaves, dh.cpu())):
        _close(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_update_forward(benchmark, backend, device):
    k = _require(backend, device)
    x, h, w_out, b_out, _ = _update_inputs(device)
    fn = reference.update if k is None else k.update

    def run():
        out = fn(x, h, w_out, b_out, SEED, STEP, FIRE_RATE)
        _sync(device)
        return out

    out = benchmark(run)
    _close(out, reference.update(x.cpu(), h.cpu(), w_out.cpu(), b_out.cpu(), SEED, STEP, FIRE_RATE))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_update_backward(benchmark, backend, device):
    k = _require(backend, device)
    x, h, w_out, b_out, grad = _update_inputs(device)

    def reference_graph(h, w_out, b_out, x):
        leaves = [t.detach().requires_grad_(True) for t in (h, w_out, b_out)]
        return reference.update(x, *leaves, SEED, STEP, FIRE_RATE), leaves

    if k is None:
        out, leaves = reference_graph(h, w_out, b_out, x)

        def run():
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)
    else:
        def run():
            grads = k.update_backward(grad, h, w_out, SEED, STEP, FIRE_RATE)
            _sync(device)
            return grads

    grads = benchmark(run)
    out, leaves = reference_graph(h.cpu(), w_out.cpu(), b_out.cpu(), x.cpu())
    for got, want in zip(grads, torch.autograd.grad(out, leaves, grad.cpu())):
        _close(got, want)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=IDS)
def test_step_forward_backward(benchmark, backend, device):
    """One whole lattice step, forward and backward, parameter gradients checked."""
    _require(backend, device)
    cfg = CFG.with_(fire_rate=FIRE_RATE)
    params, x, grad_out = make_inputs(cfg)
    params = {n: p.detach().to(device).requires_grad_(True) for n, p in params.items()}
    x, grad_out = x.to(device), grad_out.to(device)
    kw = dict(seed=SEED, step=STEP, neighbourhood=cfg.neighbourhood, boundary=cfg.boundary,
              fire_rate=cfg.fire_rate)

    def run():
        for p in params.values():
            p.grad = None
        if backend == "reference":
            out = reference.step(x, params, **kw)
        else:
            out = fused_step(x, params, backend=backend, **kw)
        out.backward(grad_out)
        _sync(device)
        return {n: params[n].grad for n in PARAM_NAMES}

    grads = benchmark(run)
    ref = {n: p.detach().cpu().requires_grad_(True) for n, p in params.items()}
    reference.step(x.cpu(), ref, **kw).backward(grad_out.cpu())
    for n in PARAM_NAMES:
        _close(grads[n], ref[n].grad, tol=1e-3)
