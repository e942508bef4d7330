// Input checks of the CUDA ops: the same rules as the CPU ops (rank, shapes, K = 7/27, one
// dtype for every tensor, contiguity, fire_rate in [0, 1], seed/step >= 0, the neighbourhood and
// boundary names), plus every tensor on one CUDA device. Each failure names the argument and
// what was expected.
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "../cell_math.h"
#include "launch.h"

namespace cube {
namespace cuda {

inline int parse_neighbourhood(c10::string_view name) {
  if (name == "von_neumann") return kVonNeumann;
  if (name == "moore") return kMoore;
  TORCH_CHECK(false, "neighbourhood must be 'von_neumann' or 'moore', got '", std::string(name),
              "'");
}

inline int parse_boundary(c10::string_view name) {
  if (name == "zero") return kZero;
  if (name == "periodic") return kPeriodic;
  TORCH_CHECK(false, "boundary must be 'zero' or 'periodic', got '", std::string(name), "'");
}

inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// Checks the tensor against `ref` (the first tensor of the call) for device and dtype, and
// its shape against `shape`, where -1 matches any size.
inline void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref,
                         const char* ref_name, const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (int64_t d = 0; ok && d < t.dim(); ++d) ok = shape[d] < 0 || t.size(d) == shape[d];
  TORCH_CHECK(ok, name, " must have shape ", c10::IntArrayRef(shape), " (-1: any size), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (channels-last [B, D, H, W, *] "
              "is the row-major layout), got strides ", t.strides());
}

// The lattice tensor that fixes B, D, H, W and the dtype of the call.
inline void check_lattice(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == 5, name, " must have shape [B, D, H, W, channels], got ", t.sizes());
  kernel_dtype(t, name);
  check_tensor(t, name, t, name, {-1, -1, -1, -1, -1});
  // The kernels index rows (cells of the whole batch) in int32 in shared memory.
  const int64_t rows = t.size(0) * t.size(1) * t.size(2) * t.size(3);
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), name,
              " has too many cells: B*D*H*W must be below 2^31, got ", rows);
}

inline void check_tokens(const at::Tensor& w_sp, int neighbourhood) {
  const int64_t K = num_tokens(neighbourhood);
  TORCH_CHECK(w_sp.dim() == 2 && w_sp.size(0) == K, "w_sp must have shape [K, F] with K = ", K,
              " for neighbourhood '", neighbourhood == kMoore ? "moore" : "von_neumann",
              "', got ", w_sp.sizes());
}

inline void check_update_scalars(int64_t seed, int64_t step, double fire_rate) {
  TORCH_CHECK(seed >= 0, "seed must be >= 0, got ", seed);
  TORCH_CHECK(step >= 0, "step must be >= 0, got ", step);
  TORCH_CHECK(fire_rate >= 0.0 && fire_rate <= 1.0, "fire_rate must be in [0, 1], got ",
              fire_rate);
}

}  // namespace cuda
}  // namespace cube
