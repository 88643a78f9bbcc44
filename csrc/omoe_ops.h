// The omoe ops: the orchestration (ATen GEMMs around a per-token pass) and, per device,
// the per-token pass itself. omoe_ops.cpp holds the schemas, the shared checks and the
// CPU orchestration and pass; CUDA has its own orchestration (cuda/omoe_cuda_plan.cpp)
// around the passes of cuda/omoe_cuda_kernels.cu, registered in cuda/omoe_cuda_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <tuple>

// The ops' signatures, after the op name: every op family defined in C++ (omoe,
// omoe_cuda_plan) uses these, and omoe_kernels/ops/registration.py's FORWARD_SCHEMA and
// BACKWARD_SCHEMA must match them (python_tests/test_op_schema.py). String literals, so
// that `"forward" OMOE_FORWARD_SIGNATURE` is one literal for TORCH_LIBRARY's def.
#define OMOE_FORWARD_SIGNATURE                                                       \
  "(Tensor x, Tensor A, Tensor B, Tensor router_weight, Tensor? router_input, "      \
  "Tensor? base_out, float scaling, int top_k, bool orthogonalize, bool normalize, " \
  "float eps) -> (Tensor y, Tensor h, Tensor logits)"
#define OMOE_BACKWARD_SIGNATURE                                                       \
  "(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor router_weight, "              \
  "Tensor? router_input, Tensor h, Tensor logits, float scaling, int top_k, "         \
  "bool orthogonalize, bool normalize, float eps) -> (Tensor grad_x, Tensor grad_A, " \
  "Tensor grad_B, Tensor grad_router_weight, Tensor grad_router_input)"

namespace omoe {

struct Sizes {
  int64_t T, d_in, d_out, E, r;
};

// The dtype h and the logits are kept in: float64 for float64 inputs, else float32.
at::ScalarType accumulate_dtype(const at::Tensor& x);

// B [E, d_out, r] as B_cat [d_out, E·r] in dtype `acc`: column i·r + a is B[i, :, a].
at::Tensor packed_expand(const at::Tensor& B, at::ScalarType acc);

// The checks shared by forward and backward of every device (messages name the argument);
// returns the sizes.
Sizes check_common(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& router_weight,
                   const std::optional<at::Tensor>& router_input, int64_t top_k, double eps);

// check_common plus the forward's own arguments (scaling, base_out).
Sizes check_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& router_weight,
                    const std::optional<at::Tensor>& router_input,
                    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
                    double eps);

// check_common plus the backward's own arguments (scaling, grad_y, h, logits).
Sizes check_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A,
                     const at::Tensor& B, const at::Tensor& router_weight,
                     const std::optional<at::Tensor>& router_input, const at::Tensor& h,
                     const at::Tensor& logits, double scaling, int64_t top_k, double eps);

// Per-token forward over all tokens: z[t] = a[t] ⊙ h[t] (docs/algorithm.md, steps 2–5).
// h: [T, E·r], logits: [T, E] (both float32, or float64 for float64 inputs);
// GH: [E, T, E·r] float64 with GH[j][t][(i, a)] = (G_ij h_j)_a (undefined unless
// orthogonalize). z: [T, E·r], written in full.
using TokenForwardFn = void (*)(const at::Tensor& h, const at::Tensor& logits,
                                const at::Tensor& GH, int64_t num_experts, int64_t rank,
                                int64_t top_k, bool orthogonalize, bool normalize, double eps,
                                at::Tensor& z);

// Per-token backward over all tokens. dz: [T, E·r]. Writes z and dh ([T, E·r]), dlogits
// ([T, E]) and, when orthogonalizing, dg_lhs ([E, T, E·r] float64, see token_backward).
using TokenBackwardFn = void (*)(const at::Tensor& h, const at::Tensor& logits,
                                 const at::Tensor& GH, const at::Tensor& dz,
                                 int64_t num_experts, int64_t rank, int64_t top_k,
                                 bool orthogonalize, bool normalize, double eps, at::Tensor& z,
                                 at::Tensor& dh, at::Tensor& dlogits, at::Tensor& dg_lhs);

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, TokenForwardFn token_forward);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, TokenBackwardFn token_backward);

// Whether the CPU forward at sizes `s` takes a route through G when G costs nothing (it is
// cached): the route choice of the single-adapter op, which the mixed-batch op follows.
bool forward_prefers_gram(const Sizes& s, int64_t k);

// Whether every tensor is in dtype `acc` and contiguous (read in place by the CPU loops).
inline bool in_dtype_and_contiguous(std::initializer_list<const at::Tensor*> tensors,
                                    at::ScalarType acc) {
  for (const at::Tensor* t : tensors)
    if (t->scalar_type() != acc || !t->is_contiguous()) return false;
  return true;
}

// The CPU forward of a few tokens from the expert outputs e_i = B_i h_i, which reads B once
// and touches no weight cache: taken where omoe::forward takes it for sizes `s`
// (acc: the accumulate dtype), and whether S is then a batched GEMM.
struct ExpertOutputsRoute {
  bool taken = false, batched_S = false;
};
ExpertOutputsRoute expert_outputs_route(const Sizes& s, int64_t k, at::ScalarType acc);

}  // namespace omoe
