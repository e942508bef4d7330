// CPU whole rollout (SPEC.md "One step", T times, with the front-face injection): T steps in
// one call, so a rollout costs no Python and no autograd node per step.
//   forward   x_0 = inject(x), x_{t+1} = inject(step(x_t, t)); returns the T step outputs
//             (or only the last one) stacked as [T, B, D, H, W, C]
//   backward  from the step outputs (the states autograd keeps: one state of C values per cell
//             and step, SPEC's memory rule), step by step in reverse: the fused cell's backward
//             at the injected state (it recomputes u, vn, h plane by plane), accumulating the
//             weight gradients; its `grad` may hold the last T' <= T steps' output gradients only
//             (the earlier ones zero), so that a caller that reads a few late states need not
//             stack T gradients that are mostly zeros
// inject(s) overwrites the first E channels of the front face (d = 0) with `inject` ([B, H, W, E]);
// both directions read them from `inject` instead of copying the state.
// Alive masking (SPEC.md, with alive_channel): each step output is multiplied by
// keep_t = alive(x_t) & alive(x_new), x_t the injected input. The forward returns the masks
// (bool [T, B, D, H, W], an empty tensor without masking) and the backward multiplies the step's
// output gradient by its mask first. The masks are kept rather than recomputed: alive(x_new)
// needs the unmasked step output, which no saved state holds, and a bool per cell and step is
// 1/(4C) of a state.
// Each step is one call of the fused cell (cpu/cell.cpp): every sum in the accumulation type
// (fp32 for bf16/fp16), the parameters cast to it once per call (fp32 master weights under
// autocast stay fp32), each state rounded once to x's dtype. Backward computes in the
// accumulation type: the gradient between steps and the weight gradients summed over the steps
// are rounded once, at the end, to their tensors' dtypes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include "below_op.h"
#include "cell_math.h"
#include "checks.h"
#include "cpu/cell.h"
#include "cpu/loops.h"

namespace cube {
namespace {

constexpr const char* kOp = "cube::rollout";

using Params = std::vector<at::Tensor>;

// Asks the kernel to back a fresh, untouched tensor with 2 MiB pages where it spans whole ones.
// The T step outputs (tens of MiB) come from a new mapping on every call, and faulting them in
// 4 KiB at a time cost about a tenth of the default config's forward; with THP in "madvise" mode
// (the usual default) this hint is what turns huge pages on. A hint only: an error is ignored.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// The arguments every rollout call shares, checked once: x [B, D, H, W, C], inject [B, H, W, E]
// with 1 <= E <= C (or undefined), the ten parameters of one dtype with SPEC's shapes. Returns
// the step's configuration.
CellConfig check_rollout(const char* op, const at::Tensor& x,
                         const c10::optional<at::Tensor>& inject, const Params& p, int64_t seed,
                         c10::string_view neighbourhood, c10::string_view boundary,
                         double fire_rate, c10::optional<int64_t> alive_channel) {
  check_tensor(op, x, "x", 5, x, "x");
  check_rows(op, x, "x");
  CellConfig cfg{seed, parse_neighbourhood(op, neighbourhood), parse_boundary(op, boundary),
                 fire_rate};
  const int K = num_tokens(cfg.neighbourhood);
  check_mask_args(op, seed, 0, fire_rate);
  const int64_t C = x.size(4);
  TORCH_CHECK_VALUE(!alive_channel || (*alive_channel >= 0 && *alive_channel < C), op,
                    ": alive_channel must be None or in [0, ", C, "), got ", *alive_channel);
  check_tensor(op, p[kWIn], "w_in", 2, p[kWIn], "w_in");
  const int64_t F2 = p[kWIn].size(1);
  TORCH_CHECK_VALUE(F2 % 2 == 0 && F2 > 0, op, ": w_in must be [C, 2F], got ", p[kWIn].sizes());
  const int64_t F = F2 / 2;
  static const char* names[kNumCellParams] = {"ln1_weight", "ln1_bias", "w_in", "b_in", "ln2_weight",
                                       "ln2_bias", "w_sp", "b_sp", "w_out", "b_out"};
  const std::vector<std::vector<int64_t>> shapes = {{C}, {C}, {C, F2}, {F2}, {F}, {F},
                                                    {K, F}, {F}, {F, C}, {C}};
  for (int i = 0; i < kNumCellParams; ++i) {
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
  cfg.bf16_gemm = bf16_gemm_for(x.scalar_type(), C, F);
  return cfg;
}

// Alive masking in place of SPEC's max_pool3d formula (two ATen pooling calls, a strided copy and
// a broadcast multiply per step were about a quarter of a growth forward: docs/performance.md).
// Each cell gets a code, 0 (channel `a` at most the threshold), 1 (above) or 2 (NaN); the max of
// the codes over the 3x3x3 block, clipped at the faces as max_pool3d's padding is, is 1 exactly
// where max_pool3d's max is above the threshold: max_pool3d lets a NaN win its window, and
// NaN > t is false. The threshold is rounded to the state's dtype, as the reference's comparison
// rounds it.
class AliveMask {
 public:
  AliveMask(const at::Tensor& x, int64_t a, double threshold)
      : B_(x.size(0)), D_(x.size(1)), H_(x.size(2)), W_(x.size(3)), C_(x.size(4)), a_(a),
        threshold_(threshold), pre_(B_ * D_ * H_ * W_), post_(pre_.size()), dead_(B_ * D_) {}

  // alive(x)'s codes and dead planes, x with `inject` (or undefined) as its front face's first
  // channels; before the step, so that `dead_planes` can tell the step which planes to skip.
  void read_input(const at::Tensor& x, const at::Tensor& inject) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cube::rollout", [&] {
      const scalar_t* front = nullptr;
      int64_t E = 0;
      if (inject.defined() && a_ < inject.size(-1)) {
        front = inject.data_ptr<scalar_t>();
        E = inject.size(-1);
      }
      const scalar_t* in = x.data_ptr<scalar_t>();
      const int64_t HW = H_ * W_;
      at::parallel_for(0, B_ * D_, rows_per_task(HW * C_), [&](int64_t begin, int64_t end) {
        std::vector<uint8_t> scratch(2 * HW);
        for (int64_t p = begin; p < end; ++p) {
          const bool injected_plane = front != nullptr && p % D_ == 0;
          const scalar_t* face = injected_plane ? front + (p / D_) * HW * E : nullptr;
          plane_max<scalar_t>(in, p, face, E, scratch.data(), pre_);
          dead_[p] = std::all_of(pre_.begin() + p * HW, pre_.begin() + (p + 1) * HW,
                                 [](uint8_t c) { return c == 0; });
        }
      });
    });
  }

  // Per (b, d) plane of the input read last: 1 where no cell has alpha above the threshold or NaN.
  const std::vector<uint8_t>& dead_planes() const { return dead_; }

  // keep = alive(x) & alive(x_new), x the input read last; x_new's cells outside keep are
  // multiplied by 0 (a NaN stays NaN, as in SPEC).
  void apply(const at::Tensor& x_new, const at::Tensor& keep) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_new.scalar_type(), "cube::rollout", [&] {
      const int64_t planes = B_ * D_, HW = H_ * W_;
      const int64_t grain = rows_per_task(HW * C_);
      scalar_t* out_all = x_new.data_ptr<scalar_t>();
      bool* keep_all = keep.data_ptr<bool>();
      at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
        std::vector<uint8_t> scratch(2 * HW);
        for (int64_t p = begin; p < end; ++p)
          plane_max<scalar_t>(out_all, p, nullptr, 0, scratch.data(), post_);
      });
      at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const int64_t d = p % D_, lo = d > 0 ? p - 1 : p, hi = d + 1 < D_ ? p + 1 : p;
          bool* k = keep_all + p * HW;
          scalar_t* out = out_all + p * HW * C_;
          for (int64_t i = 0; i < HW; ++i) {
            k[i] = depth_max(pre_, lo, p, hi, i) == 1 && depth_max(post_, lo, p, hi, i) == 1;
            if (!k[i])
              for (int64_t c = 0; c < C_; ++c) out[i * C_ + c] = out[i * C_ + c] * scalar_t(0);
          }
        }
      });
    });
  }

 private:
  // Plane p of s (channel a of its cells read from `front`, [H, W, E], where given): the codes,
  // their max along w, then along h into out's plane p. scratch: 2 H W bytes.
  template <typename scalar_t>
  void plane_max(const scalar_t* s, int64_t p, const scalar_t* front, int64_t E, uint8_t* scratch,
                 std::vector<uint8_t>& out) const {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t t = static_cast<acc_t>(static_cast<scalar_t>(threshold_));
    const int64_t HW = H_ * W_;
    auto code = [&](int64_t i) -> uint8_t {
      const acc_t v = front != nullptr ? static_cast<acc_t>(front[i * E + a_])
                                       : static_cast<acc_t>(s[(p * HW + i) * C_ + a_]);
      return v != v ? 2 : (v > t ? 1 : 0);
    };
    uint8_t* codes = scratch;
    uint8_t* row_max = scratch + HW;
    for (int64_t i = 0; i < HW; ++i) codes[i] = code(i);
    for (int64_t h = 0; h < H_; ++h)
      for (int64_t w = 0; w < W_; ++w) {
        const uint8_t* r = codes + h * W_;
        row_max[h * W_ + w] = std::max({r[w], r[w > 0 ? w - 1 : w], r[w + 1 < W_ ? w + 1 : w]});
      }
    uint8_t* o = out.data() + p * HW;
    for (int64_t h = 0; h < H_; ++h)
      for (int64_t w = 0; w < W_; ++w)
        o[h * W_ + w] = std::max({row_max[h * W_ + w], row_max[(h > 0 ? h - 1 : h) * W_ + w],
                                  row_max[(h + 1 < H_ ? h + 1 : h) * W_ + w]});
  }

  // The max over planes lo, p, hi (p's neighbours in depth, or p itself at a face) at cell i.
  uint8_t depth_max(const std::vector<uint8_t>& m, int64_t lo, int64_t p, int64_t hi,
                    int64_t i) const {
    const int64_t HW = H_ * W_;
    return std::max({m[lo * HW + i], m[p * HW + i], m[hi * HW + i]});
  }

  int64_t B_, D_, H_, W_, C_, a_;
  double threshold_;
  std::vector<uint8_t> pre_, post_;  // each plane's codes' max over h and w, [B * D, H * W]
  std::vector<uint8_t> dead_;        // per plane of the input read last, [B * D]
};

// Skipping quiet planes. Where the weights are finite, some d-planes' step results are known
// without computing them, and the fused cell (its `live` argument) writes zeros there instead:
//  - forward, with alive masking and no injection: where every plane of d's neighbourhood (d-1, d,
//    d+1 by the boundary rule) holds only zeros, its output is (0 + delta) * 0 with delta a
//    function of the weights alone: 0, as no cell of d has an alive cell in reach. The unmasked
//    output also feeds alive(x_new) of the planes next to d, so d is skipped only where those
//    are dead whatever it holds: no alpha above the threshold in d-2 to d+2. Growth leaves most
//    of the lattice empty (docs/growth.md).
//  - backward: where the masked output gradient is 0 and the state finite on every plane of d's
//    neighbourhood, each term d adds (its dx, its share of the weight gradients) is 0 times a
//    finite value. A readout on the back face leaves the far planes' gradients 0 in the last steps.
// The results then equal the dense computation's but for the sign of zeros (and where finite
// weights are large enough to overflow, which the dense result would turn into NaN).

// Per (b, d) plane of x ([B, D, H, W, C]): quiet(offset of its first value, values per plane).
template <typename Quiet>
std::vector<uint8_t> quiet_planes(const at::Tensor& x, Quiet quiet) {
  const int64_t planes = x.size(0) * x.size(1), n = x.numel() / std::max<int64_t>(1, planes);
  std::vector<uint8_t> out(planes);
  at::parallel_for(0, planes, rows_per_task(n), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) out[p] = quiet(p * n, n);
  });
  return out;
}

// Sets live[p] for each plane with a plane that is not quiet within `reach` planes of it, by the
// boundary rule (beyond a zero boundary all is quiet).
void mark_live(const std::vector<uint8_t>& quiet, int64_t D, int boundary, int64_t reach,
               std::vector<uint8_t>& live) {
  live.resize(quiet.size());
  for (size_t p = 0; p < quiet.size(); ++p) {
    const int64_t item = static_cast<int64_t>(p) / D * D, d = static_cast<int64_t>(p) % D;
    for (int64_t e = d - reach; e <= d + reach; ++e) {
      const int64_t pe = boundary_plane(e, D, boundary);
      if (pe >= 0 && !quiet[item + pe]) live[p] = 1;
    }
  }
}

bool all_finite(const Params& p) {
  bool finite = true;
  for (const at::Tensor& t : p)
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "cube::rollout", [&] {
      const scalar_t* v = t.const_data_ptr<scalar_t>();
      finite = finite && std::all_of(v, v + t.numel(), [](scalar_t a) { return std::isfinite(a); });
    });
  return finite;
}

Params cast(const Params& p, at::ScalarType dtype) {
  Params out;
  for (const at::Tensor& t : p) out.push_back(t.to(dtype).contiguous());
  return out;
}

// (outs, keeps): the step outputs and, with alive masking, their masks.
std::tuple<at::Tensor, at::Tensor> rollout_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& inject_in,
    const at::Tensor& ln1_weight, const at::Tensor& ln1_bias, const at::Tensor& w_in,
    const at::Tensor& b_in, const at::Tensor& ln2_weight, const at::Tensor& ln2_bias,
    const at::Tensor& w_sp, const at::Tensor& b_sp, const at::Tensor& w_out,
    const at::Tensor& b_out, int64_t steps, int64_t seed, c10::string_view neighbourhood,
    c10::string_view boundary, double fire_rate, c10::optional<int64_t> alive_channel,
    double alive_threshold, bool all_states) {
  const Params p_in = {ln1_weight, ln1_bias, w_in, b_in, ln2_weight,
                       ln2_bias,   w_sp,     b_sp, w_out, b_out};
  const CellConfig cfg =
      check_rollout(kOp, x_in, inject_in, p_in, seed, neighbourhood, boundary, fire_rate,
                    alive_channel);
  TORCH_CHECK_VALUE(steps >= 1, kOp, ": steps must be >= 1, got ", steps);
  const AtenBelowTheOp below;
  const at::ScalarType dtype = x_in.scalar_type();
  const Params p = cast(p_in, at::toOpMathType(dtype));
  at::Tensor inject;
  if (inject_in.has_value() && inject_in->defined()) inject = inject_in->to(dtype).contiguous();

  auto shape = x_in.sizes().vec();
  shape.insert(shape.begin(), all_states ? steps : 1);
  at::Tensor outs = at::empty(shape, x_in.options());
  advise_huge_pages(outs);
  shape.pop_back();  // the masks: one per cell and kept step
  at::Tensor keeps = at::empty(alive_channel ? shape : std::vector<int64_t>{0},
                               x_in.options().dtype(at::kBool));
  std::optional<AliveMask> alive;
  at::Tensor scratch_keep;  // the masks of the steps not returned
  if (alive_channel) {
    alive.emplace(x_in, *alive_channel, alive_threshold);
    if (!all_states && steps > 1) scratch_keep = at::empty(keeps.sizes().slice(1), keeps.options());
  }
  // Without all_states the steps before the last alternate between two states of their own.
  at::Tensor between[2];
  if (!all_states && steps > 1)
    for (at::Tensor& s : between) s = at::empty(x_in.sizes(), x_in.options());
  at::Tensor x = x_in.contiguous();
  const bool skipping = alive && !inject.defined() && all_finite(p);
  const CellWeights w = cell_weights(p, cfg);
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor x_new =
        all_states ? outs.select(0, t) : (t == steps - 1 ? outs.select(0, 0) : between[t % 2]);
    if (alive) alive->read_input(x, inject);
    std::vector<uint8_t> live;
    if (skipping) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "cube::rollout", [&] {
        const scalar_t* v = x.const_data_ptr<scalar_t>();
        const auto zero = [v](int64_t i, int64_t n) {
          return std::all_of(v + i, v + i + n, [](scalar_t u) { return u == scalar_t(0); });
        };
        mark_live(quiet_planes(x, zero), x.size(1), cfg.boundary, 1, live);
      });
      mark_live(alive->dead_planes(), x.size(1), cfg.boundary, 2, live);
    }
    cell_forward(x, inject, p, w, cfg, t, x_new, skipping ? live.data() : nullptr);
    if (alive)
      alive->apply(x_new, all_states || t == steps - 1 ? keeps.select(0, all_states ? t : 0) : scratch_keep);
    x = x_new;
  }
  return {outs, keeps};
}

// (dx, dinject, the ten weight gradients); dinject is an empty tensor without injection.
std::vector<at::Tensor> rollout_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& outs,
    const c10::optional<at::Tensor>& keeps, const c10::optional<at::Tensor>& inject_in,
    const at::Tensor& ln1_weight, const at::Tensor& ln1_bias, const at::Tensor& w_in,
    const at::Tensor& b_in, const at::Tensor& ln2_weight, const at::Tensor& ln2_bias,
    const at::Tensor& w_sp, const at::Tensor& b_sp, const at::Tensor& w_out,
    const at::Tensor& b_out, int64_t seed,
    c10::string_view neighbourhood, c10::string_view boundary, double fire_rate,
    c10::optional<int64_t> alive_channel, double /*alive_threshold: the masks are given*/) {
  const Params p_in = {ln1_weight, ln1_bias, w_in, b_in, ln2_weight,
                       ln2_bias,   w_sp,     b_sp, w_out, b_out};
  const char* op = "cube::rollout_backward";
  const CellConfig cfg =
      check_rollout(op, x_in, inject_in, p_in, seed, neighbourhood, boundary, fire_rate,
                    alive_channel);
  TORCH_CHECK_VALUE(outs.dim() == 6 && outs.size(0) >= 1 && outs.sizes().slice(1) == x_in.sizes(),
                    op, ": outs must be [T, *x.shape], got ", outs.sizes());
  TORCH_CHECK_VALUE(grad_in.dim() == 6 && grad_in.size(0) >= 1 && grad_in.size(0) <= outs.size(0) &&
                        grad_in.sizes().slice(1) == x_in.sizes(),
                    op, ": grad must be [T', *x.shape] with 1 <= T' <= T = ", outs.size(0),
                    " (the gradients of the last T' step outputs), got ", grad_in.sizes());
  const bool masking = alive_channel.has_value();
  if (masking) {
    TORCH_CHECK_VALUE(keeps.has_value() && keeps->defined(), op,
                      ": keep (the forward's alive masks) is required with alive_channel");
    TORCH_CHECK_TYPE(keeps->scalar_type() == at::kBool, op, ": keep must be bool, got ",
                     keeps->scalar_type());
    TORCH_CHECK_VALUE(keeps->sizes() == outs.sizes().slice(0, 5), op,
                      ": keep must be [T, B, D, H, W] = ", outs.sizes().slice(0, 5), ", got ",
                      keeps->sizes());
    TORCH_CHECK_VALUE(keeps->device() == x_in.device(), op, ": keep is on ", keeps->device(),
                      " but x is on ", x_in.device());
  }
  const AtenBelowTheOp below;
  const at::ScalarType acc = at::toOpMathType(x_in.scalar_type());
  const Params p = cast(p_in, acc);
  c10::optional<at::Tensor> inject;
  if (inject_in.has_value() && inject_in->defined()) inject = inject_in->to(acc).contiguous();
  const int64_t steps = outs.size(0), E = inject ? inject->size(-1) : 0;

  Params dp;
  for (const at::Tensor& t : p) dp.push_back(at::zeros_like(t));
  at::Tensor dinject = inject ? at::zeros_like(*inject) : at::empty({0}, x_in.options());
  // A quiet plane needs finite states around it; the front face's injected channels are read
  // from `inject` (x's own channels there are only checked, which can only compute more).
  const bool skipping = all_finite(p) && (!inject || all_finite({*inject}));
  const CellWeights w = cell_weights(p, cfg);
  // grad_in holds the gradients of steps first .. steps - 1; the earlier ones are zero. g is the
  // op's own (the masking below scales it in place), never a view of grad_in. Each step writes
  // its gradient into dx, then the two swap: two buffers for the T steps, not T fresh ones to
  // fault in.
  const int64_t first = steps - grad_in.size(0);
  at::Tensor g = grad_in.select(0, grad_in.size(0) - 1).to(acc, false, /*copy=*/true).contiguous();
  at::Tensor dx = at::empty_like(g);
  // A low-precision state is widened into one buffer for all steps, as the gradients above.
  const at::Tensor widened = x_in.scalar_type() == acc ? at::Tensor() : at::empty_like(g);
  for (int64_t t = steps - 1; t >= 0; --t) {
    const at::Tensor prev = t == 0 ? x_in : outs.select(0, t - 1);
    const at::Tensor x = widened.defined() ? widened.copy_(prev) : prev.contiguous();
    if (masking) g.mul_(keeps->select(0, t).unsqueeze(-1));
    std::vector<uint8_t> live;
    if (skipping)
      AT_DISPATCH_FLOATING_TYPES(acc, "cube::rollout_backward", [&] {
        const scalar_t *gv = g.const_data_ptr<scalar_t>(), *xv = x.const_data_ptr<scalar_t>();
        const auto quiet = [gv, xv](int64_t i, int64_t n) {
          return std::all_of(gv + i, gv + i + n, [](scalar_t a) { return a == 0; }) &&
                 std::all_of(xv + i, xv + i + n, [](scalar_t a) { return std::isfinite(a); });
        };
        mark_live(quiet_planes(x, quiet), x.size(1), cfg.boundary, 1, live);
      });
    cell_backward(g, x, inject ? *inject : at::Tensor(), p, w, cfg, t, dp, dx,
                  skipping ? live.data() : nullptr);
    std::swap(g, dx);
    if (inject) {  // the injected channels came from `inject`, not from the previous state
      at::Tensor g_front = g.select(1, 0).narrow(-1, 0, E);
      dinject.add_(g_front);
      g_front.zero_();
    }
    if (t > first) g.add_(grad_in.select(0, t - 1 - first));
  }
  std::vector<at::Tensor> out = {g.to(x_in.scalar_type()),
                                 inject ? dinject.to(inject_in->scalar_type()) : dinject};
  for (int i = 0; i < kNumCellParams; ++i) out.push_back(dp[i].to(p_in[i].scalar_type()));
  return out;
}

}  // namespace
}  // namespace cube

TORCH_LIBRARY_IMPL(cube, CPU, m) {
  m.impl("rollout", &cube::rollout_cpu);
  m.impl("rollout_backward", &cube::rollout_backward_cpu);
}
