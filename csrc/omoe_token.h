// Per-token algebra of OMoE-LoRA, shared by the CPU and CUDA kernels.
//
// One token at a time: routing, the Gram matrix S of the expert outputs, modified
// Gram–Schmidt in coefficient space, the mixture coefficients, and the hand-derived
// backward of all of it. docs/algorithm.md has the derivation. Everything here is float64.
//
// Where a token's Gram matrix S of its active experts comes from is a policy, a "Gram
// source" (GhGram below): it fills S and, in the backward, takes dS back. GhGram reads
// GH[j][t][(i, a)] = (G_ij h_j)_a, formed by one batched GEMM per chunk of tokens
// (G = B_catᵀ B_cat), so S_ij = <e_i, e_j> = Σ_a h_ia GH[j][t][(i, a)]. The CPU adds
// sources that touch the active pairs only (csrc/omoe_cpu_pass.h).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OMOE_HD __host__ __device__ inline
#else
#define OMOE_HD inline
#endif

namespace omoe {

// The CUDA per-token pass takes at most this many active experts k = min(top_k, E), for
// any E (the CPU pass takes more: omoe_cpu_pass.h).
constexpr int kMaxExperts = 32;

// Per-token state lives in fixed arrays sized by MAX_K, a compile-time bound on the
// number of active experts k = min(top_k, E): the state grows like MAX_K², and a CUDA
// thread must keep it small. Calls fn(std::integral_constant<int, MAX_K>{}) with the
// smallest supported bound that holds k.
template <typename Fn>
inline void dispatch_max_active(int64_t k, Fn&& fn) {
  if (k <= 4) fn(std::integral_constant<int, 4>{});
  else if (k <= 8) fn(std::integral_constant<int, 8>{});
  else if (k <= 16) fn(std::integral_constant<int, 16>{});
  else fn(std::integral_constant<int, kMaxExperts>{});
}

// True when logit a (expert i) ranks above logit b (expert j): larger first, NaN above
// everything (as torch.sort does), ties to the lower index.
OMOE_HD bool ranks_above(double a, int i, double b, int j) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan || b_nan) return a_nan && (!b_nan || i < j);
  return a > b || (a == b && i < j);
}

// The top_k < E highest-ranked experts of one token (ranks_above), in ascending order, into
// active[0, top_k): the best so far are kept in rank order as the logits are read, E·top_k
// comparisons at most. ranks_above is a strict total order, so the set is the one that
// counting each expert's rank would give.
template <typename scalar_t>
OMOE_HD void top_active(const scalar_t* logits, int E, int top_k, int* active) {
  int n = 0;  // active[0, n): the best experts so far, highest rank first
  for (int i = 0; i < E; ++i) {
    const double li = static_cast<double>(logits[i]);
    int at = n;
    while (at > 0 &&
           ranks_above(li, i, static_cast<double>(logits[active[at - 1]]), active[at - 1]))
      --at;
    if (at >= top_k) continue;
    for (int q = n < top_k ? n : top_k - 1; q > at; --q) active[q] = active[q - 1];
    active[at] = i;
    if (n < top_k) ++n;
  }
  for (int m = 1; m < top_k; ++m) {  // ascending expert index
    const int i = active[m];
    int q = m;
    for (; q > 0 && active[q - 1] > i; --q) active[q] = active[q - 1];
    active[q] = i;
  }
}

// Routing of one token. Writes the active experts in ascending order to `active`
// (returns how many: top_k, or E when top_k >= E; both arrays must hold that many) and their
// softmax gates to `gates` (gates[m] belongs to expert active[m]).
template <typename scalar_t>
OMOE_HD int route_token(const scalar_t* logits, int E, int top_k, int* active, double* gates) {
  const int k = top_k < E ? top_k : E;
  if (top_k < E) {
    top_active(logits, E, top_k, active);
  } else {  // dense
    for (int i = 0; i < E; ++i) active[i] = i;
  }
  double max_logit = -INFINITY;
  for (int m = 0; m < k; ++m) {
    const double l = static_cast<double>(logits[active[m]]);
    max_logit = (l > max_logit || l != l) ? l : max_logit;
  }
  double total = 0.0;
  for (int m = 0; m < k; ++m) {
    gates[m] = exp(static_cast<double>(logits[active[m]]) - max_logit);
    total += gates[m];
  }
  for (int m = 0; m < k; ++m) gates[m] /= total;
  return k;
}

// The active experts' Gram matrix: S[m][l] = <e_active[m], e_active[l]>.
template <int MAX_K, typename scalar_t>
OMOE_HD void gram_from_gh(const scalar_t* h, const double* gh, int64_t gh_stride, int r,
                          const int* active, int k, double (*S)[MAX_K]) {
  for (int m = 0; m < k; ++m) {
    const int i = active[m];
    for (int l = m; l < k; ++l) {
      const double* g_h_j = gh + active[l] * gh_stride + i * r;  // (G_ij h_j), r values
      double s = 0.0;
      for (int a = 0; a < r; ++a) s += static_cast<double>(h[i * r + a]) * g_h_j[a];
      S[m][l] = s;
      S[l][m] = s;
    }
  }
}

// The state of one token's MGS in coefficient space, over its k active experts.
// C[m] holds the coefficients of q_m over (e_active[0], …, e_active[k-1]);
// SC[m] = S C[m]; proj[m][j] = p/n of step (m, j); norm_sq[m] = <v_m, v_m> clamped at 0
// (a NaN stays NaN)
// (before normalizing, or of q_m when not normalizing). Holds k <= MAX_K experts.
template <int MAX_K>
struct MgsTape {
  double S[MAX_K][MAX_K];
  double C[MAX_K][MAX_K];
  double SC[MAX_K][MAX_K];
  double proj[MAX_K][MAX_K];
  double norm_sq[MAX_K];
};

// Everything token_backward needs besides its O(MAX_K) locals: the tape, dL/dC, dL/dS
// and mgs_backward's accumulator U. The CUDA kernels place it on the stack or in a
// global workspace, whichever its size allows.
template <int MAX_K>
struct BackwardScratch {
  MgsTape<MAX_K> tape;
  double dC[MAX_K][MAX_K];
  double dS[MAX_K][MAX_K];
  double U[MAX_K][MAX_K];
};

OMOE_HD double dot(const double* u, const double* v, int k) {
  double s = 0.0;
  for (int l = 0; l < k; ++l) s += u[l] * v[l];
  return s;
}

// docs/contract.md §1's modified Gram–Schmidt loop, run on coefficient vectors (tape.S must be
// set).
template <int MAX_K>
OMOE_HD void mgs_forward(MgsTape<MAX_K>& t, int k, bool normalize, double eps) {
  for (int m = 0; m < k; ++m) {
    double* c = t.C[m];
    double* sc = t.SC[m];
    for (int l = 0; l < k; ++l) {
      c[l] = (l == m) ? 1.0 : 0.0;
      sc[l] = t.S[l][m];
    }
    for (int j = 0; j < m; ++j) {
      const double n = normalize ? 1.0 : t.norm_sq[j] + eps;
      const double coef = dot(c, t.SC[j], k) / n;
      t.proj[m][j] = coef;
      for (int l = 0; l < k; ++l) {
        c[l] -= coef * t.C[j][l];
        sc[l] -= coef * t.SC[j][l];
      }
    }
    // Rounding can take <v, v> below 0 for identical experts: clamp it, but keep a NaN
    // (a NaN clamped to 0 would scale q by 1/sqrt(eps) and hide it).
    const double raw = dot(c, sc, k);
    t.norm_sq[m] = (raw > 0.0 || raw != raw) ? raw : 0.0;
    if (normalize) {
      const double inv = 1.0 / sqrt(t.norm_sq[m] + eps);
      for (int l = 0; l < k; ++l) {
        c[l] *= inv;
        sc[l] *= inv;
      }
    }
  }
}

// Reverse of mgs_forward. dC[m] holds dL/dC[m] on entry (it is overwritten as the
// gradient flows back); on exit dS holds dL/dS (not symmetrized: S is read as a general
// matrix by the forward). U is scratch: dS = Σ_j U[j] C[j]ᵀ + Σ_m dν_m c_m c_mᵀ.
template <int MAX_K>
OMOE_HD void mgs_backward(const MgsTape<MAX_K>& t, int k, bool normalize, double eps,
                          double (*dC)[MAX_K], double (*dS)[MAX_K], double (*U)[MAX_K]) {
  for (int m = 0; m < k; ++m)
    for (int l = 0; l < k; ++l) {
      U[m][l] = 0.0;
      dS[m][l] = 0.0;
    }
  double c[MAX_K], sc[MAX_K], dc[MAX_K];
  for (int m = k - 1; m >= 0; --m) {
    if (normalize) {
      const double nu = t.norm_sq[m] + eps;
      const double inv = 1.0 / sqrt(nu);
      for (int l = 0; l < k; ++l) {  // the vector before normalizing
        c[l] = t.C[m][l] * sqrt(nu);
        sc[l] = t.SC[m][l] * sqrt(nu);
      }
      // ν = max(cᵀSc, 0) + eps: no gradient through the clamp (norm_sq is >= 0 or NaN,
      // and a NaN must flow on).
      const double dnu = t.norm_sq[m] != 0.0 ? -0.5 * inv * inv * inv * dot(dC[m], c, k) : 0.0;
      for (int l = 0; l < k; ++l) dc[l] = inv * dC[m][l] + 2.0 * dnu * sc[l];
      for (int a = 0; a < k; ++a)
        for (int b = 0; b < k; ++b) dS[a][b] += dnu * c[a] * c[b];
    } else {
      for (int l = 0; l < k; ++l) {
        c[l] = t.C[m][l];
        sc[l] = t.SC[m][l];
        dc[l] = dC[m][l];
      }
    }
    for (int j = m - 1; j >= 0; --j) {
      const double coef = t.proj[m][j];
      const double n = normalize ? 1.0 : t.norm_sq[j] + eps;
      const double* Cj = t.C[j];
      const double* SCj = t.SC[j];
      for (int l = 0; l < k; ++l) {  // the running vector before this step
        c[l] += coef * Cj[l];
        sc[l] += coef * SCj[l];
      }
      const double dc_dot_cj = dot(dc, Cj, k);
      const double dp = -dc_dot_cj / n;
      for (int l = 0; l < k; ++l) {
        dC[j][l] += -coef * dc[l] + dp * sc[l];
        U[j][l] += dp * c[l];
      }
      if (!normalize && t.norm_sq[j] != 0.0) {   // clamped: no gradient; NaN: flows on
        const double dn = dc_dot_cj * coef / n;  // <dc', C_j> p / n², with p = coef·n
        for (int l = 0; l < k; ++l) {
          dC[j][l] += 2.0 * dn * SCj[l];
          U[j][l] += dn * Cj[l];
        }
      }
      for (int l = 0; l < k; ++l) dc[l] += dp * SCj[l];
    }
  }
  for (int j = 0; j < k; ++j)
    for (int a = 0; a < k; ++a)
      for (int b = 0; b < k; ++b) dS[a][b] += U[j][a] * t.C[j][b];
}

// The Gram source of the batched route: GH rows of one token (gh = GH[0][t], stride
// between j blocks), and, in the backward, its rows of dg_lhs (the token's share of
// dG = Σ_t Σ_ij dS_ij h_i h_jᵀ, laid out for the caller's batched GEMM:
// dg_lhs[j·stride + (i, a)] = dS_ij h_ia, zero for inactive pairs).
struct GhGram {
  const double* gh;
  int64_t stride;
  int num_experts, rank;
  double* dg_lhs;  // backward only

  template <int MAX_K, typename scalar_t>
  OMOE_HD void gram(const scalar_t* h, const int* active, int k, double (*S)[MAX_K]) const {
    gram_from_gh(h, gh, stride, rank, active, k, S);
  }
  template <int MAX_K, typename scalar_t>
  OMOE_HD void begin_backward(const scalar_t*, const int*, int, const double (*)[MAX_K]) const {
    for (int j = 0; j < num_experts; ++j)
      for (int q = 0; q < num_experts * rank; ++q) dg_lhs[j * stride + q] = 0.0;
  }
  // The Gram part of dh for entry a of active expert m: Σ_l (dS_ml + dS_lm) (G_ij h_j)_a.
  template <int MAX_K, typename scalar_t>
  OMOE_HD double grad_h(const scalar_t* h, const int* active, int k, const double (*dS)[MAX_K],
                        int m, int a) const {
    const int i = active[m];
    const double hv = static_cast<double>(h[i * rank + a]);
    double acc = 0.0;
    for (int l = 0; l < k; ++l) {
      acc += (dS[m][l] + dS[l][m]) * gh[active[l] * stride + i * rank + a];
      dg_lhs[active[l] * stride + i * rank + a] = dS[m][l] * hv;
    }
    return acc;
  }
  template <int MAX_K>
  OMOE_HD void end_backward(const int*, int, const double (*)[MAX_K]) const {}
};

// Routing, MGS and the mixture coefficients a = Σ g_i C_i of one token. Returns the
// number k of active experts; active[l], gates[l] and coeff[l] describe active expert l.
// The Gram source is only read when orthogonalize is set; the tape then holds the MGS
// state for the backward. Needs min(top_k, E) <= MAX_K.
template <int MAX_K, typename scalar_t, typename Gram>
OMOE_HD int token_coefficients(const scalar_t* h, const scalar_t* logits, const Gram& gram,
                               int E, int top_k, bool orthogonalize, bool normalize, double eps,
                               MgsTape<MAX_K>& t, int* active, double* gates, double* coeff) {
  const int k = route_token(logits, E, top_k, active, gates);
  if (!orthogonalize) {
    for (int l = 0; l < k; ++l) coeff[l] = gates[l];
    return k;
  }
  gram.template gram<MAX_K>(h, active, k, t.S);
  mgs_forward(t, k, normalize, eps);
  for (int l = 0; l < k; ++l) {
    coeff[l] = 0.0;
    for (int m = l; m < k; ++m) coeff[l] += gates[m] * t.C[m][l];  // C[m] is zero past m
  }
  return k;
}

// Forward of one token: z = a ⊙ h (E·r values, zero for inactive experts), and a by expert
// into a_out ([E]) when given. Needs min(top_k, E) <= MAX_K.
template <int MAX_K, typename scalar_t, typename Gram>
OMOE_HD void token_forward(const scalar_t* h, const scalar_t* logits, const Gram& gram, int E,
                           int r, int top_k, bool orthogonalize, bool normalize, double eps,
                           MgsTape<MAX_K>& t, scalar_t* z, double* a_out = nullptr) {
  int active[MAX_K];
  double gates[MAX_K], coeff[MAX_K];
  const int k = token_coefficients(h, logits, gram, E, top_k, orthogonalize, normalize, eps, t,
                                   active, gates, coeff);
  for (int q = 0; q < E * r; ++q) z[q] = scalar_t(0);
  if (a_out)
    for (int i = 0; i < E; ++i) a_out[i] = 0.0;
  for (int l = 0; l < k; ++l) {
    const int i = active[l];
    if (a_out) a_out[i] = coeff[l];
    for (int a = 0; a < r; ++a)
      z[i * r + a] = static_cast<scalar_t>(coeff[l] * static_cast<double>(h[i * r + a]));
  }
}

// The batched route's forward (what the CUDA pass calls): gh = GH[0][t], gh_stride
// between j blocks.
template <int MAX_K, typename scalar_t>
OMOE_HD void token_forward(const scalar_t* h, const scalar_t* logits, const double* gh,
                           int64_t gh_stride, int E, int r, int top_k, bool orthogonalize,
                           bool normalize, double eps, MgsTape<MAX_K>& t, scalar_t* z) {
  token_forward(h, logits, GhGram{gh, gh_stride, E, r, nullptr}, E, r, top_k, orthogonalize,
                normalize, eps, t, z);
}

// Backward of one token. Inputs as in the forward, plus dz = dL/dz. Outputs: z
// (recomputed), dh (E·r), dlogits (E), and, when orthogonalizing, whatever the Gram source
// records of dS (GhGram: the token's rows of dg_lhs).
// Needs min(top_k, E) <= MAX_K.
template <int MAX_K, typename scalar_t, typename Gram>
OMOE_HD void token_backward(const scalar_t* h, const scalar_t* logits, const Gram& gram,
                            const scalar_t* dz, int E, int r, int top_k, bool orthogonalize,
                            bool normalize, double eps, BackwardScratch<MAX_K>& scratch,
                            scalar_t* z, scalar_t* dh, scalar_t* dlogits) {
  MgsTape<MAX_K>& t = scratch.tape;
  double (*dC)[MAX_K] = scratch.dC;
  double (*dS)[MAX_K] = scratch.dS;
  int active[MAX_K];
  double gates[MAX_K], coeff[MAX_K], dcoeff[MAX_K], dgate[MAX_K];
  const int k = token_coefficients(h, logits, gram, E, top_k, orthogonalize, normalize, eps, t,
                                   active, gates, coeff);
  // z = a ⊙ h: da_l = <dz_l, h_l>, and the direct part of dh_l is a_l dz_l.
  for (int q = 0; q < E * r; ++q) {
    z[q] = scalar_t(0);
    dh[q] = scalar_t(0);
  }
  for (int l = 0; l < k; ++l) {
    const int i = active[l];
    double s = 0.0;
    for (int a = 0; a < r; ++a) {
      const double hv = static_cast<double>(h[i * r + a]);
      const double dzv = static_cast<double>(dz[i * r + a]);
      z[i * r + a] = static_cast<scalar_t>(coeff[l] * hv);
      dh[i * r + a] = static_cast<scalar_t>(coeff[l] * dzv);
      s += dzv * hv;
    }
    dcoeff[l] = s;
  }
  if (orthogonalize) {
    for (int m = 0; m < k; ++m) {
      dgate[m] = dot(t.C[m], dcoeff, k);
      for (int l = 0; l < k; ++l) dC[m][l] = gates[m] * dcoeff[l];
    }
    mgs_backward(t, k, normalize, eps, dC, dS, scratch.U);
    gram.template begin_backward<MAX_K>(h, active, k, dS);
    for (int m = 0; m < k; ++m) {
      const int i = active[m];
      for (int a = 0; a < r; ++a) {
        // Through S: dh_i += Σ_j (dS_ij + dS_ji) G_ij h_j (the source's share).
        const double acc = coeff[m] * static_cast<double>(dz[i * r + a]) +
                           gram.template grad_h<MAX_K>(h, active, k, dS, m, a);
        dh[i * r + a] = static_cast<scalar_t>(acc);
      }
    }
    gram.template end_backward<MAX_K>(active, k, dS);
  } else {
    for (int m = 0; m < k; ++m) dgate[m] = dcoeff[m];
  }
  // Softmax over the active set: dlogit_i = g_i (dg_i − Σ_j g_j dg_j).
  double mean = 0.0;
  for (int m = 0; m < k; ++m) mean += gates[m] * dgate[m];
  for (int i = 0; i < E; ++i) dlogits[i] = scalar_t(0);
  for (int m = 0; m < k; ++m)
    dlogits[active[m]] = static_cast<scalar_t>(gates[m] * (dgate[m] - mean));
}

// The batched route's backward (what the CUDA pass calls): dg_lhs = the token's rows,
// dg_lhs[j·gh_stride + (i, a)] = dS_ij h_ia.
template <int MAX_K, typename scalar_t>
OMOE_HD void token_backward(const scalar_t* h, const scalar_t* logits, const double* gh,
                            int64_t gh_stride, const scalar_t* dz, int E, int r, int top_k,
                            bool orthogonalize, bool normalize, double eps,
                            BackwardScratch<MAX_K>& scratch, scalar_t* z, scalar_t* dh,
                            scalar_t* dlogits, double* dg_lhs) {
  token_backward(h, logits, GhGram{gh, gh_stride, E, r, dg_lhs}, dz, E, r, top_k, orthogonalize,
                 normalize, eps, scratch, z, dh, dlogits);
}

}  // namespace omoe
