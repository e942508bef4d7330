// The CUDA implementation of cube::update and its backward (schemas in csrc/ops.cpp): input
// checks, allocation, the cuBLAS GEMMs of the out-projection and the launches of the kernels in
// update.cu on the current stream.
//
// The GEMMs go through cuBLAS (at::mm): at these sizes (F x C = 128 x 64) it beats a
// hand-written GEMM, and the fused part around them (bias, fire mask, residual) is
// memory-bound anyway.
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../below_op.h"
#include "../checks.h"
#include "host.h"
#include "launch.h"

namespace cube {
namespace cuda {
namespace {

UpdateParams make_params(const UpdateArgs& a, const at::Tensor& t, int64_t seed, int64_t step) {
  UpdateParams p{};
  p.dtype = kernel_dtype(t);
  p.B = a.B;
  p.cells = a.N;
  p.C = a.C;
  p.seed = static_cast<uint64_t>(seed);
  p.step = step;
  p.fire_rate = a.fire_rate;
  p.stream = at::cuda::getCurrentCUDAStream();
  return p;
}

// The forward GEMM writes fp32 (fp64 for double) so that the epilogue adds the bias and the
// residual before the one rounding to the input dtype.
at::Tensor update_cuda(const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& w_out_in,
                       const at::Tensor& b_out_in, int64_t seed, int64_t step, double fire_rate) {
  const UpdateArgs a = check_update("cube::update", x_in, "x", h_in, w_out_in, &b_out_in, seed,
                                    step, fire_rate);
  const AtenBelowTheOp below;
  const FullFp32Gemms fp32;
  const at::Tensor x = x_in.contiguous(), h = h_in.contiguous();
  const at::Tensor w_out = w_out_in.contiguous(), b_out = b_out_in.contiguous();

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_new = at::empty_like(x);
  if (x.numel() == 0) return x_new;
  const at::Tensor delta = at::mm(h.view({a.B * a.N, a.F}), w_out, acc_type(x));
  UpdateParams p = make_params(a, x, seed, step);
  p.x = x.const_data_ptr();
  p.delta = delta.const_data_ptr();
  p.b_out = b_out.const_data_ptr();
  p.x_new = x_new.mutable_data_ptr();
  launch_update_epilogue(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return x_new;
}

// d_delta = where(m, grad, 0); dh = d_delta @ w_out^T and dw_out = h^T @ d_delta by cuBLAS (which is
// run-to-run deterministic: no atomics unless asked for; dw_out is produced in fp32 so its long
// reduction over all cells never rounds to bf16/fp16 on the way); db_out by the kernel's
// two-stage tile sums.
std::tuple<at::Tensor, at::Tensor, at::Tensor> update_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& h_in, const at::Tensor& w_out_in, int64_t seed,
    int64_t step, double fire_rate) {
  const UpdateArgs a = check_update("cube::update_backward", grad_in, "grad", h_in, w_out_in,
                                    nullptr, seed, step, fire_rate);
  const AtenBelowTheOp below;
  const FullFp32Gemms fp32;
  const at::Tensor grad = grad_in.contiguous(), h = h_in.contiguous();
  const at::Tensor w_out = w_out_in.contiguous();
  const int64_t rows = a.B * a.N, C = a.C, F = a.F;

  const c10::cuda::CUDAGuard guard(grad.device());
  if (rows == 0 || C == 0) {  // d_delta is empty: every gradient is an empty sum
    return {at::zeros_like(h), at::zeros_like(w_out), at::zeros({C}, grad.options())};
  }
  // With every cell firing d_delta is grad itself: skip writing a copy.
  const bool all_fire = a.fire_rate >= 1.0f;
  at::Tensor d_delta = all_fire ? grad : at::empty_like(grad);
  at::Tensor db_out = at::empty({C}, grad.options());
  at::Tensor partial = at::empty({num_tiles(rows), C}, grad.options().dtype(acc_type(grad)));
  UpdateParams p = make_params(a, grad, seed, step);
  p.grad = grad.const_data_ptr();
  p.d_delta = all_fire ? nullptr : d_delta.mutable_data_ptr();
  p.db_out = db_out.mutable_data_ptr();
  p.partial = partial.mutable_data_ptr();
  launch_update_backward(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const at::Tensor dd = d_delta.view({rows, C});
  at::Tensor dh = at::mm(dd, w_out.t()).view(h.sizes());
  at::Tensor dw_out = at::mm(h.view({rows, F}).t(), dd, acc_type(grad)).to(grad.scalar_type());
  return {dh, dw_out, db_out};
}

}  // namespace
}  // namespace cuda
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CUDA, m) {
  m.impl("update", TORCH_FN(cube::cuda::update_cuda));
  m.impl("update_backward", TORCH_FN(cube::cuda::update_backward_cuda));
}
