// The CPU per-token passes and the Gram sources only the CPU uses.
//
// Three routes give a token the Gram matrix S of its k active experts (docs/algorithm.md,
// "Routes"); omoe_ops.cpp picks one per pass by cost:
// - batched (GhGram, omoe_token.h): GH = (G_ij h_j) for every pair by one float64 batched
//   GEMM per chunk of tokens (inner dimension r). What the GPU runs; on the CPU only when
//   forced (OMOE_ROUTE), as it loses to pairs there.
// - pairs (PairGram): S_ml = h_iᵀ G_ij h_j for the k(k+1)/2 active pairs, read from G by
//   vectorized loops (dense routing: a block of tokens per read of G, dense_gram); the
//   backward hands dS back per token into dG (few pairs, "pairs") or through W and two
//   float64 GEMMs (many pairs, "pairs_gemm").
// - direct (DirectGram): the expert outputs e_i = B_i h_i themselves (a batched GEMM per
//   chunk, in the accumulate dtype), S_ml = <e_i, e_j> summed in float64; no G at all,
//   T·(E·r·d + k²·d) work. For small T against E·r, and for E·r too large for G. Dense
//   routing with E >= r forms S (and in the backward de) by float64 batched GEMMs over the
//   chunk's tokens. Under top-k (k < E) e is formed for the active experts only,
//   T·(k·r·d + k²·d) work (RowGram, omoe_cpu_topk.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "omoe_token.h"

namespace omoe {
namespace cpu {

// Tokens per task of a pass (for_token_blocks): at most kTokensPerTask, halved down to
// kMinTokensPerTask until every thread has a task; blocks start at multiples of the size,
// which divides kTokensPerTask.
constexpr int64_t kTokensPerTask = 64;
constexpr int64_t kMinTokensPerTask = 16;

// The CPU keeps the per-token state on the heap, so it takes more active experts than a
// CUDA thread: k = min(top_k, E) up to kMaxActive (beyond that `auto` uses the reference).
constexpr int kMaxActive = 256;

template <typename Fn>
inline void dispatch_max_active(int64_t k, Fn&& fn) {
  if (k <= kMaxExperts) omoe::dispatch_max_active(k, fn);
  else fn(std::integral_constant<int, kMaxActive>{});
}

// The hot per-token loops are compiled twice, for x86-64-v3 (AVX2, FMA) and the baseline,
// and the loader picks the one this CPU runs (GCC function multiversioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define OMOE_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OMOE_VECTOR_CLONES
#endif

// h_iᵀ G_ij h_j for NT tokens at once (h rows h_stride apart) into out[NT]:
// Σ_a h_ia u_a with u = Σ_b h_jb G[(j, b), block i] (G is symmetric), 8 entries of u at a
// time. The inner loop runs along a row of G into accumulators that stay in registers, with
// no reduction, so it vectorizes; each piece of G read serves the NT tokens. The order of
// the sums does not depend on NT: one token gives the same bits alone or in a group.
// Four doubles as one value (GCC/Clang vector extension): AVX2 registers in the x86-64-v3
// clone, SSE pairs in the baseline. GCC does not vectorize the loop below on its own.
typedef double vec4d __attribute__((vector_size(32)));

template <int NT, typename h_t>
__attribute__((always_inline)) inline void pair_products_body(const double* G, int64_t R,
                                                              int rank, int i, int j,
                                                              const h_t* h, int64_t h_stride,
                                                              double* out) {
  constexpr int kWidth = 8;
  const double* g_ji = G + int64_t(j) * rank * R + int64_t(i) * rank;
  double s[NT] = {};
  int a0 = 0;
  for (; a0 + kWidth <= rank; a0 += kWidth) {
    vec4d u[NT][2] = {};
    for (int b = 0; b < rank; ++b) {
      const double* row = g_ji + b * R + a0;
      vec4d lo, hi;  // unaligned loads
      std::memcpy(&lo, row, sizeof(lo));
      std::memcpy(&hi, row + 4, sizeof(hi));
      for (int n = 0; n < NT; ++n) {
        const double hb = static_cast<double>(h[n * h_stride + j * rank + b]);
        u[n][0] += hb * lo;
        u[n][1] += hb * hi;
      }
    }
    for (int n = 0; n < NT; ++n)
      for (int a = 0; a < kWidth; ++a)
        s[n] += static_cast<double>(h[n * h_stride + i * rank + a0 + a]) * u[n][a / 4][a % 4];
  }
  for (; a0 < rank; ++a0)  // the last rank % 8 entries
    for (int n = 0; n < NT; ++n) {
      double u = 0.0;
      for (int b = 0; b < rank; ++b)
        u += static_cast<double>(h[n * h_stride + j * rank + b]) * g_ji[b * R + a0];
      s[n] += static_cast<double>(h[n * h_stride + i * rank + a0]) * u;
    }
  for (int n = 0; n < NT; ++n) out[n] = s[n];
}
// One token's h_iᵀ G_ij h_j.
template <typename h_t>
__attribute__((always_inline)) inline double pair_product_body(const double* G, int64_t R,
                                                               int rank, int i, int j,
                                                               const h_t* h) {
  double s;
  pair_products_body<1>(G, R, rank, i, j, h, 0, &s);
  return s;
}
// S[t][i][j] of all E² pairs for the n tokens of h ([n, E·r]), S laid out [n, E, E]: dense
// routing, where every token needs every pair, 4 tokens per read of G.
template <typename h_t>
__attribute__((always_inline)) inline void dense_gram_body(const double* G, int E, int rank,
                                                           const h_t* h, int64_t n, double* S) {
  constexpr int kTokens = 4;
  const int64_t R = int64_t(E) * rank, EE = int64_t(E) * E;
  double out[kTokens];
  for (int j = 0; j < E; ++j)
    for (int i = 0; i <= j; ++i) {
      int64_t t = 0;
      for (; t + kTokens <= n; t += kTokens) {
        pair_products_body<kTokens>(G, R, rank, i, j, h + t * R, R, out);
        for (int q = 0; q < kTokens; ++q)
          S[(t + q) * EE + i * E + j] = S[(t + q) * EE + j * E + i] = out[q];
      }
      for (; t < n; ++t)
        S[t * EE + i * E + j] = S[t * EE + j * E + i] =
            pair_product_body(G, R, rank, i, j, h + t * R);
    }
}
OMOE_VECTOR_CLONES static double pair_product(const double* G, int64_t R, int rank, int i,
                                              int j, const float* h) {
  return pair_product_body(G, R, rank, i, j, h);
}
OMOE_VECTOR_CLONES static double pair_product(const double* G, int64_t R, int rank, int i,
                                              int j, const double* h) {
  return pair_product_body(G, R, rank, i, j, h);
}
OMOE_VECTOR_CLONES static void dense_gram(const double* G, int E, int rank, const float* h,
                                          int64_t n, double* S) {
  dense_gram_body(G, E, rank, h, n, S);
}
OMOE_VECTOR_CLONES static void dense_gram(const double* G, int E, int rank, const double* h,
                                          int64_t n, double* S) {
  dense_gram_body(G, E, rank, h, n, S);
}

// W[i][(j, b)] = c[i·E + j] h_jb for every pair (dense routing), rows w_stride apart.
template <typename h_t>
__attribute__((always_inline)) inline void dense_w_rows_body(const double* __restrict c,
                                                             const h_t* __restrict h, int E,
                                                             int rank, int64_t w_stride,
                                                             double* __restrict w) {
  for (int i = 0; i < E; ++i)
    for (int j = 0; j < E; ++j) {
      const double cij = c[i * E + j];
      double* __restrict block = w + i * w_stride + j * rank;
      const h_t* __restrict hj = h + j * rank;
      for (int b = 0; b < rank; ++b) block[b] = cij * static_cast<double>(hj[b]);
    }
}
OMOE_VECTOR_CLONES static void dense_w_rows(const double* c, const float* h, int E, int rank,
                                            int64_t w_stride, double* w) {
  dense_w_rows_body(c, h, E, rank, w_stride, w);
}
OMOE_VECTOR_CLONES static void dense_w_rows(const double* c, const double* h, int E, int rank,
                                            int64_t w_stride, double* w) {
  dense_w_rows_body(c, h, E, rank, w_stride, w);
}

// The "pairs" backward's work for one token's k active experts (hd: their h in float64,
// r values each, in active order; dS[m·dS_stride + l] = dS_ml):
// grad[m·r + a] = Σ_l (dS_ml + dS_lm) (G_ij h_j)_a, and dG_ij += dS_ml h_i h_jᵀ
// (i = active[m], j = active[l]). (G_ij h_j)_a is read from G's block (j, i) by rows (G is
// symmetric), so, like the update of dG, every inner step is a multiply-add along contiguous
// values with no reduction: it vectorizes, where a dot product per entry would wait on its own
// sum.
OMOE_VECTOR_CLONES static void pair_backward_blocks(const double* __restrict G, int64_t R,
                                                    int rank, const double* __restrict hd,
                                                    const int* active, int k, const double* dS,
                                                    int dS_stride, double* __restrict dG,
                                                    double* __restrict grad) {
  for (int m = 0; m < k; ++m) {
    const int i = active[m];
    const double* __restrict hi = hd + m * rank;
    double* __restrict out = grad + m * rank;
    for (int a = 0; a < rank; ++a) out[a] = 0.0;
    for (int l = 0; l < k; ++l) {
      const int j = active[l];
      const double* __restrict hj = hd + l * rank;
      const double dml = dS[m * dS_stride + l], cml = dml + dS[l * dS_stride + m];
      for (int b = 0; b < rank; ++b) {
        const double* __restrict g_row = G + (int64_t(j) * rank + b) * R + int64_t(i) * rank;
        const double f = cml * hj[b];
        for (int a = 0; a < rank; ++a) out[a] += f * g_row[a];
      }
      for (int a = 0; a < rank; ++a) {
        double* __restrict dg_row = dG + (int64_t(i) * rank + a) * R + int64_t(j) * rank;
        const double f = dml * hi[a];
        for (int b = 0; b < rank; ++b) dg_row[b] += f * hj[b];
      }
    }
  }
}

// S from G = B_catᵀ B_cat ([R, R] float64, R = E·r) for the active pairs only. h is this
// token's h. The backward hands dS back in one of two ways (omoe_ops.cpp picks by cost):
// - dG set ("pairs"): begin_backward forms Σ_l (dS_ml + dS_lm) G_ij h_j into scratch, which
//   grad_h reads back, and adds dS_ml h_i h_jᵀ into dG, this thread's [R, R] accumulator:
//   2·k²·r² multiply-adds per token (pair_backward_blocks), for few pairs;
// - w set ("pairs_gemm"): grad_h adds nothing; end_backward writes this token's rows of
//   W[i][(j, b)] = (dS_ij + dS_ji) h_jb (zero outside the active pairs, w_stride between
//   experts i), and two float64 batched GEMMs after the pass give the Gram part of dh
//   (dh_i += W_i G[block i]ᵀ) and dG + dGᵀ (block row i: h_iᵀ W_i): for many pairs.
template <typename scalar_t>
struct PairGram {
  const double* G;
  int64_t R;
  int rank, num_experts;
  const scalar_t* h;
  double* dG;  // "pairs" backward only
  double* w;   // "pairs_gemm" backward only
  int64_t w_stride;
  const double* S_all;  // this token's [E, E] Gram matrix when formed ahead (dense), or null
  double* scratch;      // "pairs" backward: 2·R values of this thread

  double pair_product(int i, int j) const {
    return S_all ? S_all[i * num_experts + j] : cpu::pair_product(G, R, rank, i, j, h);
  }
  // (The pass hands h in too; this token's h is already held.)
  template <int MAX_K, typename any_t>
  void gram(const any_t*, const int* active, int k, double (*S)[MAX_K]) const {
    for (int m = 0; m < k; ++m)
      for (int l = m; l < k; ++l) {
        const double s = pair_product(active[m], active[l]);
        S[m][l] = s;
        S[l][m] = s;
      }
  }
  template <int MAX_K, typename any_t>
  void begin_backward(const any_t*, const int* active, int k, const double (*dS)[MAX_K]) const {
    if (dG == nullptr) return;  // pairs_gemm: W and the GEMMs after the pass
    double* hd = scratch + R;
    for (int m = 0; m < k; ++m)
      for (int a = 0; a < rank; ++a)
        hd[m * rank + a] = static_cast<double>(h[active[m] * rank + a]);
    pair_backward_blocks(G, R, rank, hd, active, k, &dS[0][0], MAX_K, dG, scratch);
  }
  template <int MAX_K, typename any_t>
  double grad_h(const any_t*, const int*, int, const double (*)[MAX_K], int m, int a) const {
    return dG ? scratch[m * rank + a] : 0.0;
  }
  template <int MAX_K>
  void end_backward(const int* active, int k, const double (*dS)[MAX_K]) const {
    if (w == nullptr) return;
    if (k == num_experts) {  // dense: every block of W
      double c[MAX_K * MAX_K];
      for (int m = 0; m < k; ++m)
        for (int l = 0; l < k; ++l) c[m * k + l] = dS[m][l] + dS[l][m];
      dense_w_rows(c, h, k, rank, w_stride, w);
      return;
    }
    for (int i = 0, m = 0; i < num_experts; ++i) {
      double* row = w + i * w_stride;
      const bool i_active = m < k && active[m] == i;
      for (int j = 0, l = 0; j < num_experts; ++j) {
        double* block = row + j * rank;
        if (i_active && l < k && active[l] == j) {
          const double c = dS[m][l] + dS[l][m];
          for (int b = 0; b < rank; ++b) block[b] = c * static_cast<double>(h[j * rank + b]);
          ++l;
        } else {
          std::fill_n(block, rank, 0.0);
          if (l < k && active[l] == j) ++l;
        }
      }
      if (i_active) ++m;
    }
  }
};

// <u, v> in float64 over n values, 8 partial sums (a fixed order, so it vectorizes).
template <typename v_t>
__attribute__((always_inline)) inline double dot64_body(const v_t* u, const v_t* v, int64_t n) {
  constexpr int kWidth = 8;
  double part[kWidth] = {};
  int64_t q = 0;
  for (; q + kWidth <= n; q += kWidth)
    for (int w = 0; w < kWidth; ++w)
      part[w] += static_cast<double>(u[q + w]) * static_cast<double>(v[q + w]);
  double s = 0.0;
  for (int w = 0; w < kWidth; ++w) s += part[w];
  for (; q < n; ++q) s += static_cast<double>(u[q]) * static_cast<double>(v[q]);
  return s;
}
// out = Σ_l c[l] · e_l (e_l = e + rows[l]·stride, n values), summed in float64.
template <typename v_t>
__attribute__((always_inline)) inline void combine64_body(const double* c, const int* rows,
                                                          int k, const v_t* e, int64_t stride,
                                                          int64_t n, v_t* out) {
  constexpr int64_t kChunk = 256;
  double acc[kChunk];
  for (int64_t q0 = 0; q0 < n; q0 += kChunk) {
    const int64_t len = std::min(kChunk, n - q0);
    for (int64_t q = 0; q < len; ++q) acc[q] = 0.0;
    for (int l = 0; l < k; ++l) {
      const v_t* src = e + rows[l] * stride + q0;
      const double cl = c[l];
      for (int64_t q = 0; q < len; ++q) acc[q] += cl * static_cast<double>(src[q]);
    }
    for (int64_t q = 0; q < len; ++q) out[q0 + q] = static_cast<v_t>(acc[q]);
  }
}
// S from the expert outputs: e points at this token's e_0 (d_out values, expert i at
// e + i·stride; float32 for float32 and 16-bit inputs: S is then the exact Gram matrix of
// vectors rounded like the eager fp32 e_i, which keeps MGS-level accuracy, not a Gram
// shortcut's κ²). The backward writes de_i = Σ_j (dS_ij + dS_ji) e_j in the same layout
// (zero for inactive experts); dh_i += B_iᵀ de_i and dB_i += de_i h_iᵀ are GEMMs after the
// pass, so grad_h has no share here.
// Up to kTiledRows rows, S and de read their rows as float64 kRowChunk values at a time:
// each row is converted once per chunk for all its pairs (or outputs), and the loops work
// on 2 × 2 pairs (4 outputs) per read, in registers. Every value is summed in the order
// dot64 and combine64 sum it, so the tiles change no bit of S or de.
constexpr int kTiledRows = 16;
constexpr int64_t kRowChunk = 128;

// buf[m·kRowChunk + q] = e_m[q0 + q] in float64 for q < len (rows[m], e + rows[m]·stride).
template <typename v_t>
__attribute__((always_inline)) inline void rows_to_double(const v_t* e, const int* rows, int k,
                                                          int64_t stride, int64_t q0,
                                                          int64_t len, double* buf) {
  for (int m = 0; m < k; ++m) {
    const v_t* src = e + rows[m] * stride + q0;
    double* dst = buf + m * kRowChunk;
    for (int64_t q = 0; q < len; ++q) dst[q] = static_cast<double>(src[q]);
  }
}

// S[m·ld + l] = <e_m, e_l> for k <= kTiledRows rows, as dot64 sums it: 8 partial sums along
// the row (the two halves of a pair's accumulators), added in order, then the n % 8 tail.
template <typename v_t>
__attribute__((always_inline)) inline void gram_rows64_body(const v_t* e, const int* rows,
                                                            int k, int64_t stride, int64_t n,
                                                            double* S, int ld) {
  alignas(64) double buf[kTiledRows * kRowChunk];
  vec4d acc[kTiledRows][kTiledRows][2];
  const int kp = (k + 1) / 2 * 2;  // an odd k gets a zero row
  for (int m = 0; m < kp; ++m)
    for (int l = 0; l < kp; ++l) acc[m][l][0] = acc[m][l][1] = vec4d{0.0, 0.0, 0.0, 0.0};
  if (kp > k) std::fill_n(buf + k * kRowChunk, kRowChunk, 0.0);
  const int64_t body = n / 8 * 8;
  for (int64_t q0 = 0; q0 < body; q0 += kRowChunk) {
    const int64_t len = std::min(kRowChunk, body - q0);
    rows_to_double(e, rows, k, stride, q0, len, buf);
    for (int m = 0; m < kp; m += 2)
      for (int l = m; l < kp; l += 2) {
        vec4d a[2][2][2];
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            a[i][j][0] = acc[m + i][l + j][0];
            a[i][j][1] = acc[m + i][l + j][1];
          }
        const double* u0 = buf + m * kRowChunk;
        const double* u1 = u0 + kRowChunk;
        const double* v0 = buf + l * kRowChunk;
        const double* v1 = v0 + kRowChunk;
        for (int64_t q = 0; q < len; q += 8) {
          vec4d x[2][2], y[2][2];
          std::memcpy(&x[0], u0 + q, sizeof(x[0]));
          std::memcpy(&x[1], u1 + q, sizeof(x[1]));
          std::memcpy(&y[0], v0 + q, sizeof(y[0]));
          std::memcpy(&y[1], v1 + q, sizeof(y[1]));
          for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 2; ++j) {
              a[i][j][0] += x[i][0] * y[j][0];
              a[i][j][1] += x[i][1] * y[j][1];
            }
        }
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            acc[m + i][l + j][0] = a[i][j][0];
            acc[m + i][l + j][1] = a[i][j][1];
          }
      }
  }
  for (int m = 0; m < k; ++m)
    for (int l = m; l < k; ++l) {
      double s = 0.0;
      for (int w = 0; w < 8; ++w) s += acc[m][l][w / 4][w % 4];
      const v_t* u = e + rows[m] * stride;
      const v_t* v = e + rows[l] * stride;
      for (int64_t q = body; q < n; ++q)
        s += static_cast<double>(u[q]) * static_cast<double>(v[q]);
      S[m * ld + l] = s;
      S[l * ld + m] = s;
    }
}

// de_m = Σ_l c[m·k + l] e_l for k <= kTiledRows rows, written to de + rows[m]·stride, each
// value summed over l in order from 0.0 as combine64 sums it. c holds (k + 3) / 4 · 4 rows.
template <typename v_t>
__attribute__((always_inline)) inline void combine_rows64_body(const double* c, const int* rows,
                                                               int k, const v_t* e,
                                                               int64_t stride, int64_t n,
                                                               v_t* de) {
  alignas(64) double buf[kTiledRows * kRowChunk];
  for (int64_t q0 = 0; q0 < n; q0 += kRowChunk) {
    const int64_t len = std::min(kRowChunk, n - q0);
    const int64_t body = len / 8 * 8;
    rows_to_double(e, rows, k, stride, q0, len, buf);
    for (int m0 = 0; m0 < k; m0 += 4) {
      const int tile = std::min(4, k - m0);
      for (int64_t q = 0; q < body; q += 8) {
        vec4d a[4][2] = {};
        for (int l = 0; l < k; ++l) {
          vec4d lo, hi;
          std::memcpy(&lo, buf + l * kRowChunk + q, sizeof(lo));
          std::memcpy(&hi, buf + l * kRowChunk + q + 4, sizeof(hi));
          for (int i = 0; i < 4; ++i) {
            const double cl = c[(m0 + i) * k + l];
            a[i][0] += cl * lo;
            a[i][1] += cl * hi;
          }
        }
        for (int i = 0; i < tile; ++i) {
          v_t* out = de + rows[m0 + i] * stride + q0 + q;
          for (int w = 0; w < 8; ++w) out[w] = static_cast<v_t>(a[i][w / 4][w % 4]);
        }
      }
      for (int i = 0; i < tile; ++i)
        for (int64_t q = body; q < len; ++q) {
          double s = 0.0;
          for (int l = 0; l < k; ++l) s += c[(m0 + i) * k + l] * buf[l * kRowChunk + q];
          de[rows[m0 + i] * stride + q0 + q] = static_cast<v_t>(s);
        }
    }
  }
}
// The x86-64-v3 and baseline clones of the row loops above, for float and double.
#define OMOE_ROW_LOOP_CLONES(v_t)                                                            \
  OMOE_VECTOR_CLONES static double dot64(const v_t* u, const v_t* v, int64_t n) {            \
    return dot64_body(u, v, n);                                                              \
  }                                                                                          \
  OMOE_VECTOR_CLONES static void combine64(const double* c, const int* rows, int k,          \
                                           const v_t* e, int64_t stride, int64_t n,          \
                                           v_t* out) {                                       \
    combine64_body(c, rows, k, e, stride, n, out);                                           \
  }                                                                                          \
  OMOE_VECTOR_CLONES static void gram_rows64(const v_t* e, const int* rows, int k,           \
                                             int64_t stride, int64_t n, double* S, int ld) { \
    gram_rows64_body(e, rows, k, stride, n, S, ld);                                          \
  }                                                                                          \
  OMOE_VECTOR_CLONES static void combine_rows64(const double* c, const int* rows, int k,     \
                                                const v_t* e, int64_t stride, int64_t n,     \
                                                v_t* de) {                                   \
    combine_rows64_body(c, rows, k, e, stride, n, de);                                       \
  }
OMOE_ROW_LOOP_CLONES(float)
OMOE_ROW_LOOP_CLONES(double)
#undef OMOE_ROW_LOOP_CLONES

// S of the k rows e + rows[m]·stride (n values each), in float64.
template <int MAX_K, typename value_t>
inline void gram_of_rows(const value_t* e, const int* rows, int k, int64_t stride, int64_t n,
                         double (*S)[MAX_K]) {
  if (k <= kTiledRows) {
    gram_rows64(e, rows, k, stride, n, &S[0][0], MAX_K);
    return;
  }
  for (int m = 0; m < k; ++m)
    for (int l = m; l < k; ++l) {
      const double s = dot64(e + rows[m] * stride, e + rows[l] * stride, n);
      S[m][l] = s;
      S[l][m] = s;
    }
}

// de of those rows from dS: de_m = Σ_l (dS_ml + dS_lm) e_l.
template <int MAX_K, typename value_t>
inline void de_of_rows(const value_t* e, const int* rows, int k, int64_t stride, int64_t n,
                       const double (*dS)[MAX_K], value_t* de) {
  if (k <= kTiledRows) {
    double c[kTiledRows * kTiledRows];  // rows past k up to a multiple of 4: zero
    for (int m = 0; m < k; ++m)
      for (int l = 0; l < k; ++l) c[m * k + l] = dS[m][l] + dS[l][m];
    std::fill(c + k * k, c + (k + 3) / 4 * 4 * k, 0.0);
    combine_rows64(c, rows, k, e, stride, n, de);
    return;
  }
  double c[MAX_K];
  for (int m = 0; m < k; ++m) {
    for (int l = 0; l < k; ++l) c[l] = dS[m][l] + dS[l][m];
    combine64(c, rows, k, e, stride, n, de + rows[m] * stride);
  }
}

// Dense routing (every expert active) takes S and de by batched GEMMs over the chunk's
// tokens instead (omoe_ops.cpp): S_all is then this token's [E, E] Gram matrix, formed
// ahead, and end_backward writes c_out = dS + dSᵀ ([E, E]), from which de = c_out·e is one
// more GEMM after the pass.
template <typename value_t>
struct DirectGram {
  const value_t* e;
  int64_t stride, d_out;
  int num_experts;
  value_t* de;          // backward only, per token (c_out null)
  const double* S_all;  // dense: [E, E], or null
  double* c_out;        // dense backward: [E, E], or null

  template <int MAX_K, typename scalar_t>
  void gram(const scalar_t*, const int* active, int k, double (*S)[MAX_K]) const {
    if (S_all == nullptr) {
      gram_of_rows(e, active, k, stride, d_out, S);
      return;
    }
    for (int m = 0; m < k; ++m)
      for (int l = 0; l < k; ++l) S[m][l] = S_all[active[m] * num_experts + active[l]];
  }
  template <int MAX_K, typename any_t>
  void begin_backward(const any_t*, const int*, int, const double (*)[MAX_K]) const {}
  template <int MAX_K, typename scalar_t>
  double grad_h(const scalar_t*, const int*, int, const double (*)[MAX_K], int, int) const {
    return 0.0;
  }
  template <int MAX_K>
  void end_backward(const int* active, int k, const double (*dS)[MAX_K]) const {
    if (c_out != nullptr) {  // dense: k = E, active[m] = m
      for (int m = 0; m < k; ++m)
        for (int l = 0; l < k; ++l) c_out[m * k + l] = dS[m][l] + dS[l][m];
      return;
    }
    for (int i = 0, m = 0; i < num_experts; ++i) {  // inactive experts: de_i = 0
      if (m < k && active[m] == i) ++m;
      else std::fill_n(de + i * stride, d_out, value_t(0));
    }
    de_of_rows(e, active, k, stride, d_out, dS, de);
  }
};

// ---- dense routing: MGS for kLanes tokens at once ---------------------------------------
//
// Under dense routing every token has the same active set (all E experts), so the MGS of
// kLanes tokens runs as one loop nest whose innermost loop walks the tokens. Every array
// below is token-minor: entry (a, b) of token n at [(a·k + b)·kLanes + n], k the active
// count; a row a is k·kLanes values. Each token follows mgs_forward / mgs_backward
// (omoe_token.h) step for step, its branches as per-token selects, so a token's result
// does not depend on its neighbours (the unused lanes of a short block hold a copy).
constexpr int kLanes = 4;

// The per-block MGS state (as MgsTape), token-minor.
struct LaneTape {
  double* S;
  double* C;
  double* SC;
  double* proj;
  double* norm_sq;  // [k][kLanes]
};

template <int MAX_K>
struct LaneTapeStore {
  static constexpr int kSquare = MAX_K * MAX_K * kLanes;
  // Read as lane_t (below), which is 64-byte aligned.
  alignas(64) double S[kSquare];
  alignas(64) double C[kSquare];
  alignas(64) double SC[kSquare];
  alignas(64) double proj[kSquare];
  alignas(64) double norm_sq[MAX_K * kLanes];
  LaneTape view() { return LaneTape{S, C, SC, proj, norm_sq}; }
};

// What a dense forward pass keeps per thread: the block's tape, one token's S as the Gram
// sources write it, and the gates and coefficients by token.
template <int MAX_K>
struct DenseForwardState {
  LaneTapeStore<MAX_K> lanes;
  double S_token[MAX_K][MAX_K];
  double gates[MAX_K * kLanes], coeff[MAX_K * kLanes];
};
// And a backward pass: dL/dC, dL/dS and the accumulator U of mgs_backward, token-minor;
// dcoeff and dgate by token; a token's dS in the layout the Gram sources read.
template <int MAX_K>
struct DenseBackwardState {
  static constexpr int kSquare = LaneTapeStore<MAX_K>::kSquare;
  DenseForwardState<MAX_K> fwd;
  alignas(64) double dC[kSquare];
  alignas(64) double dS[kSquare];
  alignas(64) double U[kSquare];
  double dcoeff[MAX_K * kLanes], dgate[MAX_K * kLanes];
  double dS_token[MAX_K][MAX_K];
};

// kLanes doubles as one value (GCC/Clang vector extension: one AVX2 register in the
// x86-64-v3 clone, two SSE registers in the baseline); GCC does not vectorize the plain
// loops over the lanes on its own, and lowers wider vector values than the ISA's poorly.
typedef double lane_t __attribute__((vector_size(kLanes * sizeof(double))));
typedef int64_t lane_mask_t __attribute__((vector_size(kLanes * sizeof(int64_t))));

// mgs_forward for kLanes tokens (t.S set). Arrays hold k rows of k lane values.
__attribute__((always_inline)) inline void lane_mgs_forward_body(const LaneTape& t, int k,
                                                                 bool normalize, double eps) {
  const lane_t* S = reinterpret_cast<const lane_t*>(t.S);
  lane_t* C = reinterpret_cast<lane_t*>(t.C);
  lane_t* SC = reinterpret_cast<lane_t*>(t.SC);
  lane_t* proj = reinterpret_cast<lane_t*>(t.proj);
  lane_t* norm_sq = reinterpret_cast<lane_t*>(t.norm_sq);
  const lane_t zero = {}, one = zero + 1.0;
  for (int m = 0; m < k; ++m) {
    lane_t* c = C + m * k;
    lane_t* sc = SC + m * k;
    for (int l = 0; l < k; ++l) {
      c[l] = (l == m) ? one : zero;
      sc[l] = S[l * k + m];
    }
    for (int j = 0; j < m; ++j) {
      const lane_t* cj = C + j * k;
      const lane_t* scj = SC + j * k;
      lane_t coef = zero;
      for (int l = 0; l < k; ++l) coef += c[l] * scj[l];
      if (!normalize) coef /= norm_sq[j] + eps;
      proj[m * k + j] = coef;
      for (int l = 0; l < k; ++l) {
        c[l] -= coef * cj[l];
        sc[l] -= coef * scj[l];
      }
    }
    lane_t raw = zero;
    for (int l = 0; l < k; ++l) raw += c[l] * sc[l];
    // As mgs_forward: clamp at 0, keep a NaN.
    norm_sq[m] = ((raw > 0.0) | (raw != raw)) ? raw : zero;
    if (normalize) {
      lane_t inv = {};
      for (int n = 0; n < kLanes; ++n) inv[n] = 1.0 / std::sqrt(norm_sq[m][n] + eps);
      for (int l = 0; l < k; ++l) {
        c[l] *= inv;
        sc[l] *= inv;
      }
    }
  }
}

// mgs_backward for kLanes tokens: dC holds dL/dC on entry (overwritten); dS receives dL/dS
// (not symmetrized); U is scratch.
__attribute__((always_inline)) inline void lane_mgs_backward_body(const LaneTape& t, int k,
                                                                  bool normalize, double eps,
                                                                  double* dC_, double* dS_,
                                                                  double* U_) {
  const lane_t* C = reinterpret_cast<const lane_t*>(t.C);
  const lane_t* SC = reinterpret_cast<const lane_t*>(t.SC);
  const lane_t* proj = reinterpret_cast<const lane_t*>(t.proj);
  const lane_t* norm_sq = reinterpret_cast<const lane_t*>(t.norm_sq);
  lane_t* dC = reinterpret_cast<lane_t*>(dC_);
  lane_t* dS = reinterpret_cast<lane_t*>(dS_);
  lane_t* U = reinterpret_cast<lane_t*>(U_);
  const lane_t zero = {};
  for (int q = 0; q < k * k; ++q) {
    U[q] = zero;
    dS[q] = zero;
  }
  lane_t c[kMaxExperts], sc[kMaxExperts], dc[kMaxExperts];
  for (int m = k - 1; m >= 0; --m) {
    const lane_t* cm = C + m * k;
    const lane_t* scm = SC + m * k;
    const lane_t* dcm = dC + m * k;
    if (normalize) {
      lane_t inv = {}, root = {};
      for (int n = 0; n < kLanes; ++n) {
        const double nu = norm_sq[m][n] + eps;
        inv[n] = 1.0 / std::sqrt(nu);
        root[n] = std::sqrt(nu);
      }
      for (int l = 0; l < k; ++l) {  // the vector before normalizing
        c[l] = cm[l] * root;
        sc[l] = scm[l] * root;
      }
      lane_t d = zero;
      for (int l = 0; l < k; ++l) d += dcm[l] * c[l];
      // No gradient through the clamp (norm_sq 0); a NaN flows on.
      const lane_t dnu = (norm_sq[m] != 0.0) ? -0.5 * inv * inv * inv * d : zero;
      for (int l = 0; l < k; ++l) dc[l] = inv * dcm[l] + 2.0 * dnu * sc[l];
      for (int a = 0; a < k; ++a) {
        const lane_t dnu_ca = dnu * c[a];
        for (int b = 0; b < k; ++b) dS[a * k + b] += dnu_ca * c[b];
      }
    } else {
      for (int l = 0; l < k; ++l) {
        c[l] = cm[l];
        sc[l] = scm[l];
        dc[l] = dcm[l];
      }
    }
    for (int j = m - 1; j >= 0; --j) {
      const lane_t* cj = C + j * k;
      const lane_t* scj = SC + j * k;
      lane_t* dcj = dC + j * k;
      lane_t* uj = U + j * k;
      const lane_t coef = proj[m * k + j];
      const lane_t nrm = normalize ? zero + 1.0 : norm_sq[j] + eps;
      for (int l = 0; l < k; ++l) {  // the running vector before this step
        c[l] += coef * cj[l];
        sc[l] += coef * scj[l];
      }
      lane_t dot_cj = zero;
      for (int l = 0; l < k; ++l) dot_cj += dc[l] * cj[l];
      const lane_t dp = -dot_cj / nrm;
      for (int l = 0; l < k; ++l) {
        dcj[l] += -coef * dc[l] + dp * sc[l];
        uj[l] += dp * c[l];
      }
      if (!normalize) {
        // Clamped (norm_sq 0): no gradient; a NaN flows on.
        const lane_t dn = dot_cj * coef / nrm;
        const lane_mask_t live = norm_sq[j] != 0.0;
        for (int l = 0; l < k; ++l) {
          dcj[l] = live ? dcj[l] + 2.0 * dn * scj[l] : dcj[l];
          uj[l] = live ? uj[l] + dn * cj[l] : uj[l];
        }
      }
      for (int l = 0; l < k; ++l) dc[l] += dp * scj[l];
    }
  }
  for (int j = 0; j < k; ++j)
    for (int a = 0; a < k; ++a) {
      const lane_t u = U[j * k + a];
      for (int b = 0; b < k; ++b) dS[a * k + b] += u * C[j * k + b];
    }
}
OMOE_VECTOR_CLONES static void lane_mgs_forward(const LaneTape& t, int k, bool normalize,
                                                double eps) {
  lane_mgs_forward_body(t, k, normalize, eps);
}
OMOE_VECTOR_CLONES static void lane_mgs_backward(const LaneTape& t, int k, bool normalize,
                                                 double eps, double* dC, double* dS,
                                                 double* U) {
  lane_mgs_backward_body(t, k, normalize, eps, dC, dS, U);
}

// Routing and S of token n of a block into the lane arrays: gates and S by token (the
// Gram source writes S as one token's matrix first).
template <int MAX_K, typename scalar_t, typename Gram>
void dense_lane_inputs(const scalar_t* h, const scalar_t* logits, const Gram& gram, int E,
                       DenseForwardState<MAX_K>& st, int n) {
  int active[MAX_K];
  double gates[MAX_K];
  const int k = route_token(logits, E, E, active, gates);
  gram.template gram<MAX_K>(h, active, k, st.S_token);
  for (int a = 0; a < k; ++a) {
    st.gates[a * kLanes + n] = gates[a];
    for (int b = 0; b < k; ++b) st.lanes.S[(a * k + b) * kLanes + n] = st.S_token[a][b];
  }
}
// Lanes [count, kLanes) copy lane count − 1 (k rows of a token-minor array of `rows` rows).
inline void fill_spare_lanes(double* a, int64_t rows, int count) {
  for (int64_t q = 0; q < rows; ++q)
    for (int n = count; n < kLanes; ++n) a[q * kLanes + n] = a[q * kLanes + count - 1];
}
// coeff[l] = Σ_{m >= l} g_m C[m][l], by token (as token_coefficients).
template <int MAX_K>
void dense_lane_coefficients(DenseForwardState<MAX_K>& st, int k) {
  constexpr int L = kLanes;
  for (int l = 0; l < k; ++l) {
    double acc[L] = {};
    for (int m = l; m < k; ++m)
      for (int n = 0; n < L; ++n)
        acc[n] += st.gates[m * L + n] * st.lanes.C[(m * k + l) * L + n];
    for (int n = 0; n < L; ++n) st.coeff[l * L + n] = acc[n];
  }
}

// The forward state of the dense tokens [t0, t0 + count) (count <= kLanes): their S and
// gates in the lanes, the spare lanes filled, MGS run and the coefficients formed.
template <int MAX_K, typename scalar_t, typename Route>
void dense_lane_forward(const scalar_t* h, const scalar_t* logits, const Route& route,
                        int64_t t0, int count, int thread, int E, int r, bool normalize,
                        double eps, DenseForwardState<MAX_K>& st) {
  const int64_t er = int64_t(E) * r;
  const int k = E;
  for (int n = 0; n < count; ++n)
    dense_lane_inputs(h + (t0 + n) * er, logits + (t0 + n) * E, route.at(t0 + n, thread), E, st,
                      n);
  fill_spare_lanes(st.lanes.S, int64_t(k) * k, count);
  fill_spare_lanes(st.gates, k, count);
  lane_mgs_forward(st.lanes.view(), k, normalize, eps);
  dense_lane_coefficients(st, k);
}

// token_forward for the tokens [begin, end) under dense routing, kLanes at a time.
template <int MAX_K, typename scalar_t, typename Route>
void dense_forward_tokens(const scalar_t* h, const scalar_t* logits, const Route& route,
                          int64_t begin, int64_t end, int thread, int E, int r, bool normalize,
                          double eps, DenseForwardState<MAX_K>& st, scalar_t* z,
                          double* coeff) {
  const int64_t er = int64_t(E) * r;
  const int k = E;
  for (int64_t t0 = begin; t0 < end; t0 += kLanes) {
    const int count = int(std::min<int64_t>(kLanes, end - t0));
    dense_lane_forward(h, logits, route, t0, count, thread, E, r, normalize, eps, st);
    for (int n = 0; n < count; ++n) {
      const scalar_t* ht = h + (t0 + n) * er;
      scalar_t* zt = z + (t0 + n) * er;
      for (int i = 0; i < k; ++i) {
        const double a = st.coeff[i * kLanes + n];
        if (coeff) coeff[(t0 + n) * E + i] = a;
        for (int q = i * r; q < (i + 1) * r; ++q)
          zt[q] = static_cast<scalar_t>(a * static_cast<double>(ht[q]));
      }
    }
  }
}

// token_backward for the tokens [begin, end) under dense routing, kLanes at a time.
template <int MAX_K, typename scalar_t, typename Route>
void dense_backward_tokens(const scalar_t* h, const scalar_t* logits, const Route& route,
                           const scalar_t* dz, int64_t begin, int64_t end, int thread, int E,
                           int r, bool normalize, double eps, DenseBackwardState<MAX_K>& st,
                           scalar_t* z, scalar_t* dh, scalar_t* dlogits) {
  constexpr int L = kLanes;
  const int64_t er = int64_t(E) * r;
  const int k = E;
  DenseForwardState<MAX_K>& f = st.fwd;
  int active[MAX_K];
  for (int i = 0; i < k; ++i) active[i] = i;
  for (int64_t t0 = begin; t0 < end; t0 += L) {
    const int count = int(std::min<int64_t>(L, end - t0));
    dense_lane_forward(h, logits, route, t0, count, thread, E, r, normalize, eps, f);
    // z = a ⊙ h: da_l = <dz_l, h_l>; the direct part of dh_l is a_l dz_l (added below).
    for (int n = 0; n < count; ++n) {
      const scalar_t* ht = h + (t0 + n) * er;
      const scalar_t* dzt = dz + (t0 + n) * er;
      scalar_t* zt = z + (t0 + n) * er;
      for (int i = 0; i < k; ++i) {
        const double a = f.coeff[i * L + n];
        double s = 0.0;
        for (int q = i * r; q < (i + 1) * r; ++q) {
          const double hv = static_cast<double>(ht[q]);
          zt[q] = static_cast<scalar_t>(a * hv);
          s += static_cast<double>(dzt[q]) * hv;
        }
        st.dcoeff[i * L + n] = s;
      }
    }
    fill_spare_lanes(st.dcoeff, k, count);
    // dgate_m = <C_m, dcoeff>, dC_m = g_m dcoeff.
    for (int m = 0; m < k; ++m) {
      double acc[L] = {};
      for (int l = 0; l < k; ++l)
        for (int n = 0; n < L; ++n)
          acc[n] += f.lanes.C[(m * k + l) * L + n] * st.dcoeff[l * L + n];
      for (int n = 0; n < L; ++n) st.dgate[m * L + n] = acc[n];
      for (int l = 0; l < k; ++l)
        for (int n = 0; n < L; ++n)
          st.dC[(m * k + l) * L + n] = f.gates[m * L + n] * st.dcoeff[l * L + n];
    }
    lane_mgs_backward(f.lanes.view(), k, normalize, eps, st.dC, st.dS, st.U);
    for (int n = 0; n < count; ++n) {
      const int64_t t = t0 + n;
      const auto gram = route.at(t, thread);
      for (int a = 0; a < k; ++a)
        for (int b = 0; b < k; ++b) st.dS_token[a][b] = st.dS[(a * k + b) * L + n];
      const scalar_t* ht = h + t * er;
      const scalar_t* dzt = dz + t * er;
      scalar_t* dht = dh + t * er;
      gram.template begin_backward<MAX_K>(ht, active, k, st.dS_token);
      for (int m = 0; m < k; ++m) {
        const double a = f.coeff[m * L + n];
        for (int q = 0; q < r; ++q) {
          // Through S: dh_i += Σ_j (dS_ij + dS_ji) G_ij h_j (the source's share).
          const double acc = a * static_cast<double>(dzt[m * r + q]) +
                             gram.template grad_h<MAX_K>(ht, active, k, st.dS_token, m, q);
          dht[m * r + q] = static_cast<scalar_t>(acc);
        }
      }
      gram.template end_backward<MAX_K>(active, k, st.dS_token);
      // Softmax: dlogit_i = g_i (dg_i − Σ_j g_j dg_j).
      double mean = 0.0;
      for (int m = 0; m < k; ++m) mean += f.gates[m * L + n] * st.dgate[m * L + n];
      for (int m = 0; m < k; ++m)
        dlogits[t * E + m] =
            static_cast<scalar_t>(f.gates[m * L + n] * (st.dgate[m * L + n] - mean));
    }
  }
}

// The Gram source of token t (of a chunk) for each route.
struct GhRoute {
  const double* gh;  // [E, Tc, R]
  double* dg_lhs;    // [E, Tc, R], backward only
  int64_t Tc;
  int E, r;
  void begin_block(int64_t, int64_t, int) const {}
  GhGram at(int64_t t, int) const {
    const int64_t R = int64_t(E) * r;
    return GhGram{gh ? gh + t * R : nullptr, Tc * R, E, r, dg_lhs ? dg_lhs + t * R : nullptr};
  }
};
template <typename scalar_t>
struct PairRoute {
  const double* G;    // [R, R]
  const scalar_t* h;  // [Tc, R], the chunk's h
  double* dG;         // [num_threads, R, R], "pairs" backward only
  double* scratch;    // [num_threads, 2·R], "pairs" backward only
  double* w;          // [E, Tc, R], "pairs_gemm" backward only
  int64_t Tc, R;
  int E, r;
  // Dense routing: each thread's [kTokensPerTask, E, E], S of its block of tokens formed
  // ahead by dense_gram (begin_block); null otherwise.
  double* S_blocks = nullptr;

  void begin_block(int64_t begin, int64_t end, int thread) const {
    if (S_blocks)
      dense_gram(G, E, r, h + begin * R, end - begin,
                 block_S(thread) + (begin % kTokensPerTask) * E * E);
  }
  PairGram<scalar_t> at(int64_t t, int thread) const {
    return PairGram<scalar_t>{
        G,
        R,
        r,
        E,
        h + t * R,
        dG ? dG + int64_t(thread) * R * R : nullptr,
        w ? w + t * R : nullptr,
        Tc * R,
        S_blocks ? block_S(thread) + (t % kTokensPerTask) * E * E : nullptr,
        scratch ? scratch + int64_t(thread) * 2 * R : nullptr};
  }

 private:
  double* block_S(int thread) const {
    return S_blocks + int64_t(thread) * kTokensPerTask * E * E;
  }
};
template <typename value_t>
struct DirectRoute {
  const value_t* e;  // [E, Tc, d_out]
  value_t* de;       // [E, Tc, d_out], backward only (S null)
  int64_t Tc, d_out;
  int E;
  const double* S = nullptr;  // dense: [Tc, E, E], formed ahead by a batched GEMM
  double* C = nullptr;        // dense backward: [Tc, E, E], dS + dSᵀ by token
  void begin_block(int64_t, int64_t, int) const {}
  DirectGram<value_t> at(int64_t t, int) const {
    const int64_t EE = int64_t(E) * E;
    return DirectGram<value_t>{e + t * d_out,
                               Tc * d_out,
                               d_out,
                               E,
                               de ? de + t * d_out : nullptr,
                               S ? S + t * EE : nullptr,
                               C ? C + t * EE : nullptr};
  }
};

// Runs body(begin, end, thread, state) over the tokens [0, T) in blocks of
// tokens_per_task(T) tokens, handed out one at a time; state is the thread's own State
// (made once per thread). A
// static split (at::parallel_for) waits for its slowest half: with a busy neighbour on 2
// cores, that is a whole scheduler slice per pass. Here the thread that runs keeps taking
// blocks, so a descheduled one holds up at most one block.
inline int64_t tokens_per_task(int64_t T, int threads) {
  int64_t n = kTokensPerTask;
  while (n > kMinTokensPerTask && (T + n - 1) / n < threads) n /= 2;
  return n;
}
template <typename State, typename Body>
void for_token_blocks(int64_t T, Body&& body) {
  const int64_t task = tokens_per_task(T, at::get_num_threads());
  const int64_t blocks = (T + task - 1) / task;
  const int threads = int(std::min<int64_t>(at::get_num_threads(), blocks));
#ifdef _OPENMP
  if (threads > 1 && !at::in_parallel_region()) {
    std::vector<std::unique_ptr<State>> states(threads);
#pragma omp parallel num_threads(threads)
    {
      const int thread = omp_get_thread_num();
      states[thread] = std::unique_ptr<State>(new State);  // not zeroed: written before read
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < blocks; ++b)
        body(b * task, std::min(T, (b + 1) * task), thread, *states[thread]);
    }
    return;
  }
#endif
  const std::unique_ptr<State> state(new State);
  for (int64_t b = 0; b < blocks; ++b) body(b * task, std::min(T, (b + 1) * task), 0, *state);
}

// How many per-thread accumulators a pass may index (for PairRoute's dG).
inline int pass_threads() { return std::max(1, at::get_num_threads()); }

// z for the T tokens of h ([T, E·r]) and logits ([T, E]); route.at(t, thread) is the Gram
// source of token t (ignored unless orthogonalize). coeff, when given ([T, E]), receives
// each token's mixture coefficients a by expert (0 for inactive experts). token_forward_pass
// takes h, logits and z as tensors.
template <typename scalar_t, typename Route>
void token_forward_rows(const scalar_t* h_ptr, const scalar_t* l_ptr, int64_t T,
                        const Route& route, int64_t E, int64_t r, int64_t top_k,
                        bool orthogonalize, bool normalize, double eps, scalar_t* z_ptr,
                        double* coeff = nullptr) {
  const int64_t er = E * r;
  if (orthogonalize && top_k >= E && E <= kMaxExperts) {
    dispatch_max_active(E, [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      for_token_blocks<DenseForwardState<MAX_K>>(
          T, [&](int64_t begin, int64_t end, int thread, DenseForwardState<MAX_K>& st) {
            route.begin_block(begin, end, thread);
            dense_forward_tokens<MAX_K>(h_ptr, l_ptr, route, begin, end, thread, int(E), int(r),
                                        normalize, eps, st, z_ptr, coeff);
          });
    });
    return;
  }
  dispatch_max_active(std::min(top_k, E), [&](auto max_k) {
    constexpr int MAX_K = decltype(max_k)::value;
    for_token_blocks<MgsTape<MAX_K>>(
        T, [&](int64_t begin, int64_t end, int thread, MgsTape<MAX_K>& tape) {
          if (orthogonalize) route.begin_block(begin, end, thread);
          for (int64_t t = begin; t < end; ++t)
            token_forward(h_ptr + t * er, l_ptr + t * E, route.at(t, thread), int(E), int(r),
                          int(top_k), orthogonalize, normalize, eps, tape, z_ptr + t * er,
                          coeff ? coeff + t * E : nullptr);
        });
  });
}
template <typename Route>
void token_forward_pass(const at::Tensor& h, const at::Tensor& logits, const Route& route,
                        int64_t E, int64_t r, int64_t top_k, bool orthogonalize, bool normalize,
                        double eps, at::Tensor& z, double* coeff = nullptr) {
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_token_forward_cpu", [&] {
    token_forward_rows(h.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), h.size(0), route, E,
                       r, top_k, orthogonalize, normalize, eps, z.data_ptr<scalar_t>(), coeff);
  });
}

// z, dh and dlogits for the tokens of h, given dz; the route's source records dS.
template <typename Route>
void token_backward_pass(const at::Tensor& h, const at::Tensor& logits, const Route& route,
                         const at::Tensor& dz, int64_t E, int64_t r, int64_t top_k,
                         bool orthogonalize, bool normalize, double eps, at::Tensor& z,
                         at::Tensor& dh, at::Tensor& dlogits) {
  const int64_t T = h.size(0), er = E * r;
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "omoe_token_backward_cpu", [&] {
    const scalar_t* h_ptr = h.data_ptr<scalar_t>();
    const scalar_t* l_ptr = logits.data_ptr<scalar_t>();
    const scalar_t* dz_ptr = dz.data_ptr<scalar_t>();
    scalar_t* z_ptr = z.data_ptr<scalar_t>();
    scalar_t* dh_ptr = dh.data_ptr<scalar_t>();
    scalar_t* dl_ptr = dlogits.data_ptr<scalar_t>();
    if (orthogonalize && top_k >= E && E <= kMaxExperts) {
      dispatch_max_active(E, [&](auto max_k) {
        constexpr int MAX_K = decltype(max_k)::value;
        for_token_blocks<DenseBackwardState<MAX_K>>(
            T, [&](int64_t begin, int64_t end, int thread, DenseBackwardState<MAX_K>& st) {
              route.begin_block(begin, end, thread);
              dense_backward_tokens<MAX_K>(h_ptr, l_ptr, route, dz_ptr, begin, end, thread,
                                           int(E), int(r), normalize, eps, st, z_ptr, dh_ptr,
                                           dl_ptr);
            });
      });
      return;
    }
    dispatch_max_active(std::min(top_k, E), [&](auto max_k) {
      constexpr int MAX_K = decltype(max_k)::value;
      for_token_blocks<BackwardScratch<MAX_K>>(T, [&](int64_t begin, int64_t end, int thread,
                                                      BackwardScratch<MAX_K>& scratch) {
        if (orthogonalize) route.begin_block(begin, end, thread);
        for (int64_t t = begin; t < end; ++t)
          token_backward(h_ptr + t * er, l_ptr + t * E, route.at(t, thread), dz_ptr + t * er,
                         int(E), int(r), int(top_k), orthogonalize, normalize, eps, scratch,
                         z_ptr + t * er, dh_ptr + t * er, dl_ptr + t * E);
      });
    });
  });
}

}  // namespace cpu
}  // namespace omoe
