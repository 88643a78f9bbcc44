// The CUDA ops' orchestration (omoe_cuda_plan.h; docs/algorithm.md, "The CUDA plan").
//
// Every GEMM reads the inputs in their own dtype: no float32 copy of x, base_out, dY or
// router_input is made. For 16-bit inputs the GEMMs run on tensor cores with float32
// accumulation; their results are float32 where the per-token algebra reads them (h, the
// logits, dZ) and the input dtype where they leave the op (y, grad_x, grad_router_input).
// What the pass hands back to a GEMM (z, dh, dlogits) is split into hi + lo 16-bit
// operands, and each weight is stacked twice to match, so the GEMM sums them to about
// 16 bits (omoe_lane_token.h). Float32 and float64 inputs run the same plan in their own
// dtype without the split.
#include "cuda/omoe_cuda_plan.h"

#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>

#include "omoe_ops.h"

namespace omoe {
namespace {

// G above this size is never formed (docs/contract.md §4), as on the CPU.
constexpr double kMaxGramBytes = 512.0 * (1 << 20);
// The backward's dg_lhs ([E, T, E·r] float64) is made a chunk of tokens at a time.
constexpr double kChunkBytes = 1024.0 * (1 << 20);

bool is_16bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// a @ b accumulated in float32 (float64 for float64 inputs) with a result of that dtype.
// On a GPU that is cuBLAS's 16-bit GEMM with float32 output (mm's out_dtype). The CPU
// has no such kernel; the test path multiplies float32 copies there, which is the same
// sum: a product of two 16-bit values is exact in float32.
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  if (a.scalar_type() == acc) return at::mm(a, b);
  if (a.is_cuda()) return at::mm(a, b, acc);
  return at::mm(a.to(acc), b.to(acc));
}

// t stacked twice along dim when the operands are split (hi and lo meet the same weight).
at::Tensor twice_if(bool split, const at::Tensor& t, int64_t dim) {
  return split ? at::cat({t, t}, dim) : t;
}

// The hi and lo halves of a GEMM result over split operands, added (rows or columns
// [0, n) and [n, 2n) of dim); the result as is otherwise.
at::Tensor add_halves(bool split, const at::Tensor& t, int64_t dim, int64_t n) {
  return split ? t.narrow(dim, 0, n) + t.narrow(dim, n, n) : t;
}

// G = B_catᵀ B_cat in float64 (symmetric), [E·r, E·r].
at::Tensor gram_matrix(const at::Tensor& B, const Sizes& s) {
  const double R = double(s.E * s.r);
  TORCH_CHECK(R * R * 8.0 <= kMaxGramBytes, "omoe: G = B_catᵀB_cat would take ",
              R * R * 8.0 / (1 << 20), " MiB (E·r = ", s.E * s.r,
              "); the compiled ops on this device bound it at ", kMaxGramBytes / (1 << 20),
              " MiB: use backend='reference' or a smaller E·r");
  const at::Tensor B64 = packed_expand(B, at::kDouble);
  return at::mm(B64.t(), B64);
}

LanePassShape pass_shape(const Sizes& s, int64_t T, int64_t top_k, bool orthogonalize,
                         bool normalize, double eps) {
  return LanePassShape{T, int(s.E), int(s.r), int(top_k), orthogonalize, normalize, eps};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_forward(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, const PlanPass& pass) {
  // The GEMMs choose their own precision; an enclosing autocast region must not recast.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Sizes s =
      check_forward(x, A, B, router_weight, router_input, base_out, scaling, top_k, eps);
  const at::ScalarType acc = accumulate_dtype(x), dt = x.scalar_type();
  const bool split = is_16bit(dt);
  const at::ScalarType operand = split ? dt : acc;  // == dt for float32/float64 inputs
  const int64_t er = s.E * s.r;
  const at::Tensor A_cat = A.reshape({er, s.d_in});
  at::Tensor h, logits;
  {
    RECORD_FUNCTION("omoe::shrink", std::vector<c10::IValue>());
    if (router_input.has_value()) {
      h = mm_acc(x, A_cat.t(), acc);
      logits = mm_acc(*router_input, router_weight.t(), acc);
    } else {  // h and the router logits in one pass over x
      const at::Tensor both = mm_acc(x, at::cat({A_cat, router_weight}, 0).t(), acc);
      h = both.narrow(1, 0, er).contiguous();
      logits = both.narrow(1, er, s.E).contiguous();
    }
  }
  at::Tensor z = at::empty({s.T, split ? 2 * er : er}, x.options().dtype(operand));
  if (s.T > 0) {
    RECORD_FUNCTION("omoe::orthogonalize", std::vector<c10::IValue>());
    const at::Tensor G = orthogonalize ? gram_matrix(B, s) : at::Tensor();
    pass.forward(h, logits, G, pass_shape(s, s.T, top_k, orthogonalize, normalize, eps), z);
  }
  RECORD_FUNCTION("omoe::expand", std::vector<c10::IValue>());
  // y = base_out + s·[z_hi | z_lo] [B_cat | B_cat]ᵀ: one GEMM, rounded once to the input
  // dtype. addmm skips the product when alpha is 0, which would hide a NaN in z or B.
  const at::Tensor B_op = twice_if(split, packed_expand(B, operand), 1);
  if (scaling == 0.0) {
    at::Tensor y = at::mm(z, B_op.t()).mul_(0.0);
    return {base_out.has_value() ? y.add_(*base_out) : y, h, logits};
  }
  if (base_out.has_value()) return {at::addmm(*base_out, z, B_op.t(), 1, scaling), h, logits};
  at::Tensor y = at::empty({s.T, s.d_out}, x.options());
  at::addmm_out(y, y, z, B_op.t(), /*beta=*/0, /*alpha=*/scaling);  // beta 0: y not read
  return {y, h, logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plan_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, const PlanPass& pass) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Sizes s = check_backward(grad_y, x, A, B, router_weight, router_input, h, logits,
                                 scaling, top_k, eps);
  const at::ScalarType acc = accumulate_dtype(x), dt = x.scalar_type();
  const int64_t er = s.E * s.r;
  // The GEMMs pair grad_y with x-dtype weights and operands.
  const at::Tensor dY = grad_y.scalar_type() == dt ? grad_y : grad_y.to(dt);
  const bool split = is_16bit(dt);
  const at::ScalarType operand = split ? dt : acc;
  const int64_t dl_col = split ? 2 * er : er, dl_width = split ? 2 * s.E : s.E;

  at::Tensor dz;
  {
    RECORD_FUNCTION("omoe::expand_backward_input", std::vector<c10::IValue>());
    dz = mm_acc(dY, packed_expand(B, dt), acc).mul_(scaling);
  }
  const at::Tensor hc = h.contiguous(), lc = logits.contiguous();
  at::Tensor z = at::empty({s.T, split ? 2 * er : er}, x.options().dtype(operand));
  at::Tensor dhl = at::empty({s.T, dl_col + dl_width}, x.options().dtype(operand));
  at::Tensor dG;  // Σ_t Σ_ij dS_ij h_i h_jᵀ, [E·r, E·r] float64
  if (s.T > 0) {
    RECORD_FUNCTION("omoe::orthogonalize_backward", std::vector<c10::IValue>());
    if (!orthogonalize) {
      at::Tensor none;
      pass.backward(hc, lc, at::Tensor(), dz, pass_shape(s, s.T, top_k, false, normalize, eps),
                    z, dhl, none);
    } else {
      const at::Tensor G = gram_matrix(B, s);
      // dG[:, block j] = Σ_t dg_lhs[j, t]ᵀ h_j[t]: one batched GEMM per chunk of tokens.
      const at::Tensor h_blocks64 = hc.to(at::kDouble).view({s.T, s.E, s.r}).transpose(0, 1);
      at::Tensor dG_blocks = at::zeros({s.E, er, s.r}, G.options());  // [j, (i,a), b]
      const int64_t chunk =
          std::clamp<int64_t>(int64_t(kChunkBytes / (8.0 * s.E * er)), 1, s.T);
      for (int64_t t0 = 0; t0 < s.T; t0 += chunk) {
        const int64_t n = std::min(chunk, s.T - t0);
        at::Tensor dg_lhs = at::empty({s.E, n, er}, G.options());
        at::Tensor zc = z.narrow(0, t0, n), dhlc = dhl.narrow(0, t0, n);
        pass.backward(hc.narrow(0, t0, n), lc.narrow(0, t0, n), G, dz.narrow(0, t0, n),
                      pass_shape(s, n, top_k, true, normalize, eps), zc, dhlc, dg_lhs);
        dG_blocks.baddbmm_(dg_lhs.transpose(1, 2), h_blocks64.narrow(1, t0, n));
      }
      dG = dG_blocks.permute({1, 0, 2}).reshape({er, er});
    }
  }
  at::Tensor dB_cat;  // [d_out, E·r] in acc
  {
    RECORD_FUNCTION("omoe::expand_backward_weight", std::vector<c10::IValue>());
    dB_cat = add_halves(split, mm_acc(dY.t(), z, acc), 1, er).mul_(scaling);
  }
  if (dG.defined()) {
    RECORD_FUNCTION("omoe::gram_backward", std::vector<c10::IValue>());
    dB_cat.add_(at::mm(packed_expand(B, at::kDouble), dG + dG.t()).to(acc));
  }
  RECORD_FUNCTION("omoe::shrink_backward", std::vector<c10::IValue>());
  const at::Tensor A_op = twice_if(split, A.reshape({er, s.d_in}), 0);
  const at::Tensor W_op = twice_if(split, router_weight, 0);
  at::Tensor grad_x, grad_A, grad_W, grad_router_input;
  if (router_input.has_value()) {
    const at::Tensor dh = dhl.narrow(1, 0, dl_col), dl = dhl.narrow(1, dl_col, dl_width);
    grad_A = add_halves(split, mm_acc(dh.t(), x, acc), 0, er);
    grad_x = at::mm(dh, A_op);
    grad_W = add_halves(split, mm_acc(dl.t(), *router_input, acc), 0, s.E);
    grad_router_input = at::mm(dl, W_op);
  } else {
    // The router reads x too: [dA; dW] = [dh, dl]ᵀ x and dx = [dh, dl] [A_cat; W] (each
    // part stacked twice when split).
    const at::Tensor dAW = mm_acc(dhl.t(), x, acc);
    grad_A = add_halves(split, dAW.narrow(0, 0, dl_col), 0, er);
    grad_W = add_halves(split, dAW.narrow(0, dl_col, dl_width), 0, s.E);
    if (!split) grad_W = grad_W.clone();  // outputs must not alias each other
    grad_x = at::mm(dhl, at::cat({A_op, W_op}, 0));
    grad_router_input = at::empty({0}, x.options());
  }
  const at::Tensor grad_B = dB_cat.view({s.d_out, s.E, s.r}).permute({1, 0, 2});
  return {grad_x, grad_A.reshape({s.E, s.r, s.d_in}).to(dt), grad_B.to(dt).contiguous(),
          grad_W.to(dt), grad_router_input};
}

}  // namespace omoe
