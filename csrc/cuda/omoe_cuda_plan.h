// The CUDA ops' orchestration ("plan"): the GEMMs around the per-token pass, with 16-bit
// operands on tensor cores and float32 results only where the per-token algebra reads
// them (docs/algorithm.md, "The CUDA plan"). omoe_cuda_ops.cpp runs it with the CUDA
// pass; omoe_cuda_plan_on_cpu.cpp runs it on CPU tensors with the same per-token body on
// one lane, for the tests.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cuda/omoe_lane_token.h"

namespace omoe {

// The per-token pass of one device. Tensors as omoe_lane_token.h lays them out: h, dz
// [n, E·r] and logits [n, E] in the accumulate dtype; G [E·r, E·r] float64 (undefined
// unless orthogonalizing); z and dhl the GEMM operands (row stride = their size(1));
// dg_lhs [E, n, E·r] float64 (orthogonalize only).
struct PlanPass {
  void (*forward)(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& G,
                  const LanePassShape& shape, at::Tensor& z);
  void (*backward)(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& G,
                   const at::Tensor& dz, const LanePassShape& shape, at::Tensor& z,
                   at::Tensor& dhl, at::Tensor& dg_lhs);
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_forward(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, const PlanPass& pass);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, const PlanPass& pass);

}  // namespace omoe
