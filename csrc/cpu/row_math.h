// Per-row math of the CPU kernels (SPEC.md "One step", "Backward"): erf-form GELU (not the tanh
// one) and its derivative, LayerNorm forward and backward, and the gate input (GELU + gate
// LayerNorm) of the in-projection's rows and its backward, on up to kLanes rows at a time (their
// sums run across the rows: RowSums). Shared by cube::gate_input and the fused cell
// (cpu/cell.cpp), so both compute the same formulas in the same order. Rows are in the
// accumulation type (fp32 for bf16/fp16, double for float64).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cell_math.h"
#include "cpu/loops.h"
#include "cpu/vec.h"

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

// Sums over the channels of up to kLanes rows at once, in a fixed order: each row's kLanes
// interleaved partial sums (one register; the compiler vectorises them without reassociating,
// no -ffast-math), added in lane order. An 8 x 8 transpose puts lane j of every row in one
// register, so that the lane-order adds run across the rows, kLanes - 1 vector adds for all of
// them instead of a chain of scalar adds per row (a row at a time, those chains' latency cost
// 12% of the fused forward at C = 16, F = 32). A row's sum depends neither on the rows beside it
// nor on the thread count.
template <typename acc_t>
struct RowSums {
  acc_t acc[kLanes][kLanes] = {};  // [row][lane]

  // Row r's partial sums of x[i] * y[i] (y == nullptr: x[i]) over n values.
  CUBE_ALWAYS_INLINE void add(int64_t r, const acc_t* __restrict__ x,
                              const acc_t* __restrict__ y, int64_t n) {
    acc_t* __restrict__ a = acc[r];
    int64_t i = 0;
    if (y == nullptr) {
      for (; i + kLanes <= n; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) a[j] += x[i + j];
      for (int64_t j = 0; i + j < n; ++j) a[j] += x[i + j];
    } else {
      for (; i + kLanes <= n; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) a[j] += x[i + j] * y[i + j];
      for (int64_t j = 0; i + j < n; ++j) a[j] += x[i + j] * y[i + j];
    }
  }

  // v -= mean on row r's n values and its partial sums of v * v, in one pass.
  CUBE_ALWAYS_INLINE void centre_and_add_squares(int64_t r, acc_t* __restrict__ v, acc_t mean,
                                                 int64_t n) {
    acc_t* __restrict__ a = acc[r];
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) {
        v[i + j] -= mean;
        a[j] += v[i + j] * v[i + j];
      }
    for (int64_t j = 0; i + j < n; ++j) {
      v[i + j] -= mean;
      a[j] += v[i + j] * v[i + j];
    }
  }

  // sum[r] = row r's sum, for all kLanes rows (0 for a row nothing was added to).
  CUBE_ALWAYS_INLINE void totals(acc_t* __restrict__ sum) const {
    acc_t t[kLanes][kLanes];
    transpose(&acc[0][0], kLanes, kLanes, kLanes, &t[0][0]);
    for (int64_t r = 0; r < kLanes; ++r) sum[r] = t[0][r];
    for (int64_t j = 1; j < kLanes; ++j)
      for (int64_t r = 0; r < kLanes; ++r) sum[r] += t[j][r];
  }
};

// Centres R <= kLanes rows of n values in place (row r at v + r * ld; two passes: no
// cancellation) and sets rstd[r] = 1 / sqrt(var + eps) for r < R.
template <typename acc_t>
CUBE_ALWAYS_INLINE void centre_rows(acc_t* v, int64_t ld, int64_t R, int64_t n, acc_t* rstd) {
  RowSums<acc_t> sums, squares;
  acc_t mean[kLanes], var[kLanes];
  for (int64_t r = 0; r < R; ++r) sums.add(r, v + r * ld, nullptr, n);
  sums.totals(mean);
  for (int64_t r = 0; r < kLanes; ++r) mean[r] /= static_cast<acc_t>(n);
  for (int64_t r = 0; r < R; ++r) squares.centre_and_add_squares(r, v + r * ld, mean[r], n);
  squares.totals(var);
  for (int64_t r = 0; r < R; ++r)
    rstd[r] = acc_t(1) / std::sqrt(var[r] / static_cast<acc_t>(n) +
                                   static_cast<acc_t>(kLayerNormEps));
}

// LayerNorm of R <= kLanes rows in place (row r at v + r * ld): v = (v - mean) * rstd * w + b.
template <typename acc_t>
CUBE_ALWAYS_INLINE void layer_norm_rows(acc_t* v, int64_t ld, int64_t R,
                                        const acc_t* __restrict__ w,
                                        const acc_t* __restrict__ b, int64_t n) {
  acc_t rstd[kLanes];
  centre_rows(v, ld, R, n, rstd);
  for (int64_t r = 0; r < R; ++r) {
    acc_t* __restrict__ vr = v + r * ld;
    for (int64_t i = 0; i < n; ++i) vr[i] = vr[i] * rstd[r] * w[i] + b[i];
  }
}

// LayerNorm backward of R <= kLanes rows, from vhat = (v - mean) * rstd and the output gradient
// gy (row r of both at r * ld): dv = rstd * (g - mean(g) - vhat * mean(g * vhat)), g = gy * w,
// row r of dv at dv + r * ld_dv, and the rows' terms of the weight and bias gradients added into
// pw and pb in row order. `g` is scratch of kLanes * n values.
template <typename acc_t>
CUBE_ALWAYS_INLINE void layer_norm_backward_rows(const acc_t* vhat, const acc_t* gy, int64_t ld,
                                                 int64_t R, const acc_t* __restrict__ w,
                                                 const acc_t* rstd, int64_t n, acc_t* g,
                                                 acc_t* dv, int64_t ld_dv,
                                                 acc_t* __restrict__ pw,
                                                 acc_t* __restrict__ pb) {
  RowSums<acc_t> sum_g, sum_gv;
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* __restrict__ vr = vhat + r * ld;
    const acc_t* __restrict__ gyr = gy + r * ld;
    acc_t* __restrict__ gr = g + r * n;
    for (int64_t i = 0; i < n; ++i) {
      pw[i] += gyr[i] * vr[i];
      pb[i] += gyr[i];
      gr[i] = gyr[i] * w[i];
    }
    sum_g.add(r, gr, nullptr, n);
    sum_gv.add(r, gr, vr, n);
  }
  acc_t mean_g[kLanes], mean_gv[kLanes];
  sum_g.totals(mean_g);
  sum_gv.totals(mean_gv);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n);
  for (int64_t r = 0; r < kLanes; ++r) {
    mean_g[r] *= inv_n;
    mean_gv[r] *= inv_n;
  }
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* __restrict__ vr = vhat + r * ld;
    const acc_t* __restrict__ gr = g + r * n;
    acc_t* __restrict__ dvr = dv + r * ld_dv;
    for (int64_t i = 0; i < n; ++i) dvr[i] = rstd[r] * (gr[i] - mean_g[r] - vr[i] * mean_gv[r]);
  }
}

// The gate input of R <= kLanes rows of the in-projection (row r's 2F values at z + r * 2F):
// [a | b] = z + b_in (the bias is added here rather than in a pass of its own), u = gelu(a),
// vn = layer_norm(gelu(b)) * w + b_ln, row r of u and vn at u + r * ld, vn + r * ld. In place
// is allowed: u == z, vn == z + F, ld == 2F.
template <typename acc_t>
CUBE_ALWAYS_INLINE void gate_input_rows(const acc_t* z, int64_t R, const acc_t* __restrict__ b_in,
                                        const acc_t* __restrict__ w,
                                        const acc_t* __restrict__ b_ln, int64_t F, acc_t* u,
                                        acc_t* vn, int64_t ld) {
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* zr = z + r * 2 * F;
    acc_t *ur = u + r * ld, *vr = vn + r * ld;
    for (int64_t f = 0; f < F; ++f) ur[f] = gelu(zr[f] + b_in[f]);
    for (int64_t f = 0; f < F; ++f) vr[f] = gelu(zr[F + f] + b_in[F + f]);
  }
  layer_norm_rows(vn, ld, R, w, b_ln, F);
}

// gate_input_rows, keeping what its backward needs: gelu' of both halves (dgelu, rows of 2F
// values) and the normalised gate half vhat, and the gate LayerNorm's rstd[r] (r < R). Rows of
// z and dgelu are 2F apart, of u, vn and vhat F apart.
template <typename acc_t>
CUBE_ALWAYS_INLINE void gate_input_saving_rows(const acc_t* __restrict__ z, int64_t R,
                                               const acc_t* __restrict__ b_in,
                                               const acc_t* __restrict__ w,
                                               const acc_t* __restrict__ b_ln, int64_t F,
                                               acc_t* __restrict__ u, acc_t* __restrict__ vn,
                                               acc_t* __restrict__ dgelu,
                                               acc_t* __restrict__ vhat, acc_t* rstd) {
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* zr = z + r * 2 * F;
    acc_t *ur = u + r * F, *dr = dgelu + r * 2 * F, *vr = vhat + r * F;
    for (int64_t f = 0; f < F; ++f) gelu_and_grad(zr[f] + b_in[f], ur[f], dr[f]);
    for (int64_t f = 0; f < F; ++f) gelu_and_grad(zr[F + f] + b_in[F + f], vr[f], dr[F + f]);
  }
  centre_rows(vhat, F, R, F, rstd);
  for (int64_t r = 0; r < R; ++r) {
    acc_t *vr = vhat + r * F, *nr = vn + r * F;
    for (int64_t f = 0; f < F; ++f) {
      vr[f] *= rstd[r];
      nr[f] = vr[f] * w[f] + b_ln[f];
    }
  }
}

// The backward of gate_input_rows on R <= kLanes rows, from what gate_input_saving_rows kept:
// dz = [grad_u * gelu'(a) | dv * gelu'(b)] with dv the gate LayerNorm's backward of grad_vn;
// the rows' terms of dln2_weight (pw), dln2_bias (pb) and db_in (pz, 2F) added in row order.
// Rows of grad_u, grad_vn and vhat are F apart, of dgelu and dz 2F apart; `g` is scratch of
// kLanes * F values.
template <typename acc_t>
CUBE_ALWAYS_INLINE void gate_input_backward_rows(const acc_t* __restrict__ grad_u,
                                                 const acc_t* __restrict__ grad_vn,
                                                 const acc_t* __restrict__ dgelu,
                                                 const acc_t* __restrict__ vhat,
                                                 const acc_t* rstd, int64_t R,
                                                 const acc_t* __restrict__ w, int64_t F,
                                                 acc_t* __restrict__ g, acc_t* __restrict__ dz,
                                                 acc_t* __restrict__ pw, acc_t* __restrict__ pb,
                                                 acc_t* __restrict__ pz) {
  for (int64_t r = 0; r < R; ++r) {
    const acc_t *gr = grad_u + r * F, *dr = dgelu + r * 2 * F;
    acc_t* zr = dz + r * 2 * F;
    for (int64_t f = 0; f < F; ++f) {
      zr[f] = gr[f] * dr[f];
      pz[f] += zr[f];
    }
  }
  layer_norm_backward_rows(vhat, grad_vn, F, R, w, rstd, F, g, dz + F, 2 * F, pw, pb);
  for (int64_t r = 0; r < R; ++r) {
    const acc_t* dr = dgelu + r * 2 * F + F;
    acc_t* vr = dz + r * 2 * F + F;
    for (int64_t f = 0; f < F; ++f) {
      vr[f] *= dr[f];
      pz[F + f] += vr[f];
    }
  }
}

}  // namespace rows
}  // namespace cube
