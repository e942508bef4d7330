// Neighbour gather + spatial gating (SPEC.md "What is fused"), forward and backward.
//
// Layout: a row is one cell of one batch item (rows = B*D*H*W), its F channels contiguous.
// A block covers kTileRows rows x 32 channels: each warp reads 32 consecutive channels of a
// row, so every load of u, vn and grad_h is coalesced. The K neighbour rows of the tile are
// found once per block with cube::Lattice::neighbour (cell_math.h, the same code as the CPU
// kernels) and kept in shared memory, instead of redoing the index arithmetic per channel.
#include <type_traits>

#include "common.cuh"

#include "../cell_math.h"

namespace cube {
namespace cuda {
namespace {

// nbr[r * K + k] = batch row of token k of row row0 + r, or -1 outside a zero boundary.
// With `inverse`, the row whose token k is row0 + r (offset negated): the transposed stencil
// of the backward pass. Rows fit in int32 (checked on the host).
template <int K>
__device__ void fill_neighbours(int* nbr, int64_t row0, int64_t rows, const Lattice& lat,
                                bool inverse) {
  constexpr int nbh = K == 27 ? kMoore : kVonNeumann;
  const int64_t cells = lat.cells();
  const int tid = threadIdx.y * kLanes + threadIdx.x;
  for (int idx = tid; idx < kTileRows * K; idx += kThreads) {
    const int64_t row = row0 + idx / K;
    int n = -1;
    if (row < rows) {
      int dd, dh, dw;
      token_offset(nbh, idx % K, dd, dh, dw);
      if (inverse) { dd = -dd; dh = -dh; dw = -dw; }
      const int64_t b = row / cells;
      const int64_t cell = lat.neighbour(row - b * cells, dd, dh, dw);
      if (cell >= 0) n = static_cast<int>(b * cells + cell);
    }
    nbr[idx] = n;
  }
}

template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
gather_gate_forward_kernel(const T* __restrict__ u, const T* __restrict__ vn,
                           const T* __restrict__ w_sp, const T* __restrict__ b_sp,
                           T* __restrict__ h, Lattice lat, int64_t rows, int64_t F) {
  using A = acc_t<T>;
  __shared__ int nbr[kTileRows * K];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  fill_neighbours<K>(nbr, row0, rows, lat, /*inverse=*/false);
  __syncthreads();

  const int64_t f = static_cast<int64_t>(blockIdx.y) * kLanes + threadIdx.x;
  if (f >= F) return;
  A w[K];
#pragma unroll
  for (int k = 0; k < K; ++k) w[k] = load(w_sp + k * F + f);
  const A bias = load(b_sp + f);

  for (int r = threadIdx.y; r < kTileRows && row0 + r < rows; r += kBlockRows) {
    A g = bias;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int n = nbr[r * K + k];
      if (n >= 0) g += w[k] * load(vn + n * F + f);
    }
    const int64_t i = (row0 + r) * F + f;
    store(h + i, load(u + i) * g);
  }
}

// One pass computes du = grad_h * g and dvn[j] = sum_k w_sp[k] * dg[inv(j, k)] with
// dg = grad_h * u recomputed at the neighbours (cheaper than a round trip through memory),
// and accumulates this tile's share of dw_sp[k] = sum dg[i] * vn[nbr(i, k)] and db_sp = sum dg
// in registers. The tile sums go to partial[tile, K + 1, F]; no float atomics.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
gather_gate_backward_kernel(const T* __restrict__ grad_h, const T* __restrict__ u,
                            const T* __restrict__ vn, const T* __restrict__ w_sp,
                            const T* __restrict__ b_sp, T* __restrict__ du,
                            T* __restrict__ dvn, acc_t<T>* __restrict__ partial, Lattice lat,
                            int64_t rows, int64_t F) {
  using A = acc_t<T>;
  __shared__ int nbr[kTileRows * K];
  __shared__ int inv[kTileRows * K];
  __shared__ A scratch[kThreads];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  fill_neighbours<K>(nbr, row0, rows, lat, /*inverse=*/false);
  fill_neighbours<K>(inv, row0, rows, lat, /*inverse=*/true);
  __syncthreads();

  const int64_t f = static_cast<int64_t>(blockIdx.y) * kLanes + threadIdx.x;
  const bool lane_on = f < F;  // no early return: every thread joins the block sums below
  A w[K], dw[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    w[k] = lane_on ? load(w_sp + k * F + f) : A(0);
    dw[k] = 0;
  }
  const A bias = lane_on ? load(b_sp + f) : A(0);
  A db = 0;

  if (lane_on) {
    for (int r = threadIdx.y; r < kTileRows && row0 + r < rows; r += kBlockRows) {
      const int64_t i = (row0 + r) * F + f;
      const A gh = load(grad_h + i);
      const A dg = gh * load(u + i);
      A g = bias, s = 0;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int n = nbr[r * K + k];
        if (n >= 0) {
          const A v = load(vn + n * F + f);
          g += w[k] * v;
          dw[k] += dg * v;
        }
        const int j = inv[r * K + k];
        if (j >= 0) s += w[k] * (load(grad_h + j * F + f) * load(u + j * F + f));
      }
      store(du + i, gh * g);
      store(dvn + i, s);
      db += dg;
    }
  }

  A* out = partial + static_cast<int64_t>(blockIdx.x) * (K + 1) * F;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const A t = block_row_sum(dw[k], scratch);
    if (threadIdx.y == 0 && lane_on) out[k * F + f] = t;
  }
  const A t = block_row_sum(db, scratch);
  if (threadIdx.y == 0 && lane_on) out[K * F + f] = t;
}

template <typename T, int K>
void forward(const GatherGateParams& p) {
  const Lattice lat{p.D, p.H, p.W, p.boundary};
  const int64_t rows = p.B * lat.cells();
  const dim3 grid = tile_grid(rows, p.F), block(kLanes, kBlockRows);
  gather_gate_forward_kernel<T, K><<<grid, block, 0, p.stream>>>(
      static_cast<const T*>(p.u), static_cast<const T*>(p.vn), static_cast<const T*>(p.w_sp),
      static_cast<const T*>(p.b_sp), static_cast<T*>(p.h), lat, rows, p.F);
}

template <typename T, int K>
void backward(const GatherGateParams& p) {
  const Lattice lat{p.D, p.H, p.W, p.boundary};
  const int64_t rows = p.B * lat.cells();
  const dim3 grid = tile_grid(rows, p.F), block(kLanes, kBlockRows);
  gather_gate_backward_kernel<T, K><<<grid, block, 0, p.stream>>>(
      static_cast<const T*>(p.grad_h), static_cast<const T*>(p.u), static_cast<const T*>(p.vn),
      static_cast<const T*>(p.w_sp), static_cast<const T*>(p.b_sp), static_cast<T*>(p.du),
      static_cast<T*>(p.dvn), static_cast<acc_t<T>*>(p.partial), lat, rows, p.F);
  launch_reduce_tiles<T>(p.partial, num_tiles(rows), (K + 1) * p.F, K * p.F, p.dw_sp, p.db_sp,
                         p.stream);
}

// Calls fn(Tag<T>{}, std::integral_constant<int, K>{}) for the dtype and the token count of p.
template <typename Fn>
void dispatch_stencil(const GatherGateParams& p, Fn&& fn) {
  dispatch(p.dtype, [&](auto tag) {
    if (p.neighbourhood == kMoore) fn(tag, std::integral_constant<int, 27>{});
    else fn(tag, std::integral_constant<int, 7>{});
  });
}

}  // namespace

void launch_gather_gate(const GatherGateParams& p) {
  dispatch_stencil(p, [&](auto tag, auto k) {
    forward<typename decltype(tag)::type, decltype(k)::value>(p);
  });
}

void launch_gather_gate_backward(const GatherGateParams& p) {
  dispatch_stencil(p, [&](auto tag, auto k) {
    backward<typename decltype(tag)::type, decltype(k)::value>(p);
  });
}

}  // namespace cuda
}  // namespace cube
