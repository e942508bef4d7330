"""gather_gate (neighbour gather + spatial gate) of every backend against
cube_kernels.reference.gather_gate: values and every gradient over lattices, dtypes and stencils,
gradcheck, determinism, torch.library.opcheck, strides, empty batches and the input checks."""
from __future__ import annotations

import pytest
import torch

import harness
from cube_kernels import reference

NAMES = ("u", "vn", "w_sp", "b_sp")
MEDIUM = harness.Lattice(2, 3, 4, 5)


@pytest.mark.parametrize("neighbourhood,boundary", harness.STENCILS)
@pytest.mark.parametrize("dtype,lattice", harness.cases())
@pytest.mark.parametrize("backend", harness.backend_params())
def test_matches_reference(backend, dtype, lattice, neighbourhood, boundary):
    fast_in, ref_in = harness.leaves(harness.gather_gate_inputs(lattice, harness.F_, neighbourhood),
                                     dtype, harness.device(backend))
    harness.check_op(backend, harness.ops(backend).gather_gate, reference.gather_gate, fast_in, ref_in,
                     (neighbourhood, boundary), NAMES)


@pytest.mark.parametrize("F", [32, 77])  # whole channel tiles / 32-lane blocks, then a remainder
@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "zero"), ("moore", "periodic")])
@pytest.mark.parametrize("backend", harness.backend_params(("cpu", "cuda")))
def test_channel_tiles_and_default_lattice(backend, F, neighbourhood, boundary):
    fast_in, ref_in = harness.leaves(harness.gather_gate_inputs(harness.LARGE, F, neighbourhood),
                                     torch.float32, harness.device(backend))
    harness.check_op(backend, harness.ops(backend).gather_gate, reference.gather_gate, fast_in, ref_in,
                     (neighbourhood, boundary), NAMES)


@pytest.mark.parametrize("neighbourhood,boundary", [("von_neumann", "zero"), ("moore", "periodic")])
@pytest.mark.parametrize("backend", harness.backend_params())
def test_gradcheck(backend, neighbourhood, boundary):
    # D=2 with the periodic boundary makes both d-neighbours the same cell.
    inputs, _ = harness.leaves(harness.gather_gate_inputs(harness.Lattice(1, 2, 2, 3), 3, neighbourhood),
                               torch.float64, harness.device(backend))
    op = harness.ops(backend).gather_gate
    # fast mode (random directional derivatives) keeps the Triton interpreter's share small
    assert torch.autograd.gradcheck(lambda *t: op(*t, neighbourhood, boundary), inputs,
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", harness.backend_params())
def test_backward_is_deterministic(backend):
    """Weight gradients come from fixed partial sums, no atomics: two runs agree bit for bit."""
    dev = harness.device(backend)
    u, vn, w_sp, b_sp = harness.on(harness.gather_gate_inputs(harness.SMALL[2], harness.F_, "moore"), dev)
    grad_h = harness.randn(*u.shape, seed=5).float().to(dev)
    op = harness.ops(backend).gather_gate_backward
    first = op(grad_h, u, vn, w_sp, b_sp, "moore", "periodic")
    again = op(grad_h, u, vn, w_sp, b_sp, "moore", "periodic")
    for name, a, b in zip(("du", "dvn", "dw_sp", "db_sp"), first, again):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


@pytest.mark.parametrize("backend", harness.backend_params(("cpu",)))
def test_backward_independent_of_thread_count(backend, restore_threads):
    u, vn, w_sp, b_sp = harness.on(harness.gather_gate_inputs(harness.LARGE, harness.F_, "moore"), "cpu")
    grad_h = harness.randn(*u.shape, seed=3).float()
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(harness.ops(backend).gather_gate_backward(grad_h, u, vn, w_sp, b_sp, "moore", "periodic"))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", harness.backend_params())
def test_opcheck(backend):
    """Schema, fake kernels, autograd registration and AOT dispatch of both ops."""
    dev = harness.device(backend)
    inputs, _ = harness.leaves(harness.gather_gate_inputs(harness.Lattice(1, 2, 2, 3), 3, "moore"),
                               torch.float32, dev)
    ns = torch.ops.cube_triton if backend == "triton" else torch.ops.cube
    torch.library.opcheck(ns.gather_gate.default, (*inputs, "moore", "periodic"))
    plain = [t.detach() for t in inputs]
    torch.library.opcheck(ns.gather_gate_backward.default,
                          (torch.randn_like(plain[0]), *plain, "moore", "periodic"))


@pytest.mark.parametrize("backend", harness.backend_params())
def test_non_contiguous_inputs(backend):
    dev = harness.device(backend)
    u, vn, w_sp, b_sp = harness.on(harness.gather_gate_inputs(MEDIUM, harness.F_, "von_neumann"), dev)
    u_nc = torch.cat([u, u], dim=-1)[..., ::2]  # u's values at stride 2
    u_nc.copy_(u)
    vn_nc = vn.transpose(1, 3).contiguous().transpose(1, 3)  # same values, other strides
    grad_nc = torch.randn_like(u).transpose(2, 3).contiguous().transpose(2, 3)
    assert not (u_nc.is_contiguous() or vn_nc.is_contiguous() or grad_nc.is_contiguous())
    k, args = harness.ops(backend), ("von_neumann", "zero")
    assert torch.equal(k.gather_gate(u_nc, vn_nc, w_sp, b_sp, *args), k.gather_gate(u, vn, w_sp, b_sp, *args))
    for a, b in zip(k.gather_gate_backward(grad_nc, u_nc, vn_nc, w_sp, b_sp, *args),
                    k.gather_gate_backward(grad_nc.contiguous(), u, vn, w_sp, b_sp, *args)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", harness.backend_params())
def test_empty_batch(backend):
    dev = harness.device(backend)
    u = torch.zeros(0, 2, 3, 2, 4, device=dev)
    w, b = torch.ones(7, 4, device=dev), torch.ones(4, device=dev)
    k = harness.ops(backend)
    assert k.gather_gate(u, u, w, b, "von_neumann", "zero").shape == u.shape
    du, dvn, dw, db = k.gather_gate_backward(u, u, u, w, b, "von_neumann", "zero")
    assert du.shape == dvn.shape == u.shape and not dw.any() and not db.any()


def _args(dev, **change):
    u, vn, w_sp, b_sp = harness.on(harness.gather_gate_inputs(MEDIUM, harness.F_, "von_neumann"), dev)
    args = dict(u=u, vn=vn, w_sp=w_sp, b_sp=b_sp, neighbourhood="von_neumann", boundary="zero")
    args.update({k: v(args) if callable(v) else v for k, v in change.items()})
    return args


BAD = [
    (dict(u=lambda a: a["u"][0]), ValueError, r"u must have 5 dimensions"),
    (dict(vn=lambda a: a["vn"][:, :2]), ValueError, r"vn must have shape \(2, 3, 4, 5, 19\)"),
    (dict(w_sp=lambda a: torch.zeros_like(a["w_sp"][:, :-1])), ValueError, r"w_sp must have shape \(7, 19\)"),
    (dict(neighbourhood="moore"), ValueError, r"w_sp must have shape \(27, 19\) \(\[K, F\] with K=27"),
    (dict(b_sp=lambda a: a["b_sp"][:, None]), ValueError, r"b_sp must have 1 dimensions"),
    (dict(b_sp=lambda a: a["b_sp"][:-1]), ValueError, r"b_sp must have shape \(19,\)"),
    (dict(vn=lambda a: a["vn"].double()), TypeError, r"vn has dtype torch.float64 but u has torch.float32"),
    (dict(u=lambda a: a["u"].int()), TypeError, r"u must be one of"),
    (dict(u=lambda a: a["u"].tolist()), TypeError, r"u must be a torch.Tensor, got list"),
    (dict(neighbourhood="hex"), ValueError, r"neighbourhood must be one of"),
    (dict(boundary="reflect"), ValueError, r"boundary must be one of"),
]


@pytest.mark.parametrize("change,exc,message", BAD)
@pytest.mark.parametrize("backend", harness.backend_params())
def test_bad_input_names_the_argument(backend, change, exc, message):
    """One validation for every backend: the same exception type and message."""
    with pytest.raises(exc, match=message):
        harness.ops(backend).gather_gate(**_args(harness.device(backend), **change))


@pytest.mark.parametrize("backend", harness.backend_params())
def test_backward_rejects_bad_grad(backend):
    args = _args(harness.device(backend))
    with pytest.raises(ValueError, match=r"grad_h must have shape \(2, 3, 4, 5, 19\)"):
        harness.ops(backend).gather_gate_backward(args["u"][..., :-1], *args.values())


@pytest.mark.parametrize("change,message", [
    (dict(u=lambda a: a["u"][0]), r"u must be a 5-D tensor, got 4-D"),
    (dict(vn=lambda a: a["vn"].double()), r"vn has dtype Double but u has Float"),
    (dict(neighbourhood="moore"), r"w_sp must be \[K, F\] with K = 27"),
    (dict(boundary="reflect"), r"boundary must be \"zero\" or \"periodic\""),
])
@pytest.mark.parametrize("backend", harness.backend_params(("cpu", "cuda")))
def test_cpp_checks_behind_the_python_ones(backend, change, message):
    """Direct torch.ops.cube calls skip the Python entry: csrc/checks.h still names the argument,
    with the same exception types."""
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.cube.gather_gate(*_args(harness.device(backend), **change).values())


@pytest.mark.parametrize("backend", harness.backend_params())
def test_double_backward_raises(backend):
    """Second-order gradients are not supported: asking for them is an error, not zeros."""
    inputs, _ = harness.leaves(harness.gather_gate_inputs(harness.Lattice(1, 2, 2, 2), 3, "von_neumann"),
                               torch.float32, harness.device(backend))
    h = harness.ops(backend).gather_gate(*inputs, "von_neumann", "zero")
    grads = torch.autograd.grad(h.square().sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward through cube(_triton)?::gather_gate is not supported"):
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("backend", harness.backend_params(("triton",)))
def test_every_autotune_config_matches_reference(backend):
    """On a GPU the autotuner may pick any config; the interpreter runs the first unless told,
    so each config of the forward and the backward kernel is forced here in turn."""
    from cube_kernels.triton_ops.gather_gate import _gather_gate_bwd_kernel, _gather_gate_fwd_kernel
    lattice = harness.Lattice(1, 2, 4, 17)  # 136 rows: more than any config's row block
    fast_in, ref_in = harness.leaves(harness.gather_gate_inputs(lattice, 40, "von_neumann"),
                                     torch.float32, harness.device(backend))
    for _ in harness.every_triton_config((_gather_gate_fwd_kernel, _gather_gate_bwd_kernel)):
        harness.check_op(backend, harness.ops(backend).gather_gate, reference.gather_gate, fast_in, ref_in,
                         ("von_neumann", "periodic"), NAMES)
