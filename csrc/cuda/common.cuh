// Device helpers shared by the kernels: element loads/stores with fp32 (fp64 for double)
// accumulation, dtype dispatch, and the deterministic second stage of the weight-gradient sums.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"

namespace cube {
namespace cuda {

// Block shape of every kernel: 32 lanes across channels (one coalesced warp per row) times
// kBlockRows rows; a block walks a tile of kTileRows rows.
constexpr int kLanes = 32;
constexpr int kBlockRows = 8;
constexpr int kThreads = kLanes * kBlockRows;
static_assert(kTileRows % kBlockRows == 0, "a tile must split evenly over the block's rows");

// Grid of a tiled kernel: one block per tile of rows and per 32 columns (channels).
inline dim3 tile_grid(int64_t rows, int64_t cols) {
  return dim3(static_cast<unsigned>(num_tiles(rows)),
              static_cast<unsigned>((cols + kLanes - 1) / kLanes));
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float load(const float* p) { return __ldg(p); }
__device__ __forceinline__ double load(const double* p) { return __ldg(p); }
__device__ __forceinline__ float load(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T> struct Tag { using type = T; };

// Calls fn(Tag<T>{}) with the CUDA element type of `dtype`.
template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(Tag<float>{}); break;
    case DType::kFloat64: fn(Tag<double>{}); break;
    case DType::kFloat16: fn(Tag<__half>{}); break;
    case DType::kBFloat16: fn(Tag<__nv_bfloat16>{}); break;
  }
}

// Sums a value over the kBlockRows rows of the block in a fixed order (row 0 first); the
// result is valid in row 0. `scratch` holds kThreads values; every thread must call this.
template <typename A>
__device__ __forceinline__ A block_row_sum(A v, A* scratch) {
  scratch[threadIdx.y * kLanes + threadIdx.x] = v;
  __syncthreads();
  A s = 0;
  if (threadIdx.y == 0) {
#pragma unroll
    for (int r = 0; r < kBlockRows; ++r) s += scratch[r * kLanes + threadIdx.x];
  }
  __syncthreads();  // scratch is reused by the next call
  return s;
}

// Second stage of the weight-gradient sums: out[m] = sum_t partial[t, m] over `tiles` tiles.
// Row y of a block sums tiles y, y + kBlockRows, ... in order, then the rows are added in a
// fixed order, so the result depends on the shape only. Columns m < split go to out0, the
// rest to out1 (dw_sp and db_sp come out of one pass).
template <typename T>
__global__ void __launch_bounds__(kThreads)
reduce_tiles_kernel(const acc_t<T>* __restrict__ partial, int64_t tiles, int64_t cols,
                    int64_t split, T* __restrict__ out0, T* __restrict__ out1) {
  using A = acc_t<T>;
  __shared__ A scratch[kThreads];
  const int64_t m = static_cast<int64_t>(blockIdx.x) * kLanes + threadIdx.x;
  A s = 0;
  if (m < cols) {
    for (int64_t t = threadIdx.y; t < tiles; t += kBlockRows) s += partial[t * cols + m];
  }
  s = block_row_sum(s, scratch);
  if (threadIdx.y == 0 && m < cols) {
    if (m < split) store(out0 + m, s); else store(out1 + (m - split), s);
  }
}

template <typename T>
void launch_reduce_tiles(const void* partial, int64_t tiles, int64_t cols, int64_t split,
                         void* out0, void* out1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + kLanes - 1) / kLanes));
  reduce_tiles_kernel<T><<<grid, dim3(kLanes, kBlockRows), 0, stream>>>(
      static_cast<const acc_t<T>*>(partial), tiles, cols, split, static_cast<T*>(out0),
      static_cast<T*>(out1));
}

}  // namespace cuda
}  // namespace cube
