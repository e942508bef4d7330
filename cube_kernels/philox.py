"""The fire mask's random numbers in plain PyTorch, bit for bit ``triton.language.rand``.

Philox4x32-10 on uint32 words held in int64 tensors; the 32x32-bit products are split in
16-bit halves so that nothing overflows int64.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_TO_FLOAT = 4.6566127342e-10


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and uint32 ``b``."""
    lo_part = (a & 0xFFFF) * b
    q = (a >> 16) * b + (lo_part >> 16)
    return q >> 16, ((q & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def philox_uniform(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """``U(seed, offset)`` of SPEC.md for an int64 tensor of offsets, as float32."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    offset = offset.to(torch.int64)
    c0 = offset & _MASK32
    c1 = (offset >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # read the word as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * _TO_FLOAT


def fire_mask(seed: int, step: int, batch: int, cells: int, fire_rate: float,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean ``[batch, cells]`` mask: ``U(seed, (step*B + b)*N + cell) < fire_rate``."""
    offset = torch.arange(batch * cells, device=device, dtype=torch.int64) + step * batch * cells
    return (philox_uniform(seed, offset) < fire_rate).view(batch, cells)
