// The CUDA per-token pass, one token per lane group (a warp on the GPU): the lanes share
// the token's row-sized work, and one lane runs the O(k³) MGS of omoe_token.h.
//
// docs/algorithm.md, forward steps 2–5 and backward step 3, split as follows:
//   - routing (step 2), MGS in coefficient space (step 4) and its reverse, the gates'
//     gradient: lane 0, with omoe_token.h's route_token / mgs_forward / mgs_backward;
//   - S_ml = h_iᵀ G_ij h_j for the active pairs (step 3), read from G itself (no GH),
//     da_l = <dz_l, h_l>, and every row write (z, dh, dlogits, the dG rows): lanes, with
//     lane q handling entry q of the row, so reads and writes are coalesced.
// It is host/device code: for the tests of the CUDA plan (python_tests/test_cuda_plan.py)
// the CPU runs the same body with one lane, or with a thread per lane and a barrier for
// each synchronisation point.
//
// Operands are written for the GEMMs that follow (omoe_cuda_plan.cpp): in the
// accumulate dtype (float32/float64), or, for 16-bit inputs, as a hi + lo pair of
// 16-bit values (hi = round(v), lo = round(v − hi)) placed `lo` columns apart, so that a
// GEMM over [hi | lo] with the weights stacked twice sums v to about 16 bits.
#pragma once

#include <cstdint>

#include "omoe_token.h"

namespace omoe {

// The lanes that share one token: a warp on the GPU. On the host (tests) each lane is a
// thread and host_sync a barrier among them, or there is one lane and no barrier.
struct LaneGroup {
  int lane, size;
  void (*host_sync)(void*) = nullptr;
  void* host_sync_arg = nullptr;
  OMOE_HD void sync() const {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#else
    if (host_sync != nullptr) host_sync(host_sync_arg);
#endif
  }
};

// Sizes of one pass; G is [E·r, E·r] float64 row-major (symmetric: B_catᵀ B_cat).
struct LanePassShape {
  int64_t num_tokens;
  int num_experts, rank, top_k;
  bool orthogonalize, normalize;
  double eps;
};

// A 16-bit operand type is written as hi + lo; float32/float64 as is.
template <typename Out>
constexpr bool kSplitOperand = sizeof(Out) == 2;

// float <-> 16-bit operand (round to nearest). The host's c10 types convert implicitly;
// omoe_cuda_kernels.cu specializes this for __nv_bfloat16 and __half, whose implicit
// conversions torch's build flags turn off.
template <typename Out>
struct OperandConvert {
  static OMOE_HD Out from_float(float v) { return Out(v); }
  static OMOE_HD float to_float(Out v) { return static_cast<float>(v); }
};

template <typename Out>
OMOE_HD void store_operand(Out* row, int64_t col, int64_t lo, double v) {
  if constexpr (kSplitOperand<Out>) {
    using Convert = OperandConvert<Out>;
    const Out hi = Convert::from_float(static_cast<float>(v));
    row[col] = hi;
    row[col + lo] = Convert::from_float(static_cast<float>(v - Convert::to_float(hi)));
  } else {
    row[col] = static_cast<Out>(v);
  }
}

// Column layout of the backward's operand row [dh | dl] (16-bit: [dh_hi | dh_lo | dl_hi |
// dl_lo]); dh starts at column 0.
template <typename Out>
OMOE_HD int64_t dl_column(int64_t er) {
  return kSplitOperand<Out> ? 2 * er : er;
}

// One warp's token state (shared memory or a global slot). Tape is MgsTape (forward) or
// BackwardScratch (backward).
template <int MAX_K, typename Tape>
struct LaneScratch {
  Tape tape;
  int k;
  int active[MAX_K];
  double gates[MAX_K], coeff[MAX_K], dcoeff[MAX_K], dgate[MAX_K];
  double mean;
};

template <int MAX_K>
OMOE_HD MgsTape<MAX_K>& tape_of(MgsTape<MAX_K>& t) {
  return t;
}
template <int MAX_K>
OMOE_HD MgsTape<MAX_K>& tape_of(BackwardScratch<MAX_K>& s) {
  return s.tape;
}

// Slot of expert i among the active ones (ascending), or -1.
template <int MAX_K, typename Tape>
OMOE_HD int slot_of(const LaneScratch<MAX_K, Tape>& w, int E, int i) {
  if (w.k == E) return i;
  for (int m = 0; m < w.k; ++m)
    if (w.active[m] == i) return m;
  return -1;
}

// (G_ij h_j)_a for row q = (i, a) and active expert j, read along G's row (j, ·), which
// equals its column by symmetry: lanes with consecutive q read consecutive addresses.
template <typename Acc>
OMOE_HD double gh_entry(const double* G, int64_t er, const Acc* h, int r, int j, int64_t q) {
  double s = 0.0;
  for (int b = 0; b < r; ++b)
    s += G[(int64_t(j) * r + b) * er + q] * static_cast<double>(h[int64_t(j) * r + b]);
  return s;
}

// Steps 2–4 and the coefficients a = Σ g_m C_m: fills w (k, active, gates, coeff) and,
// when orthogonalizing, w.tape. Ends with the lanes synchronised.
template <int MAX_K, typename Acc, typename Tape>
OMOE_HD void lane_coefficients(const LaneGroup& g, const LanePassShape& s, const Acc* h,
                               const Acc* logits, const double* G,
                               LaneScratch<MAX_K, Tape>& w) {
  const int E = s.num_experts, r = s.rank;
  const int64_t er = int64_t(E) * r;
  MgsTape<MAX_K>& t = tape_of(w.tape);
  if (g.lane == 0) w.k = route_token(logits, E, s.top_k, w.active, w.gates);
  g.sync();
  const int k = w.k;
  if (!s.orthogonalize) {
    for (int l = g.lane; l < k; l += g.size) w.coeff[l] = w.gates[l];
    g.sync();
    return;
  }
  // S_ml = Σ_a h_ia (G_ij h_j)_a, one active pair (m ≤ l) per lane.
  for (int p = g.lane; p < k * k; p += g.size) {
    const int m = p / k, l = p % k;
    if (l < m) continue;
    const int i = w.active[m];
    double acc = 0.0;
    for (int a = 0; a < r; ++a) {
      const int64_t q = int64_t(i) * r + a;
      acc += static_cast<double>(h[q]) * gh_entry(G, er, h, r, w.active[l], q);
    }
    t.S[m][l] = acc;
    t.S[l][m] = acc;
  }
  g.sync();
  if (g.lane == 0) {
    mgs_forward(t, k, s.normalize, s.eps);
    for (int l = 0; l < k; ++l) {
      w.coeff[l] = 0.0;
      for (int m = l; m < k; ++m) w.coeff[l] += w.gates[m] * t.C[m][l];  // C[m] is zero past m
    }
  }
  g.sync();
}

// Forward of one token: the expand operand z = a ⊙ h (E·r entries; hi at column q, lo at
// q + E·r for 16-bit operands).
template <int MAX_K, typename Acc, typename Out>
OMOE_HD void lane_token_forward(const LaneGroup& g, const LanePassShape& s, const Acc* h,
                                const Acc* logits, const double* G,
                                LaneScratch<MAX_K, MgsTape<MAX_K>>& w, Out* z) {
  lane_coefficients(g, s, h, logits, G, w);
  const int64_t er = int64_t(s.num_experts) * s.rank;
  for (int64_t q = g.lane; q < er; q += g.size) {
    const int m = slot_of(w, s.num_experts, int(q / s.rank));
    store_operand(z, q, er, m < 0 ? 0.0 : w.coeff[m] * static_cast<double>(h[q]));
  }
  g.sync();  // w is reused by the next token
}

// Backward of one token. dz = dL/dz (scaling applied). Writes the operands z and
// [dh | dl] (layout above), and, when orthogonalizing, the token's rows of dg_lhs:
// dg_lhs[j·lhs_stride + (i, a)] = dS_ij h_ia, zero for inactive pairs (see GhGram in
// omoe_token.h; dG = Σ_t dg_lhs[j]ᵀ h_j is one batched GEMM in the plan).
template <int MAX_K, typename Acc, typename Out>
OMOE_HD void lane_token_backward(const LaneGroup& g, const LanePassShape& s, const Acc* h,
                                 const Acc* logits, const double* G, const Acc* dz,
                                 LaneScratch<MAX_K, BackwardScratch<MAX_K>>& w, Out* z,
                                 Out* dhl, double* dg_lhs, int64_t lhs_stride) {
  lane_coefficients(g, s, h, logits, G, w);
  const int E = s.num_experts, r = s.rank, k = w.k;
  const int64_t er = int64_t(E) * r;
  // da_l = <dz_l, h_l>.
  for (int l = g.lane; l < k; l += g.size) {
    double acc = 0.0;
    for (int a = 0; a < r; ++a) {
      const int64_t q = int64_t(w.active[l]) * r + a;
      acc += static_cast<double>(dz[q]) * static_cast<double>(h[q]);
    }
    w.dcoeff[l] = acc;
  }
  g.sync();
  if (g.lane == 0) {
    if (s.orthogonalize) {
      MgsTape<MAX_K>& t = w.tape.tape;
      for (int m = 0; m < k; ++m) {
        w.dgate[m] = dot(t.C[m], w.dcoeff, k);
        for (int l = 0; l < k; ++l) w.tape.dC[m][l] = w.gates[m] * w.dcoeff[l];
      }
      mgs_backward(t, k, s.normalize, s.eps, w.tape.dC, w.tape.dS, w.tape.U);
    } else {
      for (int m = 0; m < k; ++m) w.dgate[m] = w.dcoeff[m];
    }
    w.mean = 0.0;  // softmax over the active set: dlogit_i = g_i (dg_i − Σ_j g_j dg_j)
    for (int m = 0; m < k; ++m) w.mean += w.gates[m] * w.dgate[m];
  }
  g.sync();
  const double (*dS)[MAX_K] = w.tape.dS;
  for (int64_t q = g.lane; q < er; q += g.size) {
    const int m = slot_of(w, E, int(q / r));
    double zv = 0.0, dhv = 0.0;
    if (m >= 0) {
      zv = w.coeff[m] * static_cast<double>(h[q]);
      dhv = w.coeff[m] * static_cast<double>(dz[q]);
      if (s.orthogonalize)  // dh_i += Σ_j (dS_ij + dS_ji) G_ij h_j
        for (int l = 0; l < k; ++l)
          dhv += (dS[m][l] + dS[l][m]) * gh_entry(G, er, h, r, w.active[l], q);
    }
    store_operand(z, q, er, zv);
    store_operand(dhl, q, er, dhv);
  }
  for (int i = g.lane; i < E; i += g.size) {
    const int m = slot_of(w, E, i);
    store_operand(dhl, dl_column<Out>(er) + i, E,
                  m < 0 ? 0.0 : w.gates[m] * (w.dgate[m] - w.mean));
  }
  if (s.orthogonalize) {
    for (int64_t p = g.lane; p < E * er; p += g.size) {
      const int j = int(p / er);
      const int64_t q = p % er;
      const int l = slot_of(w, E, j), m = slot_of(w, E, int(q / r));
      dg_lhs[j * lhs_stride + q] =
          (l < 0 || m < 0) ? 0.0 : dS[m][l] * static_cast<double>(h[q]);
    }
  }
  g.sync();  // w is reused by the next token
}

}  // namespace omoe
