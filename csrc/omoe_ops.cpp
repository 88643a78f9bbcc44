// The omoe ops: schemas, the device-generic orchestration and the CPU per-token pass.
//
//   forward(x, A, B, router_weight, router_input?, base_out?, …) -> (y, h, logits)
//   backward(grad_y, x, A, B, router_weight, router_input?, h, logits, …)
//       -> (grad_x, grad_A, grad_B, grad_router_weight, grad_router_input)
//
// x is [T, d_in] (the Python side flattens), A [E, r, d_in], B [E, d_out, r],
// router_weight [E, d_in]. h ([T, E·r]) and logits ([T, E]) are what the backward needs;
// they are float32 (float64 for float64 inputs) whatever the input dtype.
// grad_router_input is empty when router_input is None (its gradient is in grad_x).
// python_module.cpp makes the Python extension module; this file holds no Python, so the
// CMake build links the same ops into a plain shared library.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "omoe_ops.h"
#include "omoe_token.h"

#include <algorithm>
#include <memory>

namespace omoe {
namespace {

at::ScalarType accumulate_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "omoe: ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

struct Sizes {
  int64_t T, d_in, d_out, E, r;
};

// Checks the tensors shared by forward and backward; returns their sizes.
Sizes check_common(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& router_weight,
                   const std::optional<at::Tensor>& router_input, int64_t top_k,
                   double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "omoe: x must be 2-D [T, d_in], got ", x.sizes());
  TORCH_CHECK(A.dim() == 3, "omoe: A must be 3-D [E, r, d_in], got ", A.sizes());
  TORCH_CHECK(B.dim() == 3, "omoe: B must be 3-D [E, d_out, r], got ", B.sizes());
  TORCH_CHECK(router_weight.dim() == 2, "omoe: router_weight must be 2-D [E, d_in], got ",
              router_weight.sizes());
  Sizes s{x.size(0), x.size(1), B.size(1), A.size(0), A.size(1)};
  TORCH_CHECK(s.E >= 1 && s.E <= kMaxExperts, "omoe: the compiled ops take 1 to ", kMaxExperts,
              " experts, got E=", s.E);
  TORCH_CHECK(s.r >= 1, "omoe: A must have rank >= 1, got ", s.r);
  TORCH_CHECK(s.d_out >= 1, "omoe: B must have d_out >= 1");
  TORCH_CHECK(A.size(2) == s.d_in, "omoe: A is [E, r, d_in] with d_in=", A.size(2),
              " but x has d_in=", s.d_in);
  TORCH_CHECK(B.size(0) == s.E && B.size(2) == s.r, "omoe: B must be [E, d_out, r] = [", s.E,
              ", d_out, ", s.r, "], got ", B.sizes());
  TORCH_CHECK(router_weight.size(0) == s.E && router_weight.size(1) == s.d_in,
              "omoe: router_weight must be [E, d_in] = [", s.E, ", ", s.d_in, "], got ",
              router_weight.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= s.E, "omoe: top_k must be in [1, E=", s.E, "], got ", top_k);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "omoe: eps must be finite and > 0, got ", eps);
  std::vector<std::pair<const at::Tensor*, const char*>> same = {
      {&A, "A"}, {&B, "B"}, {&router_weight, "router_weight"}};
  if (router_input.has_value()) {
    const auto& ri = *router_input;
    TORCH_CHECK(ri.dim() == 2 && ri.size(0) == s.T && ri.size(1) == s.d_in,
                "omoe: router_input must be [T, d_in] = [", s.T, ", ", s.d_in, "], got ",
                ri.sizes());
    same.push_back({&ri, "router_input"});
  }
  for (const auto& [t, name] : same) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "omoe: ", name, " has dtype ",
                t->scalar_type(), " but x has ", x.scalar_type());
    TORCH_CHECK(t->device() == x.device(), "omoe: ", name, " is on ", t->device(),
                " but x is on ", x.device());
  }
  return s;
}

// B as [d_out, E·r]: column i·r + a is B[i, :, a].
at::Tensor concat_experts_B(const at::Tensor& B, at::ScalarType dtype) {
  return B.permute({1, 0, 2}).reshape({B.size(1), B.size(0) * B.size(2)}).to(dtype).contiguous();
}

// ---- CPU per-token passes -------------------------------------------------------

constexpr int64_t kTokensPerTask = 64;

void token_forward_cpu(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& GH,
                       int64_t E, int64_t r, int64_t top_k, bool orthogonalize,
                       bool normalize, double eps, at::Tensor& z) {
  const int64_t T = h.size(0), er = E * r;
  const double* gh_ptr = orthogonalize ? GH.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_token_forward_cpu", [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const scalar_t* l_ptr = logits.data_ptr<scalar_t>();
    scalar_t* z_ptr = z.data_ptr<scalar_t>();
    dispatch_max_active(std::min(top_k, E), [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      at::parallel_for(0, T, kTokensPerTask, [&](int64_t begin, int64_t end) {
        auto tape = std::make_unique<MgsTape<MAX_K>>();
        for (int64_t t = begin; t < end; ++t)
          token_forward(h_ptr + t * er, l_ptr + t * E, gh_ptr ? gh_ptr + t * er : nullptr,
                        T * er, int(E), int(r), int(top_k), orthogonalize, normalize, eps,
                        *tape, z_ptr + t * er);
      });
    });
  });
}

void token_backward_cpu(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& GH,
                        const at::Tensor& dz, int64_t E, int64_t r, int64_t top_k,
                        bool orthogonalize, bool normalize, double eps, at::Tensor& z,
                        at::Tensor& dh, at::Tensor& dlogits, at::Tensor& dg_lhs) {
  const int64_t T = h.size(0), er = E * r;
  const double* gh_ptr = orthogonalize ? GH.data_ptr<double>() : nullptr;
  double* lhs_ptr = orthogonalize ? dg_lhs.data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_token_backward_cpu", [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const scalar_t* l_ptr = logits.data_ptr<scalar_t>();
    const scalar_t* dz_ptr = dz.data_ptr<scalar_t>();
    scalar_t* z_ptr = z.data_ptr<scalar_t>();
    scalar_t* dh_ptr = dh.data_ptr<scalar_t>();
    scalar_t* dl_ptr = dlogits.data_ptr<scalar_t>();
    dispatch_max_active(std::min(top_k, E), [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      at::parallel_for(0, T, kTokensPerTask, [&](int64_t begin, int64_t end) {
        auto scratch = std::make_unique<BackwardScratch<MAX_K>>();
        for (int64_t t = begin; t < end; ++t)
          token_backward(h_ptr + t * er, l_ptr + t * E, gh_ptr ? gh_ptr + t * er : nullptr,
                         T * er, dz_ptr + t * er, int(E), int(r), int(top_k), orthogonalize,
                         normalize, eps, *scratch, z_ptr + t * er, dh_ptr + t * er,
                         dl_ptr + t * E, lhs_ptr ? lhs_ptr + t * er : nullptr);
      });
    });
  });
}

// ---- float64 GEMMs around the per-token Gram matrices --------------------------------

// h as float64 expert blocks, [E, T, r] (a transposed view), for the batched GEMMs below.
at::Tensor expert_blocks64(const at::Tensor& h, int64_t E, int64_t r) {
  return h.to(at::kDouble).view({-1, E, r}).transpose(0, 1);
}

// GH[j, t, (i, a)] = (G_ij h_j)_a for every token: one batched GEMM over j, using that
// G = B_catᵀ B_cat is symmetric (G[:, block j]ᵀ = G[block j, :]). [E, T, E·r] float64.
at::Tensor gram_times_h(const at::Tensor& h_blocks64, const at::Tensor& B64, int64_t E,
                        int64_t r) {
  const at::Tensor G = at::mm(B64.t(), B64);
  return at::bmm(h_blocks64, G.view({E, r, E * r})).contiguous();
}

}  // namespace

// ---- device-generic orchestration -----------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, TokenForwardFn token_forward) {
  // The GEMMs below choose their own precision; an enclosing autocast region must not
  // recast them (their outputs feed float32/float64 buffers).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Sizes s = check_common(x, A, B, router_weight, router_input, top_k, eps);
  TORCH_CHECK(std::isfinite(scaling), "omoe: scaling must be finite, got ", scaling);
  if (base_out.has_value()) {
    TORCH_CHECK(base_out->dim() == 2 && base_out->size(0) == s.T && base_out->size(1) == s.d_out,
                "omoe: base_out must be [T, d_out] = [", s.T, ", ", s.d_out, "], got ",
                base_out->sizes());
    TORCH_CHECK(base_out->scalar_type() == x.scalar_type() && base_out->device() == x.device(),
                "omoe: base_out must match x's dtype and device");
  }
  const auto acc = accumulate_dtype(x);
  const int64_t er = s.E * s.r;
  const at::Tensor xc = x.to(acc).contiguous();
  const at::Tensor A_cat = A.reshape({er, s.d_in}).to(acc);
  const at::Tensor W = router_weight.to(acc);
  at::Tensor h, logits;
  {
    RECORD_FUNCTION("omoe::shrink", std::vector<c10::IValue>());
    if (!router_input.has_value()) {
      // Shrink and router logits in one pass over x.
      const at::Tensor both = at::mm(xc, at::cat({A_cat, W}, 0).t());
      h = both.narrow(1, 0, er).contiguous();
      logits = both.narrow(1, er, s.E).contiguous();
    } else {
      h = at::mm(xc, A_cat.t());
      logits = at::mm(router_input->to(acc), W.t()).contiguous();
    }
  }
  const at::Tensor B_cat = concat_experts_B(B, acc);
  at::Tensor GH;
  if (orthogonalize) {
    RECORD_FUNCTION("omoe::gram", std::vector<c10::IValue>());
    GH = gram_times_h(expert_blocks64(h, s.E, s.r), B_cat.to(at::kDouble), s.E, s.r);
  }
  at::Tensor z = at::empty_like(h);
  {
    RECORD_FUNCTION("omoe::orthogonalize", std::vector<c10::IValue>());
    if (s.T > 0) token_forward(h, logits, GH, s.E, s.r, top_k, orthogonalize, normalize, eps, z);
  }
  RECORD_FUNCTION("omoe::expand", std::vector<c10::IValue>());
  // addmm skips the product when alpha is 0, which would hide a NaN in z or B_cat.
  at::Tensor y = base_out.has_value() && scaling != 0.0
                     ? at::addmm(base_out->to(acc), z, B_cat.t(), /*beta=*/1, /*alpha=*/scaling)
                     : at::mm(z, B_cat.t()).mul_(scaling);
  if (base_out.has_value() && scaling == 0.0) y.add_(base_out->to(acc));
  return {y.to(x.scalar_type()), h, logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, TokenBackwardFn token_backward) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Sizes s = check_common(x, A, B, router_weight, router_input, top_k, eps);
  TORCH_CHECK(std::isfinite(scaling), "omoe: scaling must be finite, got ", scaling);
  const auto acc = accumulate_dtype(x);
  const int64_t er = s.E * s.r;
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.T && grad_y.size(1) == s.d_out,
              "omoe: grad_y must be [T, d_out] = [", s.T, ", ", s.d_out, "], got ", grad_y.sizes());
  TORCH_CHECK(h.dim() == 2 && h.size(0) == s.T && h.size(1) == er && h.scalar_type() == acc,
              "omoe: h must be [T, E*r] = [", s.T, ", ", er, "] of ", acc, ", got ", h.sizes(),
              " of ", h.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && logits.size(0) == s.T && logits.size(1) == s.E &&
                  logits.scalar_type() == acc,
              "omoe: logits must be [T, E] = [", s.T, ", ", s.E, "] of ", acc, ", got ",
              logits.sizes(), " of ", logits.scalar_type());
  for (const auto* t : {&grad_y, &h, &logits})
    TORCH_CHECK(t->device() == x.device(), "omoe: backward tensors must be on x's device");
  TORCH_CHECK(at::isFloatingType(grad_y.scalar_type()), "omoe: grad_y must be floating");

  const at::Tensor xc = x.to(acc).contiguous();
  const at::Tensor B_cat = concat_experts_B(B, acc);
  const at::Tensor dY = grad_y.to(acc).contiguous();
  const at::Tensor hc = h.contiguous(), lc = logits.contiguous();

  at::Tensor dz;
  {
    RECORD_FUNCTION("omoe::expand_backward_input", std::vector<c10::IValue>());
    dz = at::mm(dY, B_cat).mul_(scaling);
  }
  at::Tensor h_blocks64, B64, GH, dg_lhs;
  if (orthogonalize) {
    RECORD_FUNCTION("omoe::gram_recompute", std::vector<c10::IValue>());
    h_blocks64 = expert_blocks64(hc, s.E, s.r);
    B64 = B_cat.to(at::kDouble);
    GH = gram_times_h(h_blocks64, B64, s.E, s.r);
    dg_lhs = at::empty_like(GH);
  }
  at::Tensor z = at::empty_like(hc), dh = at::empty_like(hc), dlogits = at::empty_like(lc);
  {
    RECORD_FUNCTION("omoe::orthogonalize_backward", std::vector<c10::IValue>());
    if (s.T > 0)
      token_backward(hc, lc, GH, dz, s.E, s.r, top_k, orthogonalize, normalize, eps, z, dh,
                     dlogits, dg_lhs);
  }
  at::Tensor dB_cat;
  {
    RECORD_FUNCTION("omoe::expand_backward_weight", std::vector<c10::IValue>());
    dB_cat = at::mm(dY.t(), z).mul_(scaling);
  }
  if (orthogonalize) {
    RECORD_FUNCTION("omoe::gram_backward", std::vector<c10::IValue>());
    // dG[(i,a),(j,b)] = Σ_t dS_ij h_ia h_jb: one batched GEMM over j. G = B_catᵀ B_cat.
    const at::Tensor dG =
        at::bmm(dg_lhs.transpose(1, 2), h_blocks64).permute({1, 0, 2}).reshape({er, er});
    dB_cat.add_(at::mm(B64, dG + dG.t()).to(acc));
  }
  RECORD_FUNCTION("omoe::shrink_backward", std::vector<c10::IValue>());
  const at::Tensor A_cat = A.reshape({er, s.d_in}).to(acc);
  const at::Tensor W = router_weight.to(acc);
  at::Tensor grad_x, grad_A, grad_W, grad_router_input;
  if (router_input.has_value()) {
    grad_A = at::mm(dh.t(), xc);
    grad_x = at::mm(dh, A_cat);
    grad_W = at::mm(dlogits.t(), router_input->to(acc));
    grad_router_input = at::mm(dlogits, W).to(x.scalar_type());
  } else {
    // The router reads x too: [dA; dW] = [dh, dl]ᵀ x and dx = [dh, dl] [A_cat; W].
    const at::Tensor dh_dl = at::cat({dh, dlogits}, 1);
    const at::Tensor dAW = at::mm(dh_dl.t(), xc);
    grad_A = dAW.narrow(0, 0, er);
    grad_W = dAW.narrow(0, er, s.E).clone();  // outputs must not alias each other
    grad_x = at::mm(dh_dl, at::cat({A_cat, W}, 0));
    grad_router_input = at::empty({0}, x.options());
  }
  at::Tensor grad_B = dB_cat.view({s.d_out, s.E, s.r}).permute({1, 0, 2}).contiguous();
  const auto dt = x.scalar_type();
  return {grad_x.to(dt), grad_A.reshape({s.E, s.r, s.d_in}).to(dt), grad_B.to(dt),
          grad_W.to(dt), grad_router_input};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  return forward_impl(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                      orthogonalize, normalize, eps, token_forward_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps) {
  return backward_impl(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                       orthogonalize, normalize, eps, token_backward_cpu);
}

}  // namespace
}  // namespace omoe

TORCH_LIBRARY(omoe, m) {
  m.def(
      "forward(Tensor x, Tensor A, Tensor B, Tensor router_weight, Tensor? router_input, "
      "Tensor? base_out, float scaling, int top_k, bool orthogonalize, bool normalize, "
      "float eps) -> (Tensor y, Tensor h, Tensor logits)");
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor router_weight, "
      "Tensor? router_input, Tensor h, Tensor logits, float scaling, int top_k, "
      "bool orthogonalize, bool normalize, float eps) -> (Tensor grad_x, Tensor grad_A, "
      "Tensor grad_B, Tensor grad_router_weight, Tensor grad_router_input)");
}

TORCH_LIBRARY_IMPL(omoe, CPU, m) {
  m.impl("forward", &omoe::forward_cpu);
  m.impl("backward", &omoe::backward_cpu);
}
