"""Pieces shared by the Triton ops: the interpreter switch, the device check, the accumulator
dtype and the deterministic second stage of the weight-gradient reductions. The input checks
are every backend's (cube_kernels.ops)."""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Read once, like ``triton.jit`` does when it decorates the kernels of this package: with
# TRITON_INTERPRET=1 every kernel runs in the CPU interpreter on CPU tensors.
INTERPRET = bool(triton.knobs.runtime.interpret)

# Weight gradients are reduced in two fixed stages: each program of the first kernel owns a
# contiguous chunk of rows (B*N cells) and writes one partial, then `sum_partials` adds the
# partials in a fixed order. The chunk depends only on the number of rows, never on the
# autotuned block sizes, so the partial buffer has a fixed shape. On a GPU CHUNK_ALIGN is a
# multiple of every row block of those kernels' configs, so only the block that reaches row R
# is ragged; in the interpreter it is not, on purpose, so that the tests exercise chunks that
# end inside a block.
MAX_PARTIALS = 8 if INTERPRET else 512
CHUNK_ALIGN = 32 if INTERPRET else 64


def rows_per_partial(rows: int) -> int:
    chunk = max(triton.cdiv(rows, MAX_PARTIALS), CHUNK_ALIGN)
    return triton.cdiv(chunk, CHUNK_ALIGN) * CHUNK_ALIGN


def acc_dtype(dtype: torch.dtype):
    """fp32 accumulation, except fp64 stays fp64 (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast_dot(dtype: torch.dtype) -> bool:
    """The 3.x interpreter hands bf16 to ``np.matmul`` as raw uint16 bits, so in the interpreter
    bf16 tiles are widened to fp32 before ``tl.dot``. That is exact: a product of two bf16
    values is representable in fp32, as on the tensor cores, which accumulate in fp32 too."""
    return INTERPRET and dtype == torch.bfloat16


def autotune(configs: list, key: list[str]):
    """``triton.autotune`` over ``configs``. The interpreter keeps only the first (benchmarking
    there only costs time); ``kernel.all_configs`` lists them all for ``only_config``."""
    def wrap(fn):
        kernel = triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)(fn)
        kernel.all_configs = list(configs)
        return kernel
    return wrap


@contextlib.contextmanager
def only_config(kernel, config):
    """Run the autotuned ``kernel`` with ``config`` alone, without benchmarking: how the tests
    hold every config against the reference in the interpreter."""
    saved = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved


def on_device(t: torch.Tensor):
    """Launches go to the GPU that holds ``t``, whatever the current device is."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_device(t: torch.Tensor) -> None:
    """Compiled kernels run on CUDA tensors only; the interpreter on CPU tensors."""
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(f"the Triton ops need CUDA tensors (or TRITON_INTERPRET=1 before the first "
                         f"import of triton), got tensors on {t.device}")


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, M, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[m] = sum_p part[p, m], always in the same order (no atomics)."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cmask = cols < M
    acc = tl.zeros([BLOCK_M], dtype=part_ptr.dtype.element_ty)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        tile = tl.load(part_ptr + ps[:, None].to(tl.int64) * M + cols[None, :],
                       mask=(ps < P)[:, None] & cmask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def sum_partials(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum a ``[P, *shape]`` buffer of partials over P into a new ``shape`` tensor of ``dtype``."""
    P = part.shape[0]
    out = torch.empty(part.shape[1:], dtype=dtype, device=part.device)
    M = out.numel()
    if M == 0:
        return out
    BLOCK_M = 128
    _sum_partials_kernel[(triton.cdiv(M, BLOCK_M),)](part, out, P, M, BLOCK_P=16, BLOCK_M=BLOCK_M)
    return out
