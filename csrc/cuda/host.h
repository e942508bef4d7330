// What the host side of the CUDA ops (*_host.cpp) shares: the kernels' element type of a
// tensor and the accumulator dtype of the partial sums and GEMM outputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "launch.h"

namespace cube {
namespace cuda {

inline DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "unreachable: csrc/checks.h admits no other dtype");
  }
}

// fp32, or fp64 for double inputs (gradcheck).
inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cuda
}  // namespace cube
