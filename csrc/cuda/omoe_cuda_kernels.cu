// CUDA per-token passes: one thread per token runs the algebra of omoe_token.h, the same
// source as the CPU pass (docs/algorithm.md, forward steps 2–5 and backward step 3).
#include "omoe_cuda_kernels.h"

#include <algorithm>

#include "omoe_token.h"

namespace omoe {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 128;

// A token's scratch (the MGS tape; for the backward also dC, dS and U) grows like k².
// Local memory is reserved for every thread the GPU can hold at once, not only for the
// threads launched, so only a small scratch goes on the stack. A larger one goes to a
// global workspace with one slot per launched thread, and the grid shrinks to fit the
// workspace budget (each thread then loops over several tokens).
constexpr size_t kStackScratchBytes = 1024;
constexpr int64_t kWorkspaceBudgetBytes = int64_t(256) << 20;
constexpr int64_t kMaxBlocks = int64_t(1) << 16;

template <typename Scratch>
constexpr bool scratch_on_stack() {
  return sizeof(Scratch) <= kStackScratchBytes;
}

template <typename Scratch>
int64_t num_blocks(int64_t num_tokens) {
  int64_t threads = num_tokens;
  if (!scratch_on_stack<Scratch>())
    threads = std::min<int64_t>(threads, kWorkspaceBudgetBytes / int64_t(sizeof(Scratch)));
  const int64_t blocks = (threads + kThreadsPerBlock - 1) / kThreadsPerBlock;
  return std::clamp<int64_t>(blocks, 1, kMaxBlocks);
}

template <typename Scratch>
size_t workspace_bytes(int64_t num_tokens) {
  if (scratch_on_stack<Scratch>()) return 0;
  return size_t(num_blocks<Scratch>(num_tokens)) * kThreadsPerBlock * sizeof(Scratch);
}

__device__ inline int64_t first_token() {
  return int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline int64_t token_stride() { return int64_t(gridDim.x) * blockDim.x; }

// The token loops. GH and dg_lhs hold one [T, E·r] slab per expert j; token t's part of
// slab j starts at t·E·r, and the slabs are T·E·r apart (the gh_stride of omoe_token.h).
template <int MAX_K, typename scalar_t>
__device__ void forward_tokens(const TokenPassShape& s, const scalar_t* __restrict__ h,
                               const scalar_t* __restrict__ logits,
                               const double* __restrict__ GH, MgsTape<MAX_K>& tape,
                               scalar_t* __restrict__ z) {
  const int E = s.num_experts;
  const int64_t er = int64_t(E) * s.rank, gh_stride = s.num_tokens * er;
  for (int64_t t = first_token(); t < s.num_tokens; t += token_stride())
    token_forward(h + t * er, logits + t * E, GH ? GH + t * er : nullptr, gh_stride, E, s.rank,
                  s.top_k, s.orthogonalize, s.normalize, s.eps, tape, z + t * er);
}

template <int MAX_K, typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    token_forward_kernel(TokenPassShape s, const scalar_t* __restrict__ h,
                         const scalar_t* __restrict__ logits, const double* __restrict__ GH,
                         MgsTape<MAX_K>* workspace, scalar_t* __restrict__ z) {
  if constexpr (scratch_on_stack<MgsTape<MAX_K>>()) {
    MgsTape<MAX_K> tape;
    forward_tokens(s, h, logits, GH, tape, z);
  } else {
    forward_tokens(s, h, logits, GH, workspace[first_token()], z);
  }
}

template <int MAX_K, typename scalar_t>
__device__ void backward_tokens(const TokenPassShape& s, const scalar_t* __restrict__ h,
                                const scalar_t* __restrict__ logits,
                                const double* __restrict__ GH, const scalar_t* __restrict__ dz,
                                BackwardScratch<MAX_K>& scratch, scalar_t* __restrict__ z,
                                scalar_t* __restrict__ dh, scalar_t* __restrict__ dlogits,
                                double* __restrict__ dg_lhs) {
  const int E = s.num_experts;
  const int64_t er = int64_t(E) * s.rank, gh_stride = s.num_tokens * er;
  for (int64_t t = first_token(); t < s.num_tokens; t += token_stride())
    token_backward(h + t * er, logits + t * E, GH ? GH + t * er : nullptr, gh_stride,
                   dz + t * er, E, s.rank, s.top_k, s.orthogonalize, s.normalize, s.eps,
                   scratch, z + t * er, dh + t * er, dlogits + t * E,
                   dg_lhs ? dg_lhs + t * er : nullptr);
}

template <int MAX_K, typename scalar_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    token_backward_kernel(TokenPassShape s, const scalar_t* __restrict__ h,
                          const scalar_t* __restrict__ logits, const double* __restrict__ GH,
                          const scalar_t* __restrict__ dz, BackwardScratch<MAX_K>* workspace,
                          scalar_t* __restrict__ z, scalar_t* __restrict__ dh,
                          scalar_t* __restrict__ dlogits, double* __restrict__ dg_lhs) {
  if constexpr (scratch_on_stack<BackwardScratch<MAX_K>>()) {
    BackwardScratch<MAX_K> scratch;
    backward_tokens(s, h, logits, GH, dz, scratch, z, dh, dlogits, dg_lhs);
  } else {
    backward_tokens(s, h, logits, GH, dz, workspace[first_token()], z, dh, dlogits, dg_lhs);
  }
}

}  // namespace

size_t token_forward_workspace_bytes(const TokenPassShape& shape) {
  size_t bytes = 0;
  dispatch_max_active(shape.top_k, [&](auto max_k) {
    bytes = workspace_bytes<MgsTape<decltype(max_k)::value>>(shape.num_tokens);
  });
  return bytes;
}

size_t token_backward_workspace_bytes(const TokenPassShape& shape) {
  size_t bytes = 0;
  dispatch_max_active(shape.top_k, [&](auto max_k) {
    bytes = workspace_bytes<BackwardScratch<decltype(max_k)::value>>(shape.num_tokens);
  });
  return bytes;
}

template <typename scalar_t>
void launch_token_forward(const TokenPassShape& shape, const scalar_t* h,
                          const scalar_t* logits, const double* GH, void* workspace,
                          scalar_t* z, cudaStream_t stream) {
  dispatch_max_active(shape.top_k, [&](auto max_k) {
    constexpr int MAX_K = decltype(max_k)::value;
    using Scratch = MgsTape<MAX_K>;
    const int64_t blocks = num_blocks<Scratch>(shape.num_tokens);
    token_forward_kernel<MAX_K, scalar_t><<<unsigned(blocks), kThreadsPerBlock, 0, stream>>>(
        shape, h, logits, GH, static_cast<Scratch*>(workspace), z);
  });
}

template <typename scalar_t>
void launch_token_backward(const TokenPassShape& shape, const scalar_t* h,
                           const scalar_t* logits, const double* GH, const scalar_t* dz,
                           void* workspace, scalar_t* z, scalar_t* dh, scalar_t* dlogits,
                           double* dg_lhs, cudaStream_t stream) {
  dispatch_max_active(shape.top_k, [&](auto max_k) {
    constexpr int MAX_K = decltype(max_k)::value;
    using Scratch = BackwardScratch<MAX_K>;
    const int64_t blocks = num_blocks<Scratch>(shape.num_tokens);
    token_backward_kernel<MAX_K, scalar_t><<<unsigned(blocks), kThreadsPerBlock, 0, stream>>>(
        shape, h, logits, GH, dz, static_cast<Scratch*>(workspace), z, dh, dlogits, dg_lhs);
  });
}

template void launch_token_forward<float>(const TokenPassShape&, const float*, const float*,
                                          const double*, void*, float*, cudaStream_t);
template void launch_token_forward<double>(const TokenPassShape&, const double*, const double*,
                                           const double*, void*, double*, cudaStream_t);
template void launch_token_backward<float>(const TokenPassShape&, const float*, const float*,
                                           const double*, const float*, void*, float*, float*,
                                           float*, double*, cudaStream_t);
template void launch_token_backward<double>(const TokenPassShape&, const double*, const double*,
                                            const double*, const double*, void*, double*,
                                            double*, double*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace omoe
