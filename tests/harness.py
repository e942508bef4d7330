"""The one harness every op and step test uses: which fused implementations can run here and on
which device, the lattices and dtypes they are checked on, the tolerance bound to each dtype,
and the comparison with the reference in float64.

- ``backend_params()``: ``cpu``, ``cuda`` and ``triton`` as pytest params, each skipped with the
  reason when it cannot run here (Triton runs in its CPU interpreter where there is no GPU,
  tests/conftest.py switches it on, so its cases use small lattices only).
- ``cases()``: (dtype, lattice) pairs: float32 on every small lattice (sizes 1, 2 and 13 on every
  axis), bfloat16 and float16 on one; ``LARGE`` adds the default lattice where it is cheap.
- ``STEP_IMPLS``: the implementations of one whole step (and of a rollout) that test_step.py and
  test_lattice.py hold against the reference; a new one is one more entry.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import pytest
import torch

from cube_kernels import _extension, backends, reference
from cube_kernels.neighbourhood import num_tokens
from cube_kernels.spec import PARAM_NAMES, param_shapes
from cube_kernels.step import fused_step

BACKENDS = ("cpu", "cuda", "triton")
NEIGHBOURHOODS = ("von_neumann", "moore")
BOUNDARIES = ("zero", "periodic")
STENCILS = [(n, b) for n in NEIGHBOURHOODS for b in BOUNDARIES]
F_, C_ = 19, 13  # not multiples of any vector width, channel tile or block size

# The tolerance of each dtype. float64/float32: max abs error relative to the largest magnitude
# of the float64 reference (SPEC's 1e-5 for fp32). bfloat16/float16 (ROUNDED_ONCE): per element,
# the op's output is the value computed in fp32 and rounded once to the dtype (SPEC.md), so it
# lies within half a step of the dtype's grid from the exact value, plus what fp32 accumulation
# may add (FP32_ACCUMULATION per term, times the sum of the terms' magnitudes). A whole step
# rounds its intermediates (u, vn, h) as well, so step tests hold bf16/fp16 to STEP_TOLERANCE.
ROUNDED_ONCE = "rounded once"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: ROUNDED_ONCE,
             torch.float16: ROUNDED_ONCE}
FP32_ACCUMULATION = 2.0**-22  # fp32 rounding, with room for the order of the sums
STEP_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # of the scale


class Lattice(NamedTuple):
    B: int
    D: int
    H: int
    W: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.B, self.D, self.H, self.W)

    @property
    def rows(self) -> int:
        return math.prod(self.shape)

    def __str__(self) -> str:
        return f"{self.B}x{self.D}x{self.H}x{self.W}"


# Sizes 1, 2 and 13 on every axis, B = 1..3: masked tails, neighbours that wrap onto the cell
# itself, tiles that span batch items.
SMALL = (Lattice(3, 1, 1, 1), Lattice(2, 2, 1, 13), Lattice(1, 13, 2, 2))
LARGE = Lattice(1, 11, 15, 15)  # the default lattice: many row blocks and partial sums


def cases(large: bool = False) -> list:
    """``(dtype, lattice)`` params: float32 on every small lattice (and ``LARGE``), the low
    precisions on one."""
    pairs = [(torch.float32, lat) for lat in SMALL + ((LARGE,) if large else ())]
    pairs += [(dt, SMALL[1]) for dt in (torch.bfloat16, torch.float16)]
    return [pytest.param(dt, lat, id=f"{str(dt)[6:]}-{lat}") for dt, lat in pairs]


def triton_interpreting() -> bool:
    from cube_kernels import triton_ops
    return triton_ops.interpreting()


def unavailable(backend: str) -> str | None:
    """Why ``backend``'s fused ops cannot run here, or None."""
    if backend == "cpu":
        return None if _extension.load() else "cube_kernels._C is not built"
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU"
        return None if _extension.has_cuda() else "cube_kernels._C was built without CUDA (FORCE_CUDA=1)"
    from cube_kernels import triton_ops
    if not triton_ops.available():
        return "triton is not installed"
    if not (triton_ops.interpreting() or torch.cuda.is_available()):
        return "no CUDA GPU and triton was imported without TRITON_INTERPRET=1"
    return None


def device(backend: str) -> str:
    if backend == "cpu" or (backend == "triton" and triton_interpreting()):
        return "cpu"
    return "cuda"


def backend_params(names=BACKENDS) -> list:
    return [pytest.param(b, id=b, marks=pytest.mark.skipif(unavailable(b) is not None,
                                                            reason=str(unavailable(b))))
            for b in names]


def ops(backend: str) -> backends.Kernels:
    """The four fused ops of ``backend``: gather_gate(_backward), update(_backward)."""
    return backends.kernels(backend)


def randn(*shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def leaves(tensors, dtype: torch.dtype, dev: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``tensors`` rounded to ``dtype`` on ``dev`` for the kernels, and float64 copies of the same
    values (rounding the inputs is not the kernels' error) for the reference; all require grad."""
    low = [t.to(dtype) for t in tensors]
    return ([t.to(dev).requires_grad_() for t in low], [t.double().requires_grad_() for t in low])


def on(tensors, dev: str, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``tensors`` in ``dtype`` on ``dev``, not requiring grad."""
    return [t.to(dev, dtype) for t in tensors]


def gather_gate_inputs(lattice: Lattice, F: int, neighbourhood: str, seed: int = 0) -> list[torch.Tensor]:
    """u, vn, w_sp, b_sp (float64): weights of order one, so every neighbour visibly counts."""
    K = num_tokens(neighbourhood)
    return [randn(*lattice.shape, F, seed=seed), randn(*lattice.shape, F, seed=seed + 1),
            randn(K, F, seed=seed + 2, scale=0.5), randn(F, seed=seed + 3, scale=0.1, shift=1.0)]


def update_inputs(lattice: Lattice, F: int, C: int, seed: int = 0) -> list[torch.Tensor]:
    """x, h, w_out, b_out (float64)."""
    return [randn(*lattice.shape, C, seed=seed), randn(*lattice.shape, F, seed=seed + 1),
            randn(F, C, seed=seed + 2, scale=F ** -0.5), randn(C, seed=seed + 3)]


def truncates_bf16(backend: str) -> bool:
    """Triton's interpreter (3.9) converts fp32 to bf16 by truncation, where the compiled kernels
    round to nearest: in the interpreter a bf16 output may be a whole grid step off."""
    return backend == "triton" and triton_interpreting()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 magnitude: torch.Tensor | None = None, terms: int = 0, rel: float | None = None,
                 truncated: bool = False) -> None:
    """``actual`` has ``dtype`` and ``expected``'s shape and is within ``TOLERANCE[dtype]`` (or
    ``rel``) of the float64 ``expected``. For ROUNDED_ONCE, ``magnitude`` is the sum of the
    magnitudes of the terms that make each element (the op on the inputs' absolute values) and
    ``terms`` how many terms an element sums at most; ``truncated`` allows rounding toward zero
    (``truncates_bf16``)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = rel if rel is not None else TOLERANCE[dtype]
    if tol == ROUNDED_ONCE:
        return assert_rounded_once(actual, expected, magnitude, terms, what, truncated)
    expected = expected.detach().to("cpu", torch.float64)
    actual = actual.detach().to("cpu", torch.float64)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * scale {scale:.3g}"


def assert_rounded_once(actual: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor,
                        terms: int, what: str, truncated: bool = False) -> None:
    """Each element of ``actual`` (bf16/fp16) is the exact value rounded to its dtype's grid,
    up to fp32 accumulation: |actual - exact| <= half the grid step on the exact value's side +
    terms * FP32_ACCUMULATION * magnitude. A second rounding on the way (of a GEMM's output
    before the bias or the residual) breaks it in a good share of the elements."""
    actual = actual.detach().cpu()
    exact, magnitude = exact.detach().cpu().double(), magnitude.detach().cpu().double()
    a = actual.double()
    step_up = torch.nextafter(actual, torch.full_like(actual, float("inf"))).double() - a
    step_down = a - torch.nextafter(actual, torch.full_like(actual, float("-inf"))).double()
    grid_step = torch.where(exact >= a, step_up, step_down)
    err = (a - exact).abs()
    bound = grid_step * (1.0 if truncated else 0.5) + terms * FP32_ACCUMULATION * magnitude
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} elements are not the exact value rounded once "
        f"to {actual.dtype}; worst error {(err - bound)[bad].max().item():.3g} beyond its bound")


def check_op(backend: str, fast: Callable, ref: Callable, fast_in, ref_in, args, names,
             grad_seed: int = 9) -> None:
    """Forward and every gradient of ``fast`` (on ``fast_in``) against ``ref`` on the float64
    copies ``ref_in``, for one random output gradient. bf16/fp16 are held per element to one
    rounding of the exact value (ROUNDED_ONCE); ``ref`` must then be multilinear in its tensor
    inputs (gather_gate and update are), so that ``ref`` on their absolute values gives the sum
    of the terms' magnitudes."""
    dtype = fast_in[0].dtype
    out = fast(*fast_in, *args)
    out_ref = ref(*ref_in, *args)
    grad = randn(*out.shape, seed=grad_seed).to(dtype)
    grads = torch.autograd.grad(out, fast_in, grad.to(out.device))
    grads_ref = torch.autograd.grad(out_ref, ref_in, grad.double())
    magnitudes = [None] * (len(names) + 1)
    terms = 0
    if TOLERANCE[dtype] == ROUNDED_ONCE:
        abs_in = [t.detach().abs().requires_grad_() for t in ref_in]
        abs_out = ref(*abs_in, *args)
        magnitudes = [abs_out] + list(torch.autograd.grad(abs_out, abs_in, grad.double().abs()))
        # an element sums at most one term per row (weight gradients) or per channel or token
        terms = max(math.prod(out.shape[:-1]), *(max(t.shape) for t in ref_in)) + 2
    truncated = dtype == torch.bfloat16 and truncates_bf16(backend)
    assert_close(out, out_ref, dtype, "output", magnitudes[0], terms, truncated=truncated)
    for name, g, g_ref, m in zip(names, grads, grads_ref, magnitudes[1:]):
        assert_close(g, g_ref, dtype, f"d{name}", m, terms, truncated=truncated)


def every_triton_config(kernels):
    """Loop body runs once per config index i, with config i (modulo each kernel's count) forced
    on each autotuned Triton kernel of ``kernels``: the interpreter otherwise runs the first."""
    from cube_kernels.triton_ops._common import only_config
    for i in range(max(len(k.all_configs) for k in kernels)):
        with contextlib.ExitStack() as stack:
            for k in kernels:
                stack.enter_context(only_config(k, k.all_configs[i % len(k.all_configs)]))
            yield i


def random_params(C: int, F: int, neighbourhood: str = "von_neumann", dtype=torch.float32,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Cell parameters by SPEC name, all O(1) so that every term of the step matters in a test
    (the real initialisation keeps w_sp near zero, which would hide gating errors)."""
    scale = {"ln1_weight": (0.2, 1.0), "ln1_bias": (0.1, 0.0), "w_in": (C ** -0.5, 0.0),
             "b_in": (0.1, 0.0), "ln2_weight": (0.2, 1.0), "ln2_bias": (0.1, 0.0),
             "w_sp": (0.5, 0.0), "b_sp": (0.1, 1.0), "w_out": (F ** -0.5, 0.0), "b_out": (0.1, 0.0)}
    shapes = param_shapes(C, F, num_tokens(neighbourhood))
    return {n: randn(*shapes[n], seed=seed + i, scale=scale[n][0], shift=scale[n][1]).to(dtype)
            for i, n in enumerate(PARAM_NAMES)}


@dataclass(frozen=True)
class StepImpl:
    """One implementation of a lattice step: ``step(x, params, **kw)`` with the keywords of
    ``reference.step``; ``rollout`` defaults to ``steps`` calls of ``step``, step t with
    ``step=t``. ``backend`` names whose availability and device it needs."""
    name: str
    backend: str
    step: Callable
    rollout_fn: Callable | None = None

    def rollout(self, x, params, steps: int, *, seed: int, **kw):
        if self.rollout_fn is not None:
            return self.rollout_fn(x, params, steps, seed=seed, **kw)
        for t in range(steps):
            x = self.step(x, params, seed=seed, step=t, **kw)
        return x


def _fused(backend: str) -> StepImpl:
    return StepImpl(backend, backend, lambda x, p, **kw: fused_step(x, p, backend=backend, **kw))


STEP_IMPLS = {b: _fused(b) for b in BACKENDS}
REFERENCE = StepImpl("reference", "reference", reference.step)


def step_params(names=tuple(STEP_IMPLS)) -> list:
    return [pytest.param(STEP_IMPLS[n], id=n,
                         marks=pytest.mark.skipif(unavailable(STEP_IMPLS[n].backend) is not None,
                                                  reason=str(unavailable(STEP_IMPLS[n].backend))))
            for n in names]


def in_subprocess_env(**env) -> dict[str, str]:
    """The environment of a fresh interpreter on this checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = dict(os.environ, **env)
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return out
