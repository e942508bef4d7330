// CPU gather + spatial gate (SPEC.md "One step" and "Backward"):
//   forward   h[i] = u[i] * g[i],  g[i] = b_sp + sum_k w_sp[k] * vn[nbr(i, k)]
//   backward  du = dh * g, dg = dh * u, dvn[j] = sum_k w_sp[k] * dg[j - offset_k],
//             dw_sp[k] = sum_i dg[i] * vn[nbr(i, k)], db_sp = sum_i dg[i]
// One row = the F channels of one cell; rows are contiguous, so every inner loop runs over
// contiguous channels with fp32 (double for float64) accumulators and vectorises.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "cell_math.h"
#include "checks.h"
#include "cpu/loops.h"

namespace cube {
namespace {

// Rows per partial sum of dw_sp/db_sp. Fixed, so the reduction order (and every bit of the
// weight gradients) does not depend on the number of threads.
constexpr int64_t kRowsPerPartial = 64;

// nbr[cell * K + k]: the cell (within its batch item) that token k of `cell` reads, -1 where the
// zero boundary leaves it out. With `transposed`, the cells that read `cell` through token k
// (offset negated): the gather form of the transposed stencil, so backward needs no scatter.
std::vector<int32_t> neighbour_table(const GatherGateArgs& a, bool transposed) {
  std::vector<int32_t> nbr(static_cast<size_t>(a.N * a.K));
  const int sign = transposed ? -1 : 1;
  at::parallel_for(0, a.N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t cell = begin; cell < end; ++cell) {
      for (int k = 0; k < a.K; ++k) {
        int dd, dh, dw;
        token_offset(a.neighbourhood, k, dd, dh, dw);
        nbr[cell * a.K + k] =
            static_cast<int32_t>(a.lattice.neighbour(cell, sign * dd, sign * dh, sign * dw));
      }
    }
  });
  return nbr;
}

// Channels per register tile: a tile's accumulators stay in registers across the K tokens
// instead of going through memory once per token.
constexpr int64_t kTile = 32;
constexpr int64_t kMaxTokens = 27;  // Moore

template <typename scalar_t>
struct Operands {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t rows, N, F, K;
  const int32_t* nbr;  // the neighbour table of the pass (transposed for dvn)
  const acc_t* w;      // w_sp and b_sp in the accumulation type
  const acc_t* b;
  const scalar_t* u;
  const scalar_t* vn;
  const scalar_t* grad_h;
  scalar_t* out;    // h (forward), du (backward pass 1), dvn (pass 2)
  acc_t* dg;        // backward: dh * u
  acc_t* partial;   // backward: per block of rows, K rows of dw_sp and one of db_sp partials
};

// rows[k]: row nbr_row[k] of the batch item starting at `item`, or nullptr where the zero
// boundary leaves token k out.
template <typename T>
CUBE_ALWAYS_INLINE void neighbour_rows(const T* item, const int32_t* nbr_row, int64_t K,
                                       int64_t F, const T** rows) {
  for (int64_t k = 0; k < K; ++k) rows[k] = nbr_row[k] < 0 ? nullptr : item + nbr_row[k] * F;
}

// The tile kernels take the width as a template argument (kTile for full tiles, so their loops
// unroll into registers) or at run time (kWidth = 0, the remainder).

// h = u * (b + sum_k w[k] * vn[nbr(k)]) on channels [f0, f0 + width) of row r.
template <int64_t kWidth, typename scalar_t, typename acc_t>
CUBE_ALWAYS_INLINE void forward_tile(const Operands<scalar_t>& o, const scalar_t* const* rows,
                                     int64_t r, int64_t f0, int64_t width) {
  const int64_t n = kWidth > 0 ? kWidth : width;
  acc_t g[kTile];
  for (int64_t f = 0; f < n; ++f) g[f] = o.b[f0 + f];
  for (int64_t k = 0; k < o.K; ++k) {
    if (rows[k] == nullptr) continue;
    const scalar_t* __restrict__ v = rows[k] + f0;
    const acc_t* __restrict__ wk = o.w + k * o.F + f0;
    for (int64_t f = 0; f < n; ++f) g[f] += wk[f] * static_cast<acc_t>(v[f]);
  }
  const scalar_t* __restrict__ ur = o.u + r * o.F + f0;
  scalar_t* __restrict__ hr = o.out + r * o.F + f0;
  for (int64_t f = 0; f < n; ++f) hr[f] = static_cast<scalar_t>(static_cast<acc_t>(ur[f]) * g[f]);
}

// Backward pass 1 on channels [f0, f0 + width) of row r: dg = dh * u, du = dh * g (g
// recomputed), and the row's terms of the dw_sp (pw) and db_sp (pb) partials; vn[nbr(k)] is
// loaded once for both g and dw_sp.
template <int64_t kWidth, typename scalar_t, typename acc_t>
CUBE_ALWAYS_INLINE void backward_tile(const Operands<scalar_t>& o, const scalar_t* const* rows,
                                      int64_t r, int64_t f0, int64_t width, acc_t* pw, acc_t* pb) {
  const int64_t n = kWidth > 0 ? kWidth : width;
  const scalar_t* __restrict__ dhr = o.grad_h + r * o.F + f0;
  const scalar_t* __restrict__ ur = o.u + r * o.F + f0;
  acc_t* __restrict__ dgr = o.dg + r * o.F + f0;
  acc_t* __restrict__ pbr = pb + f0;
  acc_t dg[kTile], g[kTile];
  for (int64_t f = 0; f < n; ++f) {
    dg[f] = static_cast<acc_t>(dhr[f]) * static_cast<acc_t>(ur[f]);
    dgr[f] = dg[f];
    pbr[f] += dg[f];
    g[f] = o.b[f0 + f];
  }
  for (int64_t k = 0; k < o.K; ++k) {
    if (rows[k] == nullptr) continue;
    const scalar_t* __restrict__ v = rows[k] + f0;
    const acc_t* __restrict__ wk = o.w + k * o.F + f0;
    acc_t* __restrict__ pwk = pw + k * o.F + f0;
    for (int64_t f = 0; f < n; ++f) {
      const acc_t vf = static_cast<acc_t>(v[f]);
      g[f] += wk[f] * vf;
      pwk[f] += dg[f] * vf;
    }
  }
  scalar_t* __restrict__ dur = o.out + r * o.F + f0;
  for (int64_t f = 0; f < n; ++f) dur[f] = static_cast<scalar_t>(static_cast<acc_t>(dhr[f]) * g[f]);
}

// Backward pass 2 on channels [f0, f0 + width) of row r: dvn = sum_k w[k] * dg[rows[k]].
template <int64_t kWidth, typename scalar_t, typename acc_t>
CUBE_ALWAYS_INLINE void transposed_tile(const Operands<scalar_t>& o, const acc_t* const* rows,
                                        int64_t r, int64_t f0, int64_t width) {
  const int64_t n = kWidth > 0 ? kWidth : width;
  acc_t acc[kTile];
  for (int64_t f = 0; f < n; ++f) acc[f] = acc_t(0);
  for (int64_t k = 0; k < o.K; ++k) {
    if (rows[k] == nullptr) continue;
    const acc_t* __restrict__ d = rows[k] + f0;
    const acc_t* __restrict__ wk = o.w + k * o.F + f0;
    for (int64_t f = 0; f < n; ++f) acc[f] += wk[f] * d[f];
  }
  scalar_t* __restrict__ out = o.out + r * o.F + f0;
  for (int64_t f = 0; f < n; ++f) out[f] = static_cast<scalar_t>(acc[f]);
}

template <typename scalar_t>
struct ForwardRows {
  using acc_t = at::opmath_type<scalar_t>;
  static CUBE_ALWAYS_INLINE void run(const Operands<scalar_t>& o, const int64_t& begin,
                                     const int64_t& end) {
    const scalar_t* rows[kMaxTokens];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t cell = r % o.N;
      neighbour_rows(o.vn + (r - cell) * o.F, o.nbr + cell * o.K, o.K, o.F, rows);
      int64_t f0 = 0;
      for (; f0 + kTile <= o.F; f0 += kTile)
        forward_tile<kTile, scalar_t, acc_t>(o, rows, r, f0, kTile);
      if (f0 < o.F) forward_tile<0, scalar_t, acc_t>(o, rows, r, f0, o.F - f0);
    }
  }
};

template <typename scalar_t>
struct BackwardBlocks {
  using acc_t = at::opmath_type<scalar_t>;
  static CUBE_ALWAYS_INLINE void run(const Operands<scalar_t>& o, const int64_t& block_begin,
                                     const int64_t& block_end) {
    const scalar_t* rows[kMaxTokens];
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* pw = o.partial + blk * (o.K + 1) * o.F;
      acc_t* pb = pw + o.K * o.F;
      std::fill(pw, pb + o.F, acc_t(0));
      const int64_t row_end = std::min(o.rows, (blk + 1) * kRowsPerPartial);
      for (int64_t r = blk * kRowsPerPartial; r < row_end; ++r) {
        const int64_t cell = r % o.N;
        neighbour_rows(o.vn + (r - cell) * o.F, o.nbr + cell * o.K, o.K, o.F, rows);
        int64_t f0 = 0;
        for (; f0 + kTile <= o.F; f0 += kTile)
          backward_tile<kTile, scalar_t, acc_t>(o, rows, r, f0, kTile, pw, pb);
        if (f0 < o.F) backward_tile<0, scalar_t, acc_t>(o, rows, r, f0, o.F - f0, pw, pb);
      }
    }
  }
};

template <typename scalar_t>
struct TransposedRows {
  using acc_t = at::opmath_type<scalar_t>;
  static CUBE_ALWAYS_INLINE void run(const Operands<scalar_t>& o, const int64_t& begin,
                                     const int64_t& end) {
    const acc_t* rows[kMaxTokens];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t cell = r % o.N;
      neighbour_rows<acc_t>(o.dg + (r - cell) * o.F, o.nbr + cell * o.K, o.K, o.F, rows);
      int64_t f0 = 0;
      for (; f0 + kTile <= o.F; f0 += kTile)
        transposed_tile<kTile, scalar_t, acc_t>(o, rows, r, f0, kTile);
      if (f0 < o.F) transposed_tile<0, scalar_t, acc_t>(o, rows, r, f0, o.F - f0);
    }
  }
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const scalar_t* p = t.const_data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + t.numel());
}

template <typename scalar_t>
void forward_kernel(const GatherGateArgs& a, const at::Tensor& u, const at::Tensor& vn,
                    const at::Tensor& w_sp, const at::Tensor& b_sp, const at::Tensor& h) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<int32_t> nbr = neighbour_table(a, false);
  const std::vector<acc_t> w = to_acc<scalar_t>(w_sp), b = to_acc<scalar_t>(b_sp);
  Operands<scalar_t> o{};
  o.rows = a.B * a.N, o.N = a.N, o.F = a.F, o.K = a.K;
  o.nbr = nbr.data(), o.w = w.data(), o.b = b.data();
  o.u = u.const_data_ptr<scalar_t>(), o.vn = vn.const_data_ptr<scalar_t>();
  o.out = h.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, o.rows, rows_per_task(a.F * a.K), [&](int64_t begin, int64_t end) {
    run_best_isa<ForwardRows<scalar_t>>(o, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const GatherGateArgs& a, const at::Tensor& grad_h, const at::Tensor& u,
                     const at::Tensor& vn, const at::Tensor& w_sp, const at::Tensor& b_sp,
                     const at::Tensor& du, const at::Tensor& dvn, const at::Tensor& dw_sp,
                     const at::Tensor& db_sp) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> w = to_acc<scalar_t>(w_sp), b = to_acc<scalar_t>(b_sp);
  const int64_t rows = a.B * a.N, F = a.F, K = a.K;
  const int64_t blocks = (rows + kRowsPerPartial - 1) / kRowsPerPartial;
  const auto acc_options = u.options().dtype(at::toOpMathType(u.scalar_type()));
  // dg is kept in the accumulation type: pass 2 reads it at the neighbours.
  const at::Tensor dg = at::empty({rows, F}, acc_options);
  const at::Tensor partial = at::empty({blocks, K + 1, F}, acc_options);
  Operands<scalar_t> o{};
  o.rows = rows, o.N = a.N, o.F = F, o.K = K;
  o.w = w.data(), o.b = b.data();
  o.u = u.const_data_ptr<scalar_t>(), o.vn = vn.const_data_ptr<scalar_t>();
  o.grad_h = grad_h.const_data_ptr<scalar_t>();
  o.dg = dg.mutable_data_ptr<acc_t>(), o.partial = partial.mutable_data_ptr<acc_t>();

  // Pass 1: dg, du and the weight-gradient partials, one fixed block of rows per partial.
  const std::vector<int32_t> nbr = neighbour_table(a, false);
  o.nbr = nbr.data(), o.out = du.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    run_best_isa<BackwardBlocks<scalar_t>>(o, block_begin, block_end);
  });

  // Pass 2: dvn[j] = sum_k w_sp[k] * dg[the cell that reads j through token k].
  const std::vector<int32_t> nbr_t = neighbour_table(a, true);
  o.nbr = nbr_t.data(), o.out = dvn.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, rows_per_task(F * K), [&](int64_t begin, int64_t end) {
    run_best_isa<TransposedRows<scalar_t>>(o, begin, end);
  });

  // Pass 3: the partials summed block after block, always in the same order.
  std::vector<acc_t> total(static_cast<size_t>((K + 1) * F));
  sum_block_partials(o.partial, blocks, (K + 1) * F, total.data());
  std::transform(total.begin(), total.begin() + K * F, dw_sp.mutable_data_ptr<scalar_t>(),
                 [](acc_t v) { return static_cast<scalar_t>(v); });
  std::transform(total.begin() + K * F, total.end(), db_sp.mutable_data_ptr<scalar_t>(),
                 [](acc_t v) { return static_cast<scalar_t>(v); });
}

at::Tensor gather_gate_cpu(const at::Tensor& u_in, const at::Tensor& vn_in,
                           const at::Tensor& w_sp_in, const at::Tensor& b_sp_in,
                           c10::string_view neighbourhood, c10::string_view boundary) {
  const GatherGateArgs a = check_gather_gate("cube::gather_gate", u_in, vn_in, w_sp_in, b_sp_in,
                                             neighbourhood, boundary);
  const at::Tensor u = u_in.contiguous(), vn = vn_in.contiguous();
  const at::Tensor w_sp = w_sp_in.contiguous(), b_sp = b_sp_in.contiguous();
  at::Tensor h = at::empty_like(u, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "cube::gather_gate",
                                  [&] { forward_kernel<scalar_t>(a, u, vn, w_sp, b_sp, h); });
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_gate_backward_cpu(
    const at::Tensor& grad_h_in, const at::Tensor& u_in, const at::Tensor& vn_in,
    const at::Tensor& w_sp_in, const at::Tensor& b_sp_in, c10::string_view neighbourhood,
    c10::string_view boundary) {
  const GatherGateArgs a = check_gather_gate("cube::gather_gate_backward", u_in, vn_in, w_sp_in,
                                             b_sp_in, neighbourhood, boundary, &grad_h_in);
  const at::Tensor grad_h = grad_h_in.contiguous(), u = u_in.contiguous(), vn = vn_in.contiguous();
  const at::Tensor w_sp = w_sp_in.contiguous(), b_sp = b_sp_in.contiguous();
  at::Tensor du = at::empty_like(u, at::MemoryFormat::Contiguous);
  at::Tensor dvn = at::empty_like(vn, at::MemoryFormat::Contiguous);
  at::Tensor dw_sp = at::empty_like(w_sp, at::MemoryFormat::Contiguous);
  at::Tensor db_sp = at::empty_like(b_sp, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, u.scalar_type(), "cube::gather_gate_backward",
      [&] { backward_kernel<scalar_t>(a, grad_h, u, vn, w_sp, b_sp, du, dvn, dw_sp, db_sp); });
  return {du, dvn, dw_sp, db_sp};
}

}  // namespace
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CPU, m) {
  m.impl("gather_gate", &cube::gather_gate_cpu);
  m.impl("gather_gate_backward", &cube::gather_gate_backward_cpu);
}
