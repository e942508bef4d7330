"""The FLOP count of the SPEC step, in one place.

Counted (multiply and add = 2 FLOPs), per cell and step:
  forward   in-projection  2 * C * 2F   (y @ w_in)
            out-projection 2 * F * C    (h @ w_out)
            spatial gating 2 * K * F    (sum_k w_sp[k] * vn[nbr(i, k)])
  backward  2x each of those: every contraction has an input gradient and a weight gradient
            of the same size (dy, dw_in; dh, dw_out; dvn, dw_sp).
Not counted: layer norms, GELU, the gate multiply, biases, the residual and fire mask, and any
forward work a backend recomputes in backward (the fused backend recomputes the cell input):
these are the useful FLOPs of the math, the same number for every implementation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepFlops:
    forward: int
    backward: int

    @property
    def forward_backward(self) -> int:
        return self.forward + self.backward


def per_cell_step(channels: int, hidden: int, tokens: int) -> StepFlops:
    """FLOPs of one step of one cell with C=channels, F=hidden, K=tokens."""
    C, F, K = channels, hidden, tokens
    forward = 2 * C * (2 * F) + 2 * F * C + 2 * K * F
    return StepFlops(forward=forward, backward=2 * forward)


def rollout(channels: int, hidden: int, tokens: int, cells: int, batch: int, steps: int) -> StepFlops:
    """FLOPs of a ``steps``-step rollout of ``batch`` lattices of ``cells`` cells."""
    one = per_cell_step(channels, hidden, tokens)
    n = cells * batch * steps
    return StepFlops(forward=one.forward * n, backward=one.backward * n)


def matmul(m: int, k: int, n: int) -> int:
    """FLOPs of an ``[m, k] @ [k, n]`` product."""
    return 2 * m * k * n
