// The CUDA implementation of cube::gather_gate and its backward (schemas in csrc/ops.cpp):
// input checks, allocation and the launches of the kernels in gather_gate.cu on the current
// stream.
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "host.h"
#include "launch.h"

namespace cube {
namespace cuda {
namespace {

GatherGateParams make_params(const GatherGateArgs& a, const at::Tensor& u, const at::Tensor& vn,
                             const at::Tensor& w_sp, const at::Tensor& b_sp) {
  GatherGateParams p{};
  p.dtype = kernel_dtype(u);
  p.u = u.const_data_ptr();
  p.vn = vn.const_data_ptr();
  p.w_sp = w_sp.const_data_ptr();
  p.b_sp = b_sp.const_data_ptr();
  p.B = a.B;
  p.D = a.lattice.D;
  p.H = a.lattice.H;
  p.W = a.lattice.W;
  p.F = a.F;
  p.neighbourhood = a.neighbourhood;
  p.boundary = a.lattice.boundary;
  p.stream = at::cuda::getCurrentCUDAStream();
  return p;
}

at::Tensor gather_gate_cuda(const at::Tensor& u_in, const at::Tensor& vn_in,
                            const at::Tensor& w_sp_in, const at::Tensor& b_sp_in,
                            c10::string_view neighbourhood, c10::string_view boundary) {
  const GatherGateArgs a = check_gather_gate("cube::gather_gate", u_in, vn_in, w_sp_in, b_sp_in,
                                             neighbourhood, boundary);
  const at::Tensor u = u_in.contiguous(), vn = vn_in.contiguous();
  const at::Tensor w_sp = w_sp_in.contiguous(), b_sp = b_sp_in.contiguous();

  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor h = at::empty_like(u);
  if (h.numel() == 0) return h;
  GatherGateParams p = make_params(a, u, vn, w_sp, b_sp);
  p.h = h.mutable_data_ptr();
  launch_gather_gate(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gather_gate_backward_cuda(
    const at::Tensor& grad_h_in, const at::Tensor& u_in, const at::Tensor& vn_in,
    const at::Tensor& w_sp_in, const at::Tensor& b_sp_in, c10::string_view neighbourhood,
    c10::string_view boundary) {
  const GatherGateArgs a = check_gather_gate("cube::gather_gate_backward", u_in, vn_in, w_sp_in,
                                             b_sp_in, neighbourhood, boundary, &grad_h_in);
  const at::Tensor grad_h = grad_h_in.contiguous(), u = u_in.contiguous(), vn = vn_in.contiguous();
  const at::Tensor w_sp = w_sp_in.contiguous(), b_sp = b_sp_in.contiguous();

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
  at::Tensor partial =
      at::empty({num_tiles(a.B * a.N), a.K + 1, a.F}, u.options().dtype(acc_type(u)));
  GatherGateParams p = make_params(a, u, vn, w_sp, b_sp);
  p.grad_h = grad_h.const_data_ptr();
  p.du = du.mutable_data_ptr();
  p.dvn = dvn.mutable_data_ptr();
  p.dw_sp = dw_sp.mutable_data_ptr();
  p.db_sp = db_sp.mutable_data_ptr();
  p.partial = partial.mutable_data_ptr();
  launch_gather_gate_backward(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {du, dvn, dw_sp, db_sp};
}

}  // namespace
}  // namespace cuda
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CUDA, m) {
  m.impl("gather_gate", TORCH_FN(cube::cuda::gather_gate_cuda));
  m.impl("gather_gate_backward", TORCH_FN(cube::cuda::gather_gate_backward_cuda));
}
