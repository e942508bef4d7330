"""One lattice step of every implementation (harness.STEP_IMPLS: the fused step on each backend)
against cube_kernels.reference.step: values and every gradient, gradcheck, autocast, and the
fused ops composed under torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import harness
from cube_kernels import fused_step, reference
from cube_kernels.philox import fire_mask
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


def _case_id(c):
    return f"{c[0]}-{c[1]}-{c[2]}-fire{c[3]}-alive{c[4]}"


# float32 on every case; bfloat16 and float16 (u, vn, h and the output each rounded to the
# dtype: harness.STEP_TOLERANCE) on the Moore, periodic, half-firing one
STEP_CASES = ([pytest.param(torch.float32, c, id=f"float32-{_case_id(c)}") for c in CASES]
              + [pytest.param(dt, CASES[1], id=f"{str(dt)[6:]}-{_case_id(CASES[1])}")
                 for dt in (torch.bfloat16, torch.float16)])


@pytest.mark.parametrize("dtype,case", STEP_CASES)
@pytest.mark.parametrize("impl", harness.step_params())
def test_matches_reference(impl, dtype, case):
    names, fast, ref, kw = _inputs(case, harness.device(impl.backend), dtype)
    out, out_ref = _run(impl.step, fast, kw), _run(reference.step, ref, kw)
    harness.assert_close(out, out_ref, dtype, "x_new", rel=harness.STEP_TOLERANCE[dtype])
    grad = harness.randn(*out.shape, seed=9)
    grads = torch.autograd.grad(out, fast, grad.to(dtype).to(out.device))
    grads_ref = torch.autograd.grad(out_ref, ref, grad.to(dtype).double())
    for name, g, g_ref in zip(names, grads, grads_ref):
        if dtype != torch.float32:
            harness.assert_close(g, g_ref, dtype, f"d{name}", rel=harness.STEP_TOLERANCE[dtype])
        else:  # a gradient runs through two LayerNorm backwards: 1e-5 of the output scale is too tight
            torch.testing.assert_close(g.cpu(), g_ref.float(), atol=2e-5, rtol=1e-4,
                                       msg=lambda m: f"grad of {name}: {m}")


# Triton's interpreter gets one stencil: the op gradchecks cover both.
@pytest.mark.parametrize("impl,neighbourhood,boundary",
                         [pytest.param(*p.values, stencil[0], stencil[1], marks=p.marks,
                                       id=f"{p.id}-{stencil[0]}-{stencil[1]}")
                          for p in harness.step_params()
                          for stencil in [("von_neumann", "zero"), ("moore", "periodic")][:1 if p.id == "triton" else 2]])
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
    harness.assert_close(out, ref, torch.float32, "x_new", rel=harness.STEP_TOLERANCE[torch.bfloat16])


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



def _step_inputs(dev, requires_grad=True):
    params = {n: p.float().to(dev).requires_grad_(requires_grad)
              for n, p in harness.random_params(C, F, "moore").items()}
    x = harness.randn(2, 2, 3, 4, C, seed=3).float().to(dev).requires_grad_(requires_grad)
    return x, params


KW = dict(seed=7, step=1, neighbourhood="moore", boundary="periodic", fire_rate=0.5)


@pytest.mark.parametrize("impl", harness.step_params())
def test_double_backward_raises(impl):
    """The fused step's backward is not differentiable: a second backward is an error, not
    silently wrong second-order gradients."""
    x, params = _step_inputs(harness.device(impl.backend))
    out = impl.step(x, params, **KW)
    grads = torch.autograd.grad(out.square().sum(), [x, *params.values()], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.square().sum() for g in grads).backward()


@pytest.mark.parametrize("backend", ["reference", "auto", "cpux", "CPU", None])
def test_fused_step_rejects_backends_it_does_not_run(backend):
    x, params = _step_inputs("cpu")
    with pytest.raises(ValueError, match=r"backend must be one of \('cpu', 'cuda', 'triton'\) for fused_step"):
        fused_step(x, params, backend=backend, **KW)


class _Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((str(func), args))
        return func(*args, **(kwargs or {}))

    def count(self, name):
        return sum(name in f for f, _ in self.calls)


@pytest.mark.parametrize("impl", harness.step_params())
def test_backward_computes_only_the_gradients_asked_for(impl):
    """ctx.needs_input_grad: frozen parameters and an x without grad do not pay for theirs."""
    dev = harness.device(impl.backend)

    def backward(trainable):
        """The backward of a step where only ``trainable`` (names; "x" for the state) require
        grad: the ops it ran and the gradients."""
        x, params = _step_inputs(dev, requires_grad=False)
        leaves = {"x": x, **params}
        for name in trainable:
            leaves[name].requires_grad_()
        out = impl.step(x, params, **KW)
        with _Calls() as calls:
            grads = torch.autograd.grad(out, [leaves[n] for n in trainable], harness.randn(*out.shape, seed=1)
                                        .float().to(dev))
        return calls, dict(zip(trainable, grads))

    everything, full = backward(("x",) + PARAM_NAMES)
    # x and the parameters before w_out frozen: no gather_gate, gate_input or LayerNorm backward
    head, grads = backward(("w_out", "b_out"))
    assert torch.equal(grads["w_out"], full["w_out"]) and torch.equal(grads["b_out"], full["b_out"])
    assert everything.count("gather_gate_backward") == 1 and head.count("gather_gate_backward") == 0
    assert head.count("layer_norm_backward") == 0 and head.count("gate_input_backward") == 0
    # frozen parameters, x trainable: no weight GEMM y^T dz_pre, LayerNorm's backward for dx alone
    x_only, grads = backward(("x",))
    assert torch.equal(grads["x"], full["x"])
    assert x_only.count("aten.mm") == everything.count("aten.mm") - 1
    (ln,) = [a for f, a in x_only.calls if "native_layer_norm_backward" in f]
    assert list(ln[-1]) == [True, False, False]


@pytest.mark.parametrize("impl", harness.step_params(("cpu", "cuda")))
def test_backward_inside_autocast_stays_in_the_step_dtype(impl):
    """A float32 step's backward, run inside an autocast region, is the same float32 backward."""
    dev = harness.device(impl.backend)
    x, params = _step_inputs(dev)
    out = impl.step(x, params, **KW)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, [x, *params.values()], grad, retain_graph=True)
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        got = torch.autograd.grad(out, [x, *params.values()], grad)
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32 and torch.equal(e, g)


@pytest.mark.parametrize("impl", [pytest.param(harness.REFERENCE, id="reference")] + harness.step_params())
def test_cells_that_do_not_fire_keep_their_state_and_nan_matches(impl):
    """An Inf in the state makes its cell and its neighbours' updates NaN; every implementation
    keeps the cells that do not fire bit for bit and has NaN exactly where the reference has."""
    dev = harness.device(impl.backend) if impl.backend != "reference" else "cpu"
    x, params = _step_inputs(dev, requires_grad=False)
    x[0, 1, 1, 1, 2] = float("inf")
    kw = dict(KW, neighbourhood="von_neumann")
    params["w_sp"] = params["w_sp"][:7].contiguous()
    out = impl.step(x, params, **kw).cpu()
    ref = reference.step(x.cpu(), {n: p.cpu() for n, p in params.items()}, **kw)
    m = fire_mask(kw["seed"], kw["step"], 2, 24, 0.5).view(2, 2, 3, 4, 1).expand_as(out)
    assert torch.equal(out.view(torch.int32)[~m], x.cpu().view(torch.int32)[~m])
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
    torch.testing.assert_close(out[~out.isnan()], ref[~ref.isnan()])


@pytest.mark.parametrize("impl", harness.step_params())
def test_bad_input_is_named_alike_on_every_backend(impl):
    dev = harness.device(impl.backend)
    x, params = _step_inputs(dev, requires_grad=False)
    cases = [(dict(seed=2**64), ValueError, r"seed must be an int in \[0, 2\*\*63\), got 18446744073709551616"),
             (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
             (dict(fire_rate=1.5), ValueError, r"fire_rate must be in \[0, 1\], got 1.5"),
             (dict(step=True), TypeError, r"step must be a non-negative int"),
             (dict(alive_channel=C), ValueError, rf"alive_channel must be in \[0, {C}\)")]
    for change, exc, message in cases:
        with pytest.raises(exc, match=message):
            impl.step(x, params, **dict(KW, **change))
    with pytest.raises(TypeError, match=r"w_in has dtype torch.float32 but x has torch.float64"):
        impl.step(x.double(), params, **KW)
    with pytest.raises(ValueError, match=r"w_sp must have shape \(27, 19\)"):
        impl.step(x, dict(params, w_sp=params["w_sp"][:7]), **KW)


@pytest.mark.slow
@pytest.mark.parametrize("backend", harness.backend_params())
def test_large_indices(backend):
    """Tensors of more than 2**31 elements (int64 offsets everywhere): gather_gate and update on a
    bfloat16 lattice of 2**31 + 2**21 elements per tensor, the last cells checked against the
    reference on a slab (the zero boundary makes the slab's last plane exact). Needs about
    17 GiB of (device) memory."""
    if backend == "triton" and harness.triton_interpreting():
        pytest.skip("2**31 elements take hours in Triton's interpreter")
    dev, k = harness.device(backend), harness.ops(backend)
    D, H, W, Fh = 4097, 64, 64, 128  # D*H*W*F = 2**31 + 2**21
    g = torch.Generator(dev).manual_seed(0)
    u = torch.randn(1, D, H, W, Fh, device=dev, dtype=torch.bfloat16, generator=g)
    vn = torch.randn(1, D, H, W, Fh, device=dev, dtype=torch.bfloat16, generator=g)
    w_sp = torch.randn(7, Fh, device=dev, generator=g).bfloat16()
    b_sp = torch.ones(Fh, device=dev, dtype=torch.bfloat16)
    h = k.gather_gate(u, vn, w_sp, b_sp, "von_neumann", "zero")
    slab = slice(D - 3, D)
    h_ref = reference.gather_gate(u[:, slab].double(), vn[:, slab].double(), w_sp.double(), b_sp.double(),
                                  "von_neumann", "zero")
    torch.testing.assert_close(h[:, -1].double(), h_ref[:, -1], atol=0.05, rtol=0.02)
    del u, vn
    x, h = h, h[..., :8].contiguous()  # x: the large tensor; h: 8 channels
    w_out = torch.randn(8, Fh, device=dev, generator=g).bfloat16()
    b_out = torch.zeros(Fh, device=dev, dtype=torch.bfloat16)
    x_new = k.update(x, h, w_out, b_out, 3, 0, 0.5)
    tail = (slice(None), slice(D - 2, D))
    x_ref = reference.update(x[tail].double(), h[tail].double(), w_out.double(), b_out.double(), 3, 0, 1.0)
    fired = x_new[tail] != x[tail]
    assert fired.any()
    torch.testing.assert_close(x_new[tail].double()[fired], x_ref[fired], atol=0.05, rtol=0.02)


@pytest.mark.parametrize("impl", harness.step_params(("cuda", "triton")))
def test_fp32_step_ignores_the_global_tf32_setting(impl, monkeypatch):
    """The step's own fp32 GEMMs (in-projection, backward) stay full fp32 with TF32 switched on
    for the whole process."""
    if harness.device(impl.backend) != "cuda":
        pytest.skip("TF32 is a CUDA setting")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    test_matches_reference(impl, torch.float32, CASES[1])
    assert torch.backends.cuda.matmul.allow_tf32
