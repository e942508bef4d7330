// The boundary between the host ops (*_host.cpp, which see ATen) and the kernels (*.cu, which
// do not): plain functions on raw pointers, so `nvcc -c` of the kernels needs no torch headers.
// Every launcher takes one params struct, enqueues on its stream and returns without
// synchronising; the caller checks the launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

namespace cube {
namespace cuda {

// Element type of every tensor of one call. The host maps at::Half/at::BFloat16 onto these;
// they share the bit layout of __half/__nv_bfloat16.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Rows (cells over the whole batch) per thread block in every kernel. Partial sums of the
// weight gradients are kept per tile of kTileRows rows, so the reduction order depends on the
// shape alone, never on the GPU: the weight gradients are bit-identical run to run.
constexpr int kTileRows = 64;

inline int64_t num_tiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// gather_gate on [B, D, H, W, F] channels-last tensors. Forward reads u, vn, w_sp, b_sp and
// writes h; backward reads grad_h, u, vn, w_sp, b_sp and writes du, dvn and the weight
// gradients dw_sp [K, F], db_sp [F], using `partial`, scratch of num_tiles(B*D*H*W) * (K + 1)
// * F accumulator elements (double for kFloat64, else float). Pointers a pass does not use
// stay null.
struct GatherGateParams {
  DType dtype;
  const void* u;
  const void* vn;
  const void* w_sp;
  const void* b_sp;
  void* h;
  const void* grad_h;
  void* du;
  void* dvn;
  void* dw_sp;
  void* db_sp;
  void* partial;
  int64_t B, D, H, W, F;
  int neighbourhood;  // cube::Neighbourhood
  int boundary;       // cube::Boundary
  cudaStream_t stream;
};

void launch_gather_gate(const GatherGateParams& p);
void launch_gather_gate_backward(const GatherGateParams& p);

// The update's kernels around the cuBLAS GEMMs, on B * cells rows of C channels.
// Forward epilogue: x_new = where(m, x + (delta + b_out), x), with delta = h @ w_out already
// computed in the accumulator type (double for kFloat64, else float).
// Backward: d_delta = where(m, grad, 0) (skipped when d_delta is null, i.e. fire_rate >= 1
// where it equals grad) and db_out = sum over rows of d_delta, using `partial`, scratch of
// num_tiles(B * cells) * C accumulator elements.
struct UpdateParams {
  DType dtype;
  const void* x;
  const void* delta;
  const void* b_out;
  void* x_new;
  const void* grad;
  void* d_delta;
  void* db_out;
  void* partial;
  int64_t B, cells, C;
  uint64_t seed;
  int64_t step;
  float fire_rate;
  cudaStream_t stream;
};

void launch_update_epilogue(const UpdateParams& p);
void launch_update_backward(const UpdateParams& p);

}  // namespace cuda
}  // namespace cube
