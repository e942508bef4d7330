"""Triton gather + spatial gate (SPEC.md "One step", "Backward"), forward and backward.

``h = u * g`` with ``g[i] = b_sp + sum_k w_sp[k] * vn[nbr(i, k)]``. Rows are the B*N cells of
the channels-last ``[B, D, H, W, F]`` tensors; a program owns a block of rows and a block of
channels. ``g`` is recomputed in backward rather than stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..neighbourhood import num_tokens
from ..ops.gather_gate import GATHER_GATE
from ._common import (acc_dtype, acc_torch_dtype, autotune, check_device, on_device, rows_per_partial,
                      sum_partials)


def _configs(bwd: bool):
    # Memory-bound stencil: wide channel blocks keep the loads coalesced; backward carries a
    # [K+1 (padded), BLOCK_F] accumulator, so it gets smaller tiles.
    blocks = [(32, 64), (64, 64), (32, 128), (64, 32)] if bwd else \
             [(64, 64), (128, 64), (32, 128), (64, 128), (128, 32)]
    return [triton.Config({"BLOCK_R": r, "BLOCK_F": f}, num_warps=w)
            for r, f in blocks for w in (4, 8)]


@triton.jit
def _token_offset(k, MOORE: tl.constexpr):
    """(dd, dh, dw) of token k, as in neighbourhood.offsets and cube::token_offset. The token
    loop is a runtime loop: unrolling 27 Moore tokens made the backward take minutes to compile."""
    if MOORE:  # {-1,0,1}^3 lexicographic, the centre (lex 13) moved to token 0
        lex = tl.where(k == 0, 13, tl.where(k <= 13, k - 1, k))
        return lex // 9 - 1, (lex // 3) % 3 - 1, lex % 3 - 1
    else:  # von Neumann: -d, +d, -h, +h, -w, +w
        sign = 1 - 2 * (k % 2)
        axis = (k + 1) // 2  # 0: the cell itself, 1: d, 2: h, 3: w
        return (tl.where(axis == 1, sign, 0), tl.where(axis == 2, sign, 0),
                tl.where(axis == 3, sign, 0))


@triton.jit
def _neighbour(base, d, h, w, dd, dh, dw, D, H, W, PERIODIC: tl.constexpr):
    """Row of the neighbour at (dd, dh, dw) in {-1, 0, 1}^3 of each cell, and whether it is
    inside the lattice (always, with the periodic boundary, which wraps instead)."""
    d2 = d + dd
    h2 = h + dh
    w2 = w + dw
    if PERIODIC:
        d2 = tl.where(d2 < 0, d2 + D, tl.where(d2 >= D, d2 - D, d2))
        h2 = tl.where(h2 < 0, h2 + H, tl.where(h2 >= H, h2 - H, h2))
        w2 = tl.where(w2 < 0, w2 + W, tl.where(w2 >= W, w2 - W, w2))
        inside = d2 >= 0
    else:
        inside = (d2 >= 0) & (d2 < D) & (h2 >= 0) & (h2 < H) & (w2 >= 0) & (w2 < W)
    return base + (d2 * H + h2) * W + w2, inside


@triton.jit
def _cell_coords(rows, D, H, W):
    """First row of the cell's batch item, and the cell's (d, h, w)."""
    cell = rows % (D * H * W)
    return rows - cell, cell // (H * W), (cell // W) % H, cell % W


@autotune(_configs(bwd=False), key=["R", "F", "K", "MOORE", "PERIODIC"])
@triton.jit
def _gather_gate_fwd_kernel(u_ptr, vn_ptr, w_ptr, b_ptr, h_ptr, R, D, H, W, F,
                            K: tl.constexpr, MOORE: tl.constexpr, PERIODIC: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rmask = rows < R
    fmask = cols < F
    base, d, h, w = _cell_coords(rows, D, H, W)
    g = tl.zeros([BLOCK_R, BLOCK_F], dtype=ACC) + \
        tl.load(b_ptr + cols, mask=fmask, other=0.0).to(ACC)[None, :]
    for k in range(K):
        od, oh, ow = _token_offset(k, MOORE)
        nrow, inside = _neighbour(base, d, h, w, od, oh, ow, D, H, W, PERIODIC)
        wk = tl.load(w_ptr + k * F + cols, mask=fmask, other=0.0).to(ACC)
        v = tl.load(vn_ptr + nrow.to(tl.int64)[:, None] * F + cols[None, :],
                    mask=(rmask & inside)[:, None] & fmask[None, :], other=0.0).to(ACC)
        g += wk[None, :] * v
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    mask = rmask[:, None] & fmask[None, :]
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(h_ptr + offs, (u * g).to(h_ptr.dtype.element_ty), mask=mask)


@autotune(_configs(bwd=True), key=["R", "F", "K", "MOORE", "PERIODIC"])
@triton.jit
def _gather_gate_bwd_kernel(dh_ptr, u_ptr, vn_ptr, w_ptr, b_ptr, du_ptr, dvn_ptr, part_ptr,
                            R, D, H, W, F, CHUNK,
                            K: tl.constexpr, KP: tl.constexpr, MOORE: tl.constexpr,
                            PERIODIC: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Program (p, f) walks rows [p*CHUNK, (p+1)*CHUNK) and writes du, dvn for them and its
    partial sums of dw_sp (rows 0..K-1) and db_sp (row K) into part[p, :K+1, f-block]."""
    pid_p = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = cols < F
    bias = tl.load(b_ptr + cols, mask=fmask, other=0.0).to(ACC)
    tokens = tl.arange(0, KP)
    part = tl.zeros([KP, BLOCK_F], dtype=ACC)
    start = pid_p * CHUNK
    end = tl.minimum(start + CHUNK, R)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        mask = rmask[:, None] & fmask[None, :]
        offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
        base, d, h, w = _cell_coords(rows, D, H, W)
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(ACC)
        dg = dh * tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.zeros([BLOCK_R, BLOCK_F], dtype=ACC) + bias[None, :]
        dvn = tl.zeros([BLOCK_R, BLOCK_F], dtype=ACC)
        for k in range(K):
            wk = tl.load(w_ptr + k * F + cols, mask=fmask, other=0.0).to(ACC)
            od, oh, ow = _token_offset(k, MOORE)
            # forward stencil: g and dw_sp[k] = sum_i dg[i] * vn[i + off_k]
            nrow, inside = _neighbour(base, d, h, w, od, oh, ow, D, H, W, PERIODIC)
            v = tl.load(vn_ptr + nrow.to(tl.int64)[:, None] * F + cols[None, :],
                        mask=(rmask & inside)[:, None] & fmask[None, :], other=0.0).to(ACC)
            g += wk[None, :] * v
            part += tl.where(tokens[:, None] == k, tl.sum(dg * v, axis=0)[None, :], 0.0)
            # transposed stencil: dvn[j] += w_sp[k] * dg[j - off_k], dg recomputed there
            srow, inside = _neighbour(base, d, h, w, -od, -oh, -ow, D, H, W, PERIODIC)
            smask = (rmask & inside)[:, None] & fmask[None, :]
            soffs = srow.to(tl.int64)[:, None] * F + cols[None, :]
            dg_src = tl.load(dh_ptr + soffs, mask=smask, other=0.0).to(ACC) * \
                tl.load(u_ptr + soffs, mask=smask, other=0.0).to(ACC)
            dvn += wk[None, :] * dg_src
        part += tl.where(tokens[:, None] == K, tl.sum(dg, axis=0)[None, :], 0.0)
        tl.store(du_ptr + offs, (dh * g).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dvn_ptr + offs, dvn.to(dvn_ptr.dtype.element_ty), mask=mask)
    pmask = (tokens <= K)[:, None] & fmask[None, :]
    tl.store(part_ptr + (pid_p * (K + 1) + tokens)[:, None].to(tl.int64) * F + cols[None, :],
             part, mask=pmask)


def _check(u, vn, w_sp, b_sp, neighbourhood, boundary, grad_h=None):
    GATHER_GATE.check(u, vn, w_sp, b_sp, neighbourhood, boundary, grad_h)
    check_device(u)


def _launch_args(u, neighbourhood, boundary):
    B, D, H, W, F = u.shape
    return dict(R=B * D * H * W, D=D, H=H, W=W, F=F, K=num_tokens(neighbourhood),
                MOORE=neighbourhood == "moore", PERIODIC=boundary == "periodic",
                ACC=acc_dtype(u.dtype))


@torch.library.custom_op("cube_triton::gather_gate", mutates_args=())
def _gather_gate_op(u: torch.Tensor, vn: torch.Tensor, w_sp: torch.Tensor, b_sp: torch.Tensor,
                    neighbourhood: str, boundary: str) -> torch.Tensor:
    _check(u, vn, w_sp, b_sp, neighbourhood, boundary)
    u, vn, w_sp, b_sp = (t.contiguous() for t in (u, vn, w_sp, b_sp))
    h = torch.empty_like(u)
    a = _launch_args(u, neighbourhood, boundary)
    if h.numel() == 0:
        return h
    grid = lambda meta: (triton.cdiv(a["R"], meta["BLOCK_R"]), triton.cdiv(a["F"], meta["BLOCK_F"]))
    with on_device(u):
        _gather_gate_fwd_kernel[grid](u, vn, w_sp, b_sp, h, **a)
    return h


@torch.library.custom_op("cube_triton::gather_gate_backward", mutates_args=())
def _gather_gate_backward_op(grad_h: torch.Tensor, u: torch.Tensor, vn: torch.Tensor,
                             w_sp: torch.Tensor, b_sp: torch.Tensor, neighbourhood: str,
                             boundary: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    _check(u, vn, w_sp, b_sp, neighbourhood, boundary, grad_h)
    grad_h, u, vn, w_sp, b_sp = (t.contiguous() for t in (grad_h, u, vn, w_sp, b_sp))
    a = _launch_args(u, neighbourhood, boundary)
    du, dvn = torch.empty_like(u), torch.empty_like(vn)
    K, F, R = a["K"], a["F"], a["R"]
    if R == 0 or F == 0:
        return du, dvn, torch.zeros_like(w_sp), torch.zeros_like(b_sp)
    chunk = rows_per_partial(R)
    P = triton.cdiv(R, chunk)
    part = torch.empty((P, K + 1, F), dtype=acc_torch_dtype(u.dtype), device=u.device)
    grid = lambda meta: (P, triton.cdiv(F, meta["BLOCK_F"]))
    with on_device(u):
        _gather_gate_bwd_kernel[grid](grad_h, u, vn, w_sp, b_sp, du, dvn, part, CHUNK=chunk,
                                      KP=triton.next_power_of_2(K + 1), **a)
        dwb = sum_partials(part, u.dtype)
    return du, dvn, dwb[:K].clone(), dwb[K].clone()


GATHER_GATE.register("cube_triton")


def gather_gate(u: torch.Tensor, vn: torch.Tensor, w_sp: torch.Tensor, b_sp: torch.Tensor,
                neighbourhood: str, boundary: str) -> torch.Tensor:
    """``h = u * (b_sp + sum_k w_sp[k] * vn[nbr(i, k)])``; differentiable (``cube_triton::gather_gate``)."""
    _check(u, vn, w_sp, b_sp, neighbourhood, boundary)
    return _gather_gate_op(u, vn, w_sp, b_sp, neighbourhood, boundary)


def gather_gate_backward(grad_h: torch.Tensor, u: torch.Tensor, vn: torch.Tensor,
                         w_sp: torch.Tensor, b_sp: torch.Tensor, neighbourhood: str,
                         boundary: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(du, dvn, dw_sp, db_sp)`` of :func:`gather_gate` for ``grad_h``."""
    _check(u, vn, w_sp, b_sp, neighbourhood, boundary, grad_h)
    return _gather_gate_backward_op(grad_h, u, vn, w_sp, b_sp, neighbourhood, boundary)
