// Launchers of the CUDA per-token passes (omoe_cuda_kernels.cu: one warp per token, the
// body in omoe_lane_token.h). Plain pointers and a stream only: nvcc never sees an ATen
// header, which keeps the CUDA build short; the tensors, checks and registration live in
// omoe_cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "cuda/omoe_lane_token.h"

namespace omoe {
namespace cuda {

// What the pass reads (h, logits, dz: `acc`) and writes (the GEMM operands: `operand`).
enum class PassTypes { kFloat64, kFloat32, kFloat32ToBFloat16, kFloat32ToFloat16 };

// Row-major device arrays: h, dz [T, E·r] and logits [T, E] (contiguous); G [E·r, E·r]
// float64 (orthogonalize only); z [T, z_ld] and dhl [T, dhl_ld] operands laid out as
// omoe_lane_token.h says; dg_lhs [E, T, E·r] float64 (backward, orthogonalize only).
struct TokenPassArgs {
  LanePassShape shape;
  PassTypes types;
  const void* h;
  const void* logits;
  const double* G;
  const void* dz;  // backward only
  void* z;
  int64_t z_ld;
  void* dhl;  // backward only
  int64_t dhl_ld;
  double* dg_lhs;
  void* workspace;  // token_pass_workspace_bytes(...) bytes, or nullptr when 0
};

// Bytes of global workspace a launch needs (the per-warp scratch of k > 8; 0: none).
size_t token_pass_workspace_bytes(const LanePassShape& shape, bool backward);

// Launch asynchronously on `stream`; the caller checks cudaGetLastError().
void launch_token_forward(const TokenPassArgs& args, cudaStream_t stream);
void launch_token_backward(const TokenPassArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace omoe
