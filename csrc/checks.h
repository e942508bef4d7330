// Input validation of the cube ops, the one header for the CPU and the CUDA ops: every message
// names the argument and what was expected, a wrong dtype raises TypeError, anything else
// ValueError, like the Python checks. Device-agnostic (ATen core only). The Python entries
// run the same rules first (cube_kernels/ops/checks.py); these are the last line of defence for
// direct torch.ops.cube calls.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "cell_math.h"

namespace cube {

inline Neighbourhood parse_neighbourhood(const char* op, c10::string_view s) {
  TORCH_CHECK_VALUE(s == "von_neumann" || s == "moore", op,
                    ": neighbourhood must be \"von_neumann\" or \"moore\", got \"",
                    std::string(s), "\"");
  return s == "moore" ? kMoore : kVonNeumann;
}

inline Boundary parse_boundary(const char* op, c10::string_view s) {
  TORCH_CHECK_VALUE(s == "zero" || s == "periodic", op,
                    ": boundary must be \"zero\" or \"periodic\", got \"", std::string(s), "\"");
  return s == "periodic" ? kPeriodic : kZero;
}

// `t` is a floating tensor of `ref`'s dtype and device with `dim` dimensions.
inline void check_tensor(const char* op, const at::Tensor& t, const char* name, int64_t dim,
                         const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must be a ", dim, "-D tensor, got ", t.dim(),
                    "-D of shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(
      dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op, ": ",
      name, " must be float32, float64, bfloat16 or float16, got ", dt);
  TORCH_CHECK_TYPE(dt == ref.scalar_type(), op, ": ", name, " has dtype ", dt, " but ", ref_name,
                   " has ", ref.scalar_type(), " (all tensors of one call share a dtype)");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device());
}

// The kernels index rows (cells of the whole batch, B*D*H*W) with int32.
inline void check_rows(const char* op, const at::Tensor& t, const char* name) {
  const int64_t rows = t.size(0) * t.size(1) * t.size(2) * t.size(3);
  TORCH_CHECK_VALUE(rows < (int64_t{1} << 31), op, ": ", name,
                    " has too many cells: B*D*H*W must be below 2^31, got ", rows);
}

inline void check_size(const char* op, const at::Tensor& t, const char* name, int64_t dim,
                       int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", name, ".size(", dim, ") must be ", what,
                    " = ", expected, ", got shape ", t.sizes());
}

// The [B, D, H, W] of two 5-D lattice tensors agree.
inline void check_same_lattice(const char* op, const at::Tensor& t, const char* name,
                               const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes().slice(0, 4) == ref.sizes().slice(0, 4), op, ": ", name,
                    " must have the [B, D, H, W] of ", ref_name, " = ", ref.sizes().slice(0, 4),
                    ", got shape ", t.sizes());
}

struct GatherGateArgs {
  int64_t B, N, F;
  int K;
  Neighbourhood neighbourhood;
  Lattice lattice;
};

// u, vn (and grad_h when given): [B, D, H, W, F]; w_sp: [K, F] with K the neighbourhood's token
// count; b_sp: [F].
inline GatherGateArgs check_gather_gate(const char* op, const at::Tensor& u, const at::Tensor& vn,
                                        const at::Tensor& w_sp, const at::Tensor& b_sp,
                                        c10::string_view neighbourhood, c10::string_view boundary,
                                        const at::Tensor* grad_h = nullptr) {
  GatherGateArgs a{};
  a.neighbourhood = parse_neighbourhood(op, neighbourhood);
  a.K = num_tokens(a.neighbourhood);
  a.lattice.boundary = parse_boundary(op, boundary);
  check_tensor(op, u, "u", 5, u, "u");
  a.B = u.size(0);
  a.lattice.D = u.size(1);
  a.lattice.H = u.size(2);
  a.lattice.W = u.size(3);
  a.F = u.size(4);
  a.N = a.lattice.cells();
  check_rows(op, u, "u");
  check_tensor(op, vn, "vn", 5, u, "u");
  TORCH_CHECK_VALUE(vn.sizes() == u.sizes(), op, ": vn must have the shape of u ", u.sizes(),
                    ", got ", vn.sizes());
  if (grad_h != nullptr) {
    check_tensor(op, *grad_h, "grad_h", 5, u, "u");
    TORCH_CHECK_VALUE(grad_h->sizes() == u.sizes(), op, ": grad_h must have the shape of u ",
                      u.sizes(), ", got ", grad_h->sizes());
  }
  check_tensor(op, w_sp, "w_sp", 2, u, "u");
  TORCH_CHECK_VALUE(w_sp.size(0) == a.K, op, ": w_sp must be [K, F] with K = ", a.K,
                    " tokens for the ", std::string(neighbourhood),
                    " neighbourhood, got shape ", w_sp.sizes());
  check_size(op, w_sp, "w_sp", 1, a.F, "F (the last dim of u)");
  check_tensor(op, b_sp, "b_sp", 1, u, "u");
  check_size(op, b_sp, "b_sp", 0, a.F, "F (the last dim of u)");
  return a;
}

struct UpdateArgs {
  int64_t B, N, C, F;
  float fire_rate;
};

inline void check_mask_args(const char* op, int64_t seed, int64_t step, double fire_rate) {
  TORCH_CHECK_VALUE(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK_VALUE(step >= 0, op, ": step must be >= 0, got ", step);
  // Written so that NaN fails too.
  TORCH_CHECK_VALUE(fire_rate >= 0.0 && fire_rate <= 1.0, op, ": fire_rate must be in [0, 1], got ",
                    fire_rate);
}

// x (named x_name: "x" forward, "grad" backward): [B, D, H, W, C]; h: [B, D, H, W, F];
// w_out: [F, C]; b_out (forward only): [C].
inline UpdateArgs check_update(const char* op, const at::Tensor& x, const char* x_name,
                               const at::Tensor& h, const at::Tensor& w_out,
                               const at::Tensor* b_out, int64_t seed, int64_t step,
                               double fire_rate) {
  check_tensor(op, x, x_name, 5, x, x_name);
  check_rows(op, x, x_name);
  check_tensor(op, h, "h", 5, x, x_name);
  check_same_lattice(op, h, "h", x, x_name);
  check_tensor(op, w_out, "w_out", 2, x, x_name);
  UpdateArgs a{};
  a.B = x.size(0);
  a.N = x.size(1) * x.size(2) * x.size(3);
  a.C = x.size(4);
  a.F = h.size(4);
  TORCH_CHECK_VALUE(w_out.size(0) == a.F && w_out.size(1) == a.C, op,
                    ": w_out must be [F, C] = [", a.F, ", ", a.C,
                    "] (F: last dim of h, C: last dim of ", x_name, "), got shape ",
                    w_out.sizes());
  if (b_out != nullptr) {
    check_tensor(op, *b_out, "b_out", 1, x, x_name);
    check_size(op, *b_out, "b_out", 0, a.C, "C (the last dim of x)");
  }
  check_mask_args(op, seed, step, fire_rate);
  a.fire_rate = static_cast<float>(fire_rate);
  return a;
}

struct GateInputArgs {
  int64_t N, F;
};

// proj: [N, 2F]; b_in: [2F]; ln2_weight, ln2_bias: [F]; grad_u, grad_vn (backward only): [N, F].
inline GateInputArgs check_gate_input(const char* op, const at::Tensor& proj,
                                      const at::Tensor& b_in, const at::Tensor& ln2_weight,
                                      const at::Tensor& ln2_bias,
                                      const at::Tensor* grad_u = nullptr,
                                      const at::Tensor* grad_vn = nullptr) {
  check_tensor(op, proj, "proj", 2, proj, "proj");
  TORCH_CHECK_VALUE(proj.size(1) > 0 && proj.size(1) % 2 == 0, op,
                    ": proj must be [N, 2F] (the GELU half, then the gate half) with an even, "
                    "positive last dim, got shape ", proj.sizes());
  GateInputArgs a{proj.size(0), proj.size(1) / 2};
  check_tensor(op, b_in, "b_in", 1, proj, "proj");
  check_size(op, b_in, "b_in", 0, 2 * a.F, "2F (the last dim of proj)");
  check_tensor(op, ln2_weight, "ln2_weight", 1, proj, "proj");
  check_size(op, ln2_weight, "ln2_weight", 0, a.F, "F (half the last dim of proj)");
  check_tensor(op, ln2_bias, "ln2_bias", 1, proj, "proj");
  check_size(op, ln2_bias, "ln2_bias", 0, a.F, "F (half the last dim of proj)");
  const std::pair<const at::Tensor*, const char*> grads[] = {{grad_u, "grad_u"},
                                                             {grad_vn, "grad_vn"}};
  for (const auto& [g, name] : grads) {
    if (g == nullptr) continue;
    check_tensor(op, *g, name, 2, proj, "proj");
    TORCH_CHECK_VALUE(g->size(0) == a.N && g->size(1) == a.F, op, ": ", name,
                      " must be [N, F] = [", a.N, ", ", a.F, "] (proj is [N, 2F]), got shape ",
                      g->sizes());
  }
  return a;
}

}  // namespace cube
