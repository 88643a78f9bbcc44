// The direct route under top-k routing (k < E) on the CPU: e_i = B_i h_i for each token's
// k active experts only, T·k·r·d work instead of the dense direct route's T·E·r·d.
//
// A chunk's (token, slot) pairs are grouped by expert (a counting sort of the routing that
// route_token gives, the one the token pass itself runs), so expert i's rows are contiguous:
// hs (h_i of its tokens, [rows, r]) and e (their e_i, [rows, d_out]). One GEMM per expert
// forms e; the backward's de uses the same rows, and dh_i += B_iᵀ de_i and
// dB_i = Σ_t de_i h_iᵀ are one GEMM each per expert over its tokens only. An expert no
// token routes to is never read: a NaN in its weights reaches neither S nor these GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "omoe_cpu_expand.h"
#include "omoe_cpu_pass.h"
#include "omoe_token.h"

namespace omoe {
namespace cpu {

// The expert-grouped layout of a chunk's active (token, slot) pairs.
struct ActiveRows {
  std::vector<int> row;         // [n·k]: the row of token t's slot m (m-th active expert)
  std::vector<int64_t> token;   // [n·k]: the token of each row
  std::vector<int64_t> offset;  // [E + 1]: expert i's rows are [offset[i], offset[i + 1])
  std::vector<int> expert;      // [n·k]: the expert of token t's slot m
  int64_t k = 0;
  int64_t rows(int i) const { return offset[i + 1] - offset[i]; }
};

// Routes the n tokens of `logits` ([n, E]) as the token pass does (top_active: slot m is
// the m-th of route_token's ascending active list) and groups their slots by expert, each
// expert's rows in token order.
template <typename scalar_t>
ActiveRows active_rows(const scalar_t* logits, int64_t n, int E, int top_k) {
  ActiveRows a;
  a.k = top_k;
  std::vector<int> expert(size_t(n * top_k));
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      top_active(logits + t * E, E, top_k, expert.data() + t * top_k);
  });
  a.offset.assign(size_t(E) + 1, 0);
  for (const int i : expert) ++a.offset[size_t(i) + 1];
  for (int i = 0; i < E; ++i) a.offset[size_t(i) + 1] += a.offset[size_t(i)];
  std::vector<int64_t> next(a.offset.begin(), a.offset.end() - 1);
  a.row.resize(expert.size());
  a.token.resize(expert.size());
  for (int64_t q = 0; q < int64_t(expert.size()); ++q) {
    const int64_t row = next[size_t(expert[size_t(q)])]++;
    a.row[size_t(q)] = int(row);
    a.token[size_t(row)] = q / top_k;
  }
  a.expert = std::move(expert);
  return a;
}

// hs[row] = h_i of the row's token (h: [n, E·r]); hs: [n·k, r].
inline at::Tensor gather_rows(const at::Tensor& h, const ActiveRows& a, int E, int64_t r) {
  at::Tensor hs = at::empty({int64_t(a.token.size()), r}, h.options());
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_topk_gather", [&] {
    const scalar_t* src = h.data_ptr<scalar_t>();
    scalar_t* dst = hs.data_ptr<scalar_t>();
    for (int i = 0; i < E; ++i)
      for (int64_t row = a.offset[size_t(i)]; row < a.offset[size_t(i) + 1]; ++row)
        std::memcpy(dst + row * r, src + (a.token[size_t(row)] * E + i) * r,
                    sizeof(scalar_t) * size_t(r));
  });
  return hs;
}

// rows[row] = src[token of row] (src: [n, w]); rows: [n·k, w], expert-grouped.
inline at::Tensor gather_token_rows(const at::Tensor& src, const ActiveRows& a) {
  const int64_t w = src.size(1);
  at::Tensor rows = at::empty({int64_t(a.token.size()), w}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "omoe_topk_gather_tokens", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = rows.data_ptr<scalar_t>();
    at::parallel_for(0, int64_t(a.token.size()), std::max<int64_t>(1, (64 << 10) / (w + 1)),
                     [&](int64_t r0, int64_t r1) {
                       for (int64_t row = r0; row < r1; ++row)
                         std::memcpy(out + row * w, in + a.token[size_t(row)] * w,
                                     sizeof(scalar_t) * size_t(w));
                     });
  });
  return rows;
}

// Whether expert i's rows take the loops over B_i's rows (csrc/omoe_cpu_expand.h) rather
// than ATen GEMMs: a few rows, B contiguous. At a few tokens an expert has a row or two,
// and its GEMM calls (a view, a transpose, the call) cost more than their arithmetic.
inline bool rows_in_loops(int64_t rows, const at::Tensor& B) {
  return rows <= kExpertOutputTokens && B.is_contiguous();
}

// in_loops(i) for every expert with rows that take the loops, spread over the intra-op
// threads (each expert writes rows of its own), then in_gemms(i) for the other experts
// with rows, one after another (each GEMM takes the threads itself).
template <typename Loops, typename Gemms>
void for_each_expert(const ActiveRows& a, const at::Tensor& B, const Loops& in_loops,
                     const Gemms& in_gemms) {
  std::vector<int> looped;
  for (int i = 0; i < int(B.size(0)); ++i) {
    if (a.rows(i) == 0) continue;
    if (rows_in_loops(a.rows(i), B)) looped.push_back(i);
    else in_gemms(i);
  }
  // An expert's loops are at most kExpertOutputTokens rows of d_out·r multiply-adds.
  const int64_t work = kExpertOutputTokens * B.size(1) * B.size(2);
  at::parallel_for(0, int64_t(looped.size()), std::max<int64_t>(1, (int64_t(1) << 16) / work),
                   [&](int64_t j0, int64_t j1) {
                     for (int64_t j = j0; j < j1; ++j) in_loops(looped[size_t(j)]);
                   });
}

// e[rows of i] = hs[rows of i] B_iᵀ for every expert with rows (B: [E, d_out, r]).
inline at::Tensor expert_outputs(const at::Tensor& hs, const at::Tensor& B,
                                 const ActiveRows& a) {
  const int64_t d_out = B.size(1), r = B.size(2);
  at::Tensor e = at::empty({hs.size(0), d_out}, hs.options());
  for_each_expert(
      a, B,
      [&](int i) {
        const int64_t n = a.rows(i), off = a.offset[size_t(i)];
        AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "omoe_topk_expert_outputs", [&] {
          expert_outputs_range(hs.data_ptr<scalar_t>() + off * r,
                               B.data_ptr<scalar_t>() + i * d_out * r,
                               e.data_ptr<scalar_t>() + off * d_out, n, 1, d_out, r, 0, d_out);
        });
      },
      [&](int i) {
        const int64_t n = a.rows(i), off = a.offset[size_t(i)];
        at::Tensor e_i = e.narrow(0, off, n);
        at::mm_out(e_i, hs.narrow(0, off, n), B[i].t());
      });
  return e;
}

// dst[t, block i] += src[row] for every row of expert i (token t = the row's token);
// src: [n·k, r] expert-grouped, dst: [n, E·r].
inline void add_rows_to_blocks(const at::Tensor& src, const ActiveRows& a, int E, int64_t r,
                               at::Tensor& dst) {
  AT_DISPATCH_FLOATING_TYPES(dst.scalar_type(), "omoe_topk_scatter", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    for (int i = 0; i < E; ++i)
      for (int64_t row = a.offset[size_t(i)]; row < a.offset[size_t(i) + 1]; ++row) {
        scalar_t* o = out + (a.token[size_t(row)] * E + i) * r;
        const scalar_t* v = in + row * r;
        for (int64_t q = 0; q < r; ++q) o[q] += v[q];
      }
  });
}

// The expand's gradient on the active rows: dzs[rows of i] = s · dYs_i B_i, dYs being dY's
// rows by slot (gather_token_rows); [n·k, r].
inline at::Tensor expand_input_grads(const at::Tensor& dYs, const at::Tensor& B,
                                     const ActiveRows& a, double scaling) {
  const int64_t d_out = B.size(1), r = B.size(2);
  at::Tensor dzs = at::empty({dYs.size(0), r}, dYs.options());
  for_each_expert(
      a, B,
      [&](int i) {
        const int64_t n = a.rows(i), off = a.offset[size_t(i)];
        AT_DISPATCH_FLOATING_TYPES(dYs.scalar_type(), "omoe_topk_expand_input_grads", [&] {
          rows_times_blocks_range(dYs.data_ptr<scalar_t>() + off * d_out, 0,
                                  B.data_ptr<scalar_t>() + i * d_out * r,
                                  dzs.data_ptr<scalar_t>() + off * r, r, n, d_out, r, scaling,
                                  /*accumulate=*/false, 0, 1);
        });
      },
      [&](int i) {
        const int64_t n = a.rows(i), off = a.offset[size_t(i)];
        at::Tensor dzs_i = dzs.narrow(0, off, n);
        at::mm_out(dzs_i, dYs.narrow(0, off, n), B[i]);
        dzs_i.mul_(scaling);
      });
  return dzs;
}

// The backward's GEMMs after the pass: dh[t, block i] += de_i B_i over expert i's rows, and
// dB[i] (+)= de_iᵀ hs_i + s · dYs_iᵀ zs_i (the expand's share). written[i] says whether
// dB[i] holds a sum yet.
inline void expert_gradients(const at::Tensor& de, const at::Tensor& hs, const at::Tensor& B,
                             const ActiveRows& a, at::Tensor& dh, at::Tensor& dB,
                             std::vector<char>& written, const at::Tensor& dYs,
                             const at::Tensor& zs, double scaling) {
  const int E = int(B.size(0));
  const int64_t r = B.size(2), d_out = B.size(1);
  at::Tensor dhs = at::empty_like(hs);
  for_each_expert(
      a, B,
      [&](int i) {  // dB is contiguous: made by topk_direct_backward
        const int64_t n = a.rows(i), off = a.offset[size_t(i)];
        AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "omoe_topk_expert_gradients", [&] {
          const scalar_t* de_i = de.data_ptr<scalar_t>() + off * d_out;
          const scalar_t* B_i = B.data_ptr<scalar_t>() + i * d_out * r;
          rows_times_blocks_range(de_i, 0, B_i, dhs.data_ptr<scalar_t>() + off * r, r, n, d_out,
                                  r, 1.0, /*accumulate=*/false, 0, 1);
          const OuterTerm<scalar_t> term{de_i, 0, hs.data_ptr<scalar_t>() + off * r, r, 1.0};
          const OuterTerm<scalar_t> expand{dYs.data_ptr<scalar_t>() + off * d_out, 0,
                                           zs.data_ptr<scalar_t>() + off * r, r, scaling};
          outer_blocks_range(dB.data_ptr<scalar_t>() + i * d_out * r, written[size_t(i)] != 0,
                             term, expand, n, d_out, r, 0, d_out);
        });
        written[size_t(i)] = 1;
      },
      [&](int i) {
        const int64_t n = a.rows(i), off = a.offset[size_t(i)];
        const at::Tensor de_i = de.narrow(0, off, n), hs_i = hs.narrow(0, off, n);
        at::Tensor dhs_i = dhs.narrow(0, off, n);
        at::mm_out(dhs_i, de_i, B[i]);
        at::Tensor dB_i = dB[i];
        if (written[size_t(i)]) dB_i.addmm_(de_i.t(), hs_i);
        else at::mm_out(dB_i, de_i.t(), hs_i);
        const at::Tensor dYs_i = dYs.narrow(0, off, n), zs_i = zs.narrow(0, off, n);
        // addmm skips the product when alpha is 0, which would hide a NaN in dY or z.
        if (scaling != 0.0) dB_i.addmm_(dYs_i.t(), zs_i, /*beta=*/1, /*alpha=*/scaling);
        else dB_i.add_(at::mm(dYs_i.t(), zs_i).mul_(scaling));
        written[size_t(i)] = 1;
      });
  add_rows_to_blocks(dhs, a, E, r, dh);
}

// y_t = base_t + scaling·Σ_m a_t,i e_row over token t's active slots m (expert i, row of e),
// e: [n·k, d] expert-grouped, a: [n, E] float64 coefficients (mix_token_rows). base: [n, d]
// or null.
template <typename v_t>
void mix_active_rows(const v_t* e, const ActiveRows& a, const double* coeff, int64_t n,
                     int64_t E, int64_t d, const v_t* base, double scaling, v_t* y) {
  const int64_t k = a.k;
  at::parallel_for(
      0, n, std::max<int64_t>(1, (16 << 10) / (k * d + 1)), [&](int64_t t0, int64_t t1) {
        std::vector<const v_t*> rows(static_cast<size_t>(k));
        std::vector<double> c(static_cast<size_t>(k));
        for (int64_t t = t0; t < t1; ++t) {
          for (int64_t m = 0; m < k; ++m) {
            const size_t slot = static_cast<size_t>(t * k + m);
            rows[static_cast<size_t>(m)] = e + int64_t(a.row[slot]) * d;
            c[static_cast<size_t>(m)] = coeff[t * E + a.expert[slot]];
          }
          mix_token_rows(rows.data(), c.data(), k, d, base != nullptr ? base + t * d : nullptr,
                         scaling, y + t * d);
        }
      });
}

// S from the rows of one token's active experts (rows[m]: slot m's row of e, d_out apart);
// the backward writes de of those rows as DirectGram does.
template <typename value_t>
struct RowGram {
  const value_t* e;
  value_t* de;  // backward only
  const int* rows;
  int64_t d_out;

  template <int MAX_K, typename scalar_t>
  void gram(const scalar_t*, const int*, int k, double (*S)[MAX_K]) const {
    gram_of_rows(e, rows, k, d_out, d_out, S);
  }
  template <int MAX_K, typename any_t>
  void begin_backward(const any_t*, const int*, int, const double (*)[MAX_K]) const {}
  template <int MAX_K, typename scalar_t>
  double grad_h(const scalar_t*, const int*, int, const double (*)[MAX_K], int, int) const {
    return 0.0;
  }
  template <int MAX_K>
  void end_backward(const int*, int k, const double (*dS)[MAX_K]) const {
    de_of_rows(e, rows, k, d_out, d_out, dS, de);
  }
};
template <typename value_t>
struct RowRoute {
  const value_t* e;  // [n·k, d_out], expert-grouped
  value_t* de;       // the same layout, backward only
  const int* rows;   // [n, k]
  int64_t d_out;
  int k;
  void begin_block(int64_t, int64_t, int) const {}
  RowGram<value_t> at(int64_t t, int) const {
    return RowGram<value_t>{e, de, rows + t * k, d_out};
  }
};

// A chunk of tokens gives each expert about this many rows at least: a GEMM of a few rows
// costs mostly its call and its pass over B_i.
constexpr int64_t kRowsPerExpert = 64;
inline int64_t topk_chunk(int64_t tc, int64_t E, int64_t top_k) {
  return std::max(tc, kRowsPerExpert * E / top_k);
}

// The forward of the top-k direct route: z for the tokens of h ([T, E·r]) and logits
// ([T, E]), and y = base + scaling·Σ_i a_i e_i from each token's active experts' outputs
// (no B_cat, and an inactive expert's B is never read); tc tokens per chunk or more
// (topk_chunk). B: [E, d_out, r] and base ([T, d_out] or undefined) in h's dtype,
// contiguous.
inline void topk_direct_forward(const at::Tensor& h, const at::Tensor& logits,
                                const at::Tensor& B, const at::Tensor& base, double scaling,
                                int64_t top_k, bool normalize, double eps, int64_t tc,
                                at::Tensor& z, at::Tensor& y) {
  const int64_t T = h.size(0), E = B.size(0), r = B.size(2), d_out = B.size(1);
  tc = topk_chunk(tc, E, top_k);
  const at::Tensor coeff = at::empty({std::min(tc, T), E}, h.options().dtype(at::kDouble));
  for (int64_t t0 = 0; t0 < T; t0 += tc) {
    const int64_t n = std::min(tc, T - t0);
    const at::Tensor hc = h.narrow(0, t0, n), lc = logits.narrow(0, t0, n);
    at::Tensor zc = z.narrow(0, t0, n);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_direct_topk", [&] {
      const ActiveRows a = active_rows(lc.data_ptr<scalar_t>(), n, int(E), int(top_k));
      const at::Tensor e = expert_outputs(gather_rows(hc, a, int(E), r), B, a);
      token_forward_pass(
          hc, lc,
          RowRoute<scalar_t>{e.data_ptr<scalar_t>(), nullptr, a.row.data(), d_out, int(top_k)},
          E, r, top_k, true, normalize, eps, zc, coeff.data_ptr<double>());
      mix_active_rows(e.data_ptr<scalar_t>(), a, coeff.data_ptr<double>(), n, E, d_out,
                      base.defined() ? base.data_ptr<scalar_t>() + t0 * d_out : nullptr,
                      scaling, y.data_ptr<scalar_t>() + t0 * d_out);
    });
  }
}

// The backward of the top-k direct route, the expand's included: dz = s·B_iᵀ dY for each
// token's active experts only (the pass never reads an inactive expert's dz), then z, dh
// and dlogits as token_backward_pass gives them with dh's share through S added. Returns
// dB = Σ_t (s·dY z_iᵀ + de_i h_iᵀ) over expert i's tokens ([E, d_out, r], zero for
// experts no token routes to). dY: [T, d_out] in h's dtype, contiguous.
inline at::Tensor topk_direct_backward(const at::Tensor& h, const at::Tensor& logits,
                                       const at::Tensor& dY, double scaling,
                                       const at::Tensor& B, int64_t top_k, bool normalize,
                                       double eps, int64_t tc, at::Tensor& z, at::Tensor& dh,
                                       at::Tensor& dlogits) {
  const int64_t T = h.size(0), E = B.size(0), r = B.size(2), d_out = B.size(1);
  at::Tensor dB = at::empty({E, d_out, r}, h.options());
  std::vector<char> written(size_t(E), 0);
  tc = topk_chunk(tc, E, top_k);
  for (int64_t t0 = 0; t0 < T; t0 += tc) {
    const int64_t n = std::min(tc, T - t0);
    const at::Tensor hc = h.narrow(0, t0, n), lc = logits.narrow(0, t0, n);
    at::Tensor zc = z.narrow(0, t0, n), dhc = dh.narrow(0, t0, n),
               dlc = dlogits.narrow(0, t0, n);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_direct_topk_backward", [&] {
      const ActiveRows a = active_rows(lc.data_ptr<scalar_t>(), n, int(E), int(top_k));
      const at::Tensor hs = gather_rows(hc, a, int(E), r);
      const at::Tensor e = expert_outputs(hs, B, a);
      const at::Tensor dYs = gather_token_rows(dY.narrow(0, t0, n), a);
      at::Tensor dzc = at::zeros({n, E * r}, h.options());
      add_rows_to_blocks(expand_input_grads(dYs, B, a, scaling), a, int(E), r, dzc);
      at::Tensor de = at::empty_like(e);  // every row is one token's active slot: all written
      token_backward_pass(hc, lc,
                          RowRoute<scalar_t>{e.data_ptr<scalar_t>(), de.data_ptr<scalar_t>(),
                                             a.row.data(), d_out, int(top_k)},
                          dzc, E, r, top_k, true, normalize, eps, zc, dhc, dlc);
      expert_gradients(de, hs, B, a, dhc, dB, written, dYs, gather_rows(zc, a, int(E), r),
                       scaling);
    });
  }
  AT_DISPATCH_FLOATING_TYPES(dB.scalar_type(), "omoe_topk_zero_unused", [&] {
    for (int64_t i = 0; i < E; ++i)  // experts no token chose: dB_i = 0
      if (!written[size_t(i)])
        std::fill_n(dB.data_ptr<scalar_t>() + i * d_out * r, d_out * r, scalar_t(0));
  });
  return dB;
}

}  // namespace cpu
}  // namespace omoe
