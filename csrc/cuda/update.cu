// Out-projection + stochastic residual update (SPEC.md "What is fused"): the kernels around
// the two cuBLAS GEMMs that update_host.cpp issues. The GEMMs themselves stay in cuBLAS: at
// F x C = 128 x 64 it beats a hand-written GEMM, and what is left to fuse (bias, fire mask,
// residual; the masked gradient and db_out) is memory-bound, so it lives here.
//
// The fire mask is recomputed from (seed, step) with cube::fires (cell_math.h, the same code
// as the CPU kernels) once per row of a tile into shared memory, and never stored globally.
#include "common.cuh"

#include "../cell_math.h"

namespace cube {
namespace cuda {
namespace {

// fire[r] = m[row0 + r] for the rows of this tile.
__device__ void fill_fire_mask(bool* fire, int64_t row0, int64_t rows, int64_t batch,
                               int64_t cells, uint64_t seed, int64_t step, float fire_rate) {
  const int tid = threadIdx.y * kLanes + threadIdx.x;
  for (int r = tid; r < kTileRows; r += kThreads) {
    const int64_t row = row0 + r;
    fire[r] = row < rows &&
              fires(seed, step, batch, row / cells, cells, row % cells, fire_rate);
  }
}

// x_new = where(m, x + (delta + b_out), x); delta is the GEMM's accumulator-precision output,
// so the bias and the residual are added before the single rounding to T, and a cell that does
// not fire keeps x bit for bit (copied, not converted).
template <typename T>
__global__ void __launch_bounds__(kThreads)
update_epilogue_kernel(const T* __restrict__ x, const acc_t<T>* __restrict__ delta,
                       const T* __restrict__ b_out, T* __restrict__ x_new, int64_t rows,
                       int64_t batch, int64_t cells, int64_t C, uint64_t seed, int64_t step,
                       float fire_rate) {
  using A = acc_t<T>;
  __shared__ bool fire[kTileRows];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  fill_fire_mask(fire, row0, rows, batch, cells, seed, step, fire_rate);
  __syncthreads();

  const int64_t c = static_cast<int64_t>(blockIdx.y) * kLanes + threadIdx.x;
  if (c >= C) return;
  const A bias = load(b_out + c);
  for (int r = threadIdx.y; r < kTileRows && row0 + r < rows; r += kBlockRows) {
    const int64_t i = (row0 + r) * C + c;
    if (fire[r]) {
      store(x_new + i, load(x + i) + (__ldg(delta + i) + bias));
    } else {
      x_new[i] = x[i];
    }
  }
}

// d_delta = where(m, grad, 0) (when d_delta is given) and this tile's share of db_out = sum d_delta,
// written to partial[tile, C]; no float atomics.
template <typename T>
__global__ void __launch_bounds__(kThreads)
update_backward_kernel(const T* __restrict__ grad, T* __restrict__ d_delta,
                       acc_t<T>* __restrict__ partial, int64_t rows, int64_t batch,
                       int64_t cells, int64_t C, uint64_t seed, int64_t step, float fire_rate) {
  using A = acc_t<T>;
  __shared__ bool fire[kTileRows];
  __shared__ A scratch[kThreads];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  fill_fire_mask(fire, row0, rows, batch, cells, seed, step, fire_rate);
  __syncthreads();

  const int64_t c = static_cast<int64_t>(blockIdx.y) * kLanes + threadIdx.x;
  const bool lane_on = c < C;  // no early return: every thread joins the block sum below
  A db = 0;
  if (lane_on) {
    for (int r = threadIdx.y; r < kTileRows && row0 + r < rows; r += kBlockRows) {
      const int64_t i = (row0 + r) * C + c;
      // Masking is exact in T, so d_delta feeds the GEMMs without an extra rounding.
      const A g = fire[r] ? load(grad + i) : A(0);
      if (d_delta != nullptr) store(d_delta + i, g);
      db += g;
    }
  }
  const A t = block_row_sum(db, scratch);
  if (threadIdx.y == 0 && lane_on) partial[static_cast<int64_t>(blockIdx.x) * C + c] = t;
}

}  // namespace

void launch_update_epilogue(const UpdateParams& p) {
  const int64_t rows = p.B * p.cells;
  dispatch(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    update_epilogue_kernel<T><<<tile_grid(rows, p.C), dim3(kLanes, kBlockRows), 0, p.stream>>>(
        static_cast<const T*>(p.x), static_cast<const acc_t<T>*>(p.delta),
        static_cast<const T*>(p.b_out), static_cast<T*>(p.x_new), rows, p.B, p.cells, p.C,
        p.seed, p.step, p.fire_rate);
  });
}

void launch_update_backward(const UpdateParams& p) {
  const int64_t rows = p.B * p.cells;
  dispatch(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    update_backward_kernel<T><<<tile_grid(rows, p.C), dim3(kLanes, kBlockRows), 0, p.stream>>>(
        static_cast<const T*>(p.grad), static_cast<T*>(p.d_delta),
        static_cast<acc_t<T>*>(p.partial), rows, p.B, p.cells, p.C, p.seed, p.step, p.fire_rate);
    launch_reduce_tiles<T>(p.partial, num_tiles(rows), p.C, p.C, p.db_out, nullptr, p.stream);
  });
}

}  // namespace cuda
}  // namespace cube
