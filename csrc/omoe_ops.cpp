// The omoe ops: schemas, the device-generic orchestration and the CPU per-token pass.
//
//   forward(x, A, B, router_weight, router_input?, base_out?, …) -> (y, h, logits)
//   backward(grad_y, x, A, B, router_weight, router_input?, h, logits, …)
//       -> (grad_x, grad_A, grad_B, grad_router_weight, grad_router_input)
//   omoe_cache::stats() -> [hits, misses, entries, bytes, packed_bytes];  omoe_cache::clear()
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

#include "omoe_cpu_expand.h"
#include "omoe_cpu_pass.h"
#include "omoe_cpu_topk.h"
#include "omoe_ops.h"
#include "omoe_token.h"
#include "omoe_weight_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace omoe {

// accumulate_dtype and the check_* functions are declared in omoe_ops.h: the CUDA plan
// (csrc/cuda/omoe_cuda_plan.cpp) makes the same checks.
at::ScalarType accumulate_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "omoe: ", name,
              " must be a floating tensor, got ", t.scalar_type());
}

// The most active experts k = min(top_k, E) a device's per-token pass takes.
int64_t max_active_experts(const at::Tensor& x) {
  return x.is_cpu() ? cpu::kMaxActive : kMaxExperts;
}

// Checks the tensors shared by forward and backward; returns their sizes.
Sizes check_common(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                   const at::Tensor& router_weight,
                   const std::optional<at::Tensor>& router_input, int64_t top_k, double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "omoe: x must be 2-D [T, d_in], got ", x.sizes());
  TORCH_CHECK(A.dim() == 3, "omoe: A must be 3-D [E, r, d_in], got ", A.sizes());
  TORCH_CHECK(B.dim() == 3, "omoe: B must be 3-D [E, d_out, r], got ", B.sizes());
  TORCH_CHECK(router_weight.dim() == 2, "omoe: router_weight must be 2-D [E, d_in], got ",
              router_weight.sizes());
  Sizes s{x.size(0), x.size(1), B.size(1), A.size(0), A.size(1)};
  TORCH_CHECK(s.E >= 1, "omoe: A must hold at least one expert, got E=", s.E);
  TORCH_CHECK(s.r >= 1, "omoe: A must have rank >= 1, got ", s.r);
  TORCH_CHECK(s.d_out >= 1, "omoe: B must have d_out >= 1");
  TORCH_CHECK(A.size(2) == s.d_in, "omoe: A is [E, r, d_in] with d_in=", A.size(2),
              " but x has d_in=", s.d_in);
  TORCH_CHECK(B.size(0) == s.E && B.size(2) == s.r, "omoe: B must be [E, d_out, r] = [", s.E,
              ", d_out, ", s.r, "], got ", B.sizes());
  TORCH_CHECK(router_weight.size(0) == s.E && router_weight.size(1) == s.d_in,
              "omoe: router_weight must be [E, d_in] = [", s.E, ", ", s.d_in, "], got ",
              router_weight.sizes());
  TORCH_CHECK(top_k >= 1 && top_k <= s.E, "omoe: top_k must be in [1, E=", s.E, "], got ",
              top_k);
  TORCH_CHECK(std::min(top_k, s.E) <= max_active_experts(x), "omoe: the compiled ops on ",
              x.device().type(), " take at most ", max_active_experts(x),
              " active experts (min(top_k, E)), got ", std::min(top_k, s.E),
              "; use backend='reference' or a smaller top_k");
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

Sizes check_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& router_weight,
                    const std::optional<at::Tensor>& router_input,
                    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
                    double eps) {
  const Sizes s = check_common(x, A, B, router_weight, router_input, top_k, eps);
  TORCH_CHECK(std::isfinite(scaling), "omoe: scaling must be finite, got ", scaling);
  if (base_out.has_value()) {
    TORCH_CHECK(
        base_out->dim() == 2 && base_out->size(0) == s.T && base_out->size(1) == s.d_out,
        "omoe: base_out must be [T, d_out] = [", s.T, ", ", s.d_out, "], got ",
        base_out->sizes());
    TORCH_CHECK(base_out->scalar_type() == x.scalar_type() && base_out->device() == x.device(),
                "omoe: base_out must match x's dtype and device");
  }
  return s;
}

Sizes check_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A,
                     const at::Tensor& B, const at::Tensor& router_weight,
                     const std::optional<at::Tensor>& router_input, const at::Tensor& h,
                     const at::Tensor& logits, double scaling, int64_t top_k, double eps) {
  const Sizes s = check_common(x, A, B, router_weight, router_input, top_k, eps);
  TORCH_CHECK(std::isfinite(scaling), "omoe: scaling must be finite, got ", scaling);
  const auto acc = accumulate_dtype(x);
  const int64_t er = s.E * s.r;
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.T && grad_y.size(1) == s.d_out,
              "omoe: grad_y must be [T, d_out] = [", s.T, ", ", s.d_out, "], got ",
              grad_y.sizes());
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
  return s;
}

at::Tensor packed_expand(const at::Tensor& B, at::ScalarType acc) {
  return B.permute({1, 0, 2}).reshape({B.size(1), B.size(0) * B.size(2)}).to(acc).contiguous();
}

namespace {

// ---- packed weights, and G (cached across calls while B is unchanged) ----------------

// [A_cat; W]: [E·r + E, d_in] in the accumulate dtype. Rows i·r + a are A[i, a, :], then
// the router's E rows: one GEMM gives h and the logits together.
at::Tensor packed_shrink(const at::Tensor& A, const at::Tensor& W, at::ScalarType acc) {
  return at::cat({A.reshape({A.size(0) * A.size(1), A.size(2)}).to(acc), W.to(acc)}, 0);
}

// Few tokens on the CPU run the expand and its gradients on B's own blocks
// (omoe_cpu_expand.h) unless B_cat is cached: a fresh B_cat is a strided copy of all of B
// (and dB_cat one back), which at a few tokens costs more than the GEMMs that read it.
// The loops cost more instructions per token than the GEMMs, but the copies are fresh
// memory (1 MiB at E·r = 256, d = 1024), paid for in page faults as well: timed, the
// loops are faster up to 8 tokens (bench/notes/call-cost.md).
constexpr int64_t kBlockExpandTokens = 8;
bool expand_on_blocks(const Sizes& s, const at::Tensor& x, const weight_cache::Found& found) {
  return x.is_cpu() && s.T <= kBlockExpandTokens && !found.B_cat.defined();
}

// t itself when it already is contiguous in dtype `acc` (no dispatch), else a copy.
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.is_contiguous() ? t : t.to(acc).contiguous();
}

// XᵀX for X = [n, R], exactly symmetric. On the CPU from R = 96 (from R = 192 with
// n >= 512 where the GEMMs have several threads: thin panels split worse than one GEMM),
// one GEMM per panel of kGramPanels column panels forms the panel's rows from its diagonal
// block on, 5/8 of the product, and the blocks above the diagonal are mirrored: 0.63-0.86x
// the time of one GEMM on one thread (bench/notes/cpu-gram-triangle.md).
constexpr int64_t kGramPanels = 4;
at::Tensor symmetric_gram(const at::Tensor& X) {
  const int64_t n = X.size(0), R = X.size(1);
  const bool panels = R >= 96 && (at::get_num_threads() == 1 || (R >= 192 && n >= 512));
  if (!X.is_cpu() || !panels) return at::mm(X.t(), X);
  at::Tensor G = at::empty({R, R}, X.options());
  const at::Tensor Xt = X.t();
  for (int64_t p = 0; p < kGramPanels; ++p) {
    const int64_t a = R * p / kGramPanels, b = R * (p + 1) / kGramPanels;
    at::Tensor block_row = G.narrow(0, a, b - a).narrow(1, a, R - a);
    at::mm_out(block_row, Xt.narrow(0, a, b - a), X.narrow(1, a, R - a));
    G.narrow(0, b, R - b).narrow(1, a, b - a).copy_(block_row.narrow(1, b - a, R - b).t());
  }
  return G;
}

// G = B_catᵀ B_cat in float64, [E·r, E·r]: the cached one when B is unchanged
// (omoe_weight_cache.h), else formed and kept. B_cat is made here when undefined.
at::Tensor gram_matrix(const at::Tensor& B, at::Tensor& B_cat,
                       const weight_cache::Found& found) {
  if (found.G.defined()) return found.G;
  if (!B_cat.defined()) B_cat = packed_expand(B, accumulate_dtype(B));  // B has x's dtype
  at::Tensor G = symmetric_gram(B_cat.to(at::kDouble));
  weight_cache::instance().remember(B, B_cat, G);
  return G;
}

// ---- choosing the route by cost (omoe_cpu_pass.h, docs/algorithm.md "Routes") ---------

// On the CPU the forward takes pairs or direct; the backward takes pairs, pairs_gemm or
// direct. batched (GH for all E² pairs, K = r GEMMs) is what the other devices take; on
// the CPU it runs only when forced (it tests the per-token code the GPU shares).
// direct_rows is the direct route on each token's active experts only (top-k), direct on
// all E (one batched GEMM per chunk: cheaper for a few tokens, where calls dominate).
enum class Route { kBatched, kPairs, kPairsGemm, kDirect, kDirectRows };

// G above this size is never formed: the direct route needs no G (docs/contract.md §4: no
// (E·r)² workspace at once).
constexpr double kMaxGramBytes = 512.0 * (1 << 20);
// A multiply-add of the scalar per-token loops costs about this many of a float64 GEMM's;
// one of the vectorized pair products about this many.
constexpr double kScalarCost = 4.0;
constexpr double kVectorCost = 1.0;
// A small batched float64 GEMM call costs about this many multiply-adds on its own, and
// far more when another process holds a core (its threads wait for each other): a few
// tokens are cheaper in the scalar pairs route than in any batched GEMM.
constexpr double kBatchedCallCost = 50000.0;
// The top-k direct route's GEMMs (one per expert, over its rows) are thin: r is their
// inner or outer dimension. One costs about kGemmCallCost on its own, and per row and
// output column about kGemmRowCost plus r multiply-adds at kFloat32GemmCost each in float32
// (twice the lanes), 1 in float64 (bench/notes/cpu-topk-direct.md).
constexpr double kGemmCallCost = 75000.0;
constexpr double kGemmRowCost = 12.0;
constexpr double kFloat32GemmCost = 0.5;
// The dense direct route: its float64 GEMMs batched over tokens are small (E × E outputs
// per token) and run below a large GEMM's speed, at about this many multiply-adds each;
// copying a value to float64 in another layout (e and de) at kCopyCost
// (bench/notes/cpu-dense-direct-gemm.md).
constexpr double kSmallGemmCost = 2.0;
constexpr double kCopyCost = 1.0;

// Dense routing where S (E² per token) is at least as large as forming e (E·r per token),
// i.e. E >= r: below that the float64 copy of e and the GEMM calls cost more than the
// per-token loops save. Up to cpu::kTiledRows rows the loops convert each row once per chunk
// and work on tiles of pairs, and they beat the copy and the GEMMs wherever the direct route
// runs (bench/notes/cpu-direct-row-tiles.md).
bool dense_S_outweighs_e(const Sizes& s, int64_t k) { return k == s.E && s.E >= s.r; }

// Whether the direct route forms S and de by those batched GEMMs.
bool batched_direct_gram(const Sizes& s, int64_t k) {
  return dense_S_outweighs_e(s, k) && s.E > cpu::kTiledRows;
}

// What a multiply-add of the direct route's S and de loops costs, counted over all k² pairs.
// Where they take the place of the batched GEMMs they were measured faster than those GEMMs,
// so they are priced as the GEMMs' multiply-adds without the copy and the calls; elsewhere
// at kScalarCost, the price the route choices there were measured against.
double direct_loop_cost(const Sizes& s, int64_t k) {
  return dense_S_outweighs_e(s, k) && s.E <= cpu::kTiledRows ? kSmallGemmCost : kScalarCost;
}

// Reading a 4-byte value a call finds out of cache (a layer's weights, between calls)
// costs about this many multiply-adds: a few tokens' no-grad forward is bound by what it
// reads (bench/notes/call-cost.md).
constexpr double kReadCost = 3.0;

// OMOE_ROUTE=batched|pairs|pairs_gemm|direct|direct_all forces a route on the CPU (tests
// run every route); pairs_gemm forces pairs on the forward; direct takes the active rows
// under top-k, direct_all all E experts.
Route forced_route(Route chosen, bool backward) {
  const char* env = std::getenv("OMOE_ROUTE");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return chosen;
  if (std::strcmp(env, "batched") == 0) return Route::kBatched;
  if (std::strcmp(env, "pairs") == 0) return Route::kPairs;
  if (std::strcmp(env, "pairs_gemm") == 0) return backward ? Route::kPairsGemm : Route::kPairs;
  if (std::strcmp(env, "direct") == 0) return Route::kDirectRows;
  if (std::strcmp(env, "direct_all") == 0) return Route::kDirect;
  TORCH_CHECK(
      false,
      "omoe: OMOE_ROUTE must be auto, batched, pairs, pairs_gemm, direct or direct_all, "
      "got '",
      env, "'");
}

// What one pass costs by each route, counted in float64 multiply-adds. gram_free: G costs
// nothing here (cached, or worth caching because the weights will be reused). float32: h
// is float32, so the top-k direct route's GEMMs run in float32. B_cat (dG + dGᵀ) is a
// GEMM in h's dtype, but priced as a float64 one: at a few tokens the calls and copies
// around it, which the count leaves out, outweigh what float32 saves (timed at T = 16,
// E = 4, r = 16, d = 256: the direct route 0.63 ms, through G 0.69 ms).
struct PassCosts {
  double pairs, pairs_gemm, direct, direct_rows;
  double through_g(bool backward) const {
    return backward ? std::min(pairs, pairs_gemm) : pairs;
  }
  double direct_best() const { return std::min(direct, direct_rows); }
};
PassCosts pass_costs(const Sizes& s, int64_t k, bool backward, bool gram_free, bool float32) {
  const double T = double(s.T), R = double(s.E * s.r), d = double(s.d_out), r = double(s.r);
  const double E = double(s.E), kk = double(k) * double(k);
  PassCosts c;
  // G once (unless free), and B_cat (dG + dGᵀ) in the backward. G is counted whole even
  // where symmetric_gram forms only its upper block triangle: counted at 5/8, the route
  // through G wins T = 512, E = 16, r = 64 dense on paper and loses to the direct route by
  // 1.4x timed, where the count prices the per-pair work below its cost.
  const double gram_fixed = (gram_free ? 0.0 : d * R * R) + (backward ? d * R * R : 0.0);
  // S for the k(k+1)/2 active pairs (vectorized), in the forward and again in the backward.
  const double pair_gram = kVectorCost * T * 0.5 * kk * r * r;
  c.pairs =
      gram_fixed + pair_gram +
      (backward ? kScalarCost * 2.0 * T * kk * r * r + double(at::get_num_threads()) * R * R
                : 0.0);
  // W (T·E·R values), then dh and dG + dGᵀ by two batched GEMMs (T·R² each) per chunk.
  c.pairs_gemm = gram_fixed + pair_gram + T * E * R + 2.0 * T * R * R +
                 2.0 * kBatchedCallCost * std::ceil(T * E * R * 8.0 / (4 << 20));
  // The direct route's GEMMs: e_i = B_i h_i, and in the backward dh_i and dB_i. direct: all
  // E experts by batched GEMMs; direct_rows (top-k): each token's k active ones, by a GEMM
  // per expert with tokens, after routing every token ahead.
  const double gemm_passes = backward ? 3.0 : 1.0;
  // S (and in the backward dS): dense routing with E > kTiledRows and E >= r by float64
  // batched GEMMs over all E² pairs, S and again S and de in the backward, after copying e
  // to float64 (and de back); otherwise by the per-token loops over the k² active pairs.
  const double gram_passes = backward ? 2.0 : 1.0;
  const double dense_chunks = std::ceil(T * E * d * 24.0 / (4 << 20));
  const double rest =
      (batched_direct_gram(s, k)
           ? gram_passes * (kSmallGemmCost * T * kk * d + kCopyCost * T * E * d +
                            kBatchedCallCost * dense_chunks)
           : direct_loop_cost(s, k) * gram_passes * T * kk * d) +
      R * d /* B in float64 */;
  c.direct = gemm_passes * (T * R * d + kBatchedCallCost) + rest;
  if (k == s.E) {
    c.direct_rows = c.direct;
    return c;
  }
  const double row_gemm =
      T * double(k) * d * (kGemmRowCost + (float32 ? kFloat32GemmCost : 1.0) * r) +
      std::min(E, T * double(k)) * kGemmCallCost;
  c.direct_rows = gemm_passes * row_gemm + T * E * double(k) + rest;
  // Under top-k the expand differs too. The other routes run it on B_cat over all E·r
  // columns: Y = s·Z B_catᵀ, and in the backward dZ and dB_cat, with B_cat packed (or
  // checked against the cache) and dB_cat unpacked. direct_rows forms Y from its e in
  // float64 sums, and dZ and dB on the active rows (omoe_cpu_topk.h).
  const double gemm = float32 ? kFloat32GemmCost : 1.0;
  const double through_b_cat =
      (backward ? 2.0 : 1.0) * gemm * T * R * d + (backward ? 2.0 : 1.0) * kCopyCost * d * R;
  const double on_rows = backward ? 2.0 * row_gemm + T * double(k) * d : T * double(k) * d;
  c.pairs += through_b_cat;
  c.pairs_gemm += through_b_cat;
  c.direct += through_b_cat;
  c.direct_rows += on_rows;
  return c;
}

// The cheapest route for one pass. A forward with G not at hand is chosen for the training
// step, forward and backward together: a forward that takes the direct route leaves no G
// for the backward, so a backward through G would pay for G anyway. A backward with G not
// at hand follows a forward that is already paid for (the direct route, or y from the
// expert outputs): it weighs its own costs, G's included.
Route choose_route(const Sizes& s, int64_t k, bool backward, bool gram_free, bool on_cpu,
                   bool float32) {
  const double R = double(s.E * s.r);
  const bool gram_fits = R * R * 8.0 <= kMaxGramBytes;
  if (!on_cpu) {
    TORCH_CHECK(gram_fits, "omoe: G = B_catᵀB_cat would take ", R * R * 8.0 / (1 << 20),
                " MiB (E·r = ", s.E * s.r, "); the compiled ops on this device bound it at ",
                kMaxGramBytes / (1 << 20), " MiB: use backend='reference' or a smaller E·r");
    return Route::kBatched;
  }
  const PassCosts c = pass_costs(s, k, backward, gram_free, float32);
  bool direct = c.direct_best() < c.through_g(backward);
  if (!gram_free && !backward) {  // c is this forward's costs
    // And only where the backward, with G to form, would take the direct route too: a
    // backward through G after a direct forward packs B_cat and forms G itself, which the
    // counts here price below what it costs (bench/notes/cpu-topk-direct.md).
    const PassCosts b = pass_costs(s, k, true, true, float32);
    const PassCosts b_no_g = pass_costs(s, k, true, false, float32);
    direct = c.direct_best() + b_no_g.direct_best() < c.through_g(false) + b.through_g(true) &&
             b_no_g.direct_best() < b_no_g.through_g(true);
  }
  Route best = !gram_fits || direct
                   ? (c.direct_rows < c.direct ? Route::kDirectRows : Route::kDirect)
                   : (backward && c.pairs_gemm < c.pairs ? Route::kPairsGemm : Route::kPairs);
  best = forced_route(best, backward);
  if (best != Route::kDirect && best != Route::kDirectRows)
    TORCH_CHECK(gram_fits, "omoe: OMOE_ROUTE asks for G = B_catᵀB_cat, which would take ",
                R * R * 8.0 / (1 << 20), " MiB (E·r = ", s.E * s.r, ")");
  return best;
}

double x_bytes(at::ScalarType t) { return double(c10::elementSize(t)); }

// The direct forward's workspace per token with `rows` expert outputs each: e, budgeted at
// 8 bytes a value, or, when S comes from the batched GEMM, e, its float64 copy and S.
double direct_bytes_per_token(const Sizes& s, at::ScalarType acc, int64_t rows,
                              bool batched_S) {
  return batched_S ? (x_bytes(acc) + 8.0) * rows * s.d_out + 8.0 * s.E * s.E
                   : 8.0 * rows * s.d_out;
}

// A forward on the CPU that forms y from the expert outputs: e_i = B_i h_i for every
// expert, S and the MGS from e, then y = base + s·Σ_i a_i e_i. It reads A, W and B once, as
// a LoRA does, and touches no weight cache; the cheapest route through G, even with G
// cached, reads B against the cache's record to know G is current, then G, then B_cat in the
// expand. Few tokens (decoding) take it; a route forced by OMOE_ROUTE, but direct_all,
// turns it off. Forming e is a GEMM of inner dimension r, priced per output as the top-k
// direct route's thin GEMMs. S comes from the batched GEMM (batched_direct_gram) only
// where that costs less than the per-token loops: the call alone outweighs a few tokens'.
// Each side pays kReadCost for what it reads: B once, against B and the cache's record of
// it (the compare: B_cat, or a copy of B), G (float64) and B_cat.
ExpertOutputsRoute plan_from_expert_outputs(const Sizes& s, int64_t k, bool float32) {
  if (forced_route(Route::kDirect, /*backward=*/false) != Route::kDirect) return {};
  const double T = double(s.T), R = double(s.E * s.r), d = double(s.d_out), E = double(s.E);
  const double kk = double(k) * double(k), r = double(s.r);
  const double e = T * E * d * (kGemmRowCost + (float32 ? kFloat32GemmCost : 1.0) * r);
  const double loops = direct_loop_cost(s, k) * T * kk * d;
  const double batched =
      batched_direct_gram(s, k)
          ? kSmallGemmCost * T * kk * d + kCopyCost * T * E * d + kBatchedCallCost
          : loops;
  const double from_e = kReadCost * d * R + e + std::min(loops, batched) + T * E * d;
  const double through_cached_g =
      kReadCost * (3.0 * d * R + 2.0 * R * R) + kVectorCost * T * 0.5 * kk * r * r + T * R * d;
  return {from_e < through_cached_g, batched < loops};
}

// Tokens per chunk so that a chunk's float64 workspace stays near `budget` bytes.
int64_t chunk_tokens(int64_t T, double bytes_per_token, double budget) {
  return std::clamp<int64_t>(int64_t(budget / std::max(bytes_per_token, 1.0)), 1,
                             std::max<int64_t>(T, 1));
}
// CPU: chunks that stay in cache; other devices: only what memory needs.
constexpr double kCpuChunkBudget = 4.0 * (1 << 20);
double chunk_budget(const at::Tensor& x) {
  return x.is_cpu() ? kCpuChunkBudget : 1024.0 * (1 << 20);
}

// t.narrow(dim, start, n), or t itself when that is all of it (one chunk: no dispatch).
at::Tensor part(const at::Tensor& t, int64_t dim, int64_t start, int64_t n) {
  return start == 0 && n == t.size(dim) ? t : t.narrow(dim, start, n);
}

// h ([T, E·r], contiguous) as expert blocks, [E, T, r] (a transposed view), for the
// batched GEMMs below; in float64 for the routes through G.
at::Tensor expert_blocks(const at::Tensor& h, int64_t E, int64_t r) {
  return h.view({-1, E, r}).transpose(0, 1);
}
at::Tensor expert_blocks64(const at::Tensor& h, int64_t E, int64_t r) {
  return expert_blocks(h.to(at::kDouble), E, r);
}

// The direct route under dense routing: e ([E, n, d_out], expert-major) as float64
// [n, E, d_out], so that a token's S = e eᵀ and de = (dS + dSᵀ) e are GEMMs batched over
// the tokens (d_out as the inner dimension of S), summed in float64 as the per-token loops.
at::Tensor token_major64(const at::Tensor& e) {
  at::Tensor out = at::empty({e.size(1), e.size(0), e.size(2)}, e.options().dtype(at::kDouble));
  out.copy_(e.transpose(0, 1));
  return out;
}
at::Tensor direct_gram(const at::Tensor& e64) { return at::bmm(e64, e64.transpose(1, 2)); }

// The direct route's expert outputs e ([E, n, d_out]) of tokens [t0, t0 + n) of h ([T, E·r],
// contiguous), B: [E, d_out, r] in h's dtype. For a few tokens on the CPU, a loop over B's
// rows: a batched GEMM with a row or two per batch costs several times it (at T = 1, E = 8,
// r = 4: 174 k instructions against about 30 k).
at::Tensor expert_outputs(const at::Tensor& h, int64_t t0, int64_t n, const at::Tensor& B) {
  if (h.is_cpu() && n <= cpu::kExpertOutputTokens)
    return cpu::expert_outputs(h, t0, n, contiguous_as(B, h.scalar_type()));
  return at::bmm(part(expert_blocks(h, B.size(0), B.size(2)), 1, t0, n), B.transpose(1, 2));
}

// The forward from the expert outputs (expert_outputs_route): y ([T, d_out], written) =
// base + scaling·Σ_i a_i e_i, z ([T, E·r]) the pass's. B: [E, d_out, r] and base ([T,
// d_out] or undefined) in h's dtype, contiguous.
void forward_from_expert_outputs(const at::Tensor& h, const at::Tensor& logits,
                                 const at::Tensor& B, const at::Tensor& base, double scaling,
                                 int64_t top_k, bool normalize, double eps, bool batched_S,
                                 at::Tensor& z, at::Tensor& y) {
  RECORD_FUNCTION("omoe::direct", std::vector<c10::IValue>());
  const int64_t T = h.size(0), E = B.size(0), d_out = B.size(1), r = B.size(2);
  const at::Tensor e = expert_outputs(h, 0, T, B);  // [E, T, d_out]
  const at::Tensor S = batched_S ? direct_gram(token_major64(e)) : at::Tensor();
  const at::Tensor a = at::empty({T, E}, h.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "omoe_direct", [&] {
    cpu::DirectRoute<scalar_t> route{e.data_ptr<scalar_t>(), nullptr, T, d_out, int(E)};
    if (S.defined()) route.S = S.data_ptr<double>();
    cpu::token_forward_pass(h, logits, route, E, r, top_k, true, normalize, eps, z,
                            a.data_ptr<double>());
    cpu::mix_expert_outputs(e.data_ptr<scalar_t>(), a.data_ptr<double>(), T, E, d_out,
                            base.defined() ? base.data_ptr<scalar_t>() : nullptr, scaling,
                            y.data_ptr<scalar_t>(), d_out);
  });
}

// The pairs route's Gram source over the tokens of h (a chunk); dG, dG_scratch and W as in
// PairRoute. Dense routing with few experts forms S ahead, a block of tokens per read of G.
template <typename scalar_t>
cpu::PairRoute<scalar_t> pair_route(const at::Tensor& G, const at::Tensor& h, const Sizes& s,
                                    int64_t k, double* dG, double* dG_scratch, double* W,
                                    at::Tensor& S_blocks) {
  cpu::PairRoute<scalar_t> route{G.data_ptr<double>(),
                                 h.data_ptr<scalar_t>(),
                                 dG,
                                 dG_scratch,
                                 W,
                                 h.size(0),
                                 s.E * s.r,
                                 int(s.E),
                                 int(s.r)};
  if (k == s.E && s.E <= kMaxExperts) {
    if (!S_blocks.defined())
      S_blocks = at::empty({cpu::pass_threads(), cpu::kTokensPerTask, s.E, s.E}, G.options());
    route.S_blocks = S_blocks.data_ptr<double>();
  }
  return route;
}

// The CPU batched pass, in the shape omoe_ops.h's function pointers have.
void token_forward_cpu(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& GH,
                       int64_t E, int64_t r, int64_t top_k, bool orthogonalize, bool normalize,
                       double eps, at::Tensor& z) {
  const cpu::GhRoute route{orthogonalize ? GH.data_ptr<double>() : nullptr, nullptr, h.size(0),
                           int(E), int(r)};
  cpu::token_forward_pass(h, logits, route, E, r, top_k, orthogonalize, normalize, eps, z);
}

void token_backward_cpu(const at::Tensor& h, const at::Tensor& logits, const at::Tensor& GH,
                        const at::Tensor& dz, int64_t E, int64_t r, int64_t top_k,
                        bool orthogonalize, bool normalize, double eps, at::Tensor& z,
                        at::Tensor& dh, at::Tensor& dlogits, at::Tensor& dg_lhs) {
  const cpu::GhRoute route{orthogonalize ? GH.data_ptr<double>() : nullptr,
                           orthogonalize ? dg_lhs.data_ptr<double>() : nullptr, h.size(0),
                           int(E), int(r)};
  cpu::token_backward_pass(h, logits, route, dz, E, r, top_k, orthogonalize, normalize, eps, z,
                           dh, dlogits);
}

}  // namespace

// Priced as float64: a segment this sends to omoe::forward prices its own dtype there.
bool forward_prefers_gram(const Sizes& s, int64_t k) {
  const Route route =
      choose_route(s, k, /*backward=*/false, /*gram_free=*/true, /*on_cpu=*/true,
                   /*float32=*/false);
  return route != Route::kDirect && route != Route::kDirectRows;
}

ExpertOutputsRoute expert_outputs_route(const Sizes& s, int64_t k, at::ScalarType acc) {
  const ExpertOutputsRoute plan = plan_from_expert_outputs(s, k, acc == at::kFloat);
  // y is summed from the whole of e: one chunk.
  if (plan.taken && chunk_tokens(s.T, direct_bytes_per_token(s, acc, s.E, plan.batched_S),
                                 kCpuChunkBudget) < s.T)
    return {};
  return plan;
}

// ---- device-generic orchestration -----------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const std::optional<at::Tensor>& base_out, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, TokenForwardFn token_forward) {
  // The GEMMs below choose their own precision; an enclosing autocast region must not
  // recast them (their outputs feed float32/float64 buffers).
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Sizes s =
      check_forward(x, A, B, router_weight, router_input, base_out, scaling, top_k, eps);
  const auto acc = accumulate_dtype(x);
  const int64_t er = s.E * s.r, k = std::min(top_k, s.E);
  const at::Tensor xc = x.to(acc).contiguous();
  at::Tensor h, logits;
  {
    RECORD_FUNCTION("omoe::shrink", std::vector<c10::IValue>());
    if (x.is_cpu() && s.T <= cpu::kDotRows &&
        in_dtype_and_contiguous({&A, &router_weight}, acc)) {
      const at::Tensor ri =
          router_input.has_value() ? router_input->to(acc).contiguous() : at::Tensor();
      h = at::empty({s.T, er}, xc.options());
      logits = at::empty({s.T, s.E}, xc.options());
      AT_DISPATCH_FLOATING_TYPES(acc, "omoe_shrink_rows", [&] {
        cpu::shrink_rows(xc.data_ptr<scalar_t>(),
                         ri.defined() ? ri.data_ptr<scalar_t>() : nullptr, s.T, s.d_in,
                         A.data_ptr<scalar_t>(), er, router_weight.data_ptr<scalar_t>(), s.E,
                         h.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>());
      });
    } else if (s.T < er + s.E) {
      // Few tokens: two GEMMs read x twice, which costs less than packing [A_cat; W].
      h = at::mm(xc, A.reshape({er, s.d_in}).to(acc).t());
      logits = at::mm(router_input.has_value() ? router_input->to(acc) : xc,
                      router_weight.to(acc).t());
    } else if (!router_input.has_value()) {
      // Shrink and router logits in one pass over x.
      const at::Tensor both = at::mm(xc, packed_shrink(A, router_weight, acc).t());
      h = both.narrow(1, 0, er).contiguous();
      logits = both.narrow(1, er, s.E).contiguous();
    } else {
      h = at::mm(xc, A.reshape({er, s.d_in}).to(acc).t());
      logits = at::mm(router_input->to(acc), router_weight.to(acc).t());
    }
  }
  const ExpertOutputsRoute from_e = x.is_cpu() && s.T > 0 && orthogonalize
                                        ? expert_outputs_route(s, k, acc)
                                        : ExpertOutputsRoute{};
  if (from_e.taken) {
    at::Tensor z = at::empty_like(h), y = at::empty({s.T, s.d_out}, h.options());
    forward_from_expert_outputs(
        h, logits, contiguous_as(B, acc),
        base_out.has_value() ? contiguous_as(*base_out, acc) : at::Tensor(), scaling, top_k,
        normalize, eps, from_e.batched_S, z, y);
    return {y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type()), h, logits};
  }
  // B used unchanged by an earlier call means the weights are being reused (inference,
  // decoding): B_cat and G are then kept, and G is worth forming even when this one call
  // would not pay for it. (Grad mode cannot tell: autograd runs forwards with it off.)
  const weight_cache::Found found = weight_cache::instance().find(B);
  const bool routed = s.T > 0 && orthogonalize;  // a route forms S
  const Route route =
      routed ? choose_route(s, k, /*backward=*/false, found.seen, x.is_cpu(), acc == at::kFloat)
             : Route::kDirect;
  if (routed && route == Route::kDirectRows && k < s.E) {
    // y from each token's active experts' outputs: no B_cat, no expand GEMM over E·r.
    RECORD_FUNCTION("omoe::direct", std::vector<c10::IValue>());
    at::Tensor z = at::empty_like(h), y = at::empty({s.T, s.d_out}, h.options());
    const int64_t tc =
        chunk_tokens(s.T, direct_bytes_per_token(s, acc, k, false), chunk_budget(x));
    cpu::topk_direct_forward(
        h, logits, contiguous_as(B, acc),
        base_out.has_value() ? contiguous_as(*base_out, acc) : at::Tensor(), scaling, top_k,
        normalize, eps, tc, z, y);
    if (!found.seen) weight_cache::instance().remember(B, at::Tensor());
    return {y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type()), h, logits};
  }
  const bool on_blocks = expand_on_blocks(s, x, found);
  at::Tensor B_cat = found.B_cat.defined() || on_blocks ? found.B_cat : packed_expand(B, acc);
  at::Tensor z = at::empty_like(h);
  bool gram_formed = false;  // gram_matrix then remembered B with its G
  if (s.T > 0 && !orthogonalize) {
    RECORD_FUNCTION("omoe::orthogonalize", std::vector<c10::IValue>());
    token_forward(h, logits, at::Tensor(), s.E, s.r, top_k, false, normalize, eps, z);
  } else if (routed) {
    if (route == Route::kDirect || route == Route::kDirectRows) {
      RECORD_FUNCTION("omoe::direct", std::vector<c10::IValue>());
      const at::Tensor Bt = B.to(acc).transpose(1, 2);  // [E, r, d_out], a view for fp32
      // Every expert's e (top-k on its active rows returned above).
      const bool batched_S = batched_direct_gram(s, k);
      const int64_t tc =
          chunk_tokens(s.T, direct_bytes_per_token(s, acc, s.E, batched_S), chunk_budget(x));
      for (int64_t t0 = 0; t0 < s.T; t0 += tc) {
        const int64_t n = std::min(tc, s.T - t0);
        const at::Tensor e = expert_outputs(h, t0, n, Bt.transpose(1, 2));
        const at::Tensor S = batched_S ? direct_gram(token_major64(e)) : at::Tensor();
        at::Tensor zc = part(z, 0, t0, n);
        AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "omoe_direct", [&] {
          cpu::DirectRoute<scalar_t> route{e.data_ptr<scalar_t>(), nullptr, n, s.d_out,
                                           int(s.E)};
          if (S.defined()) route.S = S.data_ptr<double>();
          cpu::token_forward_pass(part(h, 0, t0, n), part(logits, 0, t0, n), route, s.E, s.r,
                                  top_k, true, normalize, eps, zc);
        });
      }
    } else {
      at::Tensor G;
      {
        RECORD_FUNCTION("omoe::gram", std::vector<c10::IValue>());
        G = gram_matrix(B, B_cat, found);
        gram_formed = !found.G.defined();
      }
      at::Tensor S_blocks;  // pair_route's, when it forms S ahead
      if (route == Route::kPairs) {
        RECORD_FUNCTION("omoe::pairs", std::vector<c10::IValue>());
        AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_pairs", [&] {
          cpu::token_forward_pass(
              h, logits, pair_route<scalar_t>(G, h, s, k, nullptr, nullptr, nullptr, S_blocks),
              s.E, s.r, top_k, true, normalize, eps, z);
        });
      } else {
        // GH = (G_ij h_j) for every pair, a chunk of tokens at a time.
        RECORD_FUNCTION("omoe::batched", std::vector<c10::IValue>());
        const at::Tensor h_blocks64 = expert_blocks64(h, s.E, s.r);
        const at::Tensor G_rows = G.view({s.E, s.r, er});
        const int64_t tc = chunk_tokens(s.T, 8.0 * s.E * er, chunk_budget(x));
        for (int64_t t0 = 0; t0 < s.T; t0 += tc) {
          const int64_t n = std::min(tc, s.T - t0);
          const at::Tensor GH = at::bmm(h_blocks64.narrow(1, t0, n), G_rows);  // [E, n, E·r]
          at::Tensor zc = z.narrow(0, t0, n);
          token_forward(h.narrow(0, t0, n), logits.narrow(0, t0, n), GH, s.E, s.r, top_k, true,
                        normalize, eps, zc);
        }
      }
    }
  }
  // Remember B (with B_cat when made here) unless gram_matrix did.
  if (!gram_formed && (!found.seen || (B_cat.defined() && !found.B_cat.defined())))
    weight_cache::instance().remember(B, B_cat);
  RECORD_FUNCTION("omoe::expand", std::vector<c10::IValue>());
  if (!B_cat.defined()) {
    at::Tensor y = at::empty({s.T, s.d_out}, h.options());
    cpu::expand_blocks(z, contiguous_as(B, acc),
                       base_out.has_value() ? contiguous_as(*base_out, acc) : at::Tensor(),
                       scaling, y);
    return {y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type()), h, logits};
  }
  // addmm skips the product when alpha is 0, which would hide a NaN in z or B_cat.
  at::Tensor y = base_out.has_value() && scaling != 0.0
                     ? at::addmm(base_out->to(acc), z, B_cat.t(), /*beta=*/1, /*alpha=*/scaling)
                     : at::mm(z, B_cat.t()).mul_(scaling);
  if (base_out.has_value() && scaling == 0.0) y.add_(base_out->to(acc));
  return {y.to(x.scalar_type()), h, logits};
}

namespace {

// The shrink's gradients from dh and dlogits: dx, dA ([E·r, d_in]), dW and d router_input
// (empty unless the router reads its own input), in the accumulate dtype but the last.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shrink_backward(
    const at::Tensor& x, const at::Tensor& xc, const at::Tensor& A,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& dh, const at::Tensor& dlogits, const Sizes& s, at::ScalarType acc) {
  const int64_t er = s.E * s.r;
  RECORD_FUNCTION("omoe::shrink_backward", std::vector<c10::IValue>());
  at::Tensor grad_x, grad_A, grad_W, grad_router_input;
  if (router_input.has_value() || s.T < er + s.E) {
    // Separate GEMMs: no packed [A_cat; W] (few tokens, or the router reads its own input).
    const at::Tensor A_cat = A.reshape({er, s.d_in}).to(acc), W = router_weight.to(acc);
    grad_A = at::mm(dh.t(), xc);
    grad_x = at::mm(dh, A_cat);
    if (router_input.has_value()) {
      grad_W = at::mm(dlogits.t(), router_input->to(acc));
      grad_router_input = at::mm(dlogits, W).to(x.scalar_type());
    } else {
      grad_W = at::mm(dlogits.t(), xc);
      grad_x.addmm_(dlogits, W);
      grad_router_input = at::empty({0}, x.options());
    }
  } else {
    const at::Tensor AW = packed_shrink(A, router_weight, acc);
    // The router reads x too: [dA; dW] = [dh, dl]ᵀ x and dx = [dh, dl] [A_cat; W].
    const at::Tensor dh_dl = at::cat({dh, dlogits}, 1);
    const at::Tensor dAW = at::mm(dh_dl.t(), xc);
    grad_A = dAW.narrow(0, 0, er);
    grad_W = dAW.narrow(0, er, s.E).clone();  // outputs must not alias each other
    grad_x = at::mm(dh_dl, AW);
    grad_router_input = at::empty({0}, x.options());
  }
  return {grad_x, grad_A, grad_W, grad_router_input};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& router_weight, const std::optional<at::Tensor>& router_input,
    const at::Tensor& h, const at::Tensor& logits, double scaling, int64_t top_k,
    bool orthogonalize, bool normalize, double eps, TokenBackwardFn token_backward) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const Sizes s = check_backward(grad_y, x, A, B, router_weight, router_input, h, logits,
                                 scaling, top_k, eps);
  const auto acc = accumulate_dtype(x);
  const int64_t er = s.E * s.r, k = std::min(top_k, s.E);

  const at::Tensor xc = x.to(acc).contiguous();
  const at::Tensor hc = h.contiguous(), lc = logits.contiguous();
  const auto outputs = [&](const at::Tensor& dh, const at::Tensor& dlogits,
                           const at::Tensor& grad_B) {
    auto [grad_x, grad_A, grad_W, grad_router_input] =
        shrink_backward(x, xc, A, router_weight, router_input, dh, dlogits, s, acc);
    const auto dt = x.scalar_type();
    return std::make_tuple(grad_x.to(dt), grad_A.reshape({s.E, s.r, s.d_in}).to(dt),
                           grad_B.to(dt), grad_W.to(dt), grad_router_input);
  };
  // The top-k direct route reads neither B_cat nor G: where the model takes it even with G
  // cached, B is not looked up (the lookup compares all of B).
  const bool routed = s.T > 0 && orthogonalize;
  const bool active_rows_anyway =
      routed && k < s.E &&
      choose_route(s, k, /*backward=*/true, /*gram_free=*/true, x.is_cpu(),
                   acc == at::kFloat) == Route::kDirectRows;
  const weight_cache::Found found =
      active_rows_anyway ? weight_cache::Found{} : weight_cache::instance().find(B);
  const Route route = !routed ? Route::kDirect
                      : active_rows_anyway
                          ? Route::kDirectRows
                          : choose_route(s, k, /*backward=*/true, found.G.defined(), x.is_cpu(),
                                         acc == at::kFloat);
  if (routed && route == Route::kDirectRows && k < s.E) {
    // dz and dB on each token's active experts: no B_cat, no expand GEMMs over E·r.
    at::Tensor z = at::empty_like(hc), dh = at::empty_like(hc), dlogits = at::empty_like(lc);
    at::Tensor dB;
    {
      RECORD_FUNCTION("omoe::direct_backward", std::vector<c10::IValue>());
      // The forward's workspace three times: e, de and dY's rows by slot.
      const int64_t tc =
          chunk_tokens(s.T, 3.0 * direct_bytes_per_token(s, acc, k, false), chunk_budget(x));
      dB = cpu::topk_direct_backward(hc, lc, contiguous_as(grad_y, acc), scaling,
                                     contiguous_as(B, acc), top_k, normalize, eps, tc, z, dh,
                                     dlogits);
    }
    return outputs(dh, dlogits, dB);
  }
  // on_blocks: B_cat stays undefined unless a route through G needs it (gram_matrix), and
  // dB is formed in B's layout as dB_direct.
  const bool on_blocks = expand_on_blocks(s, x, found);
  at::Tensor B_cat = found.B_cat.defined() || on_blocks ? found.B_cat : packed_expand(B, acc);
  const at::Tensor Bb = on_blocks ? contiguous_as(B, acc) : at::Tensor();
  const at::Tensor dY = contiguous_as(grad_y, acc);

  at::Tensor dz;
  {
    RECORD_FUNCTION("omoe::expand_backward_input", std::vector<c10::IValue>());
    if (on_blocks) {
      dz = at::empty({s.T, er}, hc.options());
      cpu::rows_times_blocks(dY, 0, Bb, dz, s.T, scaling, /*accumulate=*/false);
    } else {
      dz = at::mm(dY, B_cat).mul_(scaling);
    }
  }
  at::Tensor z = at::empty_like(hc), dh = at::empty_like(hc), dlogits = at::empty_like(lc);
  // What the Gram part adds to dB_cat once dB_cat = s·dYᵀZ exists: B_cat (dG + dGᵀ) for the
  // routes through G; for the direct route Σ_t de_i h_iᵀ, kept in B's layout [E, d_out, r].
  at::Tensor dG_sym, dB_cat, dB_direct;
  cpu::OuterArgs de_term;  // on_blocks, one chunk: Σ_t de_i h_iᵀ, summed with s·dYᵀz_i
  if (s.T > 0 && !orthogonalize) {
    RECORD_FUNCTION("omoe::orthogonalize_backward", std::vector<c10::IValue>());
    at::Tensor none;
    token_backward(hc, lc, at::Tensor(), dz, s.E, s.r, top_k, false, normalize, eps, z, dh,
                   dlogits, none);
  } else if (routed) {
    if (route == Route::kDirect || route == Route::kDirectRows) {
      RECORD_FUNCTION("omoe::direct_backward", std::vector<c10::IValue>());
      const at::Tensor Ba = on_blocks ? Bb : B.to(acc);  // [E, d_out, r], no copy for fp32
      // Every expert's e (top-k on its active rows returned above). The forward's workspace
      // twice: e and de (dense: their float64 forms, S, dS + dSᵀ).
      const int64_t tc = chunk_tokens(
          s.T, 2.0 * direct_bytes_per_token(s, acc, s.E, batched_direct_gram(s, k)),
          chunk_budget(x));
      for (int64_t t0 = 0; t0 < s.T; t0 += tc) {
        const int64_t n = std::min(tc, s.T - t0);
        const at::Tensor hb = part(expert_blocks(hc, s.E, s.r), 1, t0, n);  // [E, n, r]
        const at::Tensor e = expert_outputs(hc, t0, n, Ba);                 // [E, n, d_out]
        at::Tensor de = at::empty_like(e);
        // Dense: S and then de = (dS + dSᵀ)·e by float64 batched GEMMs over the tokens.
        const at::Tensor e64 = batched_direct_gram(s, k) ? token_major64(e) : at::Tensor();
        const at::Tensor S = e64.defined() ? direct_gram(e64) : at::Tensor();
        const at::Tensor C = e64.defined() ? at::empty_like(S) : at::Tensor();
        at::Tensor zc = part(z, 0, t0, n), dhc = part(dh, 0, t0, n),
                   dlc = part(dlogits, 0, t0, n);
        AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "omoe_direct_backward", [&] {
          cpu::DirectRoute<scalar_t> route{e.data_ptr<scalar_t>(), de.data_ptr<scalar_t>(), n,
                                           s.d_out, int(s.E)};
          if (e64.defined()) {
            route.S = S.data_ptr<double>();
            route.C = C.data_ptr<double>();
          }
          cpu::token_backward_pass(part(hc, 0, t0, n), part(lc, 0, t0, n), route,
                                   part(dz, 0, t0, n), s.E, s.r, top_k, true, normalize, eps,
                                   zc, dhc, dlc);
        });
        if (e64.defined()) de.copy_(at::bmm(C, e64).transpose(0, 1));
        // dh_i += B_iᵀ de_i; Σ_t de_i h_iᵀ straight into B's layout (no per-expert GEMMs,
        // no permuted copy of dB at the end).
        if (on_blocks) {
          cpu::rows_times_blocks(de, n * s.d_out, Ba, dhc, n, 1.0, /*accumulate=*/true);
          const cpu::OuterArgs term{de, part(hc, 0, t0, n), n * s.d_out, 1.0};
          if (n == s.T) {
            de_term = term;
          } else {
            if (!dB_direct.defined()) dB_direct = at::empty_like(Ba);
            cpu::outer_blocks(dB_direct, /*accumulate=*/t0 > 0, n, term);
          }
        } else {
          dhc.view({n, s.E, s.r}).add_(at::bmm(de, Ba).transpose(0, 1));
          if (!dB_direct.defined()) dB_direct = at::bmm(de.transpose(1, 2), hb);
          else dB_direct.baddbmm_(de.transpose(1, 2), hb);
        }
      }
    } else {
      at::Tensor G;
      {
        RECORD_FUNCTION("omoe::gram_recompute", std::vector<c10::IValue>());
        G = gram_matrix(B, B_cat, found);
      }
      at::Tensor S_blocks;  // pair_route's, when it forms S ahead
      if (route == Route::kPairs) {
        RECORD_FUNCTION("omoe::pairs_backward", std::vector<c10::IValue>());
        const at::Tensor dG_threads = at::zeros({cpu::pass_threads(), er, er}, G.options());
        const at::Tensor scratch = at::empty({cpu::pass_threads(), 2 * er}, G.options());
        AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "omoe_pairs_backward", [&] {
          cpu::token_backward_pass(
              hc, lc,
              pair_route<scalar_t>(G, hc, s, k, dG_threads.data_ptr<double>(),
                                   scratch.data_ptr<double>(), nullptr, S_blocks),
              dz, s.E, s.r, top_k, true, normalize, eps, z, dh, dlogits);
        });
        const at::Tensor dG = dG_threads.sum(0);
        dG_sym = dG + dG.t();
      } else if (route == Route::kPairsGemm) {
        // Per chunk: the pass writes W[i, t, (j, b)] = (dS_ij + dS_ji) h_jb; then
        // dh_i += W_i G[block i]ᵀ and (dG + dGᵀ)[block i] += h_iᵀ W_i, two float64 batched
        // GEMMs (inner dimensions R and the chunk's tokens). dS + dSᵀ is symmetric, so
        // h_iᵀ W_i is block row i of dG + dGᵀ itself: one GEMM for all of it (GEMMs per
        // expert would cost ATen calls that outweigh a few tokens' arithmetic).
        RECORD_FUNCTION("omoe::pairs_gemm_backward", std::vector<c10::IValue>());
        const at::Tensor h_blocks64 = expert_blocks64(hc, s.E, s.r);
        const at::Tensor G_rows_t = G.view({s.E, s.r, er}).transpose(1, 2);  // [E, R, r]
        at::Tensor dG_rows;  // [E, r, R]: rows (i, a) of dG + dGᵀ
        const int64_t tc = chunk_tokens(s.T, 8.0 * s.E * er, chunk_budget(x));
        for (int64_t t0 = 0; t0 < s.T; t0 += tc) {
          const int64_t n = std::min(tc, s.T - t0);
          const at::Tensor W = at::empty({s.E, n, er}, G.options());
          const at::Tensor hcc = hc.narrow(0, t0, n);
          at::Tensor zc = z.narrow(0, t0, n), dhc = dh.narrow(0, t0, n),
                     dlc = dlogits.narrow(0, t0, n);
          AT_DISPATCH_FLOATING_TYPES(hc.scalar_type(), "omoe_pairs_gemm_backward", [&] {
            cpu::token_backward_pass(hcc, lc.narrow(0, t0, n),
                                     pair_route<scalar_t>(G, hcc, s, k, nullptr, nullptr,
                                                          W.data_ptr<double>(), S_blocks),
                                     dz.narrow(0, t0, n), s.E, s.r, top_k, true, normalize, eps,
                                     zc, dhc, dlc);
          });
          dhc.view({n, s.E, s.r}).add_(at::bmm(W, G_rows_t).transpose(0, 1));
          const at::Tensor h_t = h_blocks64.narrow(1, t0, n).transpose(1, 2);  // [E, r, n]
          if (t0 == 0) dG_rows = at::bmm(h_t, W);
          else dG_rows.baddbmm_(h_t, W);
        }
        dG_sym = dG_rows.view({er, er});
      } else {
        RECORD_FUNCTION("omoe::batched_backward", std::vector<c10::IValue>());
        const at::Tensor h_blocks64 = expert_blocks64(hc, s.E, s.r);
        // dG[(i,a),(j,b)] = Σ_t dS_ij h_ia h_jb: one batched GEMM over j per chunk of tokens.
        const at::Tensor G_rows = G.view({s.E, s.r, er});
        at::Tensor dG_blocks = at::zeros({s.E, er, s.r}, G.options());  // [j, (i,a), b]
        const int64_t tc = chunk_tokens(s.T, 16.0 * s.E * er, chunk_budget(x));
        for (int64_t t0 = 0; t0 < s.T; t0 += tc) {
          const int64_t n = std::min(tc, s.T - t0);
          const at::Tensor hb = h_blocks64.narrow(1, t0, n);
          const at::Tensor GH = at::bmm(hb, G_rows);
          at::Tensor dg_lhs = at::empty_like(GH);
          at::Tensor zc = z.narrow(0, t0, n), dhc = dh.narrow(0, t0, n),
                     dlc = dlogits.narrow(0, t0, n);
          token_backward(hc.narrow(0, t0, n), lc.narrow(0, t0, n), GH, dz.narrow(0, t0, n), s.E,
                         s.r, top_k, true, normalize, eps, zc, dhc, dlc, dg_lhs);
          dG_blocks.baddbmm_(dg_lhs.transpose(1, 2), hb);
        }
        const at::Tensor dG = dG_blocks.permute({1, 0, 2}).reshape({er, er});
        dG_sym = dG + dG.t();
      }
    }
  }
  if (on_blocks) {
    RECORD_FUNCTION("omoe::expand_backward_weight", std::vector<c10::IValue>());
    const bool accumulate = dB_direct.defined();
    if (!accumulate) dB_direct = at::empty({s.E, s.d_out, s.r}, hc.options());
    cpu::outer_blocks(dB_direct, accumulate, s.T, cpu::OuterArgs{dY, z, 0, scaling}, de_term);
    // A route through G: B_cat (dG + dGᵀ), unpacked to B's layout. This GEMM runs in the
    // accumulate dtype: dG + dGᵀ rounded once, an error like s·dYᵀZ's (G stays float64).
    if (dG_sym.defined()) {
      RECORD_FUNCTION("omoe::gram_backward", std::vector<c10::IValue>());
      dB_direct.add_(
          at::mm(B_cat, dG_sym.to(acc)).view({s.d_out, s.E, s.r}).permute({1, 0, 2}));
    }
  } else if (!dB_cat.defined()) {
    RECORD_FUNCTION("omoe::expand_backward_weight", std::vector<c10::IValue>());
    dB_cat = at::mm(dY.t(), z).mul_(scaling);
  }
  if (dG_sym.defined() && !on_blocks) {
    RECORD_FUNCTION("omoe::gram_backward", std::vector<c10::IValue>());
    dB_cat.addmm_(B_cat, dG_sym.to(acc));
  }
  at::Tensor grad_B = dB_direct;
  if (!on_blocks) {
    const at::Tensor dB_blocks = dB_cat.view({s.d_out, s.E, s.r}).permute({1, 0, 2});
    grad_B = dB_direct.defined() ? dB_direct.add_(dB_blocks) : dB_blocks.contiguous();
  }
  return outputs(dh, dlogits, grad_B);
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

std::vector<int64_t> weight_cache_stats() {
  const weight_cache::Stats s = weight_cache::instance().stats();
  return {s.hits, s.misses, s.entries, s.bytes, s.packed_bytes};
}

void weight_cache_clear() { weight_cache::instance().clear(); }

}  // namespace
}  // namespace omoe

TORCH_LIBRARY(omoe, m) {
  m.def("forward" OMOE_FORWARD_SIGNATURE);
  m.def("backward" OMOE_BACKWARD_SIGNATURE);
}

// The weight cache (omoe_weight_cache.h), in a namespace of its own: these are not device
// kernels. stats() -> [hits, misses, entries, bytes, packed_bytes]; clear() empties it.
TORCH_LIBRARY(omoe_cache, m) {
  m.def("stats() -> int[]", &omoe::weight_cache_stats);
  m.def("clear() -> ()", &omoe::weight_cache_clear);
}

TORCH_LIBRARY_IMPL(omoe, CPU, m) {
  m.impl("forward", &omoe::forward_cpu);
  m.impl("backward", &omoe::backward_cpu);
}
