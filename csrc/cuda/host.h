// What the host side of the CUDA ops (*_host.cpp) shares: the kernels' element type of a
// tensor and the accumulator dtype of the partial sums and GEMM outputs.
#pragma once

#include <ATen/Context.h>
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

// The ops' fp32 cuBLAS GEMMs run in full fp32 whatever the global TF32 setting
// (torch.backends.cuda.matmul), which would otherwise break SPEC's 1e-5. The setting is
// process-wide: it is switched off for the op's GEMMs and restored after.
class FullFp32Gemms {
 public:
  FullFp32Gemms() : tf32_(at::globalContext().allowTF32CuBLAS()) {
    if (tf32_) at::globalContext().setAllowTF32CuBLAS(false);
  }
  ~FullFp32Gemms() {
    if (tf32_) at::globalContext().setAllowTF32CuBLAS(true);
  }
  FullFp32Gemms(const FullFp32Gemms&) = delete;
  FullFp32Gemms& operator=(const FullFp32Gemms&) = delete;

 private:
  bool tf32_;
};

}  // namespace cuda
}  // namespace cube
