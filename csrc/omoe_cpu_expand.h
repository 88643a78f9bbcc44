// The expand and its gradients on B's own layout [E, d_out, r], for few tokens on the CPU.
//
// The GEMM route packs B as B_cat ([d_out, E·r], a strided copy of all of B) and unpacks
// dB_cat the same way. A call whose B changed since the last (every training step) pays
// both copies, each costing about as much as the expand itself at one token. These loops
// read and write B's blocks B_i ([d_out, r], contiguous) in place instead:
//   expand:          y = base + s · Σ_i z_i B_iᵀ
//   rows × blocks:   out_i (+)= s · g_i B_i          (dz = s dY B_i; dh_i += de_i B_i)
//   outer products:  dB_i (+)= Σ_terms s · g_iᵀ v_i  (s dYᵀ z_i; de_iᵀ h_i)
// Every loop over a runs along contiguous memory (an r-row of B or of z) and vectorizes;
// B is read once per call whatever the number of tokens (they share each B row).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "omoe_cpu_pass.h"  // OMOE_VECTOR_CLONES

namespace omoe {
namespace cpu {

// Multiply-adds per parallel task: below this a second thread costs more than it saves.
constexpr int64_t kExpandGrain = 1 << 16;

// The loops below take the rank as a compile-time R (4, 8, 16, 32 or 64: an r-row is then a
// few vector registers and its loop unrolls) or, with R = 0, as the runtime r.
template <int R>
__attribute__((always_inline)) inline int64_t rank_of(int64_t r) {
  return R > 0 ? R : r;
}
// Calls BODY<R>(args...) for r's compile-time R, or BODY<0> (a switch, not a lambda: a
// lambda would be a function of its own, outside the caller's x86-64-v3 clone).
#define OMOE_DISPATCH_RANK(r, BODY, ...) \
  switch (r) {                           \
    case 4:                              \
      BODY<4>(__VA_ARGS__);              \
      break;                             \
    case 8:                              \
      BODY<8>(__VA_ARGS__);              \
      break;                             \
    case 16:                             \
      BODY<16>(__VA_ARGS__);             \
      break;                             \
    case 32:                             \
      BODY<32>(__VA_ARGS__);             \
      break;                             \
    case 64:                             \
      BODY<64>(__VA_ARGS__);             \
      break;                             \
    default:                             \
      BODY<0>(__VA_ARGS__);              \
  }
// An r-row of accumulators (len values). For a compile-time R that is a multiple of a
// 32-byte vector's lanes it is R/L vectors (GCC/Clang vector extension: AVX2 registers in
// the x86-64-v3 clone, SSE pairs in the baseline); GCC does not vectorize these short rows
// on its own. Otherwise, kMaxRow scalars at a time.
constexpr int64_t kMaxRow = 64;
template <int R, typename v_t, bool kVector = (R > 0 && R % (32 / sizeof(v_t)) == 0)>
struct Row {
  static constexpr int L = 32 / sizeof(v_t), N = R / L;
  typedef v_t V __attribute__((vector_size(32)));
  V v[N];
  // Unaligned loads into x (an out-parameter: a returned 32-byte vector would be an ABI
  // question for the baseline clone, whatever the inlining).
  __attribute__((always_inline)) static void load_vec(V& x, const v_t* p) {
    std::memcpy(&x, p, sizeof(V));
  }
  __attribute__((always_inline)) void zero() {
    for (int k = 0; k < N; ++k) v[k] = V{};
  }
  __attribute__((always_inline)) void load(const v_t* p, int64_t) {
    for (int k = 0; k < N; ++k) load_vec(v[k], p + k * L);
  }
  __attribute__((always_inline)) void axpy(v_t g, const v_t* x, int64_t) {  // += g·x
    for (int k = 0; k < N; ++k) {
      V a;
      load_vec(a, x + k * L);
      v[k] += g * a;
    }
  }
  __attribute__((always_inline)) void mul_add(const v_t* x, const v_t* y, int64_t) {  // += x⊙y
    for (int k = 0; k < N; ++k) {
      V a, b;
      load_vec(a, x + k * L);
      load_vec(b, y + k * L);
      v[k] += a * b;
    }
  }
  __attribute__((always_inline)) v_t sum(int64_t) const {
    V t = v[0];
    for (int k = 1; k < N; ++k) t += v[k];
    v_t s = 0;
    for (int l = 0; l < L; ++l) s += t[l];
    return s;
  }
  // p = (accumulate ? p : 0) + scale · row
  __attribute__((always_inline)) void store(v_t* p, v_t scale, bool accumulate, int64_t) const {
    for (int k = 0; k < N; ++k) {
      V out = scale * v[k];
      if (accumulate) {
        V old;
        load_vec(old, p + k * L);
        out += old;
      }
      std::memcpy(p + k * L, &out, sizeof(V));
    }
  }
};
template <int R, typename v_t>
struct Row<R, v_t, false> {
  v_t v[R > 0 ? R : kMaxRow];
  __attribute__((always_inline)) void zero() {
    for (auto& x : v) x = 0;
  }
  __attribute__((always_inline)) void load(const v_t* p, int64_t len) {
    for (int64_t a = 0; a < len; ++a) v[a] = p[a];
  }
  __attribute__((always_inline)) void axpy(v_t g, const v_t* x, int64_t len) {
    for (int64_t a = 0; a < len; ++a) v[a] += g * x[a];
  }
  __attribute__((always_inline)) void mul_add(const v_t* x, const v_t* y, int64_t len) {
    for (int64_t a = 0; a < len; ++a) v[a] += x[a] * y[a];
  }
  __attribute__((always_inline)) v_t sum(int64_t len) const {
    v_t s = 0;
    for (int64_t a = 0; a < len; ++a) s += v[a];
    return s;
  }
  __attribute__((always_inline)) void store(v_t* p, v_t scale, bool accumulate,
                                            int64_t len) const {
    for (int64_t a = 0; a < len; ++a) p[a] = (accumulate ? p[a] : v_t(0)) + scale * v[a];
  }
};

// How many rows (or tokens) a loop whose sums are chains of multiply-adds runs side by side
// when Row<R, v_t> is whole vectors: about eight vectors of accumulators in all, half of the
// sixteen registers of the x86-64-v3 clone. 1 (one at a time) for other rows, and for rows
// of eight vectors or more, which are eight chains on their own.
template <int R, typename v_t>
constexpr int kRowBlock = R > 0 && R % (32 / sizeof(v_t)) == 0 && R / (32 / sizeof(v_t)) < 8
                              ? 8 / (R / int(32 / sizeof(v_t)))
                              : 1;

// Lanes I... of the 16 lanes of (a, b), as a vector of 8 (GCC before 12 has no
// __builtin_shufflevector).
template <int... I, typename V>
__attribute__((always_inline)) inline V select_lanes(const V& a, const V& b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, I...);
#else
  typedef int32_t Lanes __attribute__((vector_size(32)));
  return __builtin_shuffle(a, b, Lanes{I...});
#endif
}

// Lanes {2j ×4, 2j + 1 ×4} of a vector of 8 floats: the pair of g values for two float
// rows of 4, from a full 8-value load (a vector built from two scalars or an 8-byte load
// goes through the stack in GCC, a store-forwarding stall at every use).
template <int J, typename V>
__attribute__((always_inline)) inline V pair_lanes(const V& g8) {
  return select_lanes<2 * J, 2 * J, 2 * J, 2 * J, 2 * J + 1, 2 * J + 1, 2 * J + 1, 2 * J + 1>(
      g8, g8);
}

// Four vectors from, or to, 4 vectors' worth of consecutive values (eight float rows of 4).
template <typename V, typename v_t>
__attribute__((always_inline)) inline void load4(const v_t* p, V& a, V& b, V& c, V& d) {
  constexpr int L = sizeof(V) / sizeof(v_t);
  std::memcpy(&a, p, sizeof(V));
  std::memcpy(&b, p + L, sizeof(V));
  std::memcpy(&c, p + 2 * L, sizeof(V));
  std::memcpy(&d, p + 3 * L, sizeof(V));
}
// Four float values twice, {p0..p3, p0..p3}: a row of 4 for two rows to a vector (built
// once per row or token, outside the eight-row loops).
template <typename V, typename v_t>
__attribute__((always_inline)) inline V twice4(const v_t* p) {
  V v;
  std::memcpy(&v, p, 4 * sizeof(v_t));
  std::memcpy(reinterpret_cast<v_t*>(&v) + 4, p, 4 * sizeof(v_t));
  return v;
}
template <typename V, typename v_t>
__attribute__((always_inline)) inline void store4(v_t* p, const V& a, const V& b, const V& c,
                                                  const V& d) {
  constexpr int L = sizeof(V) / sizeof(v_t);
  std::memcpy(p, &a, sizeof(V));
  std::memcpy(p + L, &b, sizeof(V));
  std::memcpy(p + 2 * L, &c, sizeof(V));
  std::memcpy(p + 3 * L, &d, sizeof(V));
}

// Tokens a loop over float rows of 4 (half a vector) runs side by side: four chains of
// multiply-adds hide each one's latency.
constexpr int kQuadTokens = 4;

// rows_times_blocks for float rows of 4, NT tokens (g rows d_out apart, out rows out_stride
// apart) of one expert B_i ([d_out, 4]).
template <int NT, typename v_t>
__attribute__((always_inline)) inline void quad_rows_times_block(const v_t* g, int64_t d_out,
                                                                 const v_t* Bi, v_t* out,
                                                                 int64_t out_stride, v_t s,
                                                                 bool accumulate) {
  typedef v_t V __attribute__((vector_size(32)));
  typedef v_t Quad __attribute__((vector_size(16)));
  V acc[NT] = {};
  int64_t o = 0;
  for (; o + 8 <= d_out; o += 8) {  // 8 rows: one load of g per token, four pairs
    V b0, b1, b2, b3;
    load4(Bi + o * 4, b0, b1, b2, b3);
    for (int u = 0; u < NT; ++u) {
      V g8;
      std::memcpy(&g8, g + u * d_out + o, sizeof(V));
      acc[u] += pair_lanes<0>(g8) * b0;
      acc[u] += pair_lanes<1>(g8) * b1;
      acc[u] += pair_lanes<2>(g8) * b2;
      acc[u] += pair_lanes<3>(g8) * b3;
    }
  }
  for (int u = 0; u < NT; ++u) {
    Quad lo, hi;  // the even and the odd rows' sums
    std::memcpy(&lo, &acc[u], sizeof(Quad));
    std::memcpy(&hi, reinterpret_cast<const v_t*>(&acc[u]) + 4, sizeof(Quad));
    Quad sum = lo + hi;
    for (int64_t q = o; q < d_out; ++q) {
      Quad b;
      std::memcpy(&b, Bi + q * 4, sizeof(Quad));
      sum += g[u * d_out + q] * b;
    }
    v_t* p = out + u * out_stride;
    Quad old{};
    if (accumulate) std::memcpy(&old, p, sizeof(Quad));
    sum = old + s * sum;
    std::memcpy(p, &sum, sizeof(Quad));
  }
}

// Keeps v a rounded value of its own: without it GCC fuses a product with the add that
// follows into one multiply-add in some copies of a loop (a block of tokens) and not in
// others (one token), and the two would differ in the last bit.
template <typename T>
__attribute__((always_inline)) inline void rounded_alone(T& v) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+x"(v));
#endif
}

// expand_blocks for float rows of 4: y[t, o] for the NT tokens from t0.
template <int NT, typename v_t>
__attribute__((always_inline)) inline void quad_expand_tokens(const v_t* z, const v_t* B,
                                                              const v_t* base, v_t* y,
                                                              int64_t t0, int64_t E,
                                                              int64_t d_out, v_t s, int64_t o) {
  typedef v_t Quad __attribute__((vector_size(16)));
  Quad part[NT] = {};
  for (int64_t i = 0; i < E; ++i) {
    Quad b;
    std::memcpy(&b, B + (i * d_out + o) * 4, sizeof(Quad));
    for (int u = 0; u < NT; ++u) {
      Quad zu;
      std::memcpy(&zu, z + (t0 + u) * E * 4 + i * 4, sizeof(Quad));
      part[u] += b * zu;
    }
  }
  for (int u = 0; u < NT; ++u) {
    v_t total = 0;
    for (int a = 0; a < 4; ++a) total += part[u][a];
    const int64_t at = (t0 + u) * d_out + o;
    v_t sum = s * (v_t(0) + total);  // a -0 sum adds +0, as the other ranks' loops
    rounded_alone(sum);
    y[at] = base ? base[at] + sum : sum;
  }
}

// y[t, o] = base[t, o] + s · Σ_i Σ_a B[i, o, a] z[t, i·r + a] for o in [o0, o1).
// z: [T, E·r]; base, y: [T, d_out] (base may be null).
template <int R, typename v_t>
__attribute__((always_inline)) inline void expand_blocks_body(
    const v_t* z, const v_t* B, const v_t* base, v_t* y, int64_t T, int64_t E, int64_t d_out,
    int64_t r_, double scaling, int64_t o0, int64_t o1) {
  const int64_t r = rank_of<R>(r_), Rw = E * r;
  int64_t t_blocked = 0;  // tokens done by the blocks below
  if constexpr (R == 4 && sizeof(v_t) == 4) {
    // float rows of 4: a token's sum over the experts is a chain of multiply-adds on one
    // 4-lane vector. Eight tokens side by side, each row of B loaded once for all of them;
    // the tokens left go one at a time through the same code.
    constexpr int TB = 2 * kQuadTokens;
    const v_t s = static_cast<v_t>(scaling);
    for (int64_t o = o0; o < o1; ++o) {
      int64_t t = 0;
      for (; t + TB <= T; t += TB) quad_expand_tokens<TB>(z, B, base, y, t, E, d_out, s, o);
      for (; t < T; ++t) quad_expand_tokens<1>(z, B, base, y, t, E, d_out, s, o);
    }
    return;
  }
  if constexpr (kRowBlock<R, v_t> > 1) {
    // A token's sum over the experts is a chain of dependent multiply-adds: kRowBlock tokens
    // side by side, each row of B loaded once for all of them, in the same order per token.
    constexpr int TB = kRowBlock<R, v_t>;
    t_blocked = T / TB * TB;
    const v_t s = static_cast<v_t>(scaling);
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t t0 = 0; t0 < t_blocked; t0 += TB) {
        Row<R, v_t> part[TB];
        for (int u = 0; u < TB; ++u) part[u].zero();
        for (int64_t i = 0; i < E; ++i) {
          const v_t* row = B + (i * d_out + o) * R;
          for (int u = 0; u < TB; ++u) part[u].mul_add(row, z + (t0 + u) * Rw + i * R, R);
        }
        for (int u = 0; u < TB; ++u) {
          const int64_t at = (t0 + u) * d_out + o;
          const v_t sum = s * (v_t(0) + part[u].sum(R));
          y[at] = base ? base[at] + sum : sum;
        }
      }
  }
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t t = t_blocked; t < T; ++t) {
      v_t acc = 0;
      for (int64_t a0 = 0; a0 < r; a0 += kMaxRow) {  // one pass for a compile-time R
        const int64_t len = R > 0 ? R : std::min(kMaxRow, r - a0);
        Row<R, v_t> part;
        part.zero();
        for (int64_t i = 0; i < E; ++i)
          part.mul_add(B + (i * d_out + o) * r + a0, z + t * Rw + i * r + a0, len);
        acc += part.sum(len);
      }
      const v_t sum = static_cast<v_t>(scaling) * acc;
      y[t * d_out + o] = base ? base[t * d_out + o] + sum : sum;
    }
}

// out[t, i·r + a] = (accumulate ? out[t, i·r + a] : 0) + s · Σ_o g[i·g_expert + t·d_out + o]
// B[i, o, a] for the experts i in [i0, i1). g_expert = 0: every expert reads the same rows
// (dY); g_expert = T·d_out: expert i has its own [T, d_out] rows (de).
template <int R, typename v_t>
__attribute__((always_inline)) inline void rows_times_blocks_body(
    const v_t* g, int64_t g_expert, const v_t* B, v_t* out, int64_t out_stride, int64_t T,
    int64_t d_out, int64_t r_, double scaling, bool accumulate, int64_t i0, int64_t i1) {
  const int64_t r = rank_of<R>(r_);
  const v_t s = static_cast<v_t>(scaling);
  if constexpr (R == 4 && sizeof(v_t) == 4) {
    // float rows of 4, half a vector: two rows o, o + 1 of B_i (contiguous) per vector
    // multiply-add, the g pair broadcast by a shuffle; the halves summed at the end. A
    // token's sum is a chain of dependent multiply-adds: kQuadTokens tokens side by side,
    // each load of B_i serving all of them, every sum in the order of one token alone.
    for (int64_t i = i0; i < i1; ++i) {
      const v_t* gi = g + i * g_expert;
      const v_t* Bi = B + i * d_out * 4;
      int64_t t = 0;
      for (; t + kQuadTokens <= T; t += kQuadTokens)
        quad_rows_times_block<kQuadTokens>(
            gi + t * d_out, d_out, Bi, out + t * out_stride + i * 4, out_stride, s, accumulate);
      for (; t < T; ++t)
        quad_rows_times_block<1>(gi + t * d_out, d_out, Bi, out + t * out_stride + i * 4,
                                 out_stride, s, accumulate);
    }
    return;
  }
  int64_t t_blocked = 0;  // tokens done by the blocks below
  if constexpr (kRowBlock<R, v_t> > 1) {
    // One token's sum over o is a chain of dependent multiply-adds (N vectors wide): the
    // loop would wait on their latency. kRowBlock tokens at a time, each B_i row loaded once
    // for all of them; every sum still runs over o in order.
    constexpr int TB = kRowBlock<R, v_t>;
    t_blocked = T / TB * TB;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t t0 = 0; t0 < t_blocked; t0 += TB) {
        Row<R, v_t> acc[TB];
        for (int u = 0; u < TB; ++u) acc[u].zero();
        const v_t* gt = g + i * g_expert + t0 * d_out;
        for (int64_t o = 0; o < d_out; ++o)
          for (int u = 0; u < TB; ++u)
            acc[u].axpy(gt[u * d_out + o], B + (i * d_out + o) * R, R);
        for (int u = 0; u < TB; ++u)
          acc[u].store(out + (t0 + u) * out_stride + i * R, s, accumulate, R);
      }
  }
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t t = t_blocked; t < T; ++t)
      for (int64_t a0 = 0; a0 < r; a0 += kMaxRow) {
        const int64_t len = R > 0 ? R : std::min(kMaxRow, r - a0);
        Row<R, v_t> acc;
        acc.zero();
        const v_t* gt = g + i * g_expert + t * d_out;
        for (int64_t o = 0; o < d_out; ++o) acc.axpy(gt[o], B + (i * d_out + o) * r + a0, len);
        acc.store(out + t * out_stride + i * r + a0, s, accumulate, len);
      }
}

// One term of outer_blocks: Σ_t (s · g[i·g_expert + t·d_out + o]) v[t·v_stride + i·r + a].
template <typename v_t>
struct OuterTerm {
  const v_t* g = nullptr;  // null: no term
  int64_t g_expert = 0;
  const v_t* v = nullptr;
  int64_t v_stride = 0;
  double scaling = 1.0;
};

// NB consecutive rows of dB (whole vectors of R values) = (accumulate ? rows : 0) +
// Σ_t (s1·g1[t·d_out + u]) v1[t·vs1] + Σ_t (s2·g2[t·d_out + u]) v2[t·vs2] for u < NB (g2
// null: no second term), each row's terms and tokens added in that order.
template <int NB, int R, typename v_t>
__attribute__((always_inline)) inline void outer_rows(v_t* rows, bool accumulate, int64_t T,
                                                      int64_t d_out, const v_t* g1,
                                                      const v_t* v1, int64_t vs1, v_t s1,
                                                      const v_t* g2, const v_t* v2, int64_t vs2,
                                                      v_t s2) {
  Row<R, v_t> acc[NB];
  for (int u = 0; u < NB; ++u) {
    if (accumulate) acc[u].load(rows + u * R, R);
    else acc[u].zero();
  }
  for (int64_t t = 0; t < T; ++t)
    for (int u = 0; u < NB; ++u) acc[u].axpy(s1 * g1[t * d_out + u], v1 + t * vs1, R);
  if (g2 != nullptr)
    for (int64_t t = 0; t < T; ++t)
      for (int u = 0; u < NB; ++u) acc[u].axpy(s2 * g2[t * d_out + u], v2 + t * vs2, R);
  for (int u = 0; u < NB; ++u) acc[u].store(rows + u * R, v_t(1), false, R);
}

// dB[i, o, a] = (accumulate ? dB[i, o, a] : 0) + first + second (OuterTerm) for the rows
// (i, o) = q in [q0, q1) of dB as [E·d_out, r].
template <int R, typename v_t>
__attribute__((always_inline)) inline void outer_blocks_body(
    v_t* dB, bool accumulate, const OuterTerm<v_t>& first, const OuterTerm<v_t>& second,
    int64_t T, int64_t d_out, int64_t r_, int64_t q0, int64_t q1) {
  // The terms' fields in locals: the row stores (memcpy) may alias any memory, so fields
  // read through a reference would be reloaded after every row.
  const int64_t r = rank_of<R>(r_);
  const v_t *g1 = first.g, *v1 = first.v, *g2 = second.g, *v2 = second.v;
  const int64_t ge1 = first.g_expert, vs1 = first.v_stride, ge2 = second.g_expert,
                vs2 = second.v_stride;
  const v_t s1 = static_cast<v_t>(first.scaling), s2 = static_cast<v_t>(second.scaling);
  int64_t i = q0 / d_out, o = q0 - i * d_out;
  if constexpr (R == 4 && sizeof(v_t) == 4) {
    // float rows of 4, half a vector: row by row each costs its loop's overhead for four
    // lanes. Instead each (term, t) streams over one expert's rows, two to a vector (the
    // g pair and the v row broadcast by shuffles), adding in the same order per value.
    typedef v_t V __attribute__((vector_size(32)));
    typedef v_t Quad __attribute__((vector_size(16)));
    for (int64_t q = q0; q < q1; i += 1, o = 0) {
      const int64_t n = std::min(q1 - q, d_out - o);  // rows of expert i in the range
      v_t* rows = dB + q * 4;
      bool fresh = !accumulate;
      for (int term = 0; term < (g2 != nullptr ? 2 : 1); ++term) {
        const int64_t vs = term ? vs2 : vs1;
        const v_t sc = term ? s2 : s1;
        for (int64_t t = 0; t < T; ++t, fresh = false) {
          const v_t* g = (term ? g2 : g1) + i * (term ? ge2 : ge1) + t * d_out + o;
          const v_t* vt = (term ? v2 : v1) + t * vs + i * 4;
          Quad vq;
          std::memcpy(&vq, vt, sizeof(Quad));
          const V vv = twice4<V>(vt);
          int64_t k = 0;
          for (; k + 8 <= n; k += 8) {  // 8 rows: one load of g, four pairs
            V g8;
            std::memcpy(&g8, g + k, sizeof(V));
            g8 = sc * g8;
            V a0{}, a1{}, a2{}, a3{};
            if (!fresh) load4(rows + k * 4, a0, a1, a2, a3);
            a0 += pair_lanes<0>(g8) * vv;
            a1 += pair_lanes<1>(g8) * vv;
            a2 += pair_lanes<2>(g8) * vv;
            a3 += pair_lanes<3>(g8) * vv;
            store4(rows + k * 4, a0, a1, a2, a3);
          }
          for (; k < n; ++k) {  // the range's last rows of this expert, one at a time
            Quad acc{};
            if (!fresh) std::memcpy(&acc, rows + k * 4, sizeof(Quad));
            acc += (sc * g[k]) * vq;
            std::memcpy(rows + k * 4, &acc, sizeof(Quad));
          }
        }
      }
      if (fresh) std::memset(rows, 0, sizeof(v_t) * 4 * n);  // no term and no token
      q += n;
    }
    return;
  }
  if constexpr (kRowBlock<R, v_t> > 1) {
    // Each row's sum over t is a chain of dependent multiply-adds: kRowBlock rows of one
    // expert at a time, each token's v row loaded once for all of them.
    constexpr int QB = kRowBlock<R, v_t>;
    for (int64_t q = q0; q < q1; i += 1, o = 0) {
      const int64_t n = std::min(q1 - q, d_out - o);  // rows of expert i in the range
      const v_t *g1i = g1 + i * ge1 + o, *v1i = v1 + i * R;
      const v_t *g2i = g2 ? g2 + i * ge2 + o : nullptr, *v2i = g2 ? v2 + i * R : nullptr;
      int64_t k = 0;
      for (; k + QB <= n; k += QB)
        outer_rows<QB, R>(dB + (q + k) * R, accumulate, T, d_out, g1i + k, v1i, vs1, s1,
                          g2i ? g2i + k : nullptr, v2i, vs2, s2);
      for (; k < n; ++k)  // the range's last rows of this expert
        outer_rows<1, R>(dB + (q + k) * R, accumulate, T, d_out, g1i + k, v1i, vs1, s1,
                         g2i ? g2i + k : nullptr, v2i, vs2, s2);
      q += n;
    }
    return;
  }
  for (int64_t q = q0; q < q1; ++q) {
    for (int64_t a0 = 0; a0 < r; a0 += kMaxRow) {
      const int64_t len = R > 0 ? R : std::min(kMaxRow, r - a0);
      v_t* row = dB + q * r + a0;
      Row<R, v_t> acc;
      if (accumulate) acc.load(row, len);
      else acc.zero();
      for (int64_t t = 0; t < T; ++t)
        acc.axpy(s1 * g1[i * ge1 + t * d_out + o], v1 + t * vs1 + i * r + a0, len);
      if (g2 != nullptr)
        for (int64_t t = 0; t < T; ++t)
          acc.axpy(s2 * g2[i * ge2 + t * d_out + o], v2 + t * vs2 + i * r + a0, len);
      acc.store(row, v_t(1), false, len);
    }
    if (++o == d_out) o = 0, ++i;
  }
}

// Lane sums of two float vectors within each 128-bit half (vhaddps): {a0 + a1, a2 + a3,
// b0 + b1, b2 + b3, a4 + a5, a6 + a7, b4 + b5, b6 + b7}.
template <typename V>
__attribute__((always_inline)) inline V pair_sums(const V& a, const V& b) {
  return select_lanes<0, 2, 8, 10, 4, 6, 12, 14>(a, b) +
         select_lanes<1, 3, 9, 11, 5, 7, 13, 15>(a, b);
}

// {Σ x[0], ..., Σ x[7]}: the sums of eight float vectors, one per lane.
template <typename V>
__attribute__((always_inline)) inline V lane_totals(const V (&x)[8]) {
  const V lo = pair_sums(pair_sums(x[0], x[1]), pair_sums(x[2], x[3]));  // x0..x3, by half
  const V hi = pair_sums(pair_sums(x[4], x[5]), pair_sums(x[6], x[7]));
  return select_lanes<0, 1, 2, 3, 8, 9, 10, 11>(lo, hi) +
         select_lanes<4, 5, 6, 7, 12, 13, 14, 15>(lo, hi);
}

// Up to this many rows (decoding: a row or a few per call) the shrink forms h and the
// router logits by dot products over the weights' rows: at a few rows, a GEMM call
// (dispatch, views, packing) costs more than its arithmetic, the more so with its code and
// data out of cache after the base layer's GEMM.
constexpr int64_t kDotRows = 4;

// out[t, j] = Σ_c x[t, c] w[j, c] for t < T and j in [j0, j1): x is [T, k], w is [n, k] (both
// rows contiguous); out rows are ld_out apart. Each dot product runs over 64-value chunks
// of both rows in vector accumulators, then the tail.
template <typename v_t>
__attribute__((always_inline)) inline void rows_dot_rows_body(const v_t* x, int64_t T,
                                                              int64_t k, const v_t* w,
                                                              int64_t j0, int64_t j1, v_t* out,
                                                              int64_t ld_out) {
  constexpr int64_t C = kMaxRow;
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t t = 0; t < T; ++t) {
      const v_t *xt = x + t * k, *wj = w + j * k;
      Row<C, v_t> full;
      full.zero();
      int64_t c = 0;
      for (; c + C <= k; c += C) full.mul_add(xt + c, wj + c, C);
      v_t acc = full.sum(C);
      if (c < k) {
        Row<0, v_t> tail;
        tail.zero();
        tail.mul_add(xt + c, wj + c, k - c);
        acc += tail.sum(k - c);
      }
      out[t * ld_out + j] = acc;
    }
}
OMOE_VECTOR_CLONES static void rows_dot_rows_range(const float* x, int64_t T, int64_t k,
                                                   const float* w, int64_t j0, int64_t j1,
                                                   float* out, int64_t ld_out) {
  rows_dot_rows_body(x, T, k, w, j0, j1, out, ld_out);
}
OMOE_VECTOR_CLONES static void rows_dot_rows_range(const double* x, int64_t T, int64_t k,
                                                   const double* w, int64_t j0, int64_t j1,
                                                   double* out, int64_t ld_out) {
  rows_dot_rows_body(x, T, k, w, j0, j1, out, ld_out);
}

// out ([T, n] rows of a contiguous buffer) = x wᵀ for x [T, k] and w [n, k], contiguous.
template <typename v_t>
void rows_dot_rows(const v_t* x, int64_t T, int64_t k, const v_t* w, int64_t n, v_t* out) {
  const int64_t grain = std::max<int64_t>(1, kExpandGrain / std::max<int64_t>(1, T * k));
  at::parallel_for(0, n, grain, [&](int64_t j0, int64_t j1) {
    rows_dot_rows_range(x, T, k, w, j0, j1, out, n);
  });
}

// The shrink of T rows (at most kDotRows) by dot products: h ([T, E·r]) = x A_catᵀ and the
// router logits ([T, E]) = router_x Wᵀ, router_x null for x; x, router_x: [T, d_in], A:
// [E·r, d_in], W: [E, d_in], all contiguous.
template <typename v_t>
void shrink_rows(const v_t* x, const v_t* router_x, int64_t T, int64_t d_in, const v_t* A,
                 int64_t er, const v_t* W, int64_t E, v_t* h, v_t* logits) {
  rows_dot_rows(x, T, d_in, A, er, h);
  rows_dot_rows(router_x != nullptr ? router_x : x, T, d_in, W, E, logits);
}

// The most tokens expert_outputs takes.
constexpr int64_t kExpertOutputTokens = 8;
static_assert(kDotRows <= kExpertOutputTokens, "a few rows' expert outputs by the loops");

// e[i, t, o] = Σ_a B[i, o, a] h[t·E·r + i·r + a] for t < T (at most kExpertOutputTokens) and
// the rows (i, o) = q in [q0, q1) of B as [E·d_out, r]; e: [E, T, d_out], h: [T, E·r]. For a
// few tokens, where a batched GEMM with one row per batch costs several times these loops.
template <int R, typename v_t>
__attribute__((always_inline)) inline void expert_outputs_body(const v_t* h, const v_t* B,
                                                               v_t* e, int64_t T, int64_t E,
                                                               int64_t d_out, int64_t r_,
                                                               int64_t q0, int64_t q1) {
  const int64_t r = rank_of<R>(r_), Rw = E * r;
  int64_t i = q0 / d_out, o = q0 - i * d_out;
  for (int64_t q = q0; q < q1; i += 1, o = 0) {
    const int64_t n = std::min(q1 - q, d_out - o);  // rows of expert i in the range
    const v_t* Bi = B + q * r;
    int64_t k = 0;
    if constexpr (sizeof(v_t) == 4 && (R == 4 || (R > 0 && R % 8 == 0))) {
      // Eight rows of B_i per step for every token (the rows stay in L1), their eight dot
      // products summed across lanes at once.
      typedef v_t V __attribute__((vector_size(32)));
      constexpr int L = 8, N = R == 4 ? 1 : R / L;
      V hv[kExpertOutputTokens][N];  // each token's h_i (R = 4: twice, for two rows a vector)
      for (int64_t t = 0; t < T; ++t) {
        const v_t* ht = h + t * Rw + i * r;
        if constexpr (R == 4) {
          hv[t][0] = twice4<V>(ht);
        } else {
          for (int c = 0; c < N; ++c) std::memcpy(&hv[t][c], ht + c * L, sizeof(V));
        }
      }
      for (k = 0; k + 8 <= n; k += 8) {
        v_t* ek = e + i * T * d_out + o + k;
        if constexpr (R == 4) {
          V p0, p1, p2, p3;
          load4(Bi + k * 4, p0, p1, p2, p3);
          for (int64_t t = 0; t < T; ++t) {
            const V hh = hv[t][0];
            // {r0, r2, r4, r6, r1, r3, r5, r7}, then in row order
            const V w = pair_sums(pair_sums(p0 * hh, p1 * hh), pair_sums(p2 * hh, p3 * hh));
            const V out = select_lanes<0, 4, 1, 5, 2, 6, 3, 7>(w, w);
            std::memcpy(ek + t * d_out, &out, sizeof(V));
          }
        } else {
          for (int64_t t = 0; t < T; ++t) {
            V x[8];
            for (int j = 0; j < 8; ++j) {
              const v_t* row = Bi + (k + j) * R;
              V b;
              std::memcpy(&b, row, sizeof(V));
              x[j] = b * hv[t][0];
              for (int c = 1; c < N; ++c) {
                std::memcpy(&b, row + c * L, sizeof(V));
                x[j] += b * hv[t][c];
              }
            }
            const V out = lane_totals(x);
            std::memcpy(ek + t * d_out, &out, sizeof(V));
          }
        }
      }
    }
    for (; k < n; ++k)  // the rows left, one at a time
      for (int64_t t = 0; t < T; ++t) {
        const v_t* row = Bi + k * r;
        const v_t* ht = h + t * Rw + i * r;
        v_t acc = 0;
        for (int64_t a = 0; a < r; ++a) acc += row[a] * ht[a];
        e[(i * T + t) * d_out + o + k] = acc;
      }
    q += n;
  }
}

// The x86-64-v3 and baseline clones of each loop, for float and double.
#define OMOE_EXPAND_CLONES(v_t)                                                                \
  OMOE_VECTOR_CLONES static void expand_blocks_range(                                          \
      const v_t* z, const v_t* B, const v_t* base, v_t* y, int64_t T, int64_t E,               \
      int64_t d_out, int64_t r, double scaling, int64_t o0, int64_t o1) {                      \
    OMOE_DISPATCH_RANK(r, expand_blocks_body, z, B, base, y, T, E, d_out, r, scaling, o0, o1); \
  }                                                                                            \
  OMOE_VECTOR_CLONES static void rows_times_blocks_range(                                      \
      const v_t* g, int64_t g_expert, const v_t* B, v_t* out, int64_t out_stride, int64_t T,   \
      int64_t d_out, int64_t r, double scaling, bool accumulate, int64_t i0, int64_t i1) {     \
    OMOE_DISPATCH_RANK(r, rows_times_blocks_body, g, g_expert, B, out, out_stride, T, d_out,   \
                       r, scaling, accumulate, i0, i1);                                        \
  }                                                                                            \
  OMOE_VECTOR_CLONES static void expert_outputs_range(const v_t* h, const v_t* B, v_t* e,      \
                                                      int64_t T, int64_t E, int64_t d_out,     \
                                                      int64_t r, int64_t q0, int64_t q1) {     \
    OMOE_DISPATCH_RANK(r, expert_outputs_body, h, B, e, T, E, d_out, r, q0, q1);               \
  }                                                                                            \
  OMOE_VECTOR_CLONES static void outer_blocks_range(                                           \
      v_t* dB, bool accumulate, const OuterTerm<v_t>& first, const OuterTerm<v_t>& second,     \
      int64_t T, int64_t d_out, int64_t r, int64_t q0, int64_t q1) {                           \
    OMOE_DISPATCH_RANK(r, outer_blocks_body, dB, accumulate, first, second, T, d_out, r, q0,   \
                       q1);                                                                    \
  }
OMOE_EXPAND_CLONES(float)
OMOE_EXPAND_CLONES(double)
#undef OMOE_EXPAND_CLONES
#undef OMOE_DISPATCH_RANK

// ---- tensor entry points: every tensor contiguous, in the accumulate dtype --------------

// y ([T, d_out]) = base + s · Σ_i z_i B_iᵀ; z: [T, E·r], B: [E, d_out, r], base: [T, d_out]
// or undefined.
inline void expand_blocks(const at::Tensor& z, const at::Tensor& B, const at::Tensor& base,
                          double scaling, at::Tensor& y) {
  const int64_t T = z.size(0), E = B.size(0), d_out = B.size(1), r = B.size(2);
  const int64_t grain = std::max<int64_t>(1, kExpandGrain / std::max<int64_t>(1, T * E * r));
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "omoe_expand_blocks", [&] {
    const scalar_t* base_ptr = base.defined() ? base.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, d_out, grain, [&](int64_t o0, int64_t o1) {
      expand_blocks_range(z.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), base_ptr,
                          y.data_ptr<scalar_t>(), T, E, d_out, r, scaling, o0, o1);
    });
  });
}

// e ([E, n, d_out], written) = the expert outputs B_i h_i of n tokens (at most
// kExpertOutputTokens) of h ([n, E·r]); B: [E, d_out, r].
template <typename scalar_t>
void expert_outputs_rows(const scalar_t* h, int64_t n, const scalar_t* B, int64_t E,
                         int64_t d_out, int64_t r, scalar_t* e) {
  const int64_t grain = std::max<int64_t>(1, kExpandGrain / std::max<int64_t>(1, n * r));
  at::parallel_for(0, E * d_out, grain, [&](int64_t q0, int64_t q1) {
    expert_outputs_range(h, B, e, n, E, d_out, r, q0, q1);
  });
}

// e ([E, n, d_out]) = the expert outputs B_i h_i of tokens [t0, t0 + n) of h ([T, E·r]),
// B: [E, d_out, r].
inline at::Tensor expert_outputs(const at::Tensor& h, int64_t t0, int64_t n,
                                 const at::Tensor& B) {
  const int64_t E = B.size(0), d_out = B.size(1), r = B.size(2);
  at::Tensor e = at::empty({E, n, d_out}, B.options());
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "omoe_expert_outputs", [&] {
    expert_outputs_rows(h.data_ptr<scalar_t>() + t0 * E * r, n, B.data_ptr<scalar_t>(), E,
                        d_out, r, e.data_ptr<scalar_t>());
  });
  return e;
}

// One token's y (d values) = base + scaling·Σ_m c[m] rows[m], summed in float64; a row
// whose coefficient is 0 (an inactive expert) takes no part. base: d values or null.
template <typename v_t>
void mix_token_rows(const v_t* const* rows, const double* c, int64_t m, int64_t d,
                    const v_t* base, double scaling, v_t* y) {
  constexpr int64_t kChunk = 256;
  double acc[kChunk];
  for (int64_t o0 = 0; o0 < d; o0 += kChunk) {
    const int64_t len = std::min(kChunk, d - o0);
    std::fill_n(acc, len, 0.0);
    for (int64_t q = 0; q < m; ++q) {
      if (c[q] == 0.0) continue;
      const v_t* row = rows[q] + o0;
      for (int64_t o = 0; o < len; ++o) acc[o] += c[q] * double(row[o]);
    }
    if (base != nullptr) {
      for (int64_t o = 0; o < len; ++o)
        y[o0 + o] = v_t(double(base[o0 + o]) + scaling * acc[o]);
    } else {
      for (int64_t o = 0; o < len; ++o) y[o0 + o] = v_t(scaling * acc[o]);
    }
  }
}

// y_t = base_t + scaling·Σ_i a_ti e_it for the T tokens of e ([E, T, d]) with coefficients
// a ([T, E], float64, 0 for inactive experts, whose e then takes no part), summed in
// float64; base: [T, d] or null; y: rows y_stride apart.
template <typename v_t>
void mix_expert_outputs(const v_t* e, const double* a, int64_t T, int64_t E, int64_t d,
                        const v_t* base, double scaling, v_t* y, int64_t y_stride) {
  std::vector<const v_t*> rows(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < E; ++i) rows[static_cast<size_t>(i)] = e + (i * T + t) * d;
    mix_token_rows(rows.data(), a + t * E, E, d, base != nullptr ? base + t * d : nullptr,
                   scaling, y + t * y_stride);
  }
}

// The forward from the expert outputs of n tokens (at most kExpertOutputTokens) whose h
// ([n, E·r]) and logits ([n, E]) are formed, S by the per-token loops: z ([n, E·r]) the
// pass's, y (rows y_stride apart) = base + scaling·Σ_i a_i e_i. e ([E, n, d_out]) and a
// ([n, E]) are the caller's workspace.
template <typename scalar_t>
void forward_rows_from_expert_outputs(const scalar_t* h, const scalar_t* logits, int64_t n,
                                      const scalar_t* B, int64_t E, int64_t d_out, int64_t r,
                                      const scalar_t* base, double scaling, int64_t top_k,
                                      bool normalize, double eps, scalar_t* z, scalar_t* y,
                                      int64_t y_stride, scalar_t* e, double* a) {
  expert_outputs_rows(h, n, B, E, d_out, r, e);
  const DirectRoute<scalar_t> route{e, nullptr, n, d_out, int(E)};
  token_forward_rows(h, logits, n, route, E, r, top_k, true, normalize, eps, z, a);
  mix_expert_outputs(e, a, n, E, d_out, base, scaling, y, y_stride);
}

// out (T rows of out_stride values, expert i at columns [i·r, i·r + r)) (+)= s · g_i B_i,
// g: [T, d_out] shared by every expert (g_expert = 0) or [E, T, d_out] (g_expert = T·d_out).
inline void rows_times_blocks(const at::Tensor& g, int64_t g_expert, const at::Tensor& B,
                              at::Tensor& out, int64_t T, double scaling, bool accumulate) {
  const int64_t E = B.size(0), d_out = B.size(1), r = B.size(2);
  const int64_t out_stride = out.stride(0);
  const int64_t grain =
      std::max<int64_t>(1, kExpandGrain / std::max<int64_t>(1, T * d_out * r));
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "omoe_rows_times_blocks", [&] {
    at::parallel_for(0, E, grain, [&](int64_t i0, int64_t i1) {
      rows_times_blocks_range(g.data_ptr<scalar_t>(), g_expert, B.data_ptr<scalar_t>(),
                              out.data_ptr<scalar_t>(), out_stride, T, d_out, r, scaling,
                              accumulate, i0, i1);
    });
  });
}

// One term Σ_t s · g_iᵀ v_i of a dB block: g as in rows_times_blocks, v: T rows of
// v.stride(0) values (expert i at columns [i·r, i·r + r)).
struct OuterArgs {
  at::Tensor g, v;
  int64_t g_expert = 0;
  double scaling = 1.0;
};

// dB ([E, d_out, r]) = (accumulate ? dB : 0) + the terms (second.g undefined: one term).
inline void outer_blocks(at::Tensor& dB, bool accumulate, int64_t T, const OuterArgs& first,
                         const OuterArgs& second = OuterArgs{}) {
  const int64_t E = dB.size(0), d_out = dB.size(1), r = dB.size(2);
  const int64_t terms = second.g.defined() ? 2 : 1;
  const int64_t grain =
      std::max<int64_t>(1, kExpandGrain / std::max<int64_t>(1, terms * T * r));
  AT_DISPATCH_FLOATING_TYPES(dB.scalar_type(), "omoe_outer_blocks", [&] {
    auto term = [](const OuterArgs& a) {
      OuterTerm<scalar_t> t;
      if (a.g.defined())
        t = {a.g.data_ptr<scalar_t>(), a.g_expert, a.v.data_ptr<scalar_t>(), a.v.stride(0),
             a.scaling};
      return t;
    };
    const OuterTerm<scalar_t> one = term(first), two = term(second);
    at::parallel_for(0, E * d_out, grain, [&](int64_t q0, int64_t q1) {
      outer_blocks_range(dB.data_ptr<scalar_t>(), accumulate, one, two, T, d_out, r, q0, q1);
    });
  });
}

}  // namespace cpu
}  // namespace omoe
