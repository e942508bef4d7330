"""Triton out-projection with the stochastic residual update in its epilogue (SPEC.md), forward
and backward: ``x_new = where(m, x + (h @ w_out + b_out), x)``, accumulated in fp32 and
rounded once; a cell that does not fire keeps ``x`` bit for bit.

Rows are the R = B*N cells. The fire mask of row r is ``tl.rand(seed, step*R + r)`` with an
int64 offset, which is SPEC's ``((step*B + b)*N + cell)``; backward regenerates it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops.update import UPDATE
from ._common import (acc_dtype, acc_torch_dtype, autotune, check_device, on_device, rows_per_partial,
                      sum_partials, upcast_dot)


def _gemm_configs(m: str, n: str, k: str):
    # Skinny GEMMs (F, C of a few dozen to a few hundred) over many rows.
    shapes = [(128, 64, 32, 4, 3), (128, 64, 64, 8, 3), (64, 64, 32, 4, 4),
              (128, 128, 32, 8, 3), (64, 32, 64, 4, 4), (256, 64, 32, 8, 3)]
    return [triton.Config({m: a, n: b, k: c}, num_warps=w, num_stages=s) for a, b, c, w, s in shapes]


def _dw_configs():
    shapes = [(64, 64, 64, 4, 3), (128, 64, 32, 8, 3), (64, 32, 64, 4, 4), (128, 128, 32, 8, 3)]
    return [triton.Config({"BLOCK_F": f, "BLOCK_C": c, "BLOCK_M": m}, num_warps=w, num_stages=s)
            for f, c, m, w, s in shapes]


@triton.jit
def _fires(rows, R, seed, step, fire_rate):
    """SPEC's fire mask for a block of rows (the caller skips it when fire_rate >= 1)."""
    # int64, so that the Philox counter's hi word is used; tl.cast also takes a step or R that
    # Triton specialised to the constant 1
    offset = tl.cast(step, tl.int64) * R + rows.to(tl.int64)
    return tl.rand(seed, offset) < fire_rate


@autotune(_gemm_configs("BLOCK_M", "BLOCK_C", "BLOCK_K"), key=["R", "F", "C"])
@triton.jit(do_not_specialize=["seed", "step"])
def _update_fwd_kernel(x_ptr, h_ptr, w_ptr, b_ptr, out_ptr, R, F, C, seed, step, fire_rate,
                       USE_MASK: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < C
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    for k0 in range(0, F, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < F
        a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * F + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + ks[:, None] * C + cols[None, :],
                    mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x_new = (x.to(ACC) + acc).to(out_ptr.dtype.element_ty)
    if USE_MASK:  # a cell that does not fire keeps x bit for bit, even where delta is Inf/NaN
        x_new = tl.where(_fires(rows, R, seed, step, fire_rate)[:, None], x_new, x)
    tl.store(out_ptr + offs, x_new, mask=mask)


@autotune(_gemm_configs("BLOCK_M", "BLOCK_F", "BLOCK_C"), key=["R", "F", "C"])
@triton.jit(do_not_specialize=["seed", "step"])
def _update_bwd_dh_kernel(g_ptr, w_ptr, dh_ptr, R, F, C, seed, step, fire_rate,
                          USE_MASK: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr):
    """dh = (m * grad) @ w_out^T."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rmask = rows < R
    fmask = fs < F
    if USE_MASK:
        rmask_fire = rmask & _fires(rows, R, seed, step, fire_rate)
    else:
        rmask_fire = rmask
    acc = tl.zeros([BLOCK_M, BLOCK_F], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cmask = cs < C
        # rows that did not fire load zeros: that is d_delta = m * grad
        dd = tl.load(g_ptr + rows.to(tl.int64)[:, None] * C + cs[None, :],
                     mask=rmask_fire[:, None] & cmask[None, :], other=0.0)
        wt = tl.load(w_ptr + fs[None, :] * C + cs[:, None],
                     mask=cmask[:, None] & fmask[None, :], other=0.0)
        if UPCAST:
            dd = dd.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(dd, wt, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(dh_ptr + rows.to(tl.int64)[:, None] * F + fs[None, :],
             acc.to(dh_ptr.dtype.element_ty), mask=rmask[:, None] & fmask[None, :])


@autotune(_dw_configs(), key=["R", "F", "C"])
@triton.jit(do_not_specialize=["seed", "step"])
def _update_bwd_dw_kernel(g_ptr, h_ptr, dw_part_ptr, db_part_ptr, R, F, C, CHUNK,
                          seed, step, fire_rate,
                          USE_MASK: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (p, f, c) writes dw_part[p] = h^T (m * grad) and db_part[p] = sum (m * grad)
    over rows [p*CHUNK, (p+1)*CHUNK), for its (F, C) tile."""
    pid_p = tl.program_id(0)
    pid_f = tl.program_id(1)
    fs = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    fmask = fs < F
    cmask = cs < C
    acc = tl.zeros([BLOCK_F, BLOCK_C], dtype=ACC)
    db = tl.zeros([BLOCK_C], dtype=ACC)
    start = pid_p * CHUNK
    end = tl.minimum(start + CHUNK, R)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        if USE_MASK:
            rmask_fire = rmask & _fires(rows, R, seed, step, fire_rate)
        else:
            rmask_fire = rmask
        dd = tl.load(g_ptr + rows.to(tl.int64)[:, None] * C + cs[None, :],
                     mask=rmask_fire[:, None] & cmask[None, :], other=0.0)
        ht = tl.load(h_ptr + rows.to(tl.int64)[None, :] * F + fs[:, None],
                     mask=fmask[:, None] & rmask[None, :], other=0.0)
        db += tl.sum(dd.to(ACC), axis=0)
        if UPCAST:
            dd = dd.to(tl.float32)
            ht = ht.to(tl.float32)
        acc = tl.dot(ht, dd, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(dw_part_ptr + (pid_p * F + fs).to(tl.int64)[:, None] * C + cs[None, :], acc,
             mask=fmask[:, None] & cmask[None, :])
    if pid_f == 0:  # every F tile computes the same db; the first one writes it
        tl.store(db_part_ptr + pid_p * C + cs, db, mask=cmask)


def _check(x, h, w_out, b_out, seed, step, fire_rate):
    UPDATE.check(x, h, w_out, b_out, seed, step, fire_rate)
    check_device(x)


def _check_backward(grad, h, w_out, seed, step, fire_rate):
    UPDATE.check_backward(grad, h, w_out, seed, step, fire_rate)
    check_device(h)


def _scalars(dtype, seed, step, fire_rate):
    return dict(seed=seed, step=step, fire_rate=float(fire_rate), USE_MASK=fire_rate < 1.0,
                UPCAST=upcast_dot(dtype), ACC=acc_dtype(dtype))


@torch.library.custom_op("cube_triton::update", mutates_args=())
def _update_op(x: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
               seed: int, step: int, fire_rate: float) -> torch.Tensor:
    _check(x, h, w_out, b_out, seed, step, fire_rate)
    x, h, w_out, b_out = (t.contiguous() for t in (x, h, w_out, b_out))
    out = torch.empty_like(x)
    F, C = h.shape[-1], x.shape[-1]
    R = math.prod(x.shape[:-1])
    if R == 0 or C == 0:
        return out
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]))
    with on_device(x):
        _update_fwd_kernel[grid](x, h, w_out, b_out, out, R, F, C,
                                 **_scalars(x.dtype, seed, step, fire_rate))
    return out


@torch.library.custom_op("cube_triton::update_backward", mutates_args=())
def _update_backward_op(grad: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, seed: int,
                        step: int, fire_rate: float) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    _check_backward(grad, h, w_out, seed, step, fire_rate)
    grad, h, w_out = (t.contiguous() for t in (grad, h, w_out))
    F, C = w_out.shape
    R = math.prod(h.shape[:-1])
    dh = torch.empty_like(h)
    if R == 0 or F == 0 or C == 0:
        return dh.zero_(), torch.zeros_like(w_out), w_out.new_zeros(C)
    s = _scalars(h.dtype, seed, step, fire_rate)
    chunk = rows_per_partial(R)
    P = triton.cdiv(R, chunk)
    dw_part = torch.empty((P, F, C), dtype=acc_torch_dtype(h.dtype), device=h.device)
    db_part = torch.empty((P, C), dtype=dw_part.dtype, device=h.device)
    grid_dh = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(F, meta["BLOCK_F"]))
    grid_dw = lambda meta: (P, triton.cdiv(F, meta["BLOCK_F"]), triton.cdiv(C, meta["BLOCK_C"]))
    with on_device(h):
        _update_bwd_dh_kernel[grid_dh](grad, w_out, dh, R, F, C, **s)
        _update_bwd_dw_kernel[grid_dw](grad, h, dw_part, db_part, R, F, C, chunk, **s)
        return dh, sum_partials(dw_part, h.dtype), sum_partials(db_part, h.dtype)


UPDATE.register("cube_triton")


def update(x: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, b_out: torch.Tensor,
           seed: int, step: int, fire_rate: float) -> torch.Tensor:
    """``x_new``; differentiable (``cube_triton::update``)."""
    _check(x, h, w_out, b_out, seed, step, fire_rate)
    return _update_op(x, h, w_out, b_out, seed, step, fire_rate)


def update_backward(grad: torch.Tensor, h: torch.Tensor, w_out: torch.Tensor, seed: int,
                    step: int, fire_rate: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh, dw_out, db_out)`` of :func:`update` for ``grad`` (``dx = grad`` is the caller's)."""
    _check_backward(grad, h, w_out, seed, step, fire_rate)
    return _update_backward_op(grad, h, w_out, seed, step, fire_rate)
