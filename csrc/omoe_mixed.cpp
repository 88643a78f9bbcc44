// omoe::mixed_forward: several adapters in one batch, one op call (inference).
//
//   mixed_forward(x, A[], B[], router_weight[], router_input?, base_out?, rows, offsets,
//                 scaling[], top_k, orthogonalize, normalize, eps) -> y
//
// x is [T, d_in]; A, B and router_weight hold one tensor per adapter, as the single-adapter
// op takes them (A[n] [E, r, d_in], B[n] [E, d_out, r], router_weight[n] [E, d_in]); every
// adapter has the same E, r and d_out. rows (int64) lists x's rows adapter by adapter:
// adapter n runs on rows[offsets[n] : offsets[n + 1]], with scaling[n]. A row listed
// nowhere takes no adapter: y there is base_out (or 0). The loop over segments stays in
// C++: no Python between segments.
//
// A segment runs one of the single-adapter forward's routes (omoe_ops.cpp, forward_impl) on
// its slices of buffers shared by all segments, after the shrink (dot products over the
// weights' rows for a segment of a few rows, GEMMs otherwise):
// - a few rows where that forward forms y from the expert outputs (decoding): that route;
// - B seen by the weight cache (omoe_weight_cache.h) and a route through G cheaper: the
//   per-token pass with that adapter's G, then the expand GEMM.
// Any other segment (B new to the cache, the direct route cheaper, OMOE_ROUTE set,
// orthogonalize off, weights the loops cannot read) runs omoe::forward's CPU kernel
// itself. Either way a token gets the output a call of its adapter alone gives, to the
// GEMMs' rounding.
// No autograd: omoe_kernels/mixed.py calls it only when nothing needs a gradient.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "omoe_cpu_expand.h"
#include "omoe_cpu_pass.h"
#include "omoe_ops.h"
#include "omoe_weight_cache.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

// The schema after the op name (omoe_kernels/ops/mixed_compiled.py registers its fake).
#define OMOE_MIXED_FORWARD_SIGNATURE                                                  \
  "(Tensor x, Tensor[] A, Tensor[] B, Tensor[] router_weight, Tensor? router_input, " \
  "Tensor? base_out, Tensor rows, int[] offsets, float[] scaling, int top_k, "        \
  "bool orthogonalize, bool normalize, float eps) -> Tensor"

namespace omoe {
namespace {

using ForwardSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, int64_t, bool,
    bool, double);

// omoe::forward's CPU kernel, reached below autograd (the op's autograd is Python's).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_segment(
    const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& W,
    const std::optional<at::Tensor>& router_input, const std::optional<at::Tensor>& base_out,
    double scaling, int64_t top_k, bool orthogonalize, bool normalize, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("omoe::forward", "")
                             .typed<ForwardSignature>();
  return op.redispatch(c10::DispatchKeySet(c10::DispatchKey::CPU), x, A, B, W, router_input,
                       base_out, scaling, top_k, orthogonalize, normalize, eps);
}

// The checks of the mixed call itself; each segment's call makes the single-adapter op's
// checks (check_forward) on its adapter's tensors.
void check_mixed(const at::Tensor& x, at::TensorList A, at::TensorList B,
                 at::TensorList router_weight, const std::optional<at::Tensor>& router_input,
                 const std::optional<at::Tensor>& base_out, const at::Tensor& rows,
                 at::IntArrayRef offsets, at::ArrayRef<double> scaling, int64_t top_k,
                 double eps) {
  const int64_t N = int64_t(A.size());
  TORCH_CHECK(N >= 1, "omoe: mixed_forward needs at least one adapter, got none");
  TORCH_CHECK(int64_t(B.size()) == N && int64_t(router_weight.size()) == N &&
                  int64_t(scaling.size()) == N,
              "omoe: A, B, router_weight and scaling must hold one entry per adapter, got ", N,
              ", ", B.size(), ", ", router_weight.size(), " and ", scaling.size());
  // Adapter 0's shapes and dtypes are checked against x by the single-adapter checks; the
  // others must match adapter 0, which also covers adapters that run on no row.
  const Sizes s = check_forward(x, A[0], B[0], router_weight[0], router_input, base_out,
                                scaling[0], top_k, eps);
  for (int64_t n = 1; n < N; ++n) {
    TORCH_CHECK(A[n].sizes() == A[0].sizes() && B[n].sizes() == B[0].sizes() &&
                    router_weight[n].sizes() == router_weight[0].sizes(),
                "omoe: adapter ", n, " has A ", A[n].sizes(), ", B ", B[n].sizes(),
                ", router_weight ", router_weight[n].sizes(), " but adapter 0 has A ",
                A[0].sizes(), ", B ", B[0].sizes(), ", router_weight ",
                router_weight[0].sizes(), ": a mixed batch needs adapters of the same E, r, ",
                "d_in and d_out");
    for (const at::Tensor* t : {&A[n], &B[n], &router_weight[n]})
      TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                  "omoe: adapter ", n, "'s weights must match x's dtype (", x.scalar_type(),
                  ") and device (", x.device(), "), got ", t->scalar_type(), " on ",
                  t->device());
    TORCH_CHECK(std::isfinite(scaling[n]), "omoe: scaling of adapter ", n,
                " must be finite, got ", scaling[n]);
  }
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.device() == x.device(),
              "omoe: rows must be a 1-D int64 tensor on x's device, got ", rows.sizes(), " ",
              rows.scalar_type(), " on ", rows.device());
  const int64_t M = rows.size(0);
  TORCH_CHECK(int64_t(offsets.size()) == N + 1, "omoe: offsets must hold N + 1 = ", N + 1,
              " entries (where each adapter's rows start, then the end), got ", offsets.size());
  TORCH_CHECK(offsets[0] == 0 && offsets[N] == M, "omoe: offsets must start at 0 and end at ",
              "rows' length ", M, ", got ", offsets);
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(offsets[n] <= offsets[n + 1], "omoe: offsets must not decrease, got ", offsets);
  TORCH_CHECK(M <= s.T, "omoe: rows lists ", M, " rows but x has ", s.T);
  // Each row at most once and inside x: a repeated row would be overwritten silently.
  std::vector<char> seen(size_t(s.T), 0);
  const at::Tensor rc = rows.contiguous();
  const int64_t* r = rc.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < s.T, "omoe: rows must hold row indices of x in [0, ", s.T,
                "), got ", r[i], " at position ", i);
    TORCH_CHECK(!seen[size_t(r[i])], "omoe: rows lists row ", r[i],
                " twice: each row takes at most one adapter");
    seen[size_t(r[i])] = 1;
  }
}

// h ([size, E·r]) and the router logits ([size, E]) of rows [start, start + size) of xs
// (the router reading rs when defined) by dot products (cpu::shrink_rows); A, W in xs's
// dtype, contiguous.
template <typename scalar_t>
void shrink_in_loops(const at::Tensor& xs, const at::Tensor& rs, int64_t start, int64_t size,
                     const at::Tensor& A, const at::Tensor& W, scalar_t* h, scalar_t* logits) {
  const int64_t d_in = xs.size(1);
  cpu::shrink_rows(xs.data_ptr<scalar_t>() + start * d_in,
                   rs.defined() ? rs.data_ptr<scalar_t>() + start * d_in : nullptr, size, d_in,
                   A.data_ptr<scalar_t>(), A.size(0) * A.size(1), W.data_ptr<scalar_t>(),
                   W.size(0), h, logits);
}

// Whether a segment of `size` rows of adapter n takes the CPU loops (shrink_in_loops, the
// expert outputs): few rows, and the weights already in the accumulate dtype and
// contiguous (no copy for the loops to read).
bool segment_in_loops(int64_t size, const at::Tensor& A, const at::Tensor& B,
                      const at::Tensor& W, at::ScalarType acc) {
  return size <= cpu::kDotRows && in_dtype_and_contiguous({&A, &B, &W}, acc);
}

// Whether OMOE_ROUTE forces a route (tests run every route): the segments then go through
// omoe::forward's kernel, which reads it.
bool route_forced() {
  const char* env = std::getenv("OMOE_ROUTE");
  return env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0;
}

// What the pairs route of omoe_ops.cpp's forward needs of one adapter: B_cat and G from the
// weight cache (G formed and kept if only B_cat is there). Undefined B_cat: the segment
// goes through omoe::forward's kernel, which picks its own route (B not seen before, or
// the direct route cheaper for this many tokens even with G free).
struct AdapterGram {
  at::Tensor B_cat, G;
};

AdapterGram adapter_gram(const at::Tensor& B, const Sizes& s, int64_t k, int64_t tokens) {
  Sizes segment = s;
  segment.T = tokens;
  if (!forward_prefers_gram(segment, k)) return {};
  const weight_cache::Found found = weight_cache::instance().find(B);
  if (!found.seen) return {};
  if (found.G.defined()) return {found.B_cat, found.G};
  // A few-token call remembers B without B_cat (it expands on B's blocks).
  const at::Tensor B_cat =
      found.B_cat.defined() ? found.B_cat : packed_expand(B, accumulate_dtype(B));
  const at::Tensor B64 = B_cat.to(at::kDouble);
  at::Tensor G = at::mm(B64.t(), B64);
  weight_cache::instance().remember(B, B_cat, G);
  return {B_cat, G};
}

at::Tensor mixed_forward_cpu(const at::Tensor& x, at::TensorList A, at::TensorList B,
                             at::TensorList router_weight,
                             const std::optional<at::Tensor>& router_input,
                             const std::optional<at::Tensor>& base_out, const at::Tensor& rows,
                             at::IntArrayRef offsets, at::ArrayRef<double> scaling,
                             int64_t top_k, bool orthogonalize, bool normalize, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  check_mixed(x, A, B, router_weight, router_input, base_out, rows, offsets, scaling, top_k,
              eps);
  const int64_t N = int64_t(A.size()), T = x.size(0), M = rows.size(0);
  const Sizes s{T, x.size(1), B[0].size(1), A[0].size(0), A[0].size(1)};
  const int64_t er = s.E * s.r, k = std::min(top_k, s.E);
  const auto acc = accumulate_dtype(x);
  // Rows of no adapter keep base_out (or 0); every listed row is written once below.
  at::Tensor y = base_out.has_value() ? base_out->contiguous().clone()
                                      : at::zeros({T, s.d_out}, x.options());
  if (M == 0) return y;
  // The listed rows in segment order, once for all segments.
  const at::Tensor xs = x.index_select(0, rows).to(acc).contiguous();
  const at::Tensor rs = router_input.has_value()
                            ? router_input->index_select(0, rows).to(acc).contiguous()
                            : at::Tensor();
  const at::Tensor bs =
      base_out.has_value() ? base_out->index_select(0, rows).to(acc) : at::Tensor();
  const at::Tensor h = at::empty({M, er}, xs.options()),
                   logits = at::empty({M, s.E}, xs.options());
  at::Tensor z = at::empty_like(h), ys = at::empty({M, s.d_out}, xs.options());
  at::Tensor S_blocks;  // the pairs route's per-thread S of dense routing, shared by segments
  at::Tensor e_work, a_work;  // the expert-outputs route's e and a, shared by segments
  const bool lean = orthogonalize && !route_forced();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t start = offsets[n], size = offsets[n + 1] - offsets[n];
    if (size == 0) continue;
    RECORD_FUNCTION("omoe::mixed_segment", std::vector<c10::IValue>());
    const bool loops = segment_in_loops(size, A[n], B[n], router_weight[n], acc);
    // A few rows: the single-adapter forward's route from the expert outputs where it takes
    // it (before any route through G), here when the loops below can form h and the logits.
    Sizes segment = s;
    segment.T = size;
    ExpertOutputsRoute from_e =
        lean && loops ? expert_outputs_route(segment, k, acc) : ExpertOutputsRoute{};
    if (from_e.batched_S) from_e = {};  // S by a batched GEMM: omoe::forward's kernel
    const AdapterGram gram =
        lean && !from_e.taken ? adapter_gram(B[n], s, k, size) : AdapterGram{};
    if (!gram.B_cat.defined() && !from_e.taken) {
      // omoe::forward's kernel, on this segment alone: its rows of xs, rs and bs, gathered
      // above, where those hold the input's own dtype, else gathered again from the input.
      const at::Tensor seg = rows.narrow(0, start, size);
      const auto rows_of = [&](const at::Tensor& input, const at::Tensor& gathered) {
        return input.scalar_type() == gathered.scalar_type() ? gathered.narrow(0, start, size)
                                                             : input.index_select(0, seg);
      };
      std::optional<at::Tensor> seg_router, seg_base;
      if (router_input.has_value()) seg_router = rows_of(*router_input, rs);
      if (base_out.has_value()) seg_base = rows_of(*base_out, bs);
      ys.narrow(0, start, size)
          .copy_(std::get<0>(forward_segment(rows_of(x, xs), A[n], B[n], router_weight[n],
                                             seg_router, seg_base, scaling[n], top_k,
                                             orthogonalize, normalize, eps)));
      continue;
    }
    // The single-adapter forward's routes (omoe_ops.cpp, forward_impl), on the segment's
    // rows of h, logits, z and y: no per-segment allocation but S_blocks (pairs).
    if (from_e.taken) {  // from_e implies loops: pointers only, no tensor per segment
      RECORD_FUNCTION("omoe::direct", std::vector<c10::IValue>());
      if (!e_work.defined()) {
        e_work = at::empty({s.E * cpu::kDotRows * s.d_out}, xs.options());
        a_work = at::empty({cpu::kDotRows * s.E}, xs.options().dtype(at::kDouble));
      }
      AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_mixed_direct", [&] {
        scalar_t* h_rows = h.data_ptr<scalar_t>() + start * er;
        scalar_t* l_rows = logits.data_ptr<scalar_t>() + start * s.E;
        shrink_in_loops(xs, rs, start, size, A[n], router_weight[n], h_rows, l_rows);
        cpu::forward_rows_from_expert_outputs(
            h_rows, l_rows, size, B[n].data_ptr<scalar_t>(), s.E, s.d_out, s.r,
            bs.defined() ? bs.data_ptr<scalar_t>() + start * s.d_out : nullptr, scaling[n],
            top_k, normalize, eps, z.data_ptr<scalar_t>() + start * er,
            ys.data_ptr<scalar_t>() + start * s.d_out, s.d_out, e_work.data_ptr<scalar_t>(),
            a_work.data_ptr<double>());
      });
      continue;
    }
    at::Tensor h_seg = h.narrow(0, start, size), l_seg = logits.narrow(0, start, size),
               z_seg = z.narrow(0, start, size), y_seg = ys.narrow(0, start, size);
    if (loops) {
      AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_mixed_shrink_rows", [&] {
        shrink_in_loops(xs, rs, start, size, A[n], router_weight[n], h_seg.data_ptr<scalar_t>(),
                        l_seg.data_ptr<scalar_t>());
      });
    } else {
      const at::Tensor x_seg = xs.narrow(0, start, size);
      at::mm_out(h_seg, x_seg, A[n].reshape({er, s.d_in}).to(acc).t());
      at::mm_out(l_seg, rs.defined() ? rs.narrow(0, start, size) : x_seg,
                 router_weight[n].to(acc).t());
    }
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_mixed_pairs", [&] {
      cpu::PairRoute<scalar_t> route{gram.G.data_ptr<double>(),
                                     h_seg.data_ptr<scalar_t>(),
                                     nullptr,
                                     nullptr,
                                     nullptr,
                                     size,
                                     er,
                                     int(s.E),
                                     int(s.r)};
      if (k == s.E && s.E <= kMaxExperts) {
        if (!S_blocks.defined())
          S_blocks =
              at::empty({cpu::pass_threads(), cpu::kTokensPerTask, s.E, s.E}, gram.G.options());
        route.S_blocks = S_blocks.data_ptr<double>();
      }
      cpu::token_forward_pass(h_seg, l_seg, route, s.E, s.r, top_k, true, normalize, eps,
                              z_seg);
    });
    // As forward_impl: addmm skips the product when alpha is 0, which would hide a NaN.
    if (bs.defined() && scaling[n] != 0.0) {
      at::addmm_out(y_seg, bs.narrow(0, start, size), z_seg, gram.B_cat.t(), 1, scaling[n]);
    } else {
      at::mm_out(y_seg, z_seg, gram.B_cat.t()).mul_(scaling[n]);
      if (bs.defined()) y_seg.add_(bs.narrow(0, start, size));
    }
  }
  y.index_copy_(0, rows, ys.to(x.scalar_type()));
  return y;
}

#ifdef OMOE_WITH_CUDA
// No CUDA kernel: every omoe op has one registered (a clear error rather than the
// dispatcher's), and CUDA tensors take the triton backend's grouped kernels.
at::Tensor mixed_forward_cuda(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                              const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const at::Tensor&,
                              at::IntArrayRef, at::ArrayRef<double>, int64_t, bool, bool,
                              double) {
  TORCH_CHECK(false,
              "omoe: mixed_forward runs on the CPU only; for CUDA tensors call "
              "omoe_kernels.omoe_lora_mixed with backend='triton' (or 'reference')");
}
#endif

}  // namespace
}  // namespace omoe

TORCH_LIBRARY_FRAGMENT(omoe, m) { m.def("mixed_forward" OMOE_MIXED_FORWARD_SIGNATURE); }

TORCH_LIBRARY_IMPL(omoe, CPU, m) { m.impl("mixed_forward", &omoe::mixed_forward_cpu); }

#ifdef OMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(omoe, CUDA, m) { m.impl("mixed_forward", &omoe::mixed_forward_cuda); }
#endif
