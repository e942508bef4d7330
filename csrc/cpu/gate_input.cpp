// CPU GELU + gate LayerNorm of the in-projection (SPEC.md "One step"), one pass per row
// (kLanes rows at a time, cpu/row_math.h):
//   forward   u = gelu(a), vn = layer_norm(gelu(b)) * ln2_weight + ln2_bias,
//             [a | b] = proj row + b_in (proj = y @ w_in: adding the bias here saves the GEMM
//             a pass that broadcasts it into its output)
//   backward  dz_pre = [grad_u * gelu'(a) | dv * gelu'(b)], with the LayerNorm backward
//             dv = rstd * (g - mean(g) - vhat * mean(g * vhat)), g = grad_vn * ln2_weight,
//             and the row sums dln2_weight = sum grad_vn * vhat, dln2_bias = sum grad_vn,
//             db_in = sum dz_pre.
// A row (2F values) stays in L1, so everything the backward needs (gelu, gelu', mean, rstd,
// vhat) is recomputed from proj instead of being saved by the forward.
#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cell_math.h"
#include "checks.h"
#include "cpu/loops.h"
#include "cpu/row_math.h"

namespace cube {
namespace {

// Rows per partial sum of the weight gradients. Fixed, so their reduction order (and every bit
// of them) does not depend on the number of threads.
constexpr int64_t kRowsPerPartial = 64;

template <typename scalar_t>
struct Operands {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t rows, F;
  const scalar_t* proj;      // [rows, 2F]
  const acc_t* bias;          // b_in [2F] in the accumulation type
  const acc_t* w;             // ln2_weight and ln2_bias in the accumulation type
  const acc_t* b;
  const scalar_t* grad_u;     // backward: [rows, F]
  const scalar_t* grad_vn;
  scalar_t* u;                // forward: [rows, F]
  scalar_t* vn;
  scalar_t* dz_pre;           // backward: [rows, 2F]
  acc_t* partial;             // backward, per block of rows: dln2_weight, dln2_bias, db_in (4F)
};

// The n values at p in the accumulation type: p itself when it already is, else converted
// into buf.
template <typename acc_t, typename scalar_t>
CUBE_ALWAYS_INLINE const acc_t* load(const scalar_t* p, int64_t n, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
    return buf;
  }
}

// Where to compute an output row: in place when it has the accumulation type, else in buf,
// converted by store() afterwards.
template <typename acc_t, typename scalar_t>
CUBE_ALWAYS_INLINE acc_t* output(scalar_t* p, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return p;
  } else {
    return buf;
  }
}

template <typename acc_t, typename scalar_t>
CUBE_ALWAYS_INLINE void store(scalar_t* p, const acc_t* buf, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
  }
}

// Scratch rows of one task, kLanes of each, in the accumulation type.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> mem;
  // z, dgelu, out_b: rows of 2F; the others: rows of F
  acc_t *z, *grad_u, *grad_vn, *out_a, *out_b, *u, *vn, *dgelu, *vhat, *g;
  explicit Scratch(int64_t F) : mem(static_cast<size_t>(kLanes * 14 * F)) {
    const int64_t n = kLanes * F;
    z = mem.data(), grad_u = z + 2 * n, grad_vn = grad_u + n, out_a = grad_vn + n;
    out_b = out_a + n, u = out_b + 2 * n, vn = u + n, dgelu = vn + n, vhat = dgelu + 2 * n;
    g = vhat + n;
  }
};

template <typename scalar_t>
struct ForwardRows {
  using acc_t = at::opmath_type<scalar_t>;
  static CUBE_ALWAYS_INLINE void run(const Operands<scalar_t>& o, const int64_t& begin,
                                     const int64_t& end) {
    const int64_t F = o.F;
    Scratch<acc_t> s(F);
    for (int64_t r = begin; r < end; r += kLanes) {  // groups of rows: cpu/row_math.h
      const int64_t R = std::min(kLanes, end - r);
      const acc_t* z = load(o.proj + r * 2 * F, R * 2 * F, s.z);
      acc_t* u = output(o.u + r * F, s.out_a);
      acc_t* vn = output(o.vn + r * F, s.out_b);
      rows::gate_input_rows(z, R, o.bias, o.w, o.b, F, u, vn, F);
      store(o.u + r * F, u, R * F);
      store(o.vn + r * F, vn, R * F);
    }
  }
};

template <typename scalar_t>
struct BackwardBlocks {
  using acc_t = at::opmath_type<scalar_t>;
  static CUBE_ALWAYS_INLINE void run(const Operands<scalar_t>& o, const int64_t& block_begin,
                                     const int64_t& block_end) {
    const int64_t F = o.F;
    Scratch<acc_t> s(F);
    for (int64_t blk = block_begin; blk < block_end; ++blk) {
      acc_t* __restrict__ pw = o.partial + blk * 4 * F;  // dln2_weight
      acc_t* __restrict__ pb = pw + F;                    // dln2_bias
      acc_t* __restrict__ pz = pb + F;                    // db_in (2F)
      std::fill(pw, pw + 4 * F, acc_t(0));
      const int64_t row_end = std::min(o.rows, (blk + 1) * kRowsPerPartial);
      for (int64_t r = blk * kRowsPerPartial; r < row_end; r += kLanes) {
        const int64_t R = std::min(kLanes, row_end - r);
        const acc_t* __restrict__ z = load(o.proj + r * 2 * F, R * 2 * F, s.z);
        const acc_t* __restrict__ gu = load(o.grad_u + r * F, R * F, s.grad_u);
        const acc_t* __restrict__ gvn = load(o.grad_vn + r * F, R * F, s.grad_vn);
        acc_t* dz = output(o.dz_pre + r * 2 * F, s.out_b);
        acc_t rstd[kLanes];
        rows::gate_input_saving_rows(z, R, o.bias, o.w, o.b, F, s.u, s.vn, s.dgelu, s.vhat, rstd);
        rows::gate_input_backward_rows(gu, gvn, s.dgelu, s.vhat, rstd, R, o.w, F, s.g, dz, pw, pb,
                                       pz);
        store(o.dz_pre + r * 2 * F, dz, R * 2 * F);
      }
    }
  }
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<acc_t> to_acc(const at::Tensor& t) {
  const scalar_t* p = t.const_data_ptr<scalar_t>();
  return std::vector<acc_t>(p, p + t.numel());
}

template <typename scalar_t>
void forward_kernel(const GateInputArgs& a, const at::Tensor& proj, const at::Tensor& b_in,
                    const at::Tensor& ln2_weight, const at::Tensor& ln2_bias, const at::Tensor& u,
                    const at::Tensor& vn) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> bias = to_acc<scalar_t>(b_in);
  const std::vector<acc_t> w = to_acc<scalar_t>(ln2_weight), b = to_acc<scalar_t>(ln2_bias);
  Operands<scalar_t> o{};
  o.rows = a.N, o.F = a.F;
  o.proj = proj.const_data_ptr<scalar_t>(), o.bias = bias.data(), o.w = w.data(), o.b = b.data();
  o.u = u.mutable_data_ptr<scalar_t>(), o.vn = vn.mutable_data_ptr<scalar_t>();
  // About 40 flops per value of a row (2F values).
  at::parallel_for(0, a.N, rows_per_task(80 * a.F), [&](int64_t begin, int64_t end) {
    run_best_isa<ForwardRows<scalar_t>>(o, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const GateInputArgs& a, const at::Tensor& grad_u, const at::Tensor& grad_vn,
                     const at::Tensor& proj, const at::Tensor& b_in,
                     const at::Tensor& ln2_weight, const at::Tensor& ln2_bias,
                     const at::Tensor& dz_pre, const at::Tensor& dln2_weight,
                     const at::Tensor& dln2_bias, const at::Tensor& db_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t F = a.F;
  const int64_t blocks = (a.N + kRowsPerPartial - 1) / kRowsPerPartial;
  const std::vector<acc_t> bias = to_acc<scalar_t>(b_in), w = to_acc<scalar_t>(ln2_weight);
  const std::vector<acc_t> b = to_acc<scalar_t>(ln2_bias);  // vn, recomputed on the way
  std::vector<acc_t> partial(static_cast<size_t>(blocks * 4 * F));
  Operands<scalar_t> o{};
  o.rows = a.N, o.F = F;
  o.proj = proj.const_data_ptr<scalar_t>(), o.bias = bias.data(), o.w = w.data(), o.b = b.data();
  o.grad_u = grad_u.const_data_ptr<scalar_t>(), o.grad_vn = grad_vn.const_data_ptr<scalar_t>();
  o.dz_pre = dz_pre.mutable_data_ptr<scalar_t>(), o.partial = partial.data();
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    run_best_isa<BackwardBlocks<scalar_t>>(o, block_begin, block_end);
  });
  std::vector<acc_t> total(static_cast<size_t>(4 * F));
  sum_block_partials(partial.data(), blocks, 4 * F, total.data());
  const auto to_out = [&](int64_t from, int64_t n, const at::Tensor& out) {
    std::transform(total.begin() + from, total.begin() + from + n,
                   out.mutable_data_ptr<scalar_t>(),
                   [](acc_t x) { return static_cast<scalar_t>(x); });
  };
  to_out(0, F, dln2_weight);
  to_out(F, F, dln2_bias);
  to_out(2 * F, 2 * F, db_in);
}

std::tuple<at::Tensor, at::Tensor> gate_input_cpu(const at::Tensor& proj_in,
                                                  const at::Tensor& b_in_in,
                                                  const at::Tensor& ln2_weight_in,
                                                  const at::Tensor& ln2_bias_in) {
  const GateInputArgs a =
      check_gate_input("cube::gate_input", proj_in, b_in_in, ln2_weight_in, ln2_bias_in);
  const at::Tensor proj = proj_in.contiguous(), b_in = b_in_in.contiguous();
  const at::Tensor ln2_weight = ln2_weight_in.contiguous(), ln2_bias = ln2_bias_in.contiguous();
  at::Tensor u = at::empty({a.N, a.F}, proj.options());
  at::Tensor vn = at::empty({a.N, a.F}, proj.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, proj.scalar_type(), "cube::gate_input",
      [&] { forward_kernel<scalar_t>(a, proj, b_in, ln2_weight, ln2_bias, u, vn); });
  return {u, vn};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gate_input_backward_cpu(
    const at::Tensor& grad_u_in, const at::Tensor& grad_vn_in, const at::Tensor& proj_in,
    const at::Tensor& b_in_in, const at::Tensor& ln2_weight_in, const at::Tensor& ln2_bias_in) {
  const GateInputArgs a = check_gate_input("cube::gate_input_backward", proj_in, b_in_in,
                                           ln2_weight_in, ln2_bias_in, &grad_u_in, &grad_vn_in);
  const at::Tensor grad_u = grad_u_in.contiguous(), grad_vn = grad_vn_in.contiguous();
  const at::Tensor proj = proj_in.contiguous(), b_in = b_in_in.contiguous();
  const at::Tensor ln2_weight = ln2_weight_in.contiguous(), ln2_bias = ln2_bias_in.contiguous();
  at::Tensor dz_pre = at::empty({a.N, 2 * a.F}, proj.options());
  at::Tensor dln2_weight = at::empty({a.F}, proj.options());
  at::Tensor dln2_bias = at::empty({a.F}, proj.options());
  at::Tensor db_in = at::empty({2 * a.F}, proj.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, proj.scalar_type(), "cube::gate_input_backward", [&] {
        backward_kernel<scalar_t>(a, grad_u, grad_vn, proj, b_in, ln2_weight, ln2_bias, dz_pre,
                                  dln2_weight, dln2_bias, db_in);
      });
  return {dz_pre, dln2_weight, dln2_bias, db_in};
}

}  // namespace
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CPU, m) {
  m.impl("gate_input", &cube::gate_input_cpu);
  m.impl("gate_input_backward", &cube::gate_input_backward_cpu);
}
