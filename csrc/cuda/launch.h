// The boundary between the host ops (ops_cuda.cpp, which sees ATen) and the kernels (*.cu, which
// do not): plain functions on raw pointers, so `nvcc -c` of the kernels needs no torch headers.
// Every launcher enqueues on `stream` and returns without synchronising; the caller checks
// the launch with C10_CUDA_KERNEL_LAUNCH_CHECK().
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

// h = u * (b_sp + sum_k w_sp[k] * vn[nbr(i, k)]), all [rows, F] channels-last.
void launch_gather_gate(DType dtype, const void* u, const void* vn, const void* w_sp,
                        const void* b_sp, void* h, int64_t B, int64_t D, int64_t H, int64_t W,
                        int64_t F, int neighbourhood, int boundary, cudaStream_t stream);

// du, dvn and the weight gradients dw_sp [K, F], db_sp [F]. `partial` is scratch of
// num_tiles(B*D*H*W) * (K + 1) * F accumulator elements (double for kFloat64, else float).
void launch_gather_gate_backward(DType dtype, const void* grad_h, const void* u, const void* vn,
                                 const void* w_sp, const void* b_sp, void* du, void* dvn,
                                 void* dw_sp, void* db_sp, void* partial, int64_t B, int64_t D,
                                 int64_t H, int64_t W, int64_t F, int neighbourhood, int boundary,
                                 cudaStream_t stream);

// Epilogue of the out-projection: x_new = x + m * (delta + b_out), with delta = h @ w_out
// already computed by cuBLAS in the accumulator type (double for kFloat64, else float).
void launch_update_epilogue(DType dtype, const void* x, const void* delta, const void* b_out,
                            void* x_new, int64_t B, int64_t cells, int64_t C, uint64_t seed,
                            int64_t step, float fire_rate, cudaStream_t stream);

// d_delta = m * grad (skipped when d_delta is null, i.e. fire_rate >= 1 where it equals grad)
// and db_out = sum over rows of d_delta. `partial` is scratch of num_tiles(B*cells) * C
// accumulator elements.
void launch_update_backward(DType dtype, const void* grad, void* d_delta, void* db_out,
                            void* partial, int64_t B, int64_t cells, int64_t C, uint64_t seed,
                            int64_t step, float fire_rate, cudaStream_t stream);

}  // namespace cuda
}  // namespace cube
