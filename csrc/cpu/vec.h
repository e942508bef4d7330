// Registers of kLanes channels for the CPU kernels' hand-vectorised loops (gcc's generic
// vectors), and the 8 x 8 transpose built on them. Always inlined into the kernels, so that each
// is compiled for the instruction set of the loop that calls it (cpu/loops.h, run_best_isa).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu/loops.h"

namespace cube {

// No call passes a vector across the ABI that -Wpsabi warns about: everything here is inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

// A register of kLanes channels (gcc's generic vectors: one AVX2 register of floats, two SSE2
// ones on the baseline), or one channel where Vec is acc_t itself. The loops below spell their
// registers out: gcc does not vectorise them when written over arrays of channels.
template <typename acc_t>
struct Lanes {
  typedef acc_t type __attribute__((vector_size(kLanes * sizeof(acc_t))));
};

template <typename Vec>
CUBE_ALWAYS_INLINE Vec load(const void* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

template <typename Vec>
CUBE_ALWAYS_INLINE void store(void* p, const Vec& v) {
  std::memcpy(p, &v, sizeof(Vec));
}

// The 2x2 block swap of one round of an 8 x 8 transpose, on rows i and i + kB (bit kB of i
// clear): the upper-right kB x kB block of each 2kB x 2kB tile trades places with the
// lower-left one. The rounds kB = 4, 2, 1 together transpose the 8 x 8 block.
template <int kB, typename Vec>
CUBE_ALWAYS_INLINE void swap_blocks(Vec* r) {
  using Index = decltype(r[0] < r[0]);  // integer lanes of the element's width
  constexpr Index lo = {0 & kB ? 8 + 0 - kB : 0, 1 & kB ? 8 + 1 - kB : 1, 2 & kB ? 8 + 2 - kB : 2,
                        3 & kB ? 8 + 3 - kB : 3, 4 & kB ? 8 + 4 - kB : 4, 5 & kB ? 8 + 5 - kB : 5,
                        6 & kB ? 8 + 6 - kB : 6, 7 & kB ? 8 + 7 - kB : 7};
  constexpr Index hi = {0 & kB ? 8 + 0 : 0 + kB, 1 & kB ? 8 + 1 : 1 + kB, 2 & kB ? 8 + 2 : 2 + kB,
                        3 & kB ? 8 + 3 : 3 + kB, 4 & kB ? 8 + 4 : 4 + kB, 5 & kB ? 8 + 5 : 5 + kB,
                        6 & kB ? 8 + 6 : 6 + kB, 7 & kB ? 8 + 7 : 7 + kB};
  for (int i = 0; i < 8; ++i) {
    if (i & kB) continue;
    const Vec a = r[i], b = r[i + kB];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + kB] = __builtin_shuffle(a, b, hi);
  }
}

// out[c, r] = a[r, c] for a [rows, cols] (row stride lda): 8 x 8 blocks in registers (24
// shuffles each), the rows and columns past the last whole block one value at a time.
template <typename T>
CUBE_ALWAYS_INLINE void transpose(const T* a, int64_t rows, int64_t cols, int64_t lda, T* out) {
  using Vec = typename Lanes<T>::type;
  static_assert(kLanes == 8, "the block transpose is 8 x 8");
  const int64_t rows8 = rows - rows % 8, cols8 = cols - cols % 8;
  for (int64_t r0 = 0; r0 < rows8; r0 += 8)
    for (int64_t c0 = 0; c0 < cols8; c0 += 8) {
      Vec r[8];
      for (int i = 0; i < 8; ++i) r[i] = load<Vec>(a + (r0 + i) * lda + c0);
      swap_blocks<4>(r);
      swap_blocks<2>(r);
      swap_blocks<1>(r);
      for (int i = 0; i < 8; ++i) store(out + (c0 + i) * rows + r0, r[i]);
    }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < rows8 ? cols8 : 0; c < cols; ++c) out[c * rows + r] = a[r * lda + c];
}

#pragma GCC diagnostic pop

}  // namespace cube
