// The omoe ops on CUDA tensors: the device-generic orchestration of omoe_ops.cpp (input
// checks, then cuBLAS GEMMs through ATen) around the CUDA per-token passes of
// omoe_cuda_kernels.cu, registered for the CUDA dispatch key. Every check here and in the
// orchestration runs before any kernel is launched.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "cuda/omoe_cuda_kernels.h"
#include "omoe_ops.h"
#include "omoe_token.h"

namespace omoe {
namespace {

// The orchestration hands over contiguous tensors of its own making; these checks keep
// any other caller from launching on something else.
void check_pass_tensor(const at::Tensor& t, const at::Tensor& like, const char* name,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "omoe (cuda): ", name, " must be on ",
              like.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "omoe (cuda): ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "omoe (cuda): ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

// GH and dg_lhs are [E, T, E·r] float64 (omoe_ops.h), used only when orthogonalizing.
void check_gram_layout(const at::Tensor& t, const at::Tensor& h, int64_t E, const char* name) {
  TORCH_CHECK(
      t.dim() == 3 && t.size(0) == E && t.size(1) == h.size(0) && t.size(2) == h.size(1),
      "omoe (cuda): ", name, " must be [E, T, E*r] = [", E, ", ", h.size(0), ", ", h.size(1),
      "], got ", t.sizes());
  check_pass_tensor(t, h, name, at::kDouble);
}

cuda::TokenPassShape check_pass(const at::Tensor& h, const at::Tensor& logits,
                                const at::Tensor& GH, int64_t E, int64_t r, int64_t top_k,
                                bool orthogonalize, bool normalize, double eps) {
  TORCH_CHECK(E >= 1 && r >= 1 && top_k >= 1 && top_k <= E && top_k <= kMaxExperts,
              "omoe (cuda): bad sizes E=", E, " r=", r, " top_k=", top_k, " (at most ",
              kMaxExperts, " active experts)");
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble,
              "omoe (cuda): h must be float32 or float64, got ", h.scalar_type());
  TORCH_CHECK(h.dim() == 2 && h.size(1) == E * r, "omoe (cuda): h must be [T, E*r]");
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == h.size(0) && logits.size(1) == E,
              "omoe (cuda): logits must be [T, E]");
  check_pass_tensor(h, h, "h", h.scalar_type());
  check_pass_tensor(logits, h, "logits", h.scalar_type());
  if (orthogonalize) check_gram_layout(GH, h, E, "GH");
  return cuda::TokenPassShape{h.size(0),     int(E),    int(r), int(top_k),
                              orthogonalize, normalize, eps};
}

void check_same_as(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes(), "omoe (cuda): ", name, " must have shape ",
              like.sizes(), ", got ", t.sizes());
  check_pass_tensor(t, like, name, like.scalar_type());
}

at::Tensor make_workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({int64_t(bytes)}, like.options().dtype(at::kByte));
}

void token_forward_cuda(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& GH,
                        int64_t E, int64_t r, int64_t top_k, bool orthogonalize, bool normalize,
                        double eps, at::Tensor& z) {
  const cuda::TokenPassShape shape =
      check_pass(h, logits, GH, E, r, top_k, orthogonalize, normalize, eps);
  check_same_as(z, h, "z");
  if (shape.num_tokens == 0) return;
  const c10::cuda::CUDAGuard device_guard(h.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double* gh_ptr = orthogonalize ? GH.data_ptr<double>() : nullptr;
  const size_t ws_bytes = cuda::token_forward_workspace_bytes(shape);
  at::Tensor workspace = make_workspace(ws_bytes, h);
  void* ws_ptr = ws_bytes ? workspace.data_ptr() : nullptr;
  if (h.scalar_type() == at::kDouble)
    cuda::launch_token_forward(shape, h.data_ptr<double>(), logits.data_ptr<double>(), gh_ptr,
                               ws_ptr, z.data_ptr<double>(), stream);
  else
    cuda::launch_token_forward(shape, h.data_ptr<float>(), logits.data_ptr<float>(), gh_ptr,
                               ws_ptr, z.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void token_backward_cuda(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& GH,
                         const at::Tensor& dz, int64_t E, int64_t r, int64_t top_k,
                         bool orthogonalize, bool normalize, double eps, at::Tensor& z,
                         at::Tensor& dh, at::Tensor& dlogits, at::Tensor& dg_lhs) {
  const cuda::TokenPassShape shape =
      check_pass(h, logits, GH, E, r, top_k, orthogonalize, normalize, eps);
  check_same_as(dz, h, "dz");
  check_same_as(z, h, "z");
  check_same_as(dh, h, "dh");
  check_same_as(dlogits, logits, "dlogits");
  if (orthogonalize) check_gram_layout(dg_lhs, h, E, "dg_lhs");
  if (shape.num_tokens == 0) return;
  const c10::cuda::CUDAGuard device_guard(h.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double* gh_ptr = orthogonalize ? GH.data_ptr<double>() : nullptr;
  double* lhs_ptr = orthogonalize ? dg_lhs.data_ptr<double>() : nullptr;
  const size_t ws_bytes = cuda::token_backward_workspace_bytes(shape);
  at::Tensor workspace = make_workspace(ws_bytes, h);
  void* ws_ptr = ws_bytes ? workspace.data_ptr() : nullptr;
  if (h.scalar_type() == at::kDouble)
    cuda::launch_token_backward(shape, h.data_ptr<double>(), logits.data_ptr<double>(), gh_ptr,
                                dz.data_ptr<double>(), ws_ptr, z.data_ptr<double>(),
                                dh.data_ptr<double>(), dlogits.data_ptr<double>(), lhs_ptr,
                                stream);
  else
    cuda::launch_token_backward(shape, h.data_ptr<float>(), logits.data_ptr<float>(), gh_ptr,
                                dz.data_ptr<float>(), ws_ptr, z.data_ptr<float>(),
                                dh.data_ptr<float>(), dlogits.data_ptr<float>(), lhs_ptr,
                                stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x on another device than the other inputs is reported by the orchestration's checks,
// so the guard only acts when x is on a GPU.
std::optional<c10::Device> cuda_device_of(const at::Tensor& x) {
  return x.is_cuda() ? std::optional<c10::Device>(x.device()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(x));
  return forward_impl(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                      orthogonalize, normalize, eps, token_forward_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  const c10::cuda::OptionalCUDAGuard device_guard(cuda_device_of(x));
  return backward_impl(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                       orthogonalize, normalize, eps, token_backward_cuda);
}

}  // namespace
}  // namespace omoe

TORCH_LIBRARY_IMPL(omoe, CUDA, m) {
  m.impl("forward", &omoe::forward_cuda);
  m.impl("backward", &omoe::backward_cuda);
}
