// The omoe ops on CUDA tensors: the CUDA plan (omoe_cuda_plan.cpp: input checks, then
// cuBLAS GEMMs through ATen) around the warp-per-token passes of omoe_cuda_kernels.cu,
// registered for the CUDA dispatch key. Every check runs before any kernel is launched,
// and nothing here waits for the GPU (no host synchronisation: CUDA graphs can capture a
// step).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "cuda/omoe_cuda_kernels.h"
#include "cuda/omoe_cuda_plan.h"
#include "omoe_token.h"

namespace omoe {
namespace {

// The plan hands over tensors of its own making; these checks keep any other caller
// from launching on something else.
void check_pass_tensor(const at::Tensor& t, const at::Tensor& like, const char* name,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "omoe (cuda): ", name, " must be on ",
              like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "omoe (cuda): ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "omoe (cuda): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

void check_rows(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "omoe (cuda): ", name,
              " must be [", rows, ", ", cols, "], got ", t.sizes());
}

cuda::PassTypes pass_types(at::ScalarType acc, at::ScalarType operand) {
  if (acc == at::kDouble && operand == at::kDouble) return cuda::PassTypes::kFloat64;
  TORCH_CHECK(acc == at::kFloat, "omoe (cuda): h must be float32 or float64, got ", acc);
  if (operand == at::kBFloat16) return cuda::PassTypes::kFloat32ToBFloat16;
  if (operand == at::kHalf) return cuda::PassTypes::kFloat32ToFloat16;
  TORCH_CHECK(operand == at::kFloat,
              "omoe (cuda): operands must be float32, bfloat16 or "
              "float16 for float32 h, got ",
              operand);
  return cuda::PassTypes::kFloat32;
}

// Checks what both passes read; returns the launch arguments filled so far.
cuda::TokenPassArgs check_pass(const at::Tensor& h, const at::Tensor& logits,
                               const at::Tensor& G, const LanePassShape& s, at::Tensor& z) {
  const int64_t E = s.num_experts, r = s.rank, k = s.top_k;
  TORCH_CHECK(E >= 1 && r >= 1 && k >= 1 && k <= E && k <= kMaxExperts,
              "omoe (cuda): bad sizes E=", E, " r=", r, " top_k=", k, " (at most ", kMaxExperts,
              " active experts)");
  const int64_t T = s.num_tokens, er = E * r;
  check_rows(h, T, er, "h");
  check_rows(logits, T, E, "logits");
  check_pass_tensor(h, h, "h", h.scalar_type());
  check_pass_tensor(logits, h, "logits", h.scalar_type());
  const bool split = z.element_size() == 2;
  check_rows(z, T, split ? 2 * er : er, "z");
  check_pass_tensor(z, h, "z", z.scalar_type());
  if (s.orthogonalize) {
    check_rows(G, er, er, "G");
    check_pass_tensor(G, h, "G", at::kDouble);
  }
  cuda::TokenPassArgs args{};
  args.shape = s;
  args.types = pass_types(h.scalar_type(), z.scalar_type());
  args.h = h.data_ptr();
  args.logits = logits.data_ptr();
  args.G = s.orthogonalize ? G.data_ptr<double>() : nullptr;
  args.z = z.data_ptr();
  args.z_ld = z.size(1);
  return args;
}

at::Tensor workspace_for(const LanePassShape& s, bool backward, const at::Tensor& like) {
  const size_t bytes = cuda::token_pass_workspace_bytes(s, backward);
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

void token_forward_cuda(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& G,
                        const LanePassShape& s, at::Tensor& z) {
  cuda::TokenPassArgs args = check_pass(h, logits, G, s, z);
  if (s.num_tokens == 0) return;
  const c10::cuda::CUDAGuard device_guard(h.device());
  const at::Tensor workspace = workspace_for(s, false, h);
  args.workspace = workspace.numel() ? workspace.data_ptr() : nullptr;
  cuda::launch_token_forward(args, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void token_backward_cuda(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& G,
                         const at::Tensor& dz, const LanePassShape& s, at::Tensor& z,
                         at::Tensor& dhl, at::Tensor& dg_lhs) {
  cuda::TokenPassArgs args = check_pass(h, logits, G, s, z);
  const int64_t T = s.num_tokens, E = s.num_experts, er = E * s.rank;
  check_rows(dz, T, er, "dz");
  check_pass_tensor(dz, h, "dz", h.scalar_type());
  check_rows(dhl, T, z.element_size() == 2 ? 2 * (er + E) : er + E, "dhl");
  check_pass_tensor(dhl, h, "dhl", z.scalar_type());
  if (s.orthogonalize) {
    TORCH_CHECK(
        dg_lhs.dim() == 3 && dg_lhs.size(0) == E && dg_lhs.size(1) == T && dg_lhs.size(2) == er,
        "omoe (cuda): dg_lhs must be [E, T, E*r] = [", E, ", ", T, ", ", er, "], got ",
        dg_lhs.sizes());
    check_pass_tensor(dg_lhs, h, "dg_lhs", at::kDouble);
  }
  if (T == 0) return;
  args.dz = dz.data_ptr();
  args.dhl = dhl.data_ptr();
  args.dhl_ld = dhl.size(1);
  args.dg_lhs = s.orthogonalize ? dg_lhs.data_ptr<double>() : nullptr;
  const c10::cuda::CUDAGuard device_guard(h.device());
  const at::Tensor workspace = workspace_for(s, true, h);
  args.workspace = workspace.numel() ? workspace.data_ptr() : nullptr;
  cuda::launch_token_backward(args, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr PlanPass kCudaPass{token_forward_cuda, token_backward_cuda};

// x on another device than the other inputs is reported by the plan's checks, so the
// guard only acts when x is on a GPU.
std::optional<c10::Device> cuda_device_of(const at::Tensor& x) {
  return x.is_cuda() ? std::optional<c10::Device>(x.device()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(x));
  return plan_forward(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                      orthogonalize, normalize, eps, kCudaPass);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(x));
  return plan_backward(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                       orthogonalize, normalize, eps, kCudaPass);
}

}  // namespace
}  // namespace omoe

TORCH_LIBRARY_IMPL(omoe, CUDA, m) {
  m.impl("forward", &omoe::forward_cuda);
  m.impl("backward", &omoe::backward_cuda);
}
