"""The machine's ceiling: the FLOP/s of ``torch.mm``, measured in the same run as the rollouts.

The peak is the best median over a few square sizes (big enough to be compute-bound; a dtype
whose product takes over a second stops at that size). The
cell-shaped products of the step (``[cells, C] @ [C, 2F]``, ``[cells, F] @ [F, C]``) are timed
too, as the ceiling a step built on ATen GEMMs could reach on these shapes.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import flops
from .impls import sync


# A square product slower than this ends the sizes of its dtype: bf16 on a CPU without native
# bf16 GEMM runs at well under 1 GFLOP/s, where 2048 and 4096 would take minutes each.
SLOW_MM_S = 1.0


def time_mm(m: int, k: int, n: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """Median seconds of one ``[m, k] @ [k, n]``."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    sync(device)
    first = time.perf_counter() - t0
    if first > SLOW_MM_S:  # one sample is enough to say it is slow
        return first
    torch.mm(a, b, out=out)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(dtypes=("float32", "bfloat16"), sizes=(1024, 2048, 4096), device: str = "cpu",
            repeats: int = 5, cell_rows: int | None = None, channels: int = 64, hidden: int = 128) -> dict:
    out = {"device": device, "sizes": list(sizes), "repeats": repeats, "dtypes": {}}
    for name in dtypes:
        dtype = getattr(torch, name)
        square = {}
        for n in sorted(sizes):
            seconds = time_mm(n, n, n, dtype, device, repeats)
            square[str(n)] = flops.matmul(n, n, n) / seconds
            if seconds > SLOW_MM_S:  # no native GEMM of this dtype here: larger sizes only take minutes
                break
        entry = {"square_flops": square, "peak_flops": max(square.values())}
        if cell_rows:
            entry["cell_shaped_flops"] = {
                f"[{cell_rows},{k}]@[{k},{n}]": flops.matmul(cell_rows, k, n) / time_mm(cell_rows, k, n, dtype,
                                                                                          device, repeats)
                for k, n in ((channels, 2 * hidden), (hidden, channels))}
        out["dtypes"][name] = entry
    return out
