// CPU whole rollout (SPEC.md "One step", T times, with the front-face injection): T steps in
// one call, so a rollout costs no Python and no autograd node per step.
//   forward   x_0 = inject(x), x_{t+1} = inject(step(x_t, t)); returns the T step outputs
//             (or only the last one) stacked as [T, B, D, H, W, C]
//   backward  from the step outputs (the states autograd keeps: one state of C values per cell
//             and step, SPEC's memory rule), step by step in reverse: re-inject, recompute u, vn,
//             h, run the fused backward ops, accumulate the weight gradients
// inject(s) overwrites the first E channels of the front face (d = 0) with `inject` ([B, H, W, E]).
// Each step runs the same kernels as cube_kernels.step.fused_step (ATen LayerNorm and GEMM, then
// cube::gate_input, cube::gather_gate, cube::update), in x's dtype. The parameters may have
// another dtype (fp32 master weights under autocast): they are cast to x's once per call.
// Backward computes in the accumulation type (fp32 for bf16/fp16): the gradient between steps
// and the weight gradients summed over the steps are rounded once, at the end, to their
// tensors' dtypes.
#include <cstdint>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/native_layer_norm.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "below_op.h"
#include "cell_math.h"
#include "checks.h"

namespace cube {
namespace {

constexpr const char* kOp = "cube::rollout";
constexpr int kParams = 10;  // SPEC's order: ln1_weight ln1_bias w_in b_in ln2_weight ln2_bias
                             // w_sp b_sp w_out b_out
enum { kLn1W, kLn1B, kWIn, kBIn, kLn2W, kLn2B, kWSp, kBSp, kWOut, kBOut };

using Params = std::vector<at::Tensor>;

// The fused ops, called through the dispatcher (below autograd: see AtenBelowTheOp).
using T = const at::Tensor&;
using Str = c10::string_view;
struct Ops {
  template <typename Sig>
  static c10::TypedOperatorHandle<Sig> op(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
  }

  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(T, T, T, T)> gate_input =
      op<std::tuple<at::Tensor, at::Tensor>(T, T, T, T)>("cube::gate_input");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(T, T, T, T, T, T)>
      gate_input_backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          T, T, T, T, T, T)>("cube::gate_input_backward");
  c10::TypedOperatorHandle<at::Tensor(T, T, T, T, Str, Str)> gather_gate =
      op<at::Tensor(T, T, T, T, Str, Str)>("cube::gather_gate");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(T, T, T, T, T, Str, Str)>
      gather_gate_backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          T, T, T, T, T, Str, Str)>("cube::gather_gate_backward");
  c10::TypedOperatorHandle<at::Tensor(T, T, T, T, int64_t, int64_t, double)> update =
      op<at::Tensor(T, T, T, T, int64_t, int64_t, double)>("cube::update");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(T, T, T, int64_t, int64_t, double)>
      update_backward = op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
          T, T, T, int64_t, int64_t, double)>("cube::update_backward");

  static const Ops& get() {
    static const Ops ops;
    return ops;
  }
};

struct Config {
  int64_t seed;
  std::string neighbourhood, boundary;
  double fire_rate;
};

// The arguments every rollout call shares, checked once: x [B, D, H, W, C], inject [B, H, W, E]
// with 1 <= E <= C (or undefined), the ten parameters of one dtype with SPEC's shapes.
void check_rollout(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& inject,
                   const Params& p, const Config& cfg) {
  check_tensor(op, x, "x", 5, x, "x");
  check_rows(op, x, "x");
  const int K = num_tokens(parse_neighbourhood(op, cfg.neighbourhood));
  parse_boundary(op, cfg.boundary);
  check_mask_args(op, cfg.seed, 0, cfg.fire_rate);
  const int64_t C = x.size(4);
  check_tensor(op, p[kWIn], "w_in", 2, p[kWIn], "w_in");
  const int64_t F2 = p[kWIn].size(1);
  TORCH_CHECK_VALUE(F2 % 2 == 0 && F2 > 0, op, ": w_in must be [C, 2F], got ", p[kWIn].sizes());
  const int64_t F = F2 / 2;
  static const char* names[kParams] = {"ln1_weight", "ln1_bias", "w_in", "b_in", "ln2_weight",
                                       "ln2_bias", "w_sp", "b_sp", "w_out", "b_out"};
  const std::vector<std::vector<int64_t>> shapes = {{C}, {C}, {C, F2}, {F2}, {F}, {F},
                                                    {K, F}, {F}, {F, C}, {C}};
  for (int i = 0; i < kParams; ++i) {
    check_tensor(op, p[i], names[i], static_cast<int64_t>(shapes[i].size()), p[kWIn], "w_in");
    TORCH_CHECK_VALUE(p[i].sizes() == at::IntArrayRef(shapes[i]), op, ": ", names[i],
                      " must have shape ", at::IntArrayRef(shapes[i]), ", got ", p[i].sizes());
    TORCH_CHECK_VALUE(p[i].device() == x.device(), op, ": ", names[i], " is on ", p[i].device(),
                      " but x is on ", x.device());
  }
  if (inject.has_value() && inject->defined()) {
    const at::Tensor& s = *inject;
    check_tensor(op, s, "inject", 4, s, "inject");
    TORCH_CHECK_VALUE(s.device() == x.device(), op, ": inject is on ", s.device(), " but x is on ",
                      x.device());
    TORCH_CHECK_VALUE(s.size(0) == x.size(0) && s.size(1) == x.size(2) && s.size(2) == x.size(3) &&
                          s.size(3) >= 1 && s.size(3) <= C,
                      op, ": inject must be [B, H, W, E] with E <= C = ", C, ", got ", s.sizes());
  }
}

// x with `inject` as the first E channels of its front face (a new tensor; x is not changed).
at::Tensor injected(const at::Tensor& x, const c10::optional<at::Tensor>& inject) {
  if (!inject.has_value() || !inject->defined()) return x;
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  out.select(1, 0).narrow(-1, 0, inject->size(-1)).copy_(*inject);
  return out;
}

// y @ w_in. For bf16/fp16 on a CPU whose oneDNN micro-kernels have no native GEMM of that dtype
// (no AVX512-BF16 / AMX: cpublas::could_pack says so) ATen's low-precision mm is two orders of
// magnitude slower than its fp32 one (bench: the GEMM ceiling), so the GEMM runs in fp32 on the
// widened operands and is rounded once to the step's dtype, what a native GEMM with fp32
// accumulation gives.
at::Tensor in_projection(const at::Tensor& y, const at::Tensor& w_in) {
  const at::ScalarType dtype = y.scalar_type();
  if (dtype == at::kFloat || dtype == at::kDouble || at::native::cpublas::could_pack(dtype))
    return at::mm(y, w_in);
  return at::mm(y.to(at::kFloat), w_in.to(at::kFloat)).to(dtype);
}

// u, vn (and what the backward of the in-projection needs) from the state x.
struct CellInput {
  at::Tensor y, mean, rstd, proj, u, vn;
};

CellInput cell_input(const at::Tensor& x, const Params& p) {
  const Ops& ops = Ops::get();
  const int64_t C = x.size(-1);
  CellInput c;
  std::tie(c.y, c.mean, c.rstd) = at::native_layer_norm(x.reshape({-1, C}), {C}, p[kLn1W],
                                                        p[kLn1B], kLayerNormEps);
  c.proj = in_projection(c.y, p[kWIn]);
  std::tie(c.u, c.vn) = ops.gate_input.call(c.proj, p[kBIn], p[kLn2W], p[kLn2B]);
  auto cells = x.sizes().vec();
  cells.back() = p[kWIn].size(1) / 2;
  c.u = c.u.view(cells);
  c.vn = c.vn.view(cells);
  return c;
}

at::Tensor step_forward(const at::Tensor& x, const Params& p, const Config& cfg, int64_t t) {
  const Ops& ops = Ops::get();
  const CellInput c = cell_input(x, p);
  const at::Tensor h =
      ops.gather_gate.call(c.u, c.vn, p[kWSp], p[kBSp], cfg.neighbourhood, cfg.boundary);
  return ops.update.call(x, h, p[kWOut], p[kBOut], cfg.seed, t, cfg.fire_rate);
}

Params cast(const Params& p, at::ScalarType dtype) {
  Params out;
  for (const at::Tensor& t : p) out.push_back(t.to(dtype).contiguous());
  return out;
}

at::Tensor rollout_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& inject_in,
                       const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
                       const at::Tensor& w_in, const at::Tensor& b_in,
                       const at::Tensor& ln2_weight, const at::Tensor& ln2_bias,
                       const at::Tensor& w_sp, const at::Tensor& b_sp, const at::Tensor& w_out,
                       const at::Tensor& b_out, int64_t steps, int64_t seed,
                       c10::string_view neighbourhood, c10::string_view boundary,
                       double fire_rate, bool all_states) {
  const Config cfg{seed, std::string(neighbourhood), std::string(boundary), fire_rate};
  const Params p_in = {ln1_weight, ln1_bias, w_in, b_in, ln2_weight,
                       ln2_bias,   w_sp,     b_sp, w_out, b_out};
  check_rollout(kOp, x_in, inject_in, p_in, cfg);
  TORCH_CHECK_VALUE(steps >= 1, kOp, ": steps must be >= 1, got ", steps);
  const AtenBelowTheOp below;
  const at::ScalarType dtype = x_in.scalar_type();
  const Params p = cast(p_in, dtype);
  c10::optional<at::Tensor> inject;
  if (inject_in.has_value() && inject_in->defined()) inject = inject_in->to(dtype);

  auto shape = x_in.sizes().vec();
  shape.insert(shape.begin(), all_states ? steps : 1);
  at::Tensor outs = at::empty(shape, x_in.options());
  at::Tensor x = injected(x_in.contiguous(), inject);
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor x_new = step_forward(x, p, cfg, t);
    if (all_states || t == steps - 1) outs.select(0, all_states ? t : 0).copy_(x_new);
    if (t + 1 < steps) x = injected(x_new, inject);
  }
  return outs;
}

// The backward of one step at the state x, given the gradient of its output: the gradient of x
// (the residual included) and the weight gradients added into `dp`. Everything in one dtype.
at::Tensor step_backward(const at::Tensor& grad, const at::Tensor& x, const Params& p,
                         const Config& cfg, int64_t t, Params& dp) {
  const Ops& ops = Ops::get();
  const int64_t C = x.size(-1), F = p[kWIn].size(1) / 2;
  const CellInput c = cell_input(x, p);
  const at::Tensor h =
      ops.gather_gate.call(c.u, c.vn, p[kWSp], p[kBSp], cfg.neighbourhood, cfg.boundary);
  auto [dh, dw_out, db_out] = ops.update_backward.call(grad, h, p[kWOut], cfg.seed, t,
                                                       cfg.fire_rate);
  auto [du, dvn, dw_sp, db_sp] = ops.gather_gate_backward.call(
      dh, c.u, c.vn, p[kWSp], p[kBSp], cfg.neighbourhood, cfg.boundary);
  auto [dz_pre, dln2_weight, dln2_bias, db_in] = ops.gate_input_backward.call(
      du.view({-1, F}), dvn.view({-1, F}), c.proj, p[kBIn], p[kLn2W], p[kLn2B]);
  auto [dx, dln1_weight, dln1_bias] = at::native_layer_norm_backward(
      dz_pre.mm(p[kWIn].t()), x.reshape({-1, C}), {C}, c.mean, c.rstd, p[kLn1W], p[kLn1B],
      {true, true, true});
  const at::Tensor step_grads[kParams] = {dln1_weight, dln1_bias, c.y.t().mm(dz_pre),
                                          db_in,       dln2_weight, dln2_bias,
                                          dw_sp,       db_sp,       dw_out,
                                          db_out};
  for (int i = 0; i < kParams; ++i) dp[i].add_(step_grads[i]);
  return dx.view(x.sizes()).add_(grad);
}

// (dx, dinject, the ten weight gradients); dinject is an empty tensor without injection.
std::vector<at::Tensor> rollout_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& outs,
    const c10::optional<at::Tensor>& inject_in, const at::Tensor& ln1_weight,
    const at::Tensor& ln1_bias, const at::Tensor& w_in, const at::Tensor& b_in,
    const at::Tensor& ln2_weight, const at::Tensor& ln2_bias, const at::Tensor& w_sp,
    const at::Tensor& b_sp, const at::Tensor& w_out, const at::Tensor& b_out, int64_t seed,
    c10::string_view neighbourhood, c10::string_view boundary, double fire_rate) {
  const Config cfg{seed, std::string(neighbourhood), std::string(boundary), fire_rate};
  const Params p_in = {ln1_weight, ln1_bias, w_in, b_in, ln2_weight,
                       ln2_bias,   w_sp,     b_sp, w_out, b_out};
  const char* op = "cube::rollout_backward";
  check_rollout(op, x_in, inject_in, p_in, cfg);
  TORCH_CHECK_VALUE(outs.dim() == 6 && outs.size(0) >= 1 && outs.sizes().slice(1) == x_in.sizes(),
                    op, ": outs must be [T, *x.shape], got ", outs.sizes());
  TORCH_CHECK_VALUE(grad_in.sizes() == outs.sizes(), op, ": grad must have the shape of outs ",
                    outs.sizes(), ", got ", grad_in.sizes());
  const AtenBelowTheOp below;
  const at::ScalarType acc = at::toOpMathType(x_in.scalar_type());
  const Params p = cast(p_in, acc);
  c10::optional<at::Tensor> inject;
  if (inject_in.has_value() && inject_in->defined()) inject = inject_in->to(acc);
  const int64_t steps = outs.size(0), E = inject ? inject->size(-1) : 0;

  Params dp;
  for (const at::Tensor& t : p) dp.push_back(at::zeros_like(t));
  at::Tensor dinject = inject ? at::zeros_like(*inject) : at::empty({0}, x_in.options());
  at::Tensor g = grad_in.select(0, steps - 1).to(acc).contiguous();
  for (int64_t t = steps - 1; t >= 0; --t) {
    const at::Tensor prev = t == 0 ? x_in : outs.select(0, t - 1);
    const at::Tensor x = injected(prev.to(acc).contiguous(), inject);
    g = step_backward(g, x, p, cfg, t, dp);
    if (inject) {  // the injected channels came from `inject`, not from the previous state
      at::Tensor g_front = g.select(1, 0).narrow(-1, 0, E);
      dinject.add_(g_front);
      g_front.zero_();
    }
    if (t > 0) g.add_(grad_in.select(0, t - 1));
  }
  std::vector<at::Tensor> out = {g.to(x_in.scalar_type()),
                                 inject ? dinject.to(inject_in->scalar_type()) : dinject};
  for (int i = 0; i < kParams; ++i) out.push_back(dp[i].to(p_in[i].scalar_type()));
  return out;
}

}  // namespace
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CPU, m) {
  m.impl("rollout", &cube::rollout_cpu);
  m.impl("rollout_backward", &cube::rollout_backward_cpu);
}
