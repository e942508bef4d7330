// The fused CPU cell (SPEC.md "One step" and "Backward"; docs/performance.md "The fused cell").
// A task is one batch item's chunk of d-planes [d0, d1) and one band of rows of those planes
// (the whole plane up to 1,024 cells), swept plane by plane. The band of a plane is the tile:
// its rows run through LayerNorm, the in-projection, GELU and the gate LayerNorm into rings of
// band buffers (vn of planes d-1, d, d+1: the stencil reaches one plane each way; u of d and
// d+1), then the gather + gate of plane d, the out-projection and the stochastic residual
// update, so u, vn and h (2F values per cell) stay in per-thread band buffers. A chunk recomputes
// the planes just outside it, and a band the rows just outside it (their halos), instead of
// sharing them with their neighbours.
//   forward   plane d+1 in, then plane d out: x_new = where(m, x + (h @ w_out + b_out), x),
//             rounded once to the state's dtype; a non-firing cell keeps its state bit for bit
//   backward  from the saved state x, per plane e = d+1 (stage A): u, vn recomputed (keeping
//             gelu' and the gate LayerNorm's vhat, so stage B evaluates no GELU again),
//             d_delta = where(m, grad, 0), dh = d_delta @ w_out^T, dg = dh * u; then plane d
//             (stage B, it needs vn and dg of d-1, d, d+1): g recomputed, du = dh * g,
//             dvn (the transposed stencil on dg), dw_sp, db_sp, dw_out += h^T d_delta, the
//             gate-input backward, dw_in += y^T dz_pre, dy = dz_pre @ w_in^T, the LayerNorm
//             backward and the residual: dx = LN'(dy) + grad
// The stencils (g, the transposed one for dvn, and dw_sp) read vn and dg from band buffers
// padded with a halo, a group of tokens at a time with their weights held in registers.
// The GEMMs run one band at a time on oneDNN's fp32 micro-kernel (cpublas::brgemm, fp32
// accumulation) for fp32, bf16 and fp16 states: everything in a band buffer is fp32, only the
// state is stored in its dtype. Where CellConfig::bf16_gemm says so (bf16 states on a CPU with
// AVX512-BF16), all but dh run on its bf16 micro-kernel instead, their operands rounded to bf16
// from the band buffers (Weight::times, add_at_b), the sums still fp32 (docs/performance.md
// "bf16").
// float64 (gradcheck) runs the same plan with a plain loop GEMM.
// Weight gradients: one partial sum per task, in a fixed row order, added in task order; the
// tasks depend on the shapes only, so every bit of them is the same for any thread count.
// Planes the caller knows to be zero (`live`, cpu/rollout.cpp "Skipping quiet planes") are
// written as zeros, and a plane is projected (forward) or run through stage A (backward) only
// where a computed plane reads it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include "cell_math.h"
#include "cpu/cell.h"
#include "cpu/loops.h"
#include "cpu/row_math.h"
#include "cpu/vec.h"

namespace cube {
namespace {

// C[M, N] = A[M, K] @ B[K, N] (+ C with `add`), all row-major with leading dimensions.
CUBE_ALWAYS_INLINE void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                             const float* B, int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}

// The bf16 micro-kernel's B: N cut into blocks of at most kBlockN columns, each block in VNNI
// pairs [K/2][ldb][2] (K even), ldb its width rounded up to 16 with zeros in the padding, block
// j at j * kBlockN * K. AVX512-BF16 would take one block of any width; AMX takes only what
// oneDNN's packing of B writes, whose leading dimension is 16, 32, 48 or 64. This is that
// layout, which bf16_brgemm_runs checks against ATen's `pack` where the CPU has one.
constexpr int64_t kBlockN = 64;
CUBE_ALWAYS_INLINE int64_t block_ldb(int64_t nb) { return (nb + 15) / 16 * 16; }
// The values a [K, N] B takes in that layout.
CUBE_ALWAYS_INLINE int64_t packed_size(int64_t K, int64_t N) { return K * block_ldb(N); }
// fn(n0, nb, ldb) for each block of N columns: its first column, width and leading dimension.
template <typename Fn>
CUBE_ALWAYS_INLINE void for_each_block(int64_t N, const Fn& fn) {
  for (int64_t n0 = 0; n0 < N; n0 += kBlockN) {
    const int64_t nb = std::min(kBlockN, N - n0);
    fn(n0, nb, block_ldb(nb));
  }
}

// C[M, N] = A[M, K] @ B (+ C with `add`) on the bf16 micro-kernel, A and B in bf16 (B packed as
// above), the sums in fp32: one call per block of B.
CUBE_ALWAYS_INLINE void gemm(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda,
                             const at::BFloat16* B, float* C, int64_t ldc, bool add) {
  for_each_block(N, [&](int64_t n0, int64_t nb, int64_t ldb) {
    at::native::cpublas::brgemm(M, nb, K, lda, ldb, ldc, add, A, B + n0 * K, C + n0,
                                /*is_vnni=*/true);
  });
}

// float64 (gradcheck) has no micro-kernel and ATen exports no BLAS call for it: a plain loop.
CUBE_ALWAYS_INLINE void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                             const double* B, int64_t ldb, double* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    double* __restrict__ c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* __restrict__ b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// Tasks per call: about kTasks (batch items x chunks x bands) in all, where the shapes allow.
constexpr int64_t kTasks = 4;

// Bands per plane: a plane of more than kBandCells cells is cut into bands of whole rows, each
// swept as a tile of its own, so that a tile's buffers stay in the caches on wide lattices (the
// backward's buffers for whole 48x48 planes take 21 MB at F = 128; for bands of 12 rows, 6 MB).
// Their number is rounded up so that the batch's bands make a multiple of kTasks tasks: 1, 2 or
// 4 threads then share them evenly, and no chunks are needed, whose halo planes cost more than
// a band's halo rows (docs/performance.md "Bands").
int64_t bands_per_plane(int64_t B, int64_t H, int64_t W) {
  constexpr int64_t kBandCells = 1024;
  int64_t bands = (H * W + kBandCells - 1) / kBandCells;
  if (bands > 1) {
    const int64_t multiple = kTasks / std::gcd(B, kTasks);
    bands = (bands + multiple - 1) / multiple * multiple;
  }
  return std::clamp<int64_t>(bands, 1, H);
}

// Chunks of planes per batch item: about kTasks tasks in all where the lattice is deep enough,
// with at least kMinPlanes planes per chunk (each chunk recomputes up to two halo planes). A
// function of the shapes only, not of the thread count: the weight-gradient partials (one per
// task) are then summed in the same order for any number of threads.
int64_t chunks_per_item(int64_t B, int64_t D, int64_t bands) {
  constexpr int64_t kMinPlanes = 4;
  return std::max<int64_t>(1, std::min((kTasks + B * bands - 1) / (B * bands), D / kMinPlanes));
}

// A band of a plane, rows [h0, h0 + n), as a tile: its local rows 0 .. n+1 are the row above it,
// its own n rows and the row below it, the halo rows being what the stencil reads across the
// band's edges. A halo row is absent beyond a zero boundary (zeros), a copy of one of the band's
// own rows where a periodic boundary wraps onto the band itself, and otherwise an extra row,
// projected like the band's own (a band recomputes the rows of its neighbours it reads). Local
// rows [first, last) are the projected ones.
struct Band {
  int64_t h0, n;
  int64_t halo[2];  // the lattice rows of local rows 0 and n + 1, or -1 where absent
  int64_t first, last;
  Band(int64_t h0_, int64_t h1, int64_t H, int boundary) : h0(h0_), n(h1 - h0_) {
    halo[0] = boundary_plane(h0 - 1, H, boundary);  // the same wrap rule along h as along d
    halo[1] = boundary_plane(h1, H, boundary);
    first = extra(halo[0]) ? 0 : 1;
    last = extra(halo[1]) ? n + 2 : n + 1;
  }
  bool own(int64_t r) const { return r >= h0 && r < h0 + n; }
  bool extra(int64_t r) const { return r >= 0 && !own(r); }
  int64_t lattice_row(int64_t i) const { return i == 0 ? halo[0] : i == n + 1 ? halo[1] : h0 + i - 1; }
};

constexpr int64_t kMaxTokens = 27;  // Moore

// dst = src rounded to bf16 (at::BFloat16's rounding, which the compiler vectorises here).
CUBE_ALWAYS_INLINE void round_to_bf16(const float* __restrict__ src, int64_t n,
                                      at::BFloat16* __restrict__ dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = at::BFloat16(src[i]);
}

// Rows 2q, 2q + 1 of a B [K, N] (a, b; b nullptr: zeros) rounded to bf16 into pair row q of
// each block of its packed layout (`dst`, the layout's start).
CUBE_ALWAYS_INLINE void pair_to_bf16(const float* __restrict__ a, const float* __restrict__ b,
                                     int64_t N, int64_t K, int64_t q,
                                     at::BFloat16* __restrict__ dst) {
  for_each_block(N, [&](int64_t n0, int64_t nb, int64_t ldb) {
    at::BFloat16* __restrict__ row = dst + n0 * K + 2 * q * ldb;
    for (int64_t j = 0; j < nb; ++j) {
      row[2 * j] = at::BFloat16(a[n0 + j]);
      row[2 * j + 1] = at::BFloat16(b == nullptr ? 0.0f : b[n0 + j]);
    }
    std::fill(row + 2 * nb, row + 2 * ldb, at::BFloat16(0.0f));
  });
}

// A weight [K, N] as the B operand of the GEMMs that multiply activations by it, and, where the
// step runs them on the bf16 micro-kernel, its bf16 copy packed for it (packed_bf16).
template <typename acc_t>
struct Weight {
  const acc_t* w = nullptr;
  const at::BFloat16* w16 = nullptr;
  int64_t K = 0, N = 0;

  // C[M, N] = A[M, K] @ w, A's rows lda apart, C's N apart: with w16, on the bf16 micro-kernel,
  // A first rounded to bf16 into a16 ([M, K]).
  CUBE_ALWAYS_INLINE void times(int64_t M, const acc_t* A, int64_t lda, acc_t* C,
                                at::BFloat16* a16) const {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (w16 != nullptr) {
        for (int64_t i = 0; i < M; ++i) round_to_bf16(A + i * lda, K, a16 + i * K);
        return gemm(M, N, K, a16, K, w16, C, N, false);
      }
    }
    gemm(M, N, K, A, lda, w, N, C, N, false);
  }
};

// w [K, N] (K even) rounded to bf16, packed for the micro-kernel.
at::Tensor packed_bf16(const at::Tensor& w) {
  const int64_t K = w.size(0), N = w.size(1);
  const at::Tensor wc = w.contiguous();  // fp32: bf16 states compute in fp32
  const float* src = wc.const_data_ptr<float>();
  at::Tensor out = at::empty({packed_size(K, N)}, w.options().dtype(at::kBFloat16));
  at::BFloat16* dst = out.mutable_data_ptr<at::BFloat16>();
  for (int64_t q = 0; q < K / 2; ++q)
    pair_to_bf16(src + 2 * q * N, src + (2 * q + 1) * N, N, K, q, dst);
  return out;
}

// The gather reads vn (forward) and dg (backward's transposed stencil) from band buffers padded
// with a one-cell halo, (n + 2) x (W + 2) rows for a band of n rows: zeros for a zero boundary,
// the wrapped columns for a periodic one, the halo rows as Band says, and a padded band of zeros
// where the zero boundary leaves a d-plane out. So every token is a fixed row offset and the
// stencil loops have no branches. A padded band is stored in blocks of kLanes channels,
// [ceil(F / kLanes)][rows][kLanes] (lanes past F unused), so that a sweep over one block reads
// contiguous memory that stays in L1. The layout is that of the largest band (`rows`), the
// same for every task a thread runs in one call, so that halo entries nothing writes stay zero.
struct Padded {
  int64_t H, W, F, rows, blocks;  // H: the rows of the band in hand
  Padded(int64_t H_, int64_t W_, int64_t F_)
      : H(H_), W(W_), F(F_), rows((H_ + 2) * (W_ + 2)), blocks((F_ + kLanes - 1) / kLanes) {}
  int64_t size() const { return blocks * rows * kLanes; }
  // The same layout, for a band of n <= H rows.
  Padded band(int64_t n) const {
    Padded b = *this;
    b.H = n;
    return b;
  }
  // The row of local cell l (local row 0 the halo row above the band).
  int64_t local(int64_t l) const { return (l / W) * (W + 2) + l % W + 1; }
  // The row of the band's cell q.
  int64_t row(int64_t q) const { return local(q + W); }
  // Channel f of row 0; the rows follow kLanes apart.
  template <typename T>
  T* channel(T* pad, int64_t f) const { return pad + (f / kLanes) * rows * kLanes + f % kLanes; }
  // Row r = v (F values).
  template <typename T>
  CUBE_ALWAYS_INLINE void put(T* pad, int64_t r, const T* v) const {
    T* dst = pad + r * kLanes;
    int64_t f0 = 0;
    for (; f0 + kLanes <= F; f0 += kLanes, dst += rows * kLanes)
      std::memcpy(dst, v + f0, kLanes * sizeof(T));  // a fixed-size copy: one register
    for (; f0 < F; ++f0) dst[f0 % kLanes] = v[f0];
  }
  // Completes the halo of band `band` once its projected rows are in: absent halo rows are
  // zeroed (an earlier task's band may have written a row there); for a periodic boundary
  // the columns wrap on every row, then a halo row that wraps onto the band is copied from it
  // (whole rows, so that the corners come with them).
  template <typename T>
  void fill_halo(T* pad, const Band& band, int boundary) const {
    const int64_t Wp = W + 2, n = band.n;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      T* p = pad + blk * rows * kLanes;
      auto at = [&](int64_t i, int64_t w) { return p + (i * Wp + w + 1) * kLanes; };
      for (int side = 0; side < 2; ++side)
        if (band.halo[side] < 0) std::fill(at(side * (n + 1), -1), at(side * (n + 1), W + 1), T(0));
      if (boundary != kPeriodic) continue;
      for (int64_t i = 0; i < n + 2; ++i) {
        std::copy(at(i, W - 1), at(i, W), at(i, -1));
        std::copy(at(i, 0), at(i, 1), at(i, W));
      }
      for (int side = 0; side < 2; ++side)
        if (band.own(band.halo[side])) {
          const int64_t src = band.halo[side] - band.h0 + 1;
          std::copy(at(src, -1), at(src, W + 1), at(side * (n + 1), -1));
        }
    }
  }
};

// The vector code below is always inlined: no call passes a vector across the ABI that
// -Wpsabi warns about.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// One group of G tokens of the stencil on the channels [f0, f0 + lanes of Vec) of every cell of
// a plane: out[q, f] = (first ? bias[f] (0 without bias) : out[q, f])
//                      + sum_j w[j, f] * src[j][row(q) + off[j], f]
// with row(q) the cell's padded row, times gate[q * gate_ld + f] where `gate` is given (the
// last group's, so that the forward's h = g * u needs no pass of its own). The G weight
// registers stay loaded while the group sweeps the plane (about one load per multiply-add
// instead of two).
template <int G, typename Vec, typename acc_t>
CUBE_ALWAYS_INLINE void stencil_group(const acc_t* const* src, const int64_t* off, const acc_t* w,
                                      const acc_t* bias, bool first, const acc_t* gate,
                                      int64_t gate_ld, const Padded& pl, int64_t f0, acc_t* out) {
  const int64_t H = pl.H, W = pl.W, F = pl.F;
  Vec wr[G];
  const acc_t* base[G];
  for (int j = 0; j < G; ++j) {
    wr[j] = load<Vec>(w + j * F + f0);
    base[j] = pl.channel(src[j], f0) + off[j] * kLanes;
  }
  const Vec init = bias == nullptr ? Vec{} : load<Vec>(bias + f0);
  for (int64_t hh = 0; hh < H; ++hh) {
    const int64_t r0 = pl.row(hh * W) * kLanes;
    for (int64_t ww = 0; ww < W; ++ww) {
      const int64_t r = r0 + ww * kLanes;
      acc_t* o = out + (hh * W + ww) * F + f0;
      Vec acc = first ? init : load<Vec>(o);
      for (int j = 0; j < G; ++j) acc += wr[j] * load<Vec>(base[j] + r);
      if (gate != nullptr) acc *= load<Vec>(gate + (hh * W + ww) * gate_ld + f0);
      store(o, acc);
    }
  }
}

// One group of G tokens of dw_sp on the channels [f0, f0 + lanes of Vec): pw[j, f] += sum_q
// dg[row(q), f] * src[j][row(q) + off[j], f], the sums over the plane in registers.
template <int G, typename Vec, typename acc_t>
CUBE_ALWAYS_INLINE void correlate_group(const acc_t* const* src, const int64_t* off,
                                        const acc_t* dg, const Padded& pl, int64_t f0,
                                        acc_t* pw) {
  const int64_t H = pl.H, W = pl.W, F = pl.F;
  Vec acc[G] = {};
  const acc_t* base[G];
  for (int j = 0; j < G; ++j) base[j] = pl.channel(src[j], f0) + off[j] * kLanes;
  const acc_t* dgf = pl.channel(dg, f0);
  for (int64_t hh = 0; hh < H; ++hh) {
    const int64_t r0 = pl.row(hh * W) * kLanes;
    for (int64_t ww = 0; ww < W; ++ww) {
      const int64_t r = r0 + ww * kLanes;
      const Vec d = load<Vec>(dgf + r);
      for (int j = 0; j < G; ++j) acc[j] += d * load<Vec>(base[j] + r);
    }
  }
  for (int j = 0; j < G; ++j) store(pw + j * F + f0, load<Vec>(pw + j * F + f0) + acc[j]);
}

// The K tokens in groups of G (K = 27: three groups of 9; K = 7: one group of 7), a block of
// kLanes channels at a time (a register), the channels of a last partial block one by one.
template <int G, typename acc_t>
CUBE_ALWAYS_INLINE void stencil_groups(const acc_t* const* src, const int64_t* off,
                                       const acc_t* w, const acc_t* bias, const acc_t* gate,
                                       int64_t gate_ld, int64_t K, const Padded& pl, acc_t* out) {
  using Vec = typename Lanes<acc_t>::type;
  for (int64_t k0 = 0; k0 < K; k0 += G) {
    const acc_t* g = k0 + G >= K ? gate : nullptr;
    int64_t f0 = 0;
    for (; f0 + kLanes <= pl.F; f0 += kLanes)
      stencil_group<G, Vec>(src + k0, off + k0, w + k0 * pl.F, bias, k0 == 0, g, gate_ld, pl, f0,
                            out);
    for (; f0 < pl.F; ++f0)
      stencil_group<G, acc_t>(src + k0, off + k0, w + k0 * pl.F, bias, k0 == 0, g, gate_ld, pl,
                              f0, out);
  }
}

template <int G, typename acc_t>
CUBE_ALWAYS_INLINE void correlate_groups(const acc_t* const* src, const int64_t* off,
                                         const acc_t* dg, int64_t K, const Padded& pl,
                                         acc_t* pw) {
  using Vec = typename Lanes<acc_t>::type;
  for (int64_t k0 = 0; k0 < K; k0 += G) {
    int64_t f0 = 0;
    for (; f0 + kLanes <= pl.F; f0 += kLanes)
      correlate_group<G, Vec>(src + k0, off + k0, dg, pl, f0, pw + k0 * pl.F);
    for (; f0 < pl.F; ++f0)
      correlate_group<G, acc_t>(src + k0, off + k0, dg, pl, f0, pw + k0 * pl.F);
  }
}

// out[q, f] = bias[f] + sum_k w[k, f] * src[k][row(q) + off[k], f] over every cell q of the
// plane, the tokens added in k order (bias nullptr: from 0), times gate[q * gate_ld + f] where
// `gate` is given; out is [P, F].
template <typename acc_t>
CUBE_ALWAYS_INLINE void stencil(const acc_t* const* src, const int64_t* off, const acc_t* w,
                                const acc_t* bias, int64_t K, const Padded& pl, acc_t* out,
                                const acc_t* gate = nullptr, int64_t gate_ld = 0) {
  if (K % 9 == 0) return stencil_groups<9>(src, off, w, bias, gate, gate_ld, K, pl, out);
  stencil_groups<7>(src, off, w, bias, gate, gate_ld, K, pl, out);
}

// pw[k, f] += sum_q dg[row(q), f] * src[k][row(q) + off[k], f] (dw_sp's terms of one plane).
template <typename acc_t>
CUBE_ALWAYS_INLINE void correlate(const acc_t* const* src, const int64_t* off, const acc_t* dg,
                                  int64_t K, const Padded& pl, acc_t* pw) {
  if (K % 9 == 0) return correlate_groups<9>(src, off, dg, K, pl, pw);
  correlate_groups<7>(src, off, dg, K, pl, pw);
}
#pragma GCC diagnostic pop

// dw[M, N] += a^T b over n rows, a [n, M] and b [n, N] contiguous, a_t [M, n] scratch. With
// `bf16`, on the bf16 micro-kernel: a^T and b rounded to bf16 into a16 ((n + 1) x M values at
// most) and b16 (packed, packed_size(n + 1, N) at most), an odd n padded with a row of zeros.
template <typename acc_t>
CUBE_ALWAYS_INLINE void add_at_b(int64_t n, int64_t M, int64_t N, const acc_t* a, const acc_t* b,
                                 acc_t* dw, acc_t* a_t, bool bf16, at::BFloat16* a16,
                                 at::BFloat16* b16) {
  transpose(a, n, M, M, a_t);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (bf16) {
      const int64_t K = n + n % 2;
      for (int64_t m = 0; m < M; ++m) {
        round_to_bf16(a_t + m * n, n, a16 + m * K);
        if (K > n) a16[m * K + n] = at::BFloat16(0.0f);
      }
      for (int64_t q = 0; q < n; q += 2)
        pair_to_bf16(b + q * N, q + 1 < n ? b + (q + 1) * N : nullptr, N, K, q / 2, b16);
      return gemm(M, N, K, a16, K, b16, dw, N, true);
    }
  }
  gemm(M, N, n, a_t, n, b, N, dw, N, true);
}

// One step's operands. scalar_t: the state's dtype (the backward runs with the accumulation type).
template <typename scalar_t>
struct Step {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t B, D, H, W, P, C, F, K;  // P = H * W cells per plane
  int boundary;
  const scalar_t* x;
  const scalar_t* inject;  // [B, H, W, E] or nullptr
  int64_t E;
  const acc_t* p[kNumCellParams];
  Weight<acc_t> w_in, w_out;      // [C, 2F], [F, C]
  Weight<acc_t> w_in_t, w_out_t;  // backward: w_in^T [2F, C], w_out^T [C, F]
  int dd[kMaxTokens];         // token k's offset in d
  int64_t off[kMaxTokens];    // its offset in (h, w) as rows of a padded plane
  int64_t off_t[kMaxTokens];  // -off: backward's transposed stencil
  uint64_t seed;
  int64_t step;
  float fire_rate;
  int64_t chunks;  // per batch item
  int64_t bands;   // per plane
  LivePlanes live;

  // Whether the GEMMs run on the bf16 micro-kernel (CellConfig::bf16_gemm).
  bool bf16() const { return w_in.w16 != nullptr; }

  // Whether plane d of item b is computed.
  bool computes(int64_t b, int64_t d) const { return live == nullptr || live[b * D + d] != 0; }

  // Whether the unwrapped plane e is read by a computed plane of item b's chunk [d0, d1).
  bool feeds(int64_t b, int64_t e, int64_t d0, int64_t d1) const {
    for (int64_t d = std::max(e - 1, d0); d <= std::min(e + 1, d1 - 1); ++d)
      if (computes(b, d)) return true;
    return false;
  }

  // The plane that the unwrapped index e stands for, or -1 outside a zero boundary.
  int64_t plane(int64_t e) const { return boundary_plane(e, D, boundary); }

  bool fires(int64_t b, int64_t d, int64_t q) const {
    return cube::fires(seed, step, B, b, D * P, d * P + q, fire_rate);
  }

  // Row q of plane d of batch item b (the injected channels of the front face included) in the
  // accumulation type: the row itself where it is one, else converted into buf.
  const acc_t* row(int64_t b, int64_t d, int64_t q, acc_t* buf) const {
    const scalar_t* r = x + ((b * D + d) * P + q) * C;
    const bool injected = inject != nullptr && d == 0;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (!injected) return r;
    }
    for (int64_t c = 0; c < C; ++c) buf[c] = static_cast<acc_t>(r[c]);
    if (injected) {
      const scalar_t* s = inject + (b * P + q) * E;
      for (int64_t c = 0; c < E; ++c) buf[c] = static_cast<acc_t>(s[c]);
    }
    return buf;
  }

  // The lattice cell of local cell l of a band.
  int64_t cell(const Band& band, int64_t l) const { return band.lattice_row(l / W) * W + l % W; }

  // The projected rows of a band of plane d of item b through LayerNorm (into y, [local cells,
  // C]) and the in-projection without its bias (into z, [local cells, 2F]; the gate input adds
  // it), at their local cells. a16: Weight::times's.
  CUBE_ALWAYS_INLINE void project(int64_t b, int64_t d, const Band& band, acc_t* y, acc_t* z,
                                  acc_t* buf, at::BFloat16* a16) const {
    const int64_t l0 = band.first * W, l1 = band.last * W;
    for (int64_t l = l0; l < l1; l += kLanes) {
      const int64_t R = std::min(kLanes, l1 - l);
      for (int64_t r = 0; r < R; ++r) {
        const acc_t* v = row(b, d, cell(band, l + r), buf);
        std::copy(v, v + C, y + (l + r) * C);
      }
      rows::layer_norm_rows(y + l * C, C, R, p[kLn1W], p[kLn1B], C);
    }
    w_in.times(l1 - l0, y + l0 * C, C, z + l0 * 2 * F, a16);
  }

  // src[k]: the padded plane that token k of plane d's cells reads, from `planes` (planes d-1,
  // d, d+1, nullptr where absent: then `zeros`); `sign` -1 reads the transposed stencil's.
  CUBE_ALWAYS_INLINE void token_planes(acc_t* const* planes, const acc_t* zeros, int sign,
                                       const acc_t** src) const {
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* plane = planes[1 + sign * dd[k]];
      src[k] = plane == nullptr ? zeros : plane;
    }
  }

  int64_t tasks() const { return B * chunks * bands; }

  // The task's tile: batch item b, its chunk of planes [d0, d1), and the band of rows swept.
  Band tile(int64_t task, int64_t& b, int64_t& d0, int64_t& d1) const {
    b = task / (chunks * bands);
    const int64_t c = task / bands % chunks, j = task % bands;
    d0 = c * D / chunks, d1 = (c + 1) * D / chunks;
    return Band(j * H / bands, (j + 1) * H / bands, H, boundary);
  }

  // The most rows a band has.
  int64_t band_rows() const { return (H + bands - 1) / bands; }
};

// A task's ring of `slots` band buffers, indexed by the unwrapped plane e >= d0 - 1: three for
// what the stencils read of planes d-1, d and d+1 (vn, dg), two for what only plane d's own sweep
// reads (plane e = d+1 is projected before plane d is swept).
template <int slots, typename acc_t>
CUBE_ALWAYS_INLINE acc_t* ring_slot(acc_t* ring, int64_t slot_size, int64_t e, int64_t d0) {
  return ring + ((e - d0 + 1) % slots) * slot_size;
}

template <typename scalar_t>
struct ForwardTasks {
  using acc_t = at::opmath_type<scalar_t>;
  static CUBE_ALWAYS_INLINE void run(const Step<scalar_t>& s, scalar_t* const& out,
                                     const int64_t& begin, const int64_t& end) {
    const int64_t P = s.P, C = s.C, F = s.F, W = s.W;
    const Padded pl(s.band_rows(), W, F);
    const int64_t N = pl.H * W, L = N + 2 * W;  // cells of the largest band, local cells
    const int64_t pad = pl.size(), zs = L * 2 * F;  // per plane: vn (padded), z (u in it)
    std::vector<acc_t> mem(static_cast<size_t>(4 * pad + 2 * zs + L * C + N * C + N * F + C));
    acc_t* vn_ring = mem.data();       // three slots
    acc_t* z_ring = vn_ring + 3 * pad;  // two slots
    acc_t* zeros = z_ring + 2 * zs;    // a padded band of zeros: a plane beyond the boundary
    acc_t* y = zeros + pad;           // [L, C]
    acc_t* delta = y + L * C;         // [N, C]
    acc_t* h = delta + N * C;         // [N, F]
    acc_t* buf = h + N * F;           // one state row
    std::vector<at::BFloat16> a16(static_cast<size_t>(s.bf16() ? L * std::max(C, F) : 0));
    const acc_t* __restrict__ b_out = s.p[kBOut];
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, d0, d1;
      const Band band = s.tile(task, b, d0, d1);
      const Padded bp = pl.band(band.n);
      const int64_t n = band.n * W, c0 = band.h0 * W;  // the band's cells: [c0, c0 + n)
      for (int64_t e = d0 - 1; e <= d1; ++e) {
        const int64_t pe = s.plane(e);
        if (pe >= 0 && s.feeds(b, e, d0, d1)) {
          acc_t* z = ring_slot<2>(z_ring, zs, e, d0);
          acc_t* vn = ring_slot<3>(vn_ring, pad, e, d0);
          s.project(b, pe, band, y, z, buf, a16.data());
          const int64_t l0 = band.first * W, l1 = band.last * W;
          for (int64_t l = l0; l < l1; l += kLanes)
            rows::gate_input_rows(z + l * 2 * F, std::min(kLanes, l1 - l), s.p[kBIn],
                                  s.p[kLn2W], s.p[kLn2B], F, z + l * 2 * F, z + l * 2 * F + F,
                                  2 * F);
          for (int64_t l = l0; l < l1; ++l) bp.put(vn, bp.local(l), z + l * 2 * F + F);
          bp.fill_halo(vn, band, s.boundary);
        }
        const int64_t d = e - 1;  // plane d has its neighbours now
        if (d < d0) continue;
        scalar_t* o = out + ((b * s.D + d) * P + c0) * C;
        if (!s.computes(b, d)) {
          std::fill(o, o + n * C, scalar_t(0));
          continue;
        }
        acc_t* planes[3];
        for (int i = 0; i < 3; ++i)
          planes[i] = s.plane(d - 1 + i) < 0 ? nullptr : ring_slot<3>(vn_ring, pad, d - 1 + i, d0);
        const acc_t* src[kMaxTokens];
        s.token_planes(planes, zeros, 1, src);
        const acc_t* u = ring_slot<2>(z_ring, zs, d, d0) + W * 2 * F;  // local row 1 on
        stencil(src, s.off, s.p[kWSp], s.p[kBSp], s.K, bp, h, u, 2 * F);  // h = g * u
        s.w_out.times(n, h, F, delta, a16.data());
        for (int64_t q = 0; q < n; ++q) {
          const acc_t* __restrict__ xq = s.row(b, d, c0 + q, buf);
          scalar_t* __restrict__ oq = o + q * C;
          if (s.fires(b, d, c0 + q)) {
            const acc_t* __restrict__ dq = delta + q * C;
            for (int64_t c = 0; c < C; ++c) oq[c] = static_cast<scalar_t>(xq[c] + (dq[c] + b_out[c]));
          } else {
            for (int64_t c = 0; c < C; ++c) oq[c] = static_cast<scalar_t>(xq[c]);
          }
        }
      }
    }
  }
};

// Offsets of the ten weight gradients in a task's partial sums (SPEC's order).
struct GradLayout {
  int64_t offset[kNumCellParams + 1];
  explicit GradLayout(const CellParams& p) {
    offset[0] = 0;
    for (int i = 0; i < kNumCellParams; ++i) offset[i + 1] = offset[i] + p[i].numel();
  }
  int64_t size() const { return offset[kNumCellParams]; }
};

template <typename acc_t>
struct BackwardTasks {
  static CUBE_ALWAYS_INLINE void run(const Step<acc_t>& s, const acc_t* const& grad,
                                     acc_t* const& dx, const GradLayout& layout,
                                     acc_t* const& partials, const int64_t& begin,
                                     const int64_t& end) {
    const int64_t P = s.P, C = s.C, F = s.F, K = s.K, W = s.W;
    const Padded pl(s.band_rows(), W, F);
    const int64_t N = pl.H * W, L = N + 2 * W;  // cells of the largest band, local cells
    const int64_t pad = pl.size();
    // Per plane, in a ring of three: vn and dg [padded]; in a ring of two, over the local cells:
    // u [L, F], dgelu [L, 2F] (gelu' of the pre-activations), vhat [L, F] and rstd [L] (the gate
    // LayerNorm's), d_delta [L, C], dh [L, F].
    const int64_t vn_at = 0, dg_at = pad, nbr_slot = 2 * pad;
    const int64_t u_at = 0, dgelu_at = L * F, vhat_at = dgelu_at + L * 2 * F;
    const int64_t rstd_at = vhat_at + L * F, dd_at = rstd_at + L, dh_at = dd_at + L * C;
    const int64_t own_slot = dh_at + L * F;
    std::vector<acc_t> mem(static_cast<size_t>(3 * nbr_slot + 2 * own_slot + pad +
                                               N * (3 * F + 3 * C) + L * (3 * F + C) + N +
                                               kLanes * F + C + 2 * kLanes * C));
    acc_t* nbr_ring = mem.data();
    acc_t* own_ring = nbr_ring + 3 * nbr_slot;
    acc_t* zeros = own_ring + 2 * own_slot;  // a padded band of zeros: a plane beyond the boundary
    acc_t* h = zeros + pad;      // [N, F]
    acc_t* h_t = h + N * F;      // [F, N]
    acc_t* du = h_t + N * F;     // [N, F]: g, then du
    acc_t* dvn = du + N * F;     // [L, F]
    acc_t* dz = dvn + L * F;     // [L, 2F]: z, then dz_pre
    acc_t* y = dz + L * 2 * F;   // [L, C]
    acc_t* y_t = y + L * C;      // [C, N]
    acc_t* xhat = y_t + N * C;   // [N, C]
    acc_t* dy = xhat + N * C;    // [N, C]
    acc_t* rstd = dy + N * C;    // [N]
    acc_t* g_ln = rstd + N;          // [kLanes, F]
    acc_t* buf = g_ln + kLanes * F;  // [C]
    acc_t* ln = buf + C;             // [kLanes, C]
    acc_t* dxq = ln + kLanes * C;    // [kLanes, C]
    // bf16 copies of GEMM operands: Weight::times's and add_at_b's
    std::vector<at::BFloat16> a16(
        static_cast<size_t>(s.bf16() ? 2 * packed_size(L, std::max(C, 2 * F)) : 0));
    at::BFloat16* b16 = a16.data() + a16.size() / 2;
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, d0, d1;
      const Band band = s.tile(task, b, d0, d1);
      const Padded bp = pl.band(band.n);
      const int64_t n = band.n * W, c0 = band.h0 * W;  // the band's cells: [c0, c0 + n)
      const int64_t l0 = band.first * W, l1 = band.last * W;  // the projected local cells
      acc_t* part = partials + task * layout.size();
      acc_t* pg[kNumCellParams];
      for (int i = 0; i < kNumCellParams; ++i) pg[i] = part + layout.offset[i];
      for (int64_t e = d0 - 1; e <= d1; ++e) {
        const int64_t pe = s.plane(e);
        if (pe >= 0 && s.feeds(b, e, d0, d1)) {  // stage A, on the projected local cells
          acc_t* sl = ring_slot<2>(own_ring, own_slot, e, d0);
          acc_t* nb = ring_slot<3>(nbr_ring, nbr_slot, e, d0);
          acc_t *u = sl + u_at, *vn = nb + vn_at, *d_delta = sl + dd_at, *dh = sl + dh_at;
          acc_t* dg = nb + dg_at;
          s.project(b, pe, band, y, dz, buf, a16.data());
          for (int64_t l = l0; l < l1; l += kLanes)
            rows::gate_input_saving_rows(dz + l * 2 * F, std::min(kLanes, l1 - l), s.p[kBIn],
                                         s.p[kLn2W], s.p[kLn2B], F, u + l * F, dvn + l * F,
                                         sl + dgelu_at + l * 2 * F, sl + vhat_at + l * F,
                                         sl + rstd_at + l);
          for (int64_t l = l0; l < l1; ++l) bp.put(vn, bp.local(l), dvn + l * F);  // dvn: free here
          for (int64_t l = l0; l < l1; ++l) {
            const int64_t q = s.cell(band, l);
            const acc_t* gq = grad + ((b * s.D + pe) * P + q) * C;
            acc_t* o = d_delta + l * C;
            if (s.fires(b, pe, q)) std::copy(gq, gq + C, o); else std::fill(o, o + C, acc_t(0));
          }
          s.w_out_t.times(l1 - l0, d_delta + l0 * C, C, dh + l0 * F, a16.data());
          // dg (into dz, free until stage B), its padded copy and, on the band's own cells of
          // the chunk's planes, db_sp.
          const bool own = e >= d0 && e < d1;
          for (int64_t l = l0; l < l1; ++l) {
            const acc_t* __restrict__ ul = u + l * F;
            const acc_t* __restrict__ dhl = dh + l * F;
            acc_t* __restrict__ dgl = dz + l * F;
            for (int64_t f = 0; f < F; ++f) dgl[f] = dhl[f] * ul[f];
            bp.put(dg, bp.local(l), dgl);
            if (own && l >= W && l < W + n)
              for (int64_t f = 0; f < F; ++f) pg[kBSp][f] += dgl[f];
          }
          bp.fill_halo(vn, band, s.boundary);
          bp.fill_halo(dg, band, s.boundary);
        }
        const int64_t d = e - 1;  // stage B, on the band's own cells (local cells W on)
        if (d < d0) continue;
        if (!s.computes(b, d)) {
          acc_t* o = dx + ((b * s.D + d) * P + c0) * C;
          std::fill(o, o + n * C, acc_t(0));
          continue;
        }
        const acc_t* sl = ring_slot<2>(own_ring, own_slot, d, d0);
        const acc_t *u = sl + u_at + W * F, *d_delta = sl + dd_at + W * C;
        const acc_t *dh = sl + dh_at + W * F, *dg = ring_slot<3>(nbr_ring, nbr_slot, d, d0) + dg_at;
        const acc_t *dgelu = sl + dgelu_at + W * 2 * F, *vhat = sl + vhat_at + W * F;
        const acc_t* ln2_rstd = sl + rstd_at + W;
        acc_t *vn_planes[3], *dg_planes[3];
        for (int i = 0; i < 3; ++i) {
          acc_t* si =
              s.plane(d - 1 + i) < 0 ? nullptr : ring_slot<3>(nbr_ring, nbr_slot, d - 1 + i, d0);
          vn_planes[i] = si == nullptr ? nullptr : si + vn_at;
          dg_planes[i] = si == nullptr ? nullptr : si + dg_at;
        }
        // Gather + gate backward: g recomputed, h (for dw_out), du, db_sp, dw_sp, dvn.
        const acc_t* src[kMaxTokens];
        s.token_planes(vn_planes, zeros, 1, src);
        stencil(src, s.off, s.p[kWSp], s.p[kBSp], K, bp, du);
        for (int64_t i = 0; i < n * F; ++i) {
          h[i] = u[i] * du[i];
          du[i] *= dh[i];
        }
        correlate(src, s.off, dg, K, bp, pg[kWSp]);
        s.token_planes(dg_planes, zeros, -1, src);
        stencil<acc_t>(src, s.off_t, s.p[kWSp], nullptr, K, bp, dvn);
        // Out-projection backward: dw_out += h^T d_delta, db_out += sum d_delta.
        add_at_b(n, F, C, h, d_delta, pg[kWOut], h_t, s.bf16(), a16.data(), b16);
        for (int64_t q = 0; q < n; ++q)
          for (int64_t c = 0; c < C; ++c) pg[kBOut][c] += d_delta[q * C + c];
        // Gate input backward: dz_pre, dln2_weight, dln2_bias, db_in.
        for (int64_t q = 0; q < n; q += kLanes)
          rows::gate_input_backward_rows(du + q * F, dvn + q * F, dgelu + q * 2 * F,
                                         vhat + q * F, ln2_rstd + q, std::min(kLanes, n - q),
                                         s.p[kLn2W], F, g_ln, dz + q * 2 * F, pg[kLn2W],
                                         pg[kLn2B], pg[kBIn]);
        // In-projection backward: dw_in += y^T dz_pre, dy = dz_pre @ w_in^T (y recomputed).
        for (int64_t q0 = 0; q0 < n; q0 += kLanes) {
          const int64_t R = std::min(kLanes, n - q0);
          for (int64_t q = q0; q < q0 + R; ++q) {
            const acc_t* xq = s.row(b, d, c0 + q, buf);
            std::copy(xq, xq + C, xhat + q * C);
          }
          rows::centre_rows(xhat + q0 * C, C, R, C, rstd + q0);
          for (int64_t q = q0; q < q0 + R; ++q) {
            acc_t* __restrict__ xh = xhat + q * C;
            acc_t* __restrict__ yq = y + q * C;
            for (int64_t c = 0; c < C; ++c) {
              xh[c] *= rstd[q];
              yq[c] = xh[c] * s.p[kLn1W][c] + s.p[kLn1B][c];
            }
          }
        }
        add_at_b(n, C, 2 * F, y, dz, pg[kWIn], y_t, s.bf16(), a16.data(), b16);
        s.w_in_t.times(n, dz, 2 * F, dy, a16.data());
        // LayerNorm backward and the residual.
        for (int64_t q = 0; q < n; q += kLanes) {
          const int64_t R = std::min(kLanes, n - q);
          rows::layer_norm_backward_rows(xhat + q * C, dy + q * C, C, R, s.p[kLn1W], rstd + q, C,
                                         ln, dxq, C, pg[kLn1W], pg[kLn1B]);
          const int64_t r0 = ((b * s.D + d) * P + c0 + q) * C;
          for (int64_t i = 0; i < R * C; ++i) dx[r0 + i] = dxq[i] + grad[r0 + i];
        }
      }
    }
  }
};

// The bf16 copy of a weight, where there is one.
const at::BFloat16* bf16_or_null(const at::Tensor& w16) {
  return w16.defined() ? w16.const_data_ptr<at::BFloat16>() : nullptr;
}

// The operands common to both directions.
template <typename scalar_t>
Step<scalar_t> make_step(const at::Tensor& x, const CellParams& p, const CellWeights& w,
                         const CellConfig& cfg, int64_t step, LivePlanes live) {
  using acc_t = at::opmath_type<scalar_t>;
  Step<scalar_t> s{};
  s.B = x.size(0), s.D = x.size(1), s.H = x.size(2), s.W = x.size(3), s.C = x.size(4);
  s.P = s.H * s.W;
  s.F = p[kWIn].size(1) / 2, s.K = num_tokens(cfg.neighbourhood);
  s.boundary = cfg.boundary;
  s.x = x.const_data_ptr<scalar_t>();
  for (int i = 0; i < kNumCellParams; ++i) s.p[i] = p[i].const_data_ptr<acc_t>();
  s.w_in = {s.p[kWIn], bf16_or_null(w.w_in16), s.C, 2 * s.F};
  s.w_out = {s.p[kWOut], bf16_or_null(w.w_out16), s.F, s.C};
  s.w_in_t = {w.w_in_t.const_data_ptr<acc_t>(), bf16_or_null(w.w_in_t16), 2 * s.F, s.C};
  s.w_out_t = {w.w_out_t.const_data_ptr<acc_t>(), nullptr, s.C, s.F};
  for (int k = 0; k < s.K; ++k) {
    int dh, dw;
    token_offset(cfg.neighbourhood, k, s.dd[k], dh, dw);
    s.off[k] = dh * (s.W + 2) + dw;
    s.off_t[k] = -s.off[k];
  }
  s.seed = static_cast<uint64_t>(cfg.seed), s.step = step;
  s.fire_rate = static_cast<float>(cfg.fire_rate);
  s.bands = bands_per_plane(s.B, s.H, s.W);
  s.chunks = chunks_per_item(s.B, s.D, s.bands);
  s.live = live;
  return s;
}

// Whether oneDNN's bf16 brgemm runs here on B packed as `gemm` takes it. A CPU with AVX512-BF16
// may have oneDNN capped below it (ONEDNN_MAX_CPU_ISA), and then the call throws. Where ATen
// packs B itself (AMX), its `pack` must write this layout, padding included, and nothing past K
// rows of it. Small integers, so every sum is exact: two blocks of B, the second padded, and K
// past one AMX tile (32 rows) with a tail. NaNs after A and B would show in C if the kernel read
// beyond them.
bool bf16_brgemm_runs() {
  constexpr int64_t M = 3, K = 38, N = 72, kSlack = 32 * kBlockN;
  const at::BFloat16 nan(std::numeric_limits<float>::quiet_NaN());
  std::vector<float> a(M * K), b(K * N), expected(M * N, 0.0f), c(M * N);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = static_cast<float>((i + k) % 5 - 2);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) b[k * N + j] = static_cast<float>((3 * k + j) % 7 - 3);
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < N; ++j) expected[i * N + j] += a[i * K + k] * b[k * N + j];
  std::vector<at::BFloat16> a16(M * K + kSlack, nan), b16(packed_size(K, N) + kSlack, nan);
  round_to_bf16(a.data(), M * K, a16.data());
  for (int64_t q = 0; q < K / 2; ++q)
    pair_to_bf16(&b[2 * q * N], &b[(2 * q + 1) * N], N, K, q, b16.data());
  try {
    bool packs_alike = true;
    if (at::native::cpublas::could_pack(at::kBFloat16)) {
      for_each_block(N, [&](int64_t n0, int64_t nb, int64_t ldb) {
        // `pack` takes only an input leading dimension equal to its N: the block alone, [K, ldb]
        // with zeros in the padding columns.
        std::vector<at::BFloat16> plain(K * ldb, at::BFloat16(0.0f));
        std::vector<at::BFloat16> packed(K * ldb + kSlack, nan);
        for (int64_t k = 0; k < K; ++k) round_to_bf16(&b[k * N + n0], nb, &plain[k * ldb]);
        at::native::cpublas::pack(K, ldb, ldb, ldb, at::kBFloat16, at::kBFloat16, plain.data(),
                                  packed.data());
        const auto same = [](at::BFloat16 p, at::BFloat16 q) { return p.x == q.x; };
        const auto end = packed.begin() + K * ldb;  // past it: untouched, still NaN
        packs_alike = packs_alike && std::equal(packed.begin(), end, b16.begin() + n0 * K, same) &&
                      std::all_of(end, packed.end(), [&](at::BFloat16 p) { return same(p, nan); });
      });
    }
    if (!packs_alike) return false;
    gemm(M, N, K, a16.data(), K, b16.data(), c.data(), N, false);
    at::native::cpublas::brgemm_release();
  } catch (const std::exception&) {
    return false;
  }
  return c == expected;
}

}  // namespace

bool bf16_micro_kernel() {
  if (!at::globalContext().userEnabledMkldnn()) return false;
  static const bool here = [] {
    if (baseline_forced()) return false;
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto has = [&caps](const char* name) {
      const auto it = caps.find(name);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    return has("avx512_bf16") && bf16_brgemm_runs();
  }();
  return here;
}

bool bf16_gemm_for(at::ScalarType dtype, int64_t C, int64_t F) {
  return dtype == at::kBFloat16 && C % 2 == 0 && F % 2 == 0 && bf16_micro_kernel();
}

CellWeights cell_weights(const CellParams& p, const CellConfig& cfg) {
  CellWeights w;
  w.w_in_t = p[kWIn].t().contiguous(), w.w_out_t = p[kWOut].t().contiguous();
  // dh = d_delta @ w_out^T stays fp32: d_delta is the state's gradient from the next step,
  // which the rollout keeps in fp32; rounding it here took the worst weight gradient's error
  // from 7.3e-3 to 1.1e-2 at the bench's default config (docs/performance.md "bf16").
  if (cfg.bf16_gemm) {
    w.w_in16 = packed_bf16(p[kWIn]), w.w_out16 = packed_bf16(p[kWOut]);
    w.w_in_t16 = packed_bf16(w.w_in_t);
  }
  return w;
}

void cell_forward(const at::Tensor& x, const at::Tensor& inject, const CellParams& p,
                  const CellWeights& w, const CellConfig& cfg, int64_t step,
                  const at::Tensor& out, LivePlanes live) {
  if (x.numel() == 0) return;  // no cells (or no channels): nothing to compute
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cube::cell_forward", [&] {
    Step<scalar_t> s = make_step<scalar_t>(x, p, w, cfg, step, live);
    if (inject.defined()) s.inject = inject.const_data_ptr<scalar_t>(), s.E = inject.size(-1);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.tasks(), 1, [&](int64_t begin, int64_t end) {
      run_best_isa<ForwardTasks<scalar_t>>(s, o, begin, end);
      if (cfg.bf16_gemm) at::native::cpublas::brgemm_release();
    });
  });
}

void cell_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& inject,
                   const CellParams& p, const CellWeights& w, const CellConfig& cfg, int64_t step,
                   CellParams& dp, const at::Tensor& dx, LivePlanes live) {
  if (x.numel() == 0) return;  // no cells: no gradient to add
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cube::cell_backward", [&] {
    Step<scalar_t> s = make_step<scalar_t>(x, p, w, cfg, step, live);
    if (inject.defined()) s.inject = inject.const_data_ptr<scalar_t>(), s.E = inject.size(-1);
    const GradLayout layout(p);
    const int64_t tasks = s.tasks();
    std::vector<scalar_t> partials(static_cast<size_t>(tasks * layout.size()), scalar_t(0));
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = dx.mutable_data_ptr<scalar_t>();
    scalar_t* part = partials.data();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      run_best_isa<BackwardTasks<scalar_t>>(s, g, o, layout, part, begin, end);
      if (cfg.bf16_gemm) at::native::cpublas::brgemm_release();
    });
    std::vector<scalar_t> total(static_cast<size_t>(layout.size()));
    sum_block_partials(partials.data(), tasks, layout.size(), total.data());
    for (int i = 0; i < kNumCellParams; ++i) {
      scalar_t* dst = dp[i].mutable_data_ptr<scalar_t>();
      for (int64_t j = 0; j < layout.offset[i + 1] - layout.offset[i]; ++j)
        dst[j] += total[layout.offset[i] + j];
    }
  });
}

}  // namespace cube
