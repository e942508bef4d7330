"""Is ATen's micro-kernel GEMM (``at::native::cpublas::brgemm``, oneDNN's ukernel) worth building
the fused cell on, on this CPU? It times the step's GEMM shapes three ways, one cache-sized tile
of rows at a time (as a fused cell would call them) against one whole-lattice ``torch.mm``:

    python -m bench.brgemm_probe [--dtype float32|bfloat16]

It compiles a small extension first (torch.utils.cpp_extension, a C++ compiler needed). One
thread, CPU time of this thread (``time.thread_time``): other processes' load does not enter it.
``cpublas::could_pack`` says whether ATen packs B for oneDNN in this dtype (bf16: on AMX). bf16
runs B in the fused cell's layout, blocks of at most 64 columns in VNNI pairs: packed by ATen
where it packs, laid out here where it does not (AVX512-BF16).
"""
from __future__ import annotations

import argparse

import torch

from . import flops
from .machine import load_average
from .op_profile import cpu_ms

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>

// C[M, N] = A[M, K] @ B[K, N], `tile` rows per call. bf16 runs one call per block of at most 64
// columns of B, as the fused cell does (csrc/cpu/cell.cpp, kBlockN): B comes in VNNI pairs per
// block ([K/2][ldb][2], ldb the block's width rounded up to 16, block j at j * 64 * K), or, where
// ATen packs (AMX), as plain zero-padded blocks ([K][ldb]) that its `pack` turns into that layout
// (it takes only an input leading dimension equal to its N).
template <typename T>
void tiles_brgemm(at::Tensor A, at::Tensor B, at::Tensor C, int64_t tile, at::Tensor packed) {
  const int64_t M = A.size(0), K = A.size(1), N = C.size(1);
  const bool vnni = A.scalar_type() != at::kFloat;
  const int64_t block = vnni ? 64 : N;
  const auto ldb = [&](int64_t nb) { return vnni ? (nb + 15) / 16 * 16 : N; };
  const T* b = B.data_ptr<T>();
  if (packed.defined() && packed.numel() > 0) {
    for (int64_t n0 = 0; n0 < N; n0 += block) {
      const int64_t nb = std::min(block, N - n0);
      at::native::cpublas::pack(K, ldb(nb), ldb(nb), ldb(nb), A.scalar_type(), A.scalar_type(),
                                b + n0 * K, packed.data_ptr<T>() + n0 * K);
    }
    b = packed.data_ptr<T>();
  }
  for (int64_t r = 0; r < M; r += tile) {
    const int64_t m = std::min(tile, M - r);
    for (int64_t n0 = 0; n0 < N; n0 += block) {
      const int64_t nb = std::min(block, N - n0);
      at::native::cpublas::brgemm(m, nb, K, K, ldb(nb), N, false, A.data_ptr<T>() + r * K,
                                  b + n0 * K, C.data_ptr<float>() + r * N + n0, vnni);
    }
  }
  at::native::cpublas::brgemm_release(vnni);
}

void brgemm(at::Tensor A, at::Tensor B, at::Tensor C, int64_t tile, at::Tensor packed) {
  if (A.scalar_type() == at::kFloat) return tiles_brgemm<float>(A, B, C, tile, packed);
  return tiles_brgemm<at::BFloat16>(A, B, C, tile, packed);
}

void tiles_mm(at::Tensor A, at::Tensor B, at::Tensor C, int64_t tile) {
  for (int64_t r = 0; r < A.size(0); r += tile) {
    const int64_t m = std::min(tile, A.size(0) - r);
    at::Tensor c = C.narrow(0, r, m);
    at::mm_out(c, A.narrow(0, r, m), B);
  }
}

bool could_pack(at::ScalarType dtype) { return at::native::cpublas::could_pack(dtype); }
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.brgemm_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--tiles", default="64,256", help="rows per tile, comma-separated")
    args = p.parse_args(argv)
    from torch.utils.cpp_extension import load_inline
    ext = load_inline("cube_brgemm_probe", cpp_sources=SOURCE, functions=["brgemm", "tiles_mm", "could_pack"],
                      extra_cflags=["-O3"])
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    packs = ext.could_pack(dtype)
    print(f"cpublas::could_pack({args.dtype}) = {packs}; 1 thread, GFLOP/s from CPU time "
          f"(1-min load average {load_average()})")
    shapes = {"in-projection [19800,64]@[64,256]": (19800, 64, 256),
              "out-projection [19800,128]@[128,64]": (19800, 128, 64),
              "trainer in-projection [2475,16]@[16,64]": (2475, 16, 64)}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        want = a.float() @ b.float()
        b_in = b
        if dtype == torch.bfloat16:  # blocks of 64 columns, plain for ATen's pack or VNNI pairs
            blocks = torch.nn.functional.pad(b, (0, -n % 16)).split(64, 1)
            vnni = (blk.view(k // 2, 2, -1).transpose(1, 2) for blk in blocks)
            b_in = torch.cat([blk.flatten() for blk in (blocks if packs else vnni)])
        work = flops.matmul(m, k, n)
        row = {"torch.mm whole": work / cpu_ms(lambda: torch.mm(a, b), 10) / 1e6}
        out = torch.empty(m, n)
        packed = torch.empty(k * (n + -n % 16), dtype=dtype) if packs else torch.empty(0, dtype=dtype)
        for tile in (int(t) for t in args.tiles.split(",")):
            try:
                ext.brgemm(a, b_in, out, tile, packed)
            except RuntimeError as e:  # bf16 below AVX512: oneDNN has no micro-kernel for it
                print(f"{name}: brgemm unavailable: {e}")
                return 1
            torch.testing.assert_close(out, want, rtol=1e-2, atol=1e-2)
            row[f"brgemm tile {tile}"] = work / cpu_ms(lambda: ext.brgemm(a, b_in, out, tile, packed), 10) / 1e6
            if dtype == torch.float32:
                row[f"mm_out tile {tile}"] = work / cpu_ms(lambda: ext.tiles_mm(a, b, out, tile), 10) / 1e6
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
