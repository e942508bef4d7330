"""Compile the Triton kernels for NVIDIA targets without a GPU (Triton's own LLVM and ptxas), to
catch what the interpreter accepts but the compiler rejects.

    python -m cube_kernels.triton_ops.compile_check [--arch 90 80] [--dtypes fp32 bf16] [--all-configs] [--quick]

Must run without TRITON_INTERPRET=1, which replaces the kernels by interpreted functions.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import INTERPRET, _sum_partials_kernel
from .gather_gate import _gather_gate_bwd_kernel, _gather_gate_fwd_kernel
from .update import _update_bwd_dh_kernel, _update_bwd_dw_kernel, _update_fwd_kernel

_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


def _compile(kernel, signature: dict, constexprs: dict, arch: int, all_configs: bool, label: str) -> int:
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    fn = kernel.fn if tuned else kernel
    configs = kernel.configs if tuned else [triton.Config({})]
    for cfg in configs if all_configs else configs[:1]:
        const = {**constexprs, **cfg.kwargs}
        sig = {name: "constexpr" if name in const else signature[name] for name in fn.arg_names}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(n),): v for n, v in const.items()})
        t = time.perf_counter()
        triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        print(f"sm_{arch} {label} {fn.__name__} {const} warps={cfg.num_warps} stages={cfg.num_stages}: "
              f"{time.perf_counter() - t:.1f}s", flush=True)
    return len(configs) if all_configs else 1


def compile_all(archs=(90, 80), dtypes=("fp32", "bf16", "fp16", "fp64"), all_configs=False,
                quick=False) -> int:
    """Compile every kernel variant (``quick``: of update, only the one with the fire mask and a
    64-bit seed, the superset of the others' code); returns the number of compilations."""
    if INTERPRET:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the kernels")
    n = 0
    for arch, dt in itertools.product(archs, dtypes):
        p, acc = _PTR[dt], (tl.float64 if dt == "fp64" else tl.float32)
        part = "*fp64" if dt == "fp64" else "*fp32"
        ints = dict.fromkeys(("R", "D", "H", "W", "F", "C", "CHUNK", "step"), "i32")
        for moore, periodic in itertools.product((False, True), repeat=2):
            K = 27 if moore else 7
            const = dict(K=K, MOORE=moore, PERIODIC=periodic, ACC=acc)
            sig = {**ints, **dict.fromkeys(("u_ptr", "vn_ptr", "w_ptr", "b_ptr", "h_ptr"), p)}
            n += _compile(_gather_gate_fwd_kernel, sig, const, arch, all_configs, dt)
            sig = {**ints, "part_ptr": part,
                   **dict.fromkeys(("dh_ptr", "u_ptr", "vn_ptr", "w_ptr", "b_ptr", "du_ptr", "dvn_ptr"), p)}
            n += _compile(_gather_gate_bwd_kernel, sig,
                          {**const, "KP": triton.next_power_of_2(K + 1)}, arch, all_configs, dt)
        masks = [(True, "i64")] if quick else itertools.product((False, True), ("i32", "i64"))
        for use_mask, seed in masks:
            const = dict(USE_MASK=use_mask, UPCAST=False, ACC=acc)
            sig = {**ints, "seed": seed, "fire_rate": "fp32", "dw_part_ptr": part, "db_part_ptr": part,
                   **dict.fromkeys(("x_ptr", "h_ptr", "w_ptr", "b_ptr", "out_ptr", "g_ptr", "dh_ptr"), p)}
            for kernel in (_update_fwd_kernel, _update_bwd_dh_kernel, _update_bwd_dw_kernel):
                n += _compile(kernel, sig, const, arch, all_configs, dt)
        n += _compile(_sum_partials_kernel, {"part_ptr": part, "out_ptr": p, "P": "i32", "M": "i32"},
                      dict(BLOCK_P=16, BLOCK_M=128), arch, all_configs, dt)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities")
    ap.add_argument("--dtypes", nargs="+", default=list(_PTR), choices=list(_PTR))
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not the first")
    ap.add_argument("--quick", action="store_true", help="of update, only the masked variant")
    args = ap.parse_args(argv)
    n = compile_all(args.arch, args.dtypes, args.all_configs, args.quick)
    print(f"compiled {n} kernel variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
