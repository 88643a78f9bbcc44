// The CUDA plan on CPU tensors, for tests only: torch.ops.omoe_cuda_plan.forward/backward
// (the omoe op schemas) run omoe_cuda_plan.cpp's GEMMs with the per-token body of
// omoe_lane_token.h, token by token, on one lane, or with OMOE_CUDA_PLAN_LANES=n on n
// threads that play a warp's lanes (a barrier at each of its synchronisation points).
// What a GPU adds (shared memory, cuBLAS's tensor cores, the hardware's warps) is not
// covered here; the operand layout, the hi + lo split, the dtypes of every GEMM, the
// lanes' division of the work and the per-token algebra are
// (python_tests/test_cuda_plan.py checks them against the float64 oracle).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda/omoe_cuda_plan.h"
#include "omoe_ops.h"

namespace omoe {
namespace {

// A reusable barrier for n threads (C++17: torch before 2.13 builds extensions with
// -std=c++17, which has no std::barrier).
class LaneBarrier {
 public:
  explicit LaneBarrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
    } else {
      all_arrived_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  const int n_;
  int arrived_ = 0;
  int64_t generation_ = 0;
  std::mutex mutex_;
  std::condition_variable all_arrived_;
};

// Runs body(lanes) on each lane of a group of OMOE_CUDA_PLAN_LANES (default 1) lanes.
template <typename Body>
void run_lanes(Body&& body) {
  const char* env = std::getenv("OMOE_CUDA_PLAN_LANES");
  const int n = env != nullptr && *env != '\0' ? std::atoi(env) : 1;
  TORCH_CHECK(n >= 1 && n <= 64, "omoe: OMOE_CUDA_PLAN_LANES must be in [1, 64], got '", env,
              "'");
  if (n == 1) {
    body(LaneGroup{0, 1});
    return;
  }
  LaneBarrier barrier(n);
  auto arrive = +[](void* b) { static_cast<LaneBarrier*>(b)->arrive_and_wait(); };
  std::vector<std::thread> lanes;
  for (int lane = 0; lane < n; ++lane)
    lanes.emplace_back([&, lane] { body(LaneGroup{lane, n, arrive, &barrier}); });
  for (auto& lane : lanes) lane.join();
}

template <typename Fn>
void dispatch_operands(const at::Tensor& h, const at::Tensor& z, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_cuda_plan_acc", [&] {
    using Acc = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(),
                                    "omoe_cuda_plan_operand", [&] { fn(Acc{}, scalar_t{}); });
  });
}

void token_forward_on_cpu(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& G,
                          const LanePassShape& s, at::Tensor& z) {
  const int64_t E = s.num_experts, er = E * s.rank;
  dispatch_operands(h, z, [&](auto acc, auto out) {
    using Acc = decltype(acc);
    using Out = decltype(out);
    dispatch_max_active(s.top_k, [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      auto w = std::make_unique<LaneScratch<MAX_K, MgsTape<MAX_K>>>();
      const double* g = s.orthogonalize ? G.data_ptr<double>() : nullptr;
      run_lanes([&](const LaneGroup& lanes) {
        for (int64_t t = 0; t < s.num_tokens; ++t)
          lane_token_forward<MAX_K>(lanes, s, h.data_ptr<Acc>() + t * er,
                                    logits.data_ptr<Acc>() + t * E, g, *w,
                                    z.data_ptr<Out>() + t * z.size(1));
      });
    });
  });
}

void token_backward_on_cpu(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& G,
                           const at::Tensor& dz, const LanePassShape& s, at::Tensor& z,
                           at::Tensor& dhl, at::Tensor& dg_lhs) {
  const int64_t T = s.num_tokens, E = s.num_experts, er = E * s.rank;
  dispatch_operands(h, z, [&](auto acc, auto out) {
    using Acc = decltype(acc);
    using Out = decltype(out);
    dispatch_max_active(s.top_k, [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      auto w = std::make_unique<LaneScratch<MAX_K, BackwardScratch<MAX_K>>>();
      const double* g = s.orthogonalize ? G.data_ptr<double>() : nullptr;
      double* lhs = s.orthogonalize ? dg_lhs.data_ptr<double>() : nullptr;
      run_lanes([&](const LaneGroup& lanes) {
        for (int64_t t = 0; t < T; ++t)
          lane_token_backward<MAX_K>(
              lanes, s, h.data_ptr<Acc>() + t * er, logits.data_ptr<Acc>() + t * E, g,
              dz.data_ptr<Acc>() + t * er, *w, z.data_ptr<Out>() + t * z.size(1),
              dhl.data_ptr<Out>() + t * dhl.size(1), lhs ? lhs + t * er : nullptr, T * er);
      });
    });
  });
}

constexpr PlanPass kCpuPass{token_forward_on_cpu, token_backward_on_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_on_cpu(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  return plan_forward(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                      orthogonalize, normalize, eps, kCpuPass);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_on_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  return plan_backward(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                       orthogonalize, normalize, eps, kCpuPass);
}

}  // namespace
}  // namespace omoe

TORCH_LIBRARY(omoe_cuda_plan, m) {
  m.def("forward" OMOE_FORWARD_SIGNATURE);
  m.def("backward" OMOE_BACKWARD_SIGNATURE);
}

TORCH_LIBRARY_IMPL(omoe_cuda_plan, CPU, m) {
  m.impl("forward", &omoe::forward_on_cpu);
  m.impl("backward", &omoe::backward_on_cpu);
}
