// Helpers of the CPU kernels' loops: parallel task sizes and the choice of instruction set.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace cube {

// Rows per parallel task when each row costs `work_per_row` multiply-adds: about 32K per task,
// ATen's own grain (at::internal::GRAIN_SIZE), so small inputs are not split across threads.
inline int64_t rows_per_task(int64_t work_per_row) {
  return std::max<int64_t>(1, int64_t{32768} / std::max<int64_t>(1, work_per_row));
}

#define CUBE_ALWAYS_INLINE inline __attribute__((always_inline))

// The extension is built for the baseline ISA (portable wheels, no -march=native), which on
// x86-64 means 4-wide SSE2. The channel loops are also compiled for AVX2+FMA, picked at run time
// where the CPU has it: Kernel::run (always inlined) is instantiated once per target.
// CUBE_CPU_ISA=baseline in the environment forces the baseline code, and fp32 GEMMs for bf16
// states (cpu/cell.h, bf16_micro_kernel): the tests run both.
inline bool baseline_forced() {
  static const bool forced = [] {
    const char* isa = std::getenv("CUBE_CPU_ISA");
    return isa != nullptr && std::strcmp(isa, "baseline") == 0;
  }();
  return forced;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define CUBE_X86_DISPATCH 1

inline bool use_avx2() {
  static const bool use =
      !baseline_forced() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return use;
}

template <typename Kernel, typename... Args>
__attribute__((target("avx2,fma"))) void run_avx2(const Args&... args) {
  Kernel::run(args...);
}
#endif

// Kernel::run(args...) compiled for the best instruction set this CPU has.
template <typename Kernel, typename... Args>
void run_best_isa(const Args&... args) {
#ifdef CUBE_X86_DISPATCH
  if (use_avx2()) return run_avx2<Kernel>(args...);
#endif
  Kernel::run(args...);
}

// The channels of a register of floats under AVX2: the CPU kernels' vector width.
constexpr int64_t kLanes = 8;

// Deterministic reductions over rows (weight gradients): each fixed block of rows writes its own
// row of `partial` ([blocks, width]); total[e] = sum of the blocks' partials in block order.
template <typename T>
void sum_block_partials(const T* partial, int64_t blocks, int64_t width, T* total) {
  std::fill(total, total + width, T(0));
  for (int64_t blk = 0; blk < blocks; ++blk, partial += width)
    for (int64_t e = 0; e < width; ++e) total[e] += partial[e];
}

// The instruction set the channel loops run with: "avx2" or "baseline".
inline const char* cpu_isa() {
#ifdef CUBE_X86_DISPATCH
  if (use_avx2()) return "avx2";
#endif
  return "baseline";
}

}  // namespace cube
