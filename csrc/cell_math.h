// Per-cell math shared by the C++ CPU kernels and the CUDA kernels (SPEC.md): lattice
// geometry, the neighbourhoods and the Philox fire mask. Plain C++ with no ATen, so every
// .cu file can include it and the CPU tests exercise exactly what the GPU runs.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CUBE_HD __host__ __device__ __forceinline__
#else
#define CUBE_HD inline
#endif

namespace cube {

// The eps of both LayerNorms of a step (cube_kernels.spec.LN_EPS).
constexpr double kLayerNormEps = 1e-5;

enum Neighbourhood : int { kVonNeumann = 0, kMoore = 1 };
enum Boundary : int { kZero = 0, kPeriodic = 1 };

CUBE_HD int num_tokens(int neighbourhood) { return neighbourhood == kMoore ? 27 : 7; }

// Offset (dd, dh, dw) of token k: token 0 is the cell itself; von Neumann lists the face
// neighbours -d, +d, -h, +h, -w, +w; Moore lists {-1,0,1}^3 lexicographically with the
// centre (lexicographic index 13) moved to the front.
CUBE_HD void token_offset(int neighbourhood, int k, int& dd, int& dh, int& dw) {
  dd = dh = dw = 0;
  if (k == 0) return;
  if (neighbourhood == kMoore) {
    const int lex = k <= 13 ? k - 1 : k;
    dd = lex / 9 - 1;
    dh = (lex / 3) % 3 - 1;
    dw = lex % 3 - 1;
    return;
  }
  const int sign = (k & 1) ? -1 : 1;  // odd tokens step back, even ones forward
  if (k <= 2) dd = sign; else if (k <= 4) dh = sign; else dw = sign;
}

struct Lattice {
  int64_t D, H, W;
  int boundary;

  CUBE_HD int64_t cells() const { return D * H * W; }

  // Index within one batch item of the neighbour of `cell` at (dd, dh, dw), or -1 where the
  // zero boundary makes it contribute nothing. Offsets are in {-1, 0, 1}.
  CUBE_HD int64_t neighbour(int64_t cell, int dd, int dh, int dw) const {
    int64_t w = cell % W;
    int64_t h = (cell / W) % H;
    int64_t d = cell / (W * H);
    d += dd; h += dh; w += dw;
    if (boundary == kPeriodic) {
      d = d < 0 ? d + D : (d >= D ? d - D : d);
      h = h < 0 ? h + H : (h >= H ? h - H : h);
      w = w < 0 ? w + W : (w >= W ? w - W : w);
    } else if (d < 0 || d >= D || h < 0 || h >= H || w < 0 || w >= W) {
      return -1;
    }
    return (d * H + h) * W + w;
  }
};

// Philox4x32-10, bit for bit triton.language.rand(seed, offset).
CUBE_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t& hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

CUBE_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint32_t hi_b, hi_a;
    const uint32_t lo_b = mulhilo32(0xCD9E8D57u, c2, hi_b);
    const uint32_t lo_a = mulhilo32(0xD2511F53u, c0, hi_a);
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = static_cast<int32_t>(c0);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// The fire mask m[b, cell] of SPEC.md; fire_rate >= 1 fires everywhere (U may round to 1.0f).
CUBE_HD bool fires(uint64_t seed, int64_t step, int64_t batch, int64_t b, int64_t cells,
                   int64_t cell, float fire_rate) {
  if (fire_rate >= 1.0f) return true;
  const uint64_t offset = static_cast<uint64_t>((step * batch + b) * cells + cell);
  return philox_uniform(seed, offset) < fire_rate;
}

}  // namespace cube
