// CUDA per-token passes: one warp per token (grid-stride over tokens), the body of
// omoe_lane_token.h (docs/algorithm.md, forward steps 2–5 and backward step 3).
//
// Shared memory holds G (float64, E·r × E·r) when it fits beside the warps' scratch, so
// every S entry and Gram term reads it there; beyond that G is read from global memory
// (L1/L2). Each warp's token state (the MGS tape, routing, coefficients) sits in shared
// memory for k ≤ 8 active experts and in a global slot per warp above (it grows like k²).
#include "omoe_cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

namespace omoe {

template <>
struct OperandConvert<__nv_bfloat16> {
  static __host__ __device__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __host__ __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct OperandConvert<__half> {
  static __host__ __device__ __half from_float(float v) { return __float2half_rn(v); }
  static __host__ __device__ float to_float(__half v) { return __half2float(v); }
};

namespace cuda {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kThreadsPerBlock = kWarpSize * kWarpsPerBlock;
// Shared memory one block may take for G and the scratch; beyond this G stays global.
constexpr size_t kMaxSharedBytes = size_t(160) << 10;
constexpr size_t kDefaultSharedBytes = size_t(48) << 10;
// Global scratch (k > 8) is bounded: the grid shrinks to fit and warps loop over tokens.
constexpr size_t kWorkspaceBudgetBytes = size_t(256) << 20;

template <int MAX_K, bool BACKWARD>
using Scratch =
    LaneScratch<MAX_K, std::conditional_t<BACKWARD, BackwardScratch<MAX_K>, MgsTape<MAX_K>>>;

template <int MAX_K>
constexpr bool scratch_in_shared() {
  return MAX_K <= 8;
}

template <int MAX_K, bool BACKWARD, typename Acc, typename Out>
__global__ void __launch_bounds__(kThreadsPerBlock)
    token_pass_kernel(TokenPassArgs args, bool gram_in_shared) {
  extern __shared__ __align__(16) unsigned char shared[];
  using W = Scratch<MAX_K, BACKWARD>;
  const LanePassShape& s = args.shape;
  const int64_t E = s.num_experts, er = E * s.rank;
  const double* G = args.G;
  unsigned char* scratch_base = shared;
  if (s.orthogonalize && gram_in_shared) {
    double* G_shared = reinterpret_cast<double*>(shared);
    for (int64_t p = threadIdx.x; p < er * er; p += blockDim.x) G_shared[p] = args.G[p];
    G = G_shared;
    scratch_base += er * er * sizeof(double);
    __syncthreads();
  }
  const int warp = int(threadIdx.x) / kWarpSize;
  const LaneGroup lanes{int(threadIdx.x) % kWarpSize, kWarpSize};
  const int64_t first = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  W* w;
  if constexpr (scratch_in_shared<MAX_K>()) w = reinterpret_cast<W*>(scratch_base) + warp;
  else w = static_cast<W*>(args.workspace) + first;
  const Acc* h = static_cast<const Acc*>(args.h);
  const Acc* logits = static_cast<const Acc*>(args.logits);
  Out* z = static_cast<Out*>(args.z);
  for (int64_t t = first; t < s.num_tokens; t += int64_t(gridDim.x) * kWarpsPerBlock) {
    if constexpr (BACKWARD) {
      const Acc* dz = static_cast<const Acc*>(args.dz);
      Out* dhl = static_cast<Out*>(args.dhl);
      lane_token_backward<MAX_K>(lanes, s, h + t * er, logits + t * E, G, dz + t * er, *w,
                                 z + t * args.z_ld, dhl + t * args.dhl_ld,
                                 args.dg_lhs ? args.dg_lhs + t * er : nullptr,
                                 s.num_tokens * er);
    } else {
      lane_token_forward<MAX_K>(lanes, s, h + t * er, logits + t * E, G, *w, z + t * args.z_ld);
    }
  }
}

struct LaunchPlan {
  unsigned blocks;
  size_t shared_bytes;
  bool gram_in_shared;
};

// Grid and shared memory of one launch. Host queries only (no synchronisation).
template <int MAX_K, bool BACKWARD, typename Acc, typename Out>
LaunchPlan plan_launch(const LanePassShape& s) {
  using W = Scratch<MAX_K, BACKWARD>;
  auto kernel = token_pass_kernel<MAX_K, BACKWARD, Acc, Out>;
  int device = 0, sms = 1, optin = int(kDefaultSharedBytes);
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const size_t scratch = scratch_in_shared<MAX_K>() ? kWarpsPerBlock * sizeof(W) : 0;
  const int64_t er = int64_t(s.num_experts) * s.rank;
  const size_t gram = s.orthogonalize ? size_t(er * er) * sizeof(double) : 0;
  const size_t limit = std::min(kMaxSharedBytes, size_t(optin));
  LaunchPlan plan{1, scratch, false};
  if (gram > 0 && gram + scratch <= limit) {
    plan.gram_in_shared = true;
    plan.shared_bytes += gram;
  }
  if (plan.shared_bytes > kDefaultSharedBytes)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         int(plan.shared_bytes));
  int per_sm = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreadsPerBlock,
                                                plan.shared_bytes);
  int64_t blocks = (s.num_tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  blocks = std::min<int64_t>(blocks, int64_t(std::max(per_sm, 1)) * sms);
  if (!scratch_in_shared<MAX_K>())
    blocks = std::min<int64_t>(blocks, kWorkspaceBudgetBytes / (kWarpsPerBlock * sizeof(W)));
  plan.blocks = unsigned(std::max<int64_t>(blocks, 1));
  return plan;
}

template <int MAX_K, bool BACKWARD>
size_t workspace_bytes(const LanePassShape& s) {
  if (scratch_in_shared<MAX_K>()) return 0;
  // The scratch type does not depend on Acc/Out, nor does the grid beyond occupancy:
  // plan with the largest-register instance.
  const LaunchPlan plan = plan_launch<MAX_K, BACKWARD, double, double>(s);
  return size_t(plan.blocks) * kWarpsPerBlock * sizeof(Scratch<MAX_K, BACKWARD>);
}

template <int MAX_K, bool BACKWARD, typename Acc, typename Out>
void launch(const TokenPassArgs& args, cudaStream_t stream) {
  LaunchPlan plan = plan_launch<MAX_K, BACKWARD, Acc, Out>(args.shape);
  if (!scratch_in_shared<MAX_K>()) {  // as many blocks as the workspace was sized for
    const LaunchPlan sized = plan_launch<MAX_K, BACKWARD, double, double>(args.shape);
    plan.blocks = std::min(plan.blocks, sized.blocks);
  }
  token_pass_kernel<MAX_K, BACKWARD, Acc, Out>
      <<<plan.blocks, kThreadsPerBlock, plan.shared_bytes, stream>>>(args, plan.gram_in_shared);
}

template <bool BACKWARD>
void dispatch(const TokenPassArgs& args, cudaStream_t stream) {
  dispatch_max_active(args.shape.top_k, [&](auto max_k) {
    constexpr int MAX_K = decltype(max_k)::value;
    switch (args.types) {
      case PassTypes::kFloat64:
        return launch<MAX_K, BACKWARD, double, double>(args, stream);
      case PassTypes::kFloat32:
        return launch<MAX_K, BACKWARD, float, float>(args, stream);
      case PassTypes::kFloat32ToBFloat16:
        return launch<MAX_K, BACKWARD, float, __nv_bfloat16>(args, stream);
      case PassTypes::kFloat32ToFloat16:
        return launch<MAX_K, BACKWARD, float, __half>(args, stream);
    }
  });
}

}  // namespace

size_t token_pass_workspace_bytes(const LanePassShape& shape, bool backward) {
  size_t bytes = 0;
  dispatch_max_active(shape.top_k, [&](auto max_k) {
    constexpr int MAX_K = decltype(max_k)::value;
    bytes =
        backward ? workspace_bytes<MAX_K, true>(shape) : workspace_bytes<MAX_K, false>(shape);
  });
  return bytes;
}

void launch_token_forward(const TokenPassArgs& args, cudaStream_t stream) {
  dispatch<false>(args, stream);
}

void launch_token_backward(const TokenPassArgs& args, cudaStream_t stream) {
  dispatch<true>(args, stream);
}

}  // namespace cuda
}  // namespace omoe
