// Launchers of the CUDA per-token passes (omoe_cuda_kernels.cu). Plain pointers and a
// stream only: nvcc never sees an ATen header, which keeps the CUDA build short; the
// tensors, checks and registration live in omoe_cuda_ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace omoe {
namespace cuda {

struct TokenPassShape {
  int64_t num_tokens;  // >= 1
  int num_experts;     // E >= 1
  int rank;            // r >= 1
  int top_k;           // 1..E, and at most kMaxExperts
  bool orthogonalize, normalize;
  double eps;
};

// Bytes of device workspace the launch below needs (0: none; pass nullptr then).
size_t token_forward_workspace_bytes(const TokenPassShape& shape);
size_t token_backward_workspace_bytes(const TokenPassShape& shape);

// Row-major contiguous device arrays: h, z, dz, dh [T, E·r]; logits, dlogits [T, E];
// GH (read) and dg_lhs (written) [E, T, E·r] float64, used only when orthogonalizing
// (nullptr otherwise); see omoe_ops.h and omoe_token.h for their layout.
// Launches asynchronously on `stream`; the caller checks cudaGetLastError().
template <typename scalar_t>
void launch_token_forward(const TokenPassShape& shape, const scalar_t* h,
                          const scalar_t* logits, const double* GH, void* workspace,
                          scalar_t* z, cudaStream_t stream);

template <typename scalar_t>
void launch_token_backward(const TokenPassShape& shape, const scalar_t* h,
                           const scalar_t* logits, const double* GH, const scalar_t* dz,
                           void* workspace, scalar_t* z, scalar_t* dh, scalar_t* dlogits,
                           double* dg_lhs, cudaStream_t stream);

}  // namespace cuda
}  // namespace omoe
