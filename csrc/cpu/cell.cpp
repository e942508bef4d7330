// The fused CPU cell (SPEC.md "One step" and "Backward"; docs/performance.md "The fused cell").
// A task is one batch item's chunk of d-planes [d0, d1), swept in order. A plane (H x W cells) is
// the tile: its rows run through LayerNorm, the in-projection, GELU and the gate LayerNorm into
// a ring of three plane buffers (planes d-1, d, d+1: the stencil reaches one plane each way),
// then the gather + gate of plane d, the out-projection and the stochastic residual update, so
// u, vn and h (2F values per cell) stay in per-thread plane buffers. A chunk recomputes the
// planes just outside it (its halo) instead of sharing them with its neighbours.
//   forward   plane d+1 in, then plane d out: x_new = where(m, x + (h @ w_out + b_out), x),
//             rounded once to the state's dtype; a non-firing cell keeps its state bit for bit
//   backward  from the saved state x, per plane e = d+1 (stage A): u, vn recomputed (keeping
//             gelu' and the gate LayerNorm's vhat, so stage B evaluates no GELU again),
//             d_delta = where(m, grad, 0), dh = d_delta @ w_out^T, dg = dh * u; then plane d
//             (stage B, it needs vn and dg of d-1, d, d+1): g recomputed, du = dh * g,
//             dvn (the transposed stencil on dg), dw_sp, db_sp, dw_out += h^T d_delta, the
//             gate-input backward, dw_in += y^T dz_pre, dy = dz_pre @ w_in^T, the LayerNorm
//             backward and the residual: dx = LN'(dy) + grad
// The stencils (g, the transposed one for dvn, and dw_sp) read vn and dg from plane buffers
// padded with a halo, a group of tokens at a time with their weights held in registers.
// The GEMMs run one plane at a time on oneDNN's fp32 micro-kernel (cpublas::brgemm, fp32
// accumulation) for fp32, bf16 and fp16 states: everything in a plane buffer is fp32, only the
// state is stored in its dtype. float64 (gradcheck) runs the same plan with a plain loop GEMM.
// Weight gradients: one partial sum per task, in a fixed row order, added in task order; the
// tasks depend on the shapes only, so every bit of them is the same for any thread count.
// Planes the caller knows to be zero (`live`, cpu/rollout.cpp "Skipping quiet planes") are
// written as zeros, and a plane is projected (forward) or run through stage A (backward) only
// where a computed plane reads it.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>

#include "cell_math.h"
#include "cpu/cell.h"
#include "cpu/loops.h"
#include "cpu/row_math.h"

namespace cube {
namespace {

// C[M, N] = A[M, K] @ B[K, N] (+ C with `add`), all row-major with leading dimensions.
CUBE_ALWAYS_INLINE void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                             const float* B, int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
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

// out[c, r] = a[r, c] for a [rows, cols] (row stride lda), in blocks of 8 x 8 so that both
// sides touch few cache lines at a time.
template <typename T>
CUBE_ALWAYS_INLINE void transpose(const T* a, int64_t rows, int64_t cols, int64_t lda, T* out) {
  constexpr int64_t kBlock = 8;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = a[r * lda + c];
    }
  }
}

// Chunks of planes per batch item: about kTasks tasks in all where the lattice is deep enough,
// with at least kMinPlanes planes per chunk (each chunk recomputes up to two halo planes). A
// function of the shapes only, not of the thread count: the weight-gradient partials (one per
// task) are then summed in the same order for any number of threads.
int64_t chunks_per_item(int64_t B, int64_t D) {
  constexpr int64_t kTasks = 4, kMinPlanes = 4;
  return std::max<int64_t>(1, std::min((kTasks + B - 1) / B, D / kMinPlanes));
}

constexpr int64_t kMaxTokens = 27;  // Moore

// The gather reads vn (forward) and dg (backward's transposed stencil) from plane buffers padded
// with a one-cell halo, (H + 2) x (W + 2) rows: zeros for a zero boundary, the wrapped rows for a
// periodic one, and a plane of zeros where the zero boundary leaves a d-plane out. So every token
// is a fixed row offset and the stencil loops have no branches. A padded plane is stored in
// blocks of kLanes channels, [ceil(F / kLanes)][rows][kLanes] (lanes past F unused), so that a
// sweep over one block reads contiguous memory that stays in L1.
struct Padded {
  int64_t H, W, F, rows, blocks;
  Padded(int64_t H_, int64_t W_, int64_t F_)
      : H(H_), W(W_), F(F_), rows((H_ + 2) * (W_ + 2)), blocks((F_ + kLanes - 1) / kLanes) {}
  int64_t size() const { return blocks * rows * kLanes; }
  // Cell q's row.
  int64_t row(int64_t q) const { return (q / W + 1) * (W + 2) + q % W + 1; }
  // Channel f of row 0; the rows follow kLanes apart.
  template <typename T>
  T* channel(T* pad, int64_t f) const { return pad + (f / kLanes) * rows * kLanes + f % kLanes; }
  // Row r = v (F values).
  template <typename T>
  CUBE_ALWAYS_INLINE void put(T* pad, int64_t r, const T* v) const {
    int64_t f0 = 0;
    for (; f0 + kLanes <= F; f0 += kLanes)  // a fixed-size copy: one register
      std::memcpy(channel(pad, f0) + r * kLanes, v + f0, kLanes * sizeof(T));
    for (; f0 < F; ++f0) channel(pad, f0)[r * kLanes] = v[f0];
  }
  // Fills the halo with the rows a periodic boundary wraps to (the columns first, so that the
  // row copies carry the corners).
  template <typename T>
  void wrap_halo(T* pad) const {
    const int64_t Wp = W + 2;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      T* p = pad + blk * rows * kLanes;
      auto at = [&](int64_t h, int64_t w) { return p + ((h + 1) * Wp + w + 1) * kLanes; };
      for (int64_t h = 0; h < H; ++h) {
        std::copy(at(h, W - 1), at(h, W - 1) + kLanes, at(h, -1));
        std::copy(at(h, 0), at(h, 0) + kLanes, at(h, W));
      }
      std::copy(at(H - 1, -1), at(H - 1, -1) + Wp * kLanes, at(-1, -1));
      std::copy(at(0, -1), at(0, -1) + Wp * kLanes, at(H, -1));
    }
  }
};

// The vector code below is always inlined: no call passes a vector across the ABI that
// -Wpsabi warns about.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// A register of kLanes channels (gcc's generic vectors: one AVX2 register of floats, two SSE2
// ones on the baseline), or one channel where Vec is acc_t itself. The loops below spell their
// registers out: gcc does not vectorise them when written over arrays of channels.
template <typename acc_t>
struct Lanes {
  typedef acc_t type __attribute__((vector_size(kLanes * sizeof(acc_t))));
};

template <typename Vec>
CUBE_ALWAYS_INLINE Vec load(const void* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

template <typename Vec>
CUBE_ALWAYS_INLINE void store(void* p, const Vec& v) {
  std::memcpy(p, &v, sizeof(Vec));
}

// One group of G tokens of the stencil on the channels [f0, f0 + lanes of Vec) of every cell of
// a plane: out[q, f] = (first ? bias[f] (0 without bias) : out[q, f])
//                      + sum_j w[j, f] * src[j][row(q) + off[j], f]
// with row(q) the cell's padded row. The G weight registers stay loaded while the group sweeps
// the plane (about one load per multiply-add instead of two).
template <int G, typename Vec, typename acc_t>
CUBE_ALWAYS_INLINE void stencil_group(const acc_t* const* src, const int64_t* off, const acc_t* w,
                                      const acc_t* bias, bool first, const Padded& pl, int64_t f0,
                                      acc_t* out) {
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
                                       const acc_t* w, const acc_t* bias, int64_t K,
                                       const Padded& pl, acc_t* out) {
  using Vec = typename Lanes<acc_t>::type;
  for (int64_t k0 = 0; k0 < K; k0 += G) {
    int64_t f0 = 0;
    for (; f0 + kLanes <= pl.F; f0 += kLanes)
      stencil_group<G, Vec>(src + k0, off + k0, w + k0 * pl.F, bias, k0 == 0, pl, f0, out);
    for (; f0 < pl.F; ++f0)
      stencil_group<G, acc_t>(src + k0, off + k0, w + k0 * pl.F, bias, k0 == 0, pl, f0, out);
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
// plane, the tokens added in k order (bias nullptr: from 0); out is [P, F].
template <typename acc_t>
CUBE_ALWAYS_INLINE void stencil(const acc_t* const* src, const int64_t* off, const acc_t* w,
                                const acc_t* bias, int64_t K, const Padded& pl, acc_t* out) {
  if (K % 9 == 0) return stencil_groups<9>(src, off, w, bias, K, pl, out);
  stencil_groups<7>(src, off, w, bias, K, pl, out);
}

// pw[k, f] += sum_q dg[row(q), f] * src[k][row(q) + off[k], f] (dw_sp's terms of one plane).
template <typename acc_t>
CUBE_ALWAYS_INLINE void correlate(const acc_t* const* src, const int64_t* off, const acc_t* dg,
                                  int64_t K, const Padded& pl, acc_t* pw) {
  if (K % 9 == 0) return correlate_groups<9>(src, off, dg, K, pl, pw);
  correlate_groups<7>(src, off, dg, K, pl, pw);
}
#pragma GCC diagnostic pop

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
  const acc_t* w_in_t;   // backward: w_in^T [2F, C] and w_out^T [C, F]
  const acc_t* w_out_t;
  int dd[kMaxTokens];         // token k's offset in d
  int64_t off[kMaxTokens];    // its offset in (h, w) as rows of a padded plane
  int64_t off_t[kMaxTokens];  // -off: backward's transposed stencil
  uint64_t seed;
  int64_t step;
  float fire_rate;
  int64_t chunks;  // per batch item
  LivePlanes live;

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

  // Plane d of item b through LayerNorm (into y, [P, C]) and the in-projection plus its bias
  // (into z, [P, 2F]).
  CUBE_ALWAYS_INLINE void project_plane(int64_t b, int64_t d, acc_t* y, acc_t* z,
                                        acc_t* buf) const {
    for (int64_t q = 0; q < P; ++q)
      rows::layer_norm(row(b, d, q, buf), p[kLn1W], p[kLn1B], C, y + q * C);
    gemm(P, 2 * F, C, y, C, p[kWIn], 2 * F, z, 2 * F, false);
    const acc_t* __restrict__ b_in = p[kBIn];
    for (int64_t q = 0; q < P; ++q) {
      acc_t* __restrict__ zq = z + q * 2 * F;
      for (int64_t f = 0; f < 2 * F; ++f) zq[f] += b_in[f];
    }
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

  // Chunk c of item b: planes [d0, d1).
  void chunk(int64_t task, int64_t& b, int64_t& d0, int64_t& d1) const {
    b = task / chunks;
    const int64_t c = task % chunks;
    d0 = c * D / chunks, d1 = (c + 1) * D / chunks;
  }
};

// A task's ring of three plane buffers, indexed by the unwrapped plane e >= d0 - 1.
template <typename acc_t>
CUBE_ALWAYS_INLINE acc_t* ring_slot(acc_t* ring, int64_t slot_size, int64_t e, int64_t d0) {
  return ring + ((e - d0 + 1) % 3) * slot_size;
}

template <typename scalar_t>
struct ForwardTasks {
  using acc_t = at::opmath_type<scalar_t>;
  static CUBE_ALWAYS_INLINE void run(const Step<scalar_t>& s, scalar_t* const& out,
                                     const int64_t& begin, const int64_t& end) {
    const int64_t P = s.P, C = s.C, F = s.F;
    const Padded pl(s.H, s.W, F);
    const int64_t pad = pl.size(), slot = P * 2 * F + pad;  // per ring slot: u (in z) [P, 2F], vn
    std::vector<acc_t> mem(static_cast<size_t>(3 * slot + pad + 2 * P * C + P * F + C));
    acc_t* ring = mem.data();
    acc_t* zeros = ring + 3 * slot;   // a padded plane of zeros: a d-plane the boundary leaves out
    acc_t* y = zeros + pad;           // [P, C]
    acc_t* delta = y + P * C;         // [P, C]
    acc_t* h = delta + P * C;         // [P, F]
    acc_t* buf = h + P * F;           // one state row
    const acc_t* __restrict__ b_out = s.p[kBOut];
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, d0, d1;
      s.chunk(task, b, d0, d1);
      for (int64_t e = d0 - 1; e <= d1; ++e) {
        const int64_t pe = s.plane(e);
        if (pe >= 0 && s.feeds(b, e, d0, d1)) {
          acc_t* z = ring_slot(ring, slot, e, d0);
          acc_t* vn = z + P * 2 * F;
          s.project_plane(b, pe, y, z, buf);
          for (int64_t q = 0; q < P; ++q) {
            acc_t* zq = z + q * 2 * F;
            rows::gate_input(zq, s.p[kLn2W], s.p[kLn2B], F, zq, zq + F);
            pl.put(vn, pl.row(q), zq + F);
          }
          if (s.boundary == kPeriodic) pl.wrap_halo(vn);
        }
        const int64_t d = e - 1;  // plane d has its neighbours now
        if (d < d0) continue;
        if (!s.computes(b, d)) {
          scalar_t* o = out + (b * s.D + d) * P * C;
          std::fill(o, o + P * C, scalar_t(0));
          continue;
        }
        acc_t* planes[3];
        for (int i = 0; i < 3; ++i)
          planes[i] = s.plane(d - 1 + i) < 0 ? nullptr
                                             : ring_slot(ring, slot, d - 1 + i, d0) + P * 2 * F;
        const acc_t* src[kMaxTokens];
        s.token_planes(planes, zeros, 1, src);
        stencil(src, s.off, s.p[kWSp], s.p[kBSp], s.K, pl, h);
        const acc_t* __restrict__ u = ring_slot(ring, slot, d, d0);
        for (int64_t q = 0; q < P; ++q)
          for (int64_t f = 0; f < F; ++f) h[q * F + f] *= u[q * 2 * F + f];
        gemm(P, C, F, h, F, s.p[kWOut], C, delta, C, false);
        for (int64_t q = 0; q < P; ++q) {
          const acc_t* __restrict__ xq = s.row(b, d, q, buf);
          scalar_t* __restrict__ o = out + ((b * s.D + d) * P + q) * C;
          if (s.fires(b, d, q)) {
            const acc_t* __restrict__ dq = delta + q * C;
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(xq[c] + (dq[c] + b_out[c]));
          } else {
            for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(xq[c]);
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
    const int64_t P = s.P, C = s.C, F = s.F, K = s.K;
    const Padded pl(s.H, s.W, F);
    const int64_t pad = pl.size();
    // Per ring slot: u [P, F], vn [padded], dgelu [P, 2F] (gelu' of the pre-activations), vhat
    // [P, F] and rstd [P] (the gate LayerNorm's), d_delta [P, C], dh [P, F], dg [padded].
    const int64_t u_at = 0, vn_at = P * F, dgelu_at = vn_at + pad, vhat_at = dgelu_at + P * 2 * F;
    const int64_t rstd_at = vhat_at + P * F, dd_at = rstd_at + P, dh_at = dd_at + P * C;
    const int64_t dg_at = dh_at + P * F, slot = dg_at + pad;
    std::vector<acc_t> mem(
        static_cast<size_t>(3 * slot + pad + P * (6 * F + 4 * C) + P + F + 3 * C));
    acc_t* ring = mem.data();
    acc_t* zeros = ring + 3 * slot;  // a padded plane of zeros: a d-plane the boundary leaves out
    acc_t* h = zeros + pad;      // [P, F]
    acc_t* h_t = h + P * F;      // [F, P]
    acc_t* du = h_t + P * F;     // [P, F]: g, then du
    acc_t* dvn = du + P * F;     // [P, F]
    acc_t* dz = dvn + P * F;     // [P, 2F]: z, then dz_pre
    acc_t* y = dz + P * 2 * F;   // [P, C]
    acc_t* y_t = y + P * C;      // [C, P]
    acc_t* xhat = y_t + P * C;   // [P, C]
    acc_t* dy = xhat + P * C;    // [P, C]
    acc_t* rstd = dy + P * C;    // [P]
    acc_t* g_ln = rstd + P;      // [F]
    acc_t* buf = g_ln + F;       // [C]
    acc_t* ln = buf + C;         // [C]
    acc_t* dxq = ln + C;         // [C]
    for (int64_t task = begin; task < end; ++task) {
      int64_t b, d0, d1;
      s.chunk(task, b, d0, d1);
      acc_t* part = partials + task * layout.size();
      acc_t* pg[kNumCellParams];
      for (int i = 0; i < kNumCellParams; ++i) pg[i] = part + layout.offset[i];
      for (int64_t e = d0 - 1; e <= d1; ++e) {
        const int64_t pe = s.plane(e);
        if (pe >= 0 && s.feeds(b, e, d0, d1)) {  // stage A
          acc_t* sl = ring_slot(ring, slot, e, d0);
          acc_t *u = sl + u_at, *vn = sl + vn_at, *d_delta = sl + dd_at, *dh = sl + dh_at;
          acc_t* dg = sl + dg_at;
          s.project_plane(b, pe, y, dz, buf);
          for (int64_t q = 0; q < P; ++q)
            sl[rstd_at + q] = rows::gate_input_saving(
                dz + q * 2 * F, s.p[kLn2W], s.p[kLn2B], F, u + q * F, dvn + q * F,
                sl + dgelu_at + q * 2 * F, sl + vhat_at + q * F);
          for (int64_t q = 0; q < P; ++q) pl.put(vn, pl.row(q), dvn + q * F);  // dvn: free here
          for (int64_t q = 0; q < P; ++q) {
            const acc_t* gq = grad + ((b * s.D + pe) * P + q) * C;
            acc_t* o = d_delta + q * C;
            if (s.fires(b, pe, q)) std::copy(gq, gq + C, o); else std::fill(o, o + C, acc_t(0));
          }
          gemm(P, F, C, d_delta, C, s.w_out_t, F, dh, F, false);
          // dg (into dz, free until stage B), its padded copy and, on the chunk's planes, db_sp.
          const bool own = e >= d0 && e < d1;
          for (int64_t q = 0; q < P; ++q) {
            const acc_t* __restrict__ uq = u + q * F;
            const acc_t* __restrict__ dhq = dh + q * F;
            acc_t* __restrict__ dgq = dz + q * F;
            for (int64_t f = 0; f < F; ++f) dgq[f] = dhq[f] * uq[f];
            pl.put(dg, pl.row(q), dgq);
            if (own)
              for (int64_t f = 0; f < F; ++f) pg[kBSp][f] += dgq[f];
          }
          if (s.boundary == kPeriodic) {
            pl.wrap_halo(vn);
            pl.wrap_halo(dg);
          }
        }
        const int64_t d = e - 1;  // stage B
        if (d < d0) continue;
        if (!s.computes(b, d)) {
          acc_t* o = dx + (b * s.D + d) * P * C;
          std::fill(o, o + P * C, acc_t(0));
          continue;
        }
        acc_t* sl = ring_slot(ring, slot, d, d0);
        const acc_t *u = sl + u_at, *d_delta = sl + dd_at, *dh = sl + dh_at, *dg = sl + dg_at;
        acc_t *vn_planes[3], *dg_planes[3];
        for (int i = 0; i < 3; ++i) {
          acc_t* si = s.plane(d - 1 + i) < 0 ? nullptr : ring_slot(ring, slot, d - 1 + i, d0);
          vn_planes[i] = si == nullptr ? nullptr : si + vn_at;
          dg_planes[i] = si == nullptr ? nullptr : si + dg_at;
        }
        // Gather + gate backward: g recomputed, h (for dw_out), du, db_sp, dw_sp, dvn.
        const acc_t* src[kMaxTokens];
        s.token_planes(vn_planes, zeros, 1, src);
        stencil(src, s.off, s.p[kWSp], s.p[kBSp], K, pl, du);
        for (int64_t i = 0; i < P * F; ++i) {
          h[i] = u[i] * du[i];
          du[i] *= dh[i];
        }
        correlate(src, s.off, dg, K, pl, pg[kWSp]);
        s.token_planes(dg_planes, zeros, -1, src);
        stencil<acc_t>(src, s.off_t, s.p[kWSp], nullptr, K, pl, dvn);
        // Out-projection backward: dw_out += h^T d_delta, db_out += sum d_delta.
        transpose(h, P, F, F, h_t);
        gemm(F, C, P, h_t, P, d_delta, C, pg[kWOut], C, true);
        for (int64_t q = 0; q < P; ++q)
          for (int64_t c = 0; c < C; ++c) pg[kBOut][c] += d_delta[q * C + c];
        // Gate input backward: dz_pre, dln2_weight, dln2_bias, db_in.
        for (int64_t q = 0; q < P; ++q)
          rows::gate_input_backward(du + q * F, dvn + q * F, sl + dgelu_at + q * 2 * F,
                                    sl + vhat_at + q * F, sl[rstd_at + q], s.p[kLn2W], F, g_ln,
                                    dz + q * 2 * F, pg[kLn2W], pg[kLn2B], pg[kBIn]);
        // In-projection backward: dw_in += y^T dz_pre, dy = dz_pre @ w_in^T (y recomputed).
        for (int64_t q = 0; q < P; ++q) {
          const acc_t* xq = s.row(b, d, q, buf);
          acc_t* __restrict__ xh = xhat + q * C;
          std::copy(xq, xq + C, xh);
          rstd[q] = rows::centre(xh, C);
          acc_t* __restrict__ yq = y + q * C;
          for (int64_t c = 0; c < C; ++c) {
            xh[c] *= rstd[q];
            yq[c] = xh[c] * s.p[kLn1W][c] + s.p[kLn1B][c];
          }
        }
        transpose(y, P, C, C, y_t);
        gemm(C, 2 * F, P, y_t, P, dz, 2 * F, pg[kWIn], 2 * F, true);
        gemm(P, C, 2 * F, dz, 2 * F, s.w_in_t, C, dy, C, false);
        // LayerNorm backward and the residual.
        for (int64_t q = 0; q < P; ++q) {
          const int64_t r = ((b * s.D + d) * P + q) * C;
          rows::layer_norm_backward(xhat + q * C, dy + q * C, s.p[kLn1W], rstd[q], C, ln, dxq,
                                    pg[kLn1W], pg[kLn1B]);
          for (int64_t c = 0; c < C; ++c) dx[r + c] = dxq[c] + grad[r + c];
        }
      }
    }
  }
};

// The operands common to both directions.
template <typename scalar_t>
Step<scalar_t> make_step(const at::Tensor& x, const CellParams& p, const CellConfig& cfg,
                         int64_t step, LivePlanes live) {
  using acc_t = at::opmath_type<scalar_t>;
  Step<scalar_t> s{};
  s.B = x.size(0), s.D = x.size(1), s.H = x.size(2), s.W = x.size(3), s.C = x.size(4);
  s.P = s.H * s.W;
  s.F = p[kWIn].size(1) / 2, s.K = num_tokens(cfg.neighbourhood);
  s.boundary = cfg.boundary;
  s.x = x.const_data_ptr<scalar_t>();
  for (int i = 0; i < kNumCellParams; ++i) s.p[i] = p[i].const_data_ptr<acc_t>();
  for (int k = 0; k < s.K; ++k) {
    int dh, dw;
    token_offset(cfg.neighbourhood, k, s.dd[k], dh, dw);
    s.off[k] = dh * (s.W + 2) + dw;
    s.off_t[k] = -s.off[k];
  }
  s.seed = static_cast<uint64_t>(cfg.seed), s.step = step;
  s.fire_rate = static_cast<float>(cfg.fire_rate);
  s.chunks = chunks_per_item(s.B, s.D);
  s.live = live;
  return s;
}

}  // namespace

void cell_forward(const at::Tensor& x, const at::Tensor& inject, const CellParams& p,
                  const CellConfig& cfg, int64_t step, const at::Tensor& out, LivePlanes live) {
  if (x.numel() == 0) return;  // no cells (or no channels): nothing to compute
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cube::cell_forward", [&] {
    Step<scalar_t> s = make_step<scalar_t>(x, p, cfg, step, live);
    if (inject.defined()) s.inject = inject.const_data_ptr<scalar_t>(), s.E = inject.size(-1);
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.chunks, 1, [&](int64_t begin, int64_t end) {
      run_best_isa<ForwardTasks<scalar_t>>(s, o, begin, end);
    });
  });
}

at::Tensor cell_backward(const at::Tensor& grad, const at::Tensor& x, const CellParams& p,
                         const CellConfig& cfg, int64_t step, CellParams& dp, LivePlanes live) {
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;  // no cells: no gradient to add
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cube::cell_backward", [&] {
    Step<scalar_t> s = make_step<scalar_t>(x, p, cfg, step, live);
    const at::Tensor w_in_t = p[kWIn].t().contiguous(), w_out_t = p[kWOut].t().contiguous();
    s.w_in_t = w_in_t.const_data_ptr<scalar_t>(), s.w_out_t = w_out_t.const_data_ptr<scalar_t>();
    const GradLayout layout(p);
    const int64_t tasks = s.B * s.chunks;
    std::vector<scalar_t> partials(static_cast<size_t>(tasks * layout.size()), scalar_t(0));
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* o = dx.mutable_data_ptr<scalar_t>();
    scalar_t* part = partials.data();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      run_best_isa<BackwardTasks<scalar_t>>(s, g, o, layout, part, begin, end);
    });
    std::vector<scalar_t> total(static_cast<size_t>(layout.size()));
    sum_block_partials(partials.data(), tasks, layout.size(), total.data());
    for (int i = 0; i < kNumCellParams; ++i) {
      scalar_t* dst = dp[i].mutable_data_ptr<scalar_t>();
      for (int64_t j = 0; j < layout.offset[i + 1] - layout.offset[i]; ++j)
        dst[j] += total[layout.offset[i] + j];
    }
  });
  return dx;
}

}  // namespace cube
