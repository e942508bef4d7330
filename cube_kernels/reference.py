"""The whole SPEC in plain differentiable PyTorch: the ground truth of the tests and the
baseline of the benchmarks. Nothing here is fast on purpose; it reads like SPEC.md."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .neighbourhood import check_boundary, offsets
from .philox import fire_mask
from .spec import ALIVE_THRESHOLD, LN_EPS

__all__ = ["ALIVE_THRESHOLD", "LN_EPS", "alive", "cell_input", "gate_input", "gather_gate", "rollout",
           "shift", "step", "update"]


def shift(t: torch.Tensor, offset: tuple[int, int, int], boundary: str) -> torch.Tensor:
    """``out[b, d, h, w] = t[b, d+dd, h+dh, w+dw]`` on a ``[B, D, H, W, ...]`` tensor,
    zero outside the lattice (``zero``) or wrapped (``periodic``)."""
    check_boundary(boundary)
    out = t
    for dim, o in zip((1, 2, 3), offset):
        if o == 0:
            continue
        out = torch.roll(out, shifts=-o, dims=dim)
        if boundary == "zero":
            n = t.shape[dim]
            keep = torch.arange(n, device=t.device) + o
            keep = ((keep >= 0) & (keep < n)).view([n if i == dim else 1 for i in range(t.dim())])
            out = out * keep.to(out.dtype)
    return out


def gather_gate(u, vn, w_sp, b_sp, neighbourhood: str, boundary: str):
    """``h = u * (b_sp + sum_k w_sp[k] * vn[nbr(i, k)])``."""
    g = b_sp
    for k, o in enumerate(offsets(neighbourhood)):
        g = g + w_sp[k] * shift(vn, o, boundary)
    return u * g


def update(x, h, w_out, b_out, seed: int, step: int, fire_rate: float):
    """``where(m, x + (h @ w_out + b_out), x)`` with the Philox fire mask of SPEC.md: a cell that
    does not fire keeps ``x`` bit for bit, even where the update is Inf or NaN."""
    x_fired = x + (h @ w_out + b_out)
    if fire_rate >= 1.0:
        return x_fired
    B = x.shape[0]
    cells = x[0, ..., 0].numel()
    m = fire_mask(seed, step, B, cells, fire_rate, x.device).view(x.shape[:-1] + (1,))
    return torch.where(m, x_fired, x)


def alive(x, channel: int, threshold: float = ALIVE_THRESHOLD):
    """``max_pool3d(x[..., channel], 3, 1, 1) > threshold`` as a bool ``[B, D, H, W]``."""
    a = x[..., channel].unsqueeze(1)
    return (F.max_pool3d(a, 3, stride=1, padding=1) > threshold).squeeze(1)


def gate_input(proj, b_in, ln2_weight, ln2_bias):
    """The in-projection's bias, GELU and the gate's LayerNorm: ``(u, vn)`` from
    ``proj = y @ w_in`` (``[..., 2F]``), both ``[..., F]``."""
    Fh = proj.shape[-1] // 2
    z = F.gelu(proj + b_in)
    u, v = z[..., :Fh], z[..., Fh:]
    return u, F.layer_norm(v, (Fh,), ln2_weight, ln2_bias, LN_EPS)


def cell_input(x, ln1_weight, ln1_bias, w_in, b_in, ln2_weight, ln2_bias):
    """LayerNorm, in-projection, GELU and the gate's LayerNorm: ``(u, vn)``."""
    y = F.layer_norm(x, (x.shape[-1],), ln1_weight, ln1_bias, LN_EPS)
    return gate_input(y @ w_in, b_in, ln2_weight, ln2_bias)


def step(x, params: dict, *, seed: int, step: int, neighbourhood: str = "von_neumann",
         boundary: str = "zero", fire_rate: float = 1.0, alive_channel: int | None = None,
         alive_threshold: float = ALIVE_THRESHOLD):
    """One lattice step of SPEC.md. ``params`` holds the cell parameters by their SPEC names."""
    p = params
    u, vn = cell_input(x, p["ln1_weight"], p["ln1_bias"], p["w_in"], p["b_in"],
                       p["ln2_weight"], p["ln2_bias"])
    h = gather_gate(u, vn, p["w_sp"], p["b_sp"], neighbourhood, boundary)
    x_new = update(x, h, p["w_out"], p["b_out"], seed, step, fire_rate)
    if alive_channel is not None:
        keep = alive(x, alive_channel, alive_threshold) & alive(x_new, alive_channel, alive_threshold)
        x_new = x_new * keep.unsqueeze(-1).to(x_new.dtype)
    return x_new


def rollout(x, params: dict, steps: int, *, seed: int, **kw):
    """``steps`` lattice steps, step ``t`` drawing its fire mask from ``(seed, t)``."""
    for t in range(steps):
        x = step(x, params, seed=seed, step=t, **kw)
    return x
