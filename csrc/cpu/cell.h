// The fused CPU cell: one whole lattice step (SPEC.md "One step") and its backward, one d-plane
// (or band of rows of one, on wide lattices) at a time, so that u, vn, h (2F values per cell)
// stay in per-thread buffers instead of whole-lattice tensors. Called by the rollout op (cpu/rollout.cpp); cpu/cell.cpp says how.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

#include "cell_math.h"

namespace cube {

struct CellConfig {
  int64_t seed;
  int neighbourhood, boundary;  // cell_math.h's Neighbourhood and Boundary
  double fire_rate;
  bool bf16_gemm = false;  // the GEMMs on the bf16 micro-kernel (see bf16_gemm_for)
};

// Whether a rollout of `dtype` states with C channels and hidden width F runs the cell's GEMMs
// (the projections, their recompute and their gradients, all but dh) on oneDNN's bf16
// micro-kernel: bf16 states, C and F even (the kernel reads K in pairs), and a CPU with
// AVX512-BF16 (AMX included). Their inputs are then rounded to bf16, as autocast rounds a linear
// layer's; they still accumulate in fp32.
bool bf16_gemm_for(at::ScalarType dtype, int64_t C, int64_t F);

// Whether this CPU runs the bf16 micro-kernel: AVX512-BF16 (AMX included), oneDNN's bf16 brgemm
// not capped below it (ONEDNN_MAX_CPU_ISA) and, where ATen packs B for it, packing it as the cell
// does (a first-use probe, cpu/cell.cpp), mkldnn enabled, and not CUBE_CPU_ISA=baseline.
bool bf16_micro_kernel();

// The plane that the unwrapped d-index e stands for, or -1 beyond a zero boundary.
inline int64_t boundary_plane(int64_t e, int64_t D, int boundary) {
  if (e >= 0 && e < D) return e;
  return boundary == kPeriodic ? (e % D + D) % D : -1;
}

// The ten parameters, in SPEC's order.
enum CellParam { kLn1W, kLn1B, kWIn, kBIn, kLn2W, kLn2B, kWSp, kBSp, kWOut, kBOut, kNumCellParams };

// The ten parameters, contiguous, in the accumulation type of the state (fp32 for bf16/fp16,
// float64 for float64).
using CellParams = std::vector<at::Tensor>;

// The weights as the cell's GEMMs read them, prepared once per rollout rather than per step:
// the backward's transposes and, with cfg.bf16_gemm, the bf16 copies in the micro-kernel's
// packed layout (undefined without it; w_out^T has none: dh stays fp32, cpu/cell.cpp).
struct CellWeights {
  at::Tensor w_in_t, w_out_t;            // w_in^T [2F, C], w_out^T [C, F]
  at::Tensor w_in16, w_out16, w_in_t16;  // cpu/cell.cpp's packed_bf16 of each [K, N]
};

CellWeights cell_weights(const CellParams& p, const CellConfig& cfg);

// `live`, where given (B * D bytes, plane (b, d) at b * D + d), says which d-planes to compute:
// the others are written as zeros, and a plane is projected only where a live plane reads it.
// The caller vouches that zero is their result (cpu/rollout.cpp, "Skipping quiet planes").
// nullptr: every plane.
using LivePlanes = const uint8_t*;

// x_new = step(inject(x), step) into `out` (x's shape and dtype, contiguous). x: [B, D, H, W, C]
// contiguous; `inject` ([B, H, W, E], x's dtype, contiguous) or undefined: the first E channels
// of the front face (d = 0) are read from it instead of x. Every sum in the accumulation type,
// each output rounded once to x's dtype.
void cell_forward(const at::Tensor& x, const at::Tensor& inject, const CellParams& p,
                  const CellWeights& w, const CellConfig& cfg, int64_t step,
                  const at::Tensor& out, LivePlanes live = nullptr);

// The backward of one step at the state inject(x), x, `inject` (as cell_forward's) and `grad`
// (the gradient of the step's output) contiguous in the accumulation type: writes the
// gradient of inject(x), the residual included, into `dx` (x's shape and dtype, contiguous, not
// `grad`'s memory: other tasks may still read grad where dx is written) and adds the weight
// gradients into `dp` (shapes and dtype of `p`). The weight gradients are summed in an order
// fixed by the shapes, not by the number of threads.
void cell_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& inject,
                   const CellParams& p, const CellWeights& w, const CellConfig& cfg, int64_t step,
                   CellParams& dp, const at::Tensor& dx, LivePlanes live = nullptr);

}  // namespace cube
