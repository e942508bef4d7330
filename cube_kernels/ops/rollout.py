"""rollout: T lattice steps with the front-face injection in one op call, and its contract.

``outs, keep = rollout(x, inject, *params, steps, seed, neighbourhood, boundary, fire_rate,
alive_channel, alive_threshold, all_states)``: ``x_0 = inject(x)``,
``x_{t+1} = inject(step(x_t, t))`` (SPEC.md's step, its fire mask from ``(seed, t)``, alive masking
on ``alive_channel`` unless it is None; ``inject`` ``[B, H, W, E]`` overwrites the first E channels
of the front face, or is None), ``outs`` the T step outputs stacked ``[T, B, D, H, W, C]`` (only
the last, ``[1, ...]``, without ``all_states``), ``keep`` their alive masks ``[T, B, D, H, W]``
(bool; empty without alive masking). One autograd node for the whole rollout: it keeps ``x``, the
step outputs (one state of C values per cell and step, SPEC's memory rule) and, with alive
masking, the masks (one bool per cell and step: the backward cannot recompute them, as
``alive(x_new)`` reads the unmasked step output), and nothing under ``torch.no_grad()``; the
backward op recomputes each step from them. Its ``grad`` is ``[T', B, D, H, W, C]``, the
gradients of the last T' <= T step outputs (the earlier ones zero): ``rollout_states`` (T
tensors) and ``rollout`` without ``all_states`` (the last state) pass it only those from the
first state read on, not T stacked, most of them zeros.

The parameters (SPEC order, one dtype) may differ from ``x``'s dtype: under autocast ``x`` is in
the low precision and the parameters are the fp32 masters, cast inside the op; the backward
computes in fp32 (float64 for float64) and rounds each gradient once, to its input's dtype.
C++ CPU op: csrc/cpu/rollout.cpp. The reference is ``steps`` calls of ``reference.step``.
"""
from __future__ import annotations

import numbers

import torch

from .. import _extension
from ..spec import ALIVE_THRESHOLD, PARAM_NAMES, param_shapes
from .checks import check_alive, check_mask_args, check_rows, check_shape, check_stencil, check_tensor
from .registry import FusedOp


def check(x, inject, *args) -> None:
    *params, steps, seed, neighbourhood, boundary, fire_rate, alive_channel, alive_threshold, \
        all_states = args
    check_tensor("x", x, 5)
    K = check_stencil(neighbourhood, boundary)
    if len(params) != len(PARAM_NAMES):
        raise ValueError(f"rollout takes the {len(PARAM_NAMES)} cell parameters {PARAM_NAMES}, "
                         f"got {len(params)} tensors")
    w_in = params[PARAM_NAMES.index("w_in")]
    check_tensor("w_in", w_in, 2, x, "x", same_dtype=False)
    C, F = x.shape[-1], w_in.shape[1] // 2
    for name, p, shape in zip(PARAM_NAMES, params, param_shapes(C, F, K).values()):
        check_tensor(name, p, len(shape), w_in, "w_in")  # the parameters share one dtype
        check_shape(name, p, shape, f"C={C} from x, F={F} from w_in, K={K} tokens")
    if inject is not None:
        B, _, H, W, _ = x.shape
        check_tensor("inject", inject, 4, x, "x", same_dtype=False)
        if tuple(inject.shape[:3]) != (B, H, W) or not 1 <= inject.shape[3] <= C:
            raise ValueError(f"inject must be [B, H, W, E] = [{B}, {H}, {W}, E<={C}], "
                             f"got {tuple(inject.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be a positive int, got {steps!r}")
    if steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    check_mask_args(seed, steps - 1, fire_rate, check_rows("x", x))
    check_alive(alive_channel, alive_threshold, C)
    if not isinstance(all_states, bool):
        raise TypeError(f"all_states must be a bool, got {all_states!r}")


def _check_backward(grad, x, outs, keep, inject, *args) -> None:
    check(x, inject, *args[:-6], outs.shape[0], *args[-6:], True)
    if tuple(outs.shape) != (outs.shape[0], *x.shape) or grad.dim() != outs.dim() \
            or not 1 <= grad.shape[0] <= outs.shape[0] or tuple(grad.shape[1:]) != tuple(x.shape):
        raise ValueError(f"outs must be [T, *x.shape] and grad [T', *x.shape] with 1 <= T' <= T, got "
                         f"{tuple(outs.shape)} and {tuple(grad.shape)} for x {tuple(x.shape)}")
    if args[-2] is not None and (keep is None or keep.dtype != torch.bool
                                 or tuple(keep.shape) != tuple(outs.shape[:-1])):
        raise ValueError(f"keep (the forward's alive masks) must be a bool [T, B, D, H, W] = "
                         f"{list(outs.shape[:-1])} tensor with alive_channel, got "
                         f"{None if keep is None else (keep.dtype, tuple(keep.shape))}")


def _fake(x, inject, *args):
    steps, alive_channel, all_states = args[-8], args[-3], args[-1]
    outs = x.new_empty((steps if all_states else 1, *x.shape))
    keep_shape = outs.shape[:-1] if alive_channel is not None else (0,)
    return outs, x.new_empty(keep_shape, dtype=torch.bool)


def _fake_backward(grad, x, outs, keep, inject, *args):
    params = args[:len(PARAM_NAMES)]
    dinject = torch.empty_like(inject) if inject is not None else x.new_empty(0)
    return [torch.empty_like(x), dinject] + [torch.empty_like(p) for p in params]


def _setup_context(ctx, inputs, output):
    x, inject, *params = inputs[:2 + len(PARAM_NAMES)]
    steps, *cfg, all_states = inputs[2 + len(PARAM_NAMES):]
    if not all_states and steps > 1:
        raise RuntimeError("cube::rollout needs all_states=True to be differentiable (its backward "
                           "starts from every step's state)")
    outs, keep = output
    alive_channel = cfg[-2]
    ctx.save_for_backward(x, outs, keep if alive_channel is not None else None, inject, *params)
    ctx.cfg = tuple(cfg)  # seed, neighbourhood, boundary, fire_rate, alive_channel, alive_threshold


def _backward(ctx, backward_op, grad, _grad_keep):
    x, outs, keep, inject, *params = ctx.saved_tensors
    dx, dinject, *dparams = backward_op(grad.contiguous(), x, outs, keep, inject, *params, *ctx.cfg)
    return (dx, dinject if inject is not None else None, *dparams) + (None,) * 8


ROLLOUT = FusedOp("rollout", check, _check_backward, _fake, _fake_backward, _setup_context, _backward)

if _extension.load():
    ROLLOUT.register("cube")


class _States(torch.autograd.Function):
    """The rollout as T step outputs of their own, for callers that read a few of them (the
    trainer reads the last two of twelve): autograd hands the backward None for the others, and
    the backward op gets the gradients from the first step that has one on (its ``grad``
    ``[T', ...]``), instead of autograd's stack of all T, the unread ones zero-filled (a fresh
    63 MB per training step at the trainer's default config). It saves what the op's own
    autograd saves and runs the same backward."""

    @staticmethod
    def forward(ctx, x, inject, *args):
        outs, keep = torch.ops.cube.rollout(x, inject, *args)
        ctx.set_materialize_grads(False)
        _setup_context(ctx, (x, inject, *args), (outs, keep))
        return outs.unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        first = next((t for t, g in enumerate(grads) if g is not None), None)
        if first is None:
            return (None,) * len(ctx.needs_input_grad)
        zero = grads[first].new_zeros(()).expand_as(grads[first])
        grad = torch.stack([zero if g is None else g for g in grads[first:]])
        return _backward(ctx, torch.ops.cube.rollout_backward.default, grad, None)


def _op_args(x, inject, params, steps, seed, neighbourhood, boundary, fire_rate, alive_channel,
             alive_threshold, all_states):
    """The op's arguments after ``x`` and ``inject``, checked, and whether autograd records it
    (then all_states: its backward starts from every step's state)."""
    _extension.require("rollout")
    tensors = [params[n] for n in PARAM_NAMES]
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in [x, inject, *tensors])
    args = (*tensors, steps, seed, neighbourhood, boundary, fire_rate, alive_channel,
            alive_threshold, all_states or needs_grad)
    check(x, inject, *args)
    return args, needs_grad


def rollout(x: torch.Tensor, inject: torch.Tensor | None, params: dict[str, torch.Tensor],
            steps: int, *, seed: int, neighbourhood: str, boundary: str, fire_rate: float,
            all_states: bool, alive_channel: int | None = None,
            alive_threshold: float = ALIVE_THRESHOLD) -> torch.Tensor:
    """The step outputs ``[T, B, D, H, W, C]`` (``[1, ...]``: the last only, without
    ``all_states``; a rollout that needs gradients keeps them all either way, for backward, and
    then only the last one's gradient reaches its backward op)."""
    args, needs_grad = _op_args(x, inject, params, steps, seed, neighbourhood, boundary, fire_rate,
                                alive_channel, alive_threshold, all_states)
    if needs_grad and not all_states:
        return _States.apply(x.contiguous(), inject, *args)[-1].unsqueeze(0)
    return torch.ops.cube.rollout(x.contiguous(), inject, *args)[0]


def rollout_states(x: torch.Tensor, inject: torch.Tensor | None, params: dict[str, torch.Tensor],
                   steps: int, *, seed: int, neighbourhood: str, boundary: str, fire_rate: float,
                   alive_channel: int | None = None,
                   alive_threshold: float = ALIVE_THRESHOLD) -> list[torch.Tensor]:
    """The T step outputs as T tensors ``[B, D, H, W, C]``. Under autograd the backward op gets
    the gradients of the states read and of the later ones only, not T stacked (``_States``)."""
    args, needs_grad = _op_args(x, inject, params, steps, seed, neighbourhood, boundary, fire_rate,
                                alive_channel, alive_threshold, True)
    if needs_grad:
        return list(_States.apply(x.contiguous(), inject, *args))
    return list(torch.ops.cube.rollout(x.contiguous(), inject, *args)[0].unbind(0))
