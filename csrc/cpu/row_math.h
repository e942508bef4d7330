// Per-row math of the CPU kernels (SPEC.md "One step", "Backward"): erf-form GELU (not the tanh
// one) and its derivative, LayerNorm forward and backward on one row, and the gate input (GELU +
// gate LayerNorm) of one row of the in-projection and its backward. Shared by cube::gate_input
// and the fused cell (cpu/cell.cpp), so both compute the same formulas in the same order. Rows
// are in the accumulation type (fp32 for bf16/fp16, double for float64).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cell_math.h"
#include "cpu/loops.h"

namespace cube {
namespace rows {

// The normal CDF Phi and density phi: gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x).
// float: branch-free polynomials that gcc vectorises in a plain loop (std::erf/std::exp are
// scalar library calls); max abs error of Phi a few 1e-7. double (gradcheck): the exact libm.

constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// gcc 12 (-O3, default -ftrapping-math) leaves a loop unvectorised when a float select (?:,
// std::max) feeds a float-to-int conversion or depends on a float comparison; selects on the
// bits as integers vectorise. `bits` and `as_float` are those reinterpretations.
CUBE_ALWAYS_INLINE uint32_t bits(float x) { return __builtin_bit_cast(uint32_t, x); }
CUBE_ALWAYS_INLINE float as_float(uint32_t b) { return __builtin_bit_cast(float, b); }

// exp(y) for y <= 0: y = n ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
// (relative error < 1e-8), 2^n built in the exponent bits. y is clamped at -87 (2^n stays
// normal): for y <= 0 a larger magnitude has larger bits, so an unsigned min does it.
CUBE_ALWAYS_INLINE float exp_nonpositive(float y) {
  constexpr uint32_t kMinus87 = 0xC2AE0000u;  // bits(-87.0f)
  y = as_float(std::min(bits(y), kMinus87));
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (y * 1.44269504088896341f + kRound) - kRound;
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * as_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

// Phi(x) = 1 - erfc(|x|/sqrt2)/2 (x >= 0) or erfc(|x|/sqrt2)/2, with erfc(z) = e^(-z^2) t P(t),
// t = 1/(1 + p z): Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7). `e` = e^(-x^2/2) = sqrt(2 pi)
// phi(x), shared with the backward's phi.
CUBE_ALWAYS_INLINE float normal_cdf(float x, float e) {
  const float t = 1.0f / (1.0f + 0.3275911f * (std::fabs(x) * 0.70710678118654752f));
  float q = 1.061405429f;
  q = q * t - 1.453152027f;
  q = q * t + 1.421413741f;
  q = q * t - 0.284496736f;
  q = q * t + 0.254829592f;
  const float lower = 0.5f * (q * t) * e;
  const float upper = 1.0f - lower;
  const uint32_t negative = 0u - (bits(x) >> 31);  // all ones where the sign bit is set
  return as_float((negative & bits(lower)) | (~negative & bits(upper)));
}

// gelu(x) = x (1 + erf(z)) / 2, z = x / sqrt2, erf(z) = z P(z^2) / Q(z^2) for |z| <= 3.92 (erf
// rounds to +-1 beyond it): a rational fit (max abs error 4e-8, 4e-7 as evaluated in float)
// that needs no exponential, so it costs about half of the Phi above. gelu_and_grad keeps that
// Phi: the backward needs e^(-x^2/2) for phi anyway.
CUBE_ALWAYS_INLINE float gelu(float x) {
  constexpr uint32_t kMaxAbs = 0x40B16622u;  // bits(3.92f * sqrt2): |x| is clamped there
  const uint32_t sign = bits(x) & 0x80000000u;
  const float z = as_float(std::min(bits(x) & 0x7FFFFFFFu, kMaxAbs)) * 0.70710678118654752f;
  const float t = z * z;
  float p = 1.9923057315e-08f;
  p = p * t - 1.9943059638e-06f;
  p = p * t + 1.4897101904e-04f;
  p = p * t + 3.9721262502e-03f;
  p = p * t + 5.1394794494e-02f;
  p = p * t + 2.0609551576e-01f;
  p = p * t + 1.1283787777e+00f;
  float q = 1.0239469476e-03f;
  q = q * t + 1.4887632669e-02f;
  q = q * t + 1.1755682265e-01f;
  q = q * t + 5.1597616332e-01f;
  q = q * t + 1.0f;
  const float erf = as_float(bits(z * p / q) | sign);
  return x * (0.5f + 0.5f * erf);
}

// gelu(x) and gelu'(x).
CUBE_ALWAYS_INLINE void gelu_and_grad(float x, float& g, float& dg) {
  const float e = exp_nonpositive(-0.5f * x * x);
  const float cdf = normal_cdf(x, e);
  g = x * cdf;
  dg = cdf + x * (kInvSqrt2Pi * e);
}

CUBE_ALWAYS_INLINE double normal_cdf(double x) { return 0.5 * std::erfc(-x * M_SQRT1_2); }

CUBE_ALWAYS_INLINE double gelu(double x) { return x * normal_cdf(x); }

CUBE_ALWAYS_INLINE void gelu_and_grad(double x, double& g, double& dg) {
  const double cdf = normal_cdf(x);
  g = x * cdf;
  dg = cdf + x * (0.5 * M_2_SQRTPI * M_SQRT1_2) * std::exp(-0.5 * x * x);
}

// Centres v in place and returns rstd = 1 / sqrt(var(v) + eps) (two passes: no cancellation).
template <typename acc_t>
CUBE_ALWAYS_INLINE acc_t centre(acc_t* __restrict__ v, int64_t F) {
  const acc_t mean = fixed_order_dot<acc_t>(v, nullptr, F) / static_cast<acc_t>(F);
  // v -= mean and fixed_order_dot(v, v) in one pass: the same sums in the same order.
  acc_t acc[kLanes] = {};
  int64_t f = 0;
  for (; f + kLanes <= F; f += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      v[f + j] -= mean;
      acc[j] += v[f + j] * v[f + j];
    }
  for (int64_t j = 0; f + j < F; ++j) {
    v[f + j] -= mean;
    acc[j] += v[f + j] * v[f + j];
  }
  const acc_t var = sum_lanes(acc) / static_cast<acc_t>(F);
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(kLayerNormEps));
}

// LayerNorm of one row: out = (v - mean) * rstd * w + b; returns rstd. `out` may be `v`.
template <typename acc_t>
CUBE_ALWAYS_INLINE acc_t layer_norm(const acc_t* v, const acc_t* __restrict__ w,
                                    const acc_t* __restrict__ b, int64_t n, acc_t* out) {
  std::copy(v, v + n, out);
  const acc_t rstd = centre(out, n);
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] * rstd * w[i] + b[i];
  return rstd;
}

// LayerNorm backward of one row, from vhat = (v - mean) * rstd and the output gradient gy:
// dv = rstd * (g - mean(g) - vhat * mean(g * vhat)), g = gy * w, and the row's terms of the
// weight and bias gradients added into pw and pb. `g` is scratch of n values.
template <typename acc_t>
CUBE_ALWAYS_INLINE void layer_norm_backward(const acc_t* __restrict__ vhat,
                                            const acc_t* __restrict__ gy,
                                            const acc_t* __restrict__ w, acc_t rstd, int64_t n,
                                            acc_t* __restrict__ g, acc_t* __restrict__ dv,
                                            acc_t* __restrict__ pw, acc_t* __restrict__ pb) {
  for (int64_t i = 0; i < n; ++i) {
    pw[i] += gy[i] * vhat[i];
    pb[i] += gy[i];
    g[i] = gy[i] * w[i];
  }
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  const acc_t mean_g = fixed_order_dot<acc_t>(g, nullptr, n) * inv_n;
  const acc_t mean_gv = fixed_order_dot<acc_t>(g, vhat, n) * inv_n;
  for (int64_t i = 0; i < n; ++i) dv[i] = rstd * (g[i] - mean_g - vhat[i] * mean_gv);
}

// The gate input of one row: [a | b] = z + b_in (z: the in-projection row, 2F values; the bias
// is added here rather than in a pass of its own), u = gelu(a), vn = layer_norm(gelu(b)) * w +
// b_ln. In place is allowed: u == z, vn == z + F.
template <typename acc_t>
CUBE_ALWAYS_INLINE void gate_input(const acc_t* z, const acc_t* __restrict__ b_in,
                                   const acc_t* __restrict__ w, const acc_t* __restrict__ b_ln,
                                   int64_t F, acc_t* u, acc_t* vn) {
  for (int64_t f = 0; f < F; ++f) u[f] = gelu(z[f] + b_in[f]);
  for (int64_t f = 0; f < F; ++f) vn[f] = gelu(z[F + f] + b_in[F + f]);
  const acc_t rstd = centre(vn, F);
  for (int64_t f = 0; f < F; ++f) vn[f] = vn[f] * rstd * w[f] + b_ln[f];
}

// gate_input, keeping what its backward needs: gelu' of both halves (dgelu, 2F values) and the
// normalised gate half vhat (F values); returns the gate LayerNorm's rstd.
template <typename acc_t>
CUBE_ALWAYS_INLINE acc_t gate_input_saving(const acc_t* __restrict__ z,
                                           const acc_t* __restrict__ b_in,
                                           const acc_t* __restrict__ w,
                                           const acc_t* __restrict__ b_ln, int64_t F,
                                           acc_t* __restrict__ u, acc_t* __restrict__ vn,
                                           acc_t* __restrict__ dgelu, acc_t* __restrict__ vhat) {
  for (int64_t f = 0; f < F; ++f) gelu_and_grad(z[f] + b_in[f], u[f], dgelu[f]);
  for (int64_t f = 0; f < F; ++f) gelu_and_grad(z[F + f] + b_in[F + f], vhat[f], dgelu[F + f]);
  const acc_t rstd = centre(vhat, F);
  for (int64_t f = 0; f < F; ++f) {
    vhat[f] *= rstd;
    vn[f] = vhat[f] * w[f] + b_ln[f];
  }
  return rstd;
}

// The backward of gate_input on one row, from what gate_input_saving kept: dz = [grad_u *
// gelu'(a) | dv * gelu'(b)] with dv the gate LayerNorm's backward of grad_vn; the row's terms
// of dln2_weight (pw), dln2_bias (pb) and db_in (pz, 2F) added in. `g` is scratch of F values.
template <typename acc_t>
CUBE_ALWAYS_INLINE void gate_input_backward(const acc_t* __restrict__ grad_u,
                                            const acc_t* __restrict__ grad_vn,
                                            const acc_t* __restrict__ dgelu,
                                            const acc_t* __restrict__ vhat, acc_t rstd,
                                            const acc_t* __restrict__ w, int64_t F,
                                            acc_t* __restrict__ g, acc_t* __restrict__ dz,
                                            acc_t* __restrict__ pw, acc_t* __restrict__ pb,
                                            acc_t* __restrict__ pz) {
  for (int64_t f = 0; f < F; ++f) {
    dz[f] = grad_u[f] * dgelu[f];
    pz[f] += dz[f];
  }
  acc_t* __restrict__ dv = dz + F;
  layer_norm_backward(vhat, grad_vn, w, rstd, F, g, dv, pw, pb);
  for (int64_t f = 0; f < F; ++f) {
    dv[f] *= dgelu[F + f];
    pz[F + f] += dv[f];
  }
}

}  // namespace rows
}  // namespace cube
