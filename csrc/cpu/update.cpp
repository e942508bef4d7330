// CPU out-projection + stochastic residual update (SPEC.md "One step", "The fire mask",
// "Backward"):
//   forward   x_new = where(m, x + (h @ w_out + b_out), x), in fp32 for bf16/fp16 and rounded
//             once, after the residual add; a cell that does not fire keeps x bit for bit
//   backward  d_delta = where(m, grad, 0), dh = d_delta @ w_out^T, dw_out = h^T @ d_delta,
//             db_out = sum d_delta
// The fire mask m comes from cube::fires (Philox, bit for bit tl.rand) and is regenerated in
// backward, never stored. The GEMMs go to ATen (MKL / oneDNN): at these sizes a tuned BLAS is
// several times faster than a hand-written loop; only the cheap, memory-bound epilogue is ours.
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
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "below_op.h"
#include "cell_math.h"
#include "checks.h"
#include "cpu/loops.h"

namespace cube {
namespace {

// Rows per partial sum of dw_out/db_out: fixed, so the weight gradients are bit-identical for
// any number of threads. Large enough that each partial is a reasonably sized GEMM.
constexpr int64_t kRowsPerPartial = 512;

struct Mask {
  uint64_t seed;
  int64_t step, B, N;
  float fire_rate;
  bool all;  // fire_rate >= 1: every cell fires, skip the Philox rounds

  bool fires(int64_t row) const {
    return all || cube::fires(seed, step, B, row / N, N, row % N, fire_rate);
  }
};

Mask make_mask(const UpdateArgs& a, int64_t seed, int64_t step) {
  return Mask{static_cast<uint64_t>(seed), step, a.B, a.N, a.fire_rate, a.fire_rate >= 1.0f};
}

// out = where(m, x + (delta + b_out), x) row by row; delta = h @ w_out in the accumulation type.
// `out` may be `delta` itself (fp32, fp64): each element is read before it is written.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void epilogue_kernel(const UpdateArgs& a, const Mask& mask, const scalar_t* x, const acc_t* delta,
                     const scalar_t* b_out, scalar_t* out) {
  const int64_t C = a.C;
  std::vector<acc_t> bias(b_out, b_out + C);
  at::parallel_for(0, a.B * a.N, rows_per_task(C), [&](int64_t begin, int64_t end) {
    const acc_t* bb = bias.data();
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * C;
      const acc_t* dr = delta + r * C;
      scalar_t* o = out + r * C;
      if (mask.fires(r)) {
        for (int64_t c = 0; c < C; ++c)
          o[c] = static_cast<scalar_t>(static_cast<acc_t>(xr[c]) + (dr[c] + bb[c]));
      } else {
        std::copy(xr, xr + C, o);
      }
    }
  });
}

at::Tensor update_cpu(const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& w_out_in,
                      const at::Tensor& b_out_in, int64_t seed, int64_t step, double fire_rate) {
  const UpdateArgs a = check_update("cube::update", x_in, "x", h_in, w_out_in, &b_out_in, seed,
                                    step, fire_rate);
  const AtenBelowTheOp below;
  const at::Tensor x = x_in.contiguous(), b_out = b_out_in.contiguous();
  // The GEMM in the accumulation type (fp32 for bf16/fp16), so the bias and the residual are
  // added before the one rounding to x's dtype (SPEC.md: round(x + (h @ w_out + b_out))).
  const at::ScalarType acc_type = at::toOpMathType(x.scalar_type());
  const at::Tensor delta =
      at::mm(h_in.contiguous().view({a.B * a.N, a.F}).to(acc_type), w_out_in.to(acc_type));
  at::Tensor out = acc_type == x.scalar_type() ? delta : at::empty_like(x);  // x_new
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cube::update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    epilogue_kernel<scalar_t>(a, make_mask(a, seed, step), x.const_data_ptr<scalar_t>(),
                              delta.const_data_ptr<acc_t>(), b_out.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>());
  });
  return out.view(x.sizes());
}

// d_delta (in the accumulation type) of the rows [begin, end), and their sum into db.
template <typename scalar_t, typename acc_t>
void masked_grad_rows(const Mask& mask, int64_t C, int64_t begin, int64_t end,
                      const scalar_t* grad, acc_t* d_delta, acc_t* db) {
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* __restrict__ gr = grad + r * C;
    acc_t* __restrict__ dr = d_delta + r * C;
    acc_t* __restrict__ s = db;
    if (mask.fires(r)) {
      for (int64_t c = 0; c < C; ++c) {
        dr[c] = static_cast<acc_t>(gr[c]);
        s[c] += dr[c];
      }
    } else {
      std::fill(dr, dr + C, acc_t(0));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> update_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& w_out_in, int64_t seed,
    int64_t step, double fire_rate) {
  const UpdateArgs a = check_update("cube::update_backward", grad_in, "grad", h_in, w_out_in,
                                    nullptr, seed, step, fire_rate);
  const AtenBelowTheOp below;
  const int64_t rows = a.B * a.N, C = a.C, F = a.F;
  const at::ScalarType dtype = grad_in.scalar_type();
  // fp32 accumulation for bf16/fp16: the GEMMs below run on fp32 copies.
  const at::ScalarType acc_type = at::toOpMathType(dtype);
  const at::Tensor grad = grad_in.contiguous().view({rows, C});
  const at::Tensor h = h_in.contiguous().view({rows, F}).to(acc_type);
  const at::Tensor w_out = w_out_in.to(acc_type);
  const Mask mask = make_mask(a, seed, step);

  // With every cell firing and no conversion needed, d_delta is grad itself.
  const bool copy = !(mask.all && acc_type == dtype);
  const at::Tensor d_delta = copy ? at::empty({rows, C}, grad.options().dtype(acc_type)) : grad;
  const int64_t blocks = (rows + kRowsPerPartial - 1) / kRowsPerPartial;
  at::Tensor dw_partial = at::empty({blocks, F, C}, h.options());
  at::Tensor db_partial = at::zeros({blocks, C}, h.options());

  // One task per block of rows: its d_delta rows, their column sums and h_blk^T @ d_delta_blk.
  // The workers call ATen themselves: below autograd and autocast (the calling thread is one of
  // them), and single-threaded BLAS since they already run inside the parallel region.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cube::update_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const acc_t* dd = d_delta.const_data_ptr<acc_t>();
    acc_t* dd_out = copy ? d_delta.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* db = db_partial.mutable_data_ptr<acc_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      const AtenBelowTheOp below_in_worker;
      for (int64_t blk = block_begin; blk < block_end; ++blk) {
        const int64_t begin = blk * kRowsPerPartial, end = std::min(rows, begin + kRowsPerPartial);
        acc_t* db_blk = db + blk * C;
        if (copy) {
          masked_grad_rows(mask, C, begin, end, g, dd_out, db_blk);
        } else {
          for (int64_t r = begin; r < end; ++r)
            for (int64_t c = 0; c < C; ++c) db_blk[c] += dd[r * C + c];
        }
        at::Tensor dw_blk = dw_partial.select(0, blk);
        at::mm_out(dw_blk, h.slice(0, begin, end).t(), d_delta.slice(0, begin, end));
      }
    });
  });

  // Block partials summed in block order: deterministic.
  at::Tensor dw_out = at::zeros({F, C}, h.options());
  at::Tensor db_out = at::zeros({C}, h.options());
  for (int64_t blk = 0; blk < blocks; ++blk) {
    dw_out.add_(dw_partial.select(0, blk));
    db_out.add_(db_partial.select(0, blk));
  }
  at::Tensor dh = at::mm(d_delta, w_out.t()).to(dtype);
  return {dh.view(h_in.sizes()), dw_out.to(dtype), db_out.to(dtype)};
}

}  // namespace
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CPU, m) {
  m.impl("update", &cube::update_cpu);
  m.impl("update_backward", &cube::update_backward_cpu);
}
