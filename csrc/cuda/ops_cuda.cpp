// CUDA implementations of the cube:: ops (schemas in csrc/ops.cpp): input checks, allocation,
// the cuBLAS GEMMs of the out-projection, and the launches of the kernels in *.cu on the
// current stream.
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "checks.h"
#include "launch.h"

namespace cube {
namespace cuda {
namespace {

// Accumulator dtype of the partial sums and of the forward GEMM's output: fp32, or fp64 for
// double inputs (gradcheck).
at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor gather_gate_cuda(const at::Tensor& u_in, const at::Tensor& vn_in,
                            const at::Tensor& w_sp_in, const at::Tensor& b_sp_in,
                            c10::string_view neighbourhood, c10::string_view boundary) {
  constexpr const char* op = "cube::gather_gate";
  const GatherGateArgs a =
      check_gather_gate(op, u_in, vn_in, w_sp_in, b_sp_in, neighbourhood, boundary);
  check_rows(op, u_in, "u");
  const at::Tensor u = u_in.contiguous(), vn = vn_in.contiguous();
  const at::Tensor w_sp = w_sp_in.contiguous(), b_sp = b_sp_in.contiguous();

  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor h = at::empty_like(u);
  if (h.numel() == 0) return h;
  launch_gather_gate(kernel_dtype(u), u.const_data_ptr(), vn.const_data_ptr(),
                     w_sp.const_data_ptr(), b_sp.const_data_ptr(), h.mutable_data_ptr(),
                     a.B, a.lattice.D, a.lattice.H, a.lattice.W, a.F, a.neighbourhood,
                     a.lattice.boundary, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_gate_backward_cuda(
    const at::Tensor& grad_h_in, const at::Tensor& u_in, const at::Tensor& vn_in,
    const at::Tensor& w_sp_in, const at::Tensor& b_sp_in, c10::string_view neighbourhood,
    c10::string_view boundary) {
  constexpr const char* op = "cube::gather_gate_backward";
  const GatherGateArgs a = check_gather_gate(op, u_in, vn_in, w_sp_in, b_sp_in, neighbourhood,
                                             boundary, &grad_h_in);
  check_rows(op, u_in, "u");
  const at::Tensor grad_h = grad_h_in.contiguous(), u = u_in.contiguous(), vn = vn_in.contiguous();
  const at::Tensor w_sp = w_sp_in.contiguous(), b_sp = b_sp_in.contiguous();
  const int64_t F = a.F, K = a.K;

  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor du = at::empty_like(u);
  at::Tensor dvn = at::empty_like(u);
  at::Tensor dw_sp = at::empty_like(w_sp);
  at::Tensor db_sp = at::empty_like(b_sp);
  if (u.numel() == 0) {  // no cells (the weight gradients are empty sums) or F == 0
    dw_sp.zero_();
    db_sp.zero_();
    return {du, dvn, dw_sp, db_sp};
  }
  const int64_t rows = u.numel() / F;
  at::Tensor partial = at::empty({num_tiles(rows), K + 1, F}, u.options().dtype(acc_type(u)));
  launch_gather_gate_backward(kernel_dtype(u), grad_h.const_data_ptr(), u.const_data_ptr(),
                              vn.const_data_ptr(), w_sp.const_data_ptr(), b_sp.const_data_ptr(),
                              du.mutable_data_ptr(), dvn.mutable_data_ptr(),
                              dw_sp.mutable_data_ptr(), db_sp.mutable_data_ptr(),
                              partial.mutable_data_ptr(), a.B, a.lattice.D, a.lattice.H,
                              a.lattice.W, F, a.neighbourhood, a.lattice.boundary,
                              at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {du, dvn, dw_sp, db_sp};
}

// The out-projection GEMMs go through cuBLAS (at::mm): at these sizes (F x C = 128 x 64) it
// beats a hand-written GEMM, and the fused part around them (bias, fire mask, residual) is
// memory-bound anyway. The forward GEMM writes fp32 (fp64 for double) so that the epilogue
// adds the bias before the one rounding to the input dtype.
at::Tensor update_cuda(const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& w_out_in,
                       const at::Tensor& b_out_in, int64_t seed, int64_t step, double fire_rate) {
  constexpr const char* op = "cube::update";
  const UpdateArgs a =
      check_update(op, x_in, "x", h_in, w_out_in, &b_out_in, seed, step, fire_rate);
  check_rows(op, x_in, "x");
  const at::Tensor x = x_in.contiguous(), h = h_in.contiguous();
  const at::Tensor w_out = w_out_in.contiguous(), b_out = b_out_in.contiguous();
  const int64_t C = a.C, F = a.F;

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_new = at::empty_like(x);
  if (x.numel() == 0) return x_new;
  const int64_t cells = x.size(1) * x.size(2) * x.size(3);
  const int64_t rows = x.size(0) * cells;
  const at::Tensor delta = at::mm(h.view({rows, F}), w_out, acc_type(x));
  launch_update_epilogue(kernel_dtype(x), x.const_data_ptr(), delta.const_data_ptr(),
                         b_out.const_data_ptr(), x_new.mutable_data_ptr(), x.size(0), cells, C,
                         static_cast<uint64_t>(seed), step, a.fire_rate,
                         at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return x_new;
}

// d_delta = m * grad; dh = d_delta @ w_out^T and dw_out = h^T @ d_delta by cuBLAS (which is
// run-to-run deterministic: no atomics unless asked for; dw_out is produced in fp32 so its long
// reduction over all cells never rounds to bf16/fp16 on the way); db_out by the kernel's
// two-stage tile sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor> update_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& w_out_in, int64_t seed,
    int64_t step, double fire_rate) {
  constexpr const char* op = "cube::update_backward";
  const UpdateArgs a =
      check_update(op, grad_in, "grad", h_in, w_out_in, nullptr, seed, step, fire_rate);
  check_rows(op, grad_in, "grad");
  const at::Tensor grad = grad_in.contiguous(), h = h_in.contiguous();
  const at::Tensor w_out = w_out_in.contiguous();
  const int64_t C = a.C, F = a.F;

  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t cells = grad.size(1) * grad.size(2) * grad.size(3);
  const int64_t rows = grad.size(0) * cells;
  if (rows == 0 || C == 0) {  // d_delta is empty: every gradient is an empty sum
    return {at::zeros_like(h), at::zeros_like(w_out), at::zeros({C}, grad.options())};
  }
  const float rate = a.fire_rate;
  // With every cell firing d_delta is grad itself: skip writing a copy.
  const bool all_fire = rate >= 1.0f;
  at::Tensor d_delta = all_fire ? grad : at::empty_like(grad);
  at::Tensor db_out = at::empty({C}, grad.options());
  at::Tensor partial = at::empty({num_tiles(rows), C}, grad.options().dtype(acc_type(grad)));
  launch_update_backward(kernel_dtype(grad), grad.const_data_ptr(),
                         all_fire ? nullptr : d_delta.mutable_data_ptr(),
                         db_out.mutable_data_ptr(), partial.mutable_data_ptr(), grad.size(0),
                         cells, C, static_cast<uint64_t>(seed), step, rate,
                         at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor dd = d_delta.view({rows, C});
  const at::Tensor h2 = h.view({rows, F});
  at::Tensor dh = at::mm(dd, w_out.t()).view(h.sizes());
  at::Tensor dw_out = at::mm(h2.t(), dd, acc_type(grad)).to(grad.scalar_type());
  return {dh, dw_out, db_out};
}

}  // namespace
}  // namespace cuda
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CUDA, m) {
  m.impl("gather_gate", TORCH_FN(cube::cuda::gather_gate_cuda));
  m.impl("gather_gate_backward", TORCH_FN(cube::cuda::gather_gate_backward_cuda));
  m.impl("update", TORCH_FN(cube::cuda::update_cuda));
  m.impl("update_backward", TORCH_FN(cube::cuda::update_backward_cuda));
}
