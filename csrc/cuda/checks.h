// What the CUDA ops check beyond the shared rules of csrc/checks.h: the kernels' element types
// and their int32 row indexing.
#pragma once
#include <cstdint>
#include <limits>

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

// The kernels index rows (cells of the whole batch) with int32 in shared memory.
inline void check_rows(const char* op, const at::Tensor& t, const char* name) {
  const int64_t rows = t.size(0) * t.size(1) * t.size(2) * t.size(3);
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), op, ": ", name,
              " has too many cells: B*D*H*W must be below 2^31, got ", rows);
}

}  // namespace cuda
}  // namespace cube
