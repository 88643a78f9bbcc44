"""Per-token kernels of the `triton` backend: routing, Gram, MGS and their reverse
(docs/algorithm.md, Forward steps 2–5 and Backward step 3), float64 inside, and the gram
gradient `dG` over the active expert pairs (Backward step 4).

Layout: tokens on the fastest axis. Every per-token tensor is `[..., BT]` with
`BT = 32 · num_warps` (configs.TokenConfig), so Triton's default blocked layout
gives each thread one token and keeps every other axis in that thread's registers:
reductions over experts, slots and ranks are register adds (no SHFL, no BAR). A program
takes `per_program` <= BT tokens (configs.tokens_per_program: enough programs for two
waves over the SMs); the lanes past them idle. Every
global load and store of the per-token kernels is a `[BT]` vector (one per column): for a
multi-dimensional one Triton's coalescing pass picks the layout itself, and triton 3.6 put
the other axis over lanes (python_tests/test_kernel_report.py checks the IR for this).

Loops that touch memory (over slots, ranks and columns) are run-time loops (`range`),
so the IR holds each load or store once: Triton's coalescing pass is quadratic in the
number of memory operations, and the same loops unrolled (`tl.static_range`) took minutes
to compile. Picking row `s` of a `[KP, ...]` register tensor at a run-time `s` is a
masked sum over KP values in the thread: a few selects, no shuffles. The Gram pairs and
the MGS sweep and its reverse, register algebra only, stay unrolled: as run-time loops
their `[KP, KP]` state is live across the whole loop, and the backward spilled.

Only the active experts: routing first gathers, per token, the `K = top_k` active experts
in ascending index order ("slots"; `idx[s, t]` is the expert in slot `s`), and Gram, MGS
and the reverse run over slots, so a token costs `K²·r²` for `S` and `O(K³)` for MGS,
whatever `E` is. Dense routing is `K = E` with slot `s` = expert `s` (the same in every
lane, so `G` loads are warp-uniform). `G` is read from global memory (ERP² float64,
L1/L2 resident). Outputs in the padded expert layout are written per slot at the slot's
columns, and zeros at the columns of inactive experts (disjoint masks, so each element
is written once). The backward hands `dS` on per slot pair (`[T, KP, KP]`) with the
slots' experts (`[T, KP]`, top-k only), and `gram_grad_kernel` skips token blocks in
which an expert pair is not active.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_offsets(tokens, stride):
    """tokens · stride in int64: token index times row stride passes 2³¹ on large inputs
    (T · E·r elements), while the offsets within a row stay int32. Every row base of
    these kernels goes through here (python_tests check both)."""
    return tokens.to(tl.int64) * stride


@triton.jit
def _rows(ptr, tokens, stride):
    """Pointers to the rows `tokens` of a [T, stride] buffer."""
    return ptr + _row_offsets(tokens, stride)


@triton.jit
def _pow2_scales(amax):
    """(2^(127-e), 2^(e-127)) with e the fp32 exponent field of amax, kept in [1, 253]:
    amax · scale < 2 (< 4 for amax ≥ 2^127). Built from exponent bits, so both are exact
    powers of 2 and scale · unscale = 1. The clamp keeps rows past 2^127 (at e = 254 the
    scale's bits would be 0.0 and zero the row); Inf/NaN keep finite scales and propagate
    through the values themselves."""
    exponent = tl.minimum(tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
    scale = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
    unscale = (exponent << 23).to(tl.float32, bitcast=True)
    return scale, unscale


@triton.jit
def _pick(M, axis_idx, s):
    """The slice of M at index s of axis 0 ([KP, ...] → [...]): KP selects in the thread."""
    return tl.sum(tl.where(axis_idx == s, M, 0.0), axis=0)


@triton.jit
def _route_slots(logits, E, top_k, K: tl.constexpr, TOP_K_ROUTING: tl.constexpr,
                 BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr):
    """Routing of a [EP, BT] block of float64 logits (padding experts: -inf).

    Returns active [EP, BT], idx [KP, BT] (int32; slot s holds the s-th active expert,
    0 in padding slots s >= K) and the gates of the slots [KP, BT] (0 in padding slots).
    Top-k: expert i is active when fewer than top_k experts rank above it (larger logit,
    ties to the lower index, NaN above everything, as torch.sort orders them).
    """
    ei = tl.arange(0, EP)
    real = ei[:, None] < E
    sk = tl.arange(0, KP)[:, None]
    if TOP_K_ROUTING:
        i3 = ei[:, None, None]
        j3 = ei[None, :, None]
        li = logits[:, None, :]
        lj = logits[None, :, :]
        li_nan = li != li
        lj_nan = lj != lj
        above = (lj > li) | ((lj == li) & (j3 < i3))
        above_nan = lj_nan & ((~li_nan) | (j3 < i3))
        above = tl.where(li_nan | lj_nan, above_nan, above)
        above = above & (j3 != i3) & (j3 < E)
        rank = tl.sum(above.to(tl.int32), axis=1)                        # [EP, BT]
        active = real & (rank < top_k)
        # Slot of an active expert = number of active experts below it.
        pos = tl.sum(((j3 < i3) & active[None, :, :]).to(tl.int32), axis=1)
        hit = active[None, :, :] & (pos[None, :, :] == tl.arange(0, KP)[:, None, None])
        idx = tl.sum(tl.where(hit, ei[None, :, None], 0), axis=1)        # [KP, BT]
        lk = tl.sum(tl.where(hit, logits[None, :, :], 0.0), axis=1)
    else:
        active = tl.broadcast_to(real, (EP, BT))
        idx = tl.broadcast_to(sk, (KP, BT))
        lk = logits          # KP == EP
    slot_ok = sk < K
    masked = tl.where(slot_ok, lk, float("-inf"))
    top = tl.max(masked, axis=0)
    ex = tl.where(slot_ok, tl.exp(masked - top[None, :]), 0.0)
    gates = ex / tl.sum(ex, axis=0)[None, :]
    return active, idx, gates


@triton.jit
def _expert_of(idx, s, TOP_K_ROUTING: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr):
    """Expert of slot s, per token ([BT] int32); dense: s itself, the same in every lane."""
    if TOP_K_ROUTING:
        return tl.sum(tl.where(tl.arange(0, KP)[:, None] == s, idx, 0), axis=0)
    else:
        return tl.zeros((BT, ), tl.int32) + s


@triton.jit
def _load_cols(rows, first, tok, count, N: tl.constexpr, BT: tl.constexpr):
    """rows[t][first_t + n] for n < N as [N, BT] float64 (0 past T and for n >= count).

    One [BT] load per column: a [N, BT] load would be re-laid out by Triton's coalescing
    pass with N over lanes (shuffles and a shared-memory round trip). A run-time loop, so
    that the IR holds one load, not N (that pass is quadratic in the memory operations);
    LLVM unrolls it and the row select folds into register moves."""
    out = tl.zeros((N, BT), dtype=tl.float64)
    n_idx = tl.arange(0, N)[:, None]
    for n in range(N):
        col = tl.load(rows + first + n, mask=tok & (n < count), other=0.0).to(tl.float64)
        out = tl.where(n_idx == n, col[None, :], out)
    return out


@triton.jit
def _store_cols(rows, first, mask, vals, N: tl.constexpr):
    """rows[t][first_t + n] = vals[n, t] for n < N where mask[t], one [BT] store per column."""
    n_idx = tl.arange(0, N)[:, None]
    for n in range(N):
        tl.store(rows + first + n, _pick(vals, n_idx, n).to(rows.dtype.element_ty), mask=mask)


@triton.jit
def _g_column(g_ptr, e1, e2, b, BT: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr):
    """G[(e1, a), (e2, b)] for a < RP, per token ([RP, BT]; the same in every lane when
    dense). One [BT] load per a, as in _load_cols: as one [RP, BT] load (no axis
    contiguous) triton 3.6's coalescing pass put RP over lanes (SHFL, BAR, shared memory
    and spills)."""
    base = g_ptr + e1 * (RP * ERP) + e2 * RP + b
    a_idx = tl.arange(0, RP)[:, None]
    out = tl.zeros((RP, BT), dtype=tl.float64)
    for a in range(RP):
        out = tl.where(a_idx == a, tl.load(base + a * ERP)[None, :], out)
    return out


@triton.jit
def _h_g_h(h1, rows, g_ptr, e1, e2, tok, BT: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr):
    """h1ᵀ G_(e1,e2) h_e2 per token ([BT], float64): Σ_b h[e2, b] Σ_a h1[a] G[(e1,a),(e2,b)],
    so only h1 is held in registers."""
    out = tl.zeros((BT, ), dtype=tl.float64)
    for b in range(RP):
        w = tl.sum(h1 * _g_column(g_ptr, e1, e2, b, BT, RP, ERP), axis=0)
        out += w * tl.load(rows + e2 * RP + b, mask=tok, other=0.0).to(tl.float64)
    return out


@triton.jit
def _add_g_h(acc, m, rows, g_ptr, e1, e2, tok, BT: tl.constexpr, RP: tl.constexpr,
             ERP: tl.constexpr):
    """acc[a, t] + m[t] Σ_b G[(e1, a), (e2, b)] h[t, e2, b]  ([RP, BT], float64)."""
    for b in range(RP):
        mhb = m * tl.load(rows + e2 * RP + b, mask=tok, other=0.0).to(tl.float64)
        acc += _g_column(g_ptr, e1, e2, b, BT, RP, ERP) * mhb[None, :]
    return acc


@triton.jit
def _load_slot(rows, e, tok, BT: tl.constexpr, RP: tl.constexpr):
    """h[t, e_t, :] of each token as [RP, BT] float64."""
    return _load_cols(rows, e * RP, tok, RP, RP, BT)


@triton.jit
def _load_dz(rows, e, tok, splits, stride_split, BT: tl.constexpr, RP: tl.constexpr):
    """dZ[t, e_t, :] as [RP, BT] float64: the sum of `splits` split-K partials, the first
    at `rows`, the next `stride_split` elements on, in a fixed order."""
    out = _load_slot(rows, e, tok, BT, RP)
    for _ in range(1, splits):
        rows += stride_split   # pointers: 64-bit sums of the partials' offsets
        out += _load_slot(rows, e, tok, BT, RP)
    return out


@triton.jit
def _gram_slots(rows, g_ptr, idx, tok, K: tl.constexpr, TOP_K_ROUTING: tl.constexpr,
                BT: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr):
    """S[s1, s2, t] = h_s1ᵀ G_(s1,s2) h_s2 over the active slots ([KP, KP, BT])."""
    si = tl.arange(0, KP)[:, None, None]
    sl = tl.arange(0, KP)[None, :, None]
    S = tl.zeros((KP, KP, BT), dtype=tl.float64)
    for s1 in tl.static_range(K):
        e1 = _expert_of(idx, s1, TOP_K_ROUTING, BT, KP)
        h1 = _load_slot(rows, e1, tok, BT, RP)
        for s2 in tl.static_range(s1, K):
            e2 = _expert_of(idx, s2, TOP_K_ROUTING, BT, KP)
            s12 = _h_g_h(h1, rows, g_ptr, e1, e2, tok, BT, RP, ERP)
            S = tl.where(((si == s1) & (sl == s2)) | ((si == s2) & (sl == s1)), s12[None, None, :], S)
    return S


@triton.jit
def _mgs_slots(S, eps, K: tl.constexpr, NORMALIZE: tl.constexpr, BT: tl.constexpr,
               KP: tl.constexpr):
    """MGS in coefficient space over the slots, right-looking: at step j, row j is final,
    it is normalized and projected out of every later row at once. Each row sees the same
    operations in the same order as docs/contract.md §1's loop.

    Returns C (row i = C_i), SC (row i = S C_i), P[i, j] = p/n of step (i, j) and
    nsq[j] = max(<v_j, v_j>, 0) (NaN kept), all over [.., BT].
    """
    si = tl.arange(0, KP)[:, None, None]
    sl = tl.arange(0, KP)[None, :, None]
    s2 = tl.arange(0, KP)[:, None]
    C = tl.broadcast_to(tl.where((si == sl) & (si < K), 1.0, 0.0).to(tl.float64), (KP, KP, BT))
    SC = S
    P = tl.zeros((KP, KP, BT), dtype=tl.float64)
    nsq = tl.zeros((KP, BT), dtype=tl.float64)
    for j in tl.static_range(K):
        c_j = _pick(C, si, j)                                              # [KP, BT]
        sc_j = _pick(SC, si, j)
        raw = tl.sum(c_j * sc_j, axis=0)
        # Clamp rounding below 0 (identical experts), but keep a NaN: clamped to 0 it
        # would scale q by 1/sqrt(eps) and hide the NaN.
        nsq_j = tl.where((raw > 0.0) | (raw != raw), raw, 0.0)
        nsq = tl.where(s2 == j, nsq_j[None, :], nsq)
        if NORMALIZE:
            inv = 1.0 / tl.sqrt(nsq_j + eps)
            c_j = c_j * inv[None, :]
            sc_j = sc_j * inv[None, :]
            C = tl.where(si == j, c_j[None, :, :], C)
            SC = tl.where(si == j, sc_j[None, :, :], SC)
            n_j = tl.full((BT, ), 1.0, tl.float64)
        else:
            n_j = nsq_j + eps
        later = (s2 > j) & (s2 < K)
        coef = tl.where(later, tl.sum(C * sc_j[None, :, :], axis=1) / n_j[None, :], 0.0)
        P = tl.where(sl == j, coef[:, None, :], P)
        later3 = later[:, :, None]
        C = tl.where(later3, C - coef[:, None, :] * c_j[None, :, :], C)
        SC = tl.where(later3, SC - coef[:, None, :] * sc_j[None, :, :], SC)
    return C, SC, P, nsq


@triton.jit
def _token_setup(h_ptr, l_ptr, g_ptr, start, count, T, E, top_k, eps, stride_ht, stride_lt,
                 K: tl.constexpr, TOP_K_ROUTING: tl.constexpr, ORTHOGONALIZE: tl.constexpr,
                 NORMALIZE: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr,
                 RP: tl.constexpr, ERP: tl.constexpr):
    """Load, route, Gram and MGS of the `count` <= BT tokens from `start` (lane l holds
    token start + l; lanes past count idle, as lanes past T); coeff[s] = a of slot s
    ([KP, BT])."""
    # int64 tokens (int32 would do: row bases widen in _rows): with int32, ptxas spills
    # token_forward at llama7b-top2 (kernel_report shows it).
    lane = tl.arange(0, BT)
    offs_t = start.to(tl.int64) + lane
    tok = (lane < count) & (offs_t < T)
    e2 = tl.arange(0, EP)[:, None]
    logits = _load_cols(_rows(l_ptr, offs_t, stride_lt), 0, tok, E, EP, BT)
    logits = tl.where(e2 < E, logits, float("-inf"))   # padding tokens keep finite logits
    active, idx, gates = _route_slots(logits, E, top_k, K, TOP_K_ROUTING, BT, EP, KP)
    rows = _rows(h_ptr, offs_t, stride_ht)
    if ORTHOGONALIZE:
        S = _gram_slots(rows, g_ptr, idx, tok, K, TOP_K_ROUTING, BT, KP, RP, ERP)
        C, SC, P, nsq = _mgs_slots(S, eps, K, NORMALIZE, BT, KP)
        coeff = tl.sum(gates[:, None, :] * C, axis=0)
    else:
        C = tl.zeros((KP, KP, BT), dtype=tl.float64)
        SC = C
        P = C
        nsq = tl.zeros((KP, BT), dtype=tl.float64)
        coeff = gates
    return offs_t, tok, rows, active, idx, gates, coeff, C, SC, P, nsq


@triton.jit
def _zero_inactive(rows, tok, active, BT: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr):
    """Zeros in the columns of every inactive (or padding) expert of a [T, EP·RP] output."""
    ei = tl.arange(0, EP)[:, None]
    zeros = tl.zeros((RP, BT), dtype=tl.float32)
    for e in range(EP):
        on = tl.sum(tl.where(ei == e, active, False).to(tl.int32), axis=0) != 0
        _store_cols(rows, e * RP, tok & ~on, zeros, RP)


@triton.jit
def _store_z(z_rows, rows, tok, active, idx, coeff, K: tl.constexpr,
             TOP_K_ROUTING: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr,
             RP: tl.constexpr):
    """Z[t] = a ⊙ h in the padded layout (zeros for inactive experts)."""
    sk = tl.arange(0, KP)[:, None]
    for s in range(K):
        e = _expert_of(idx, s, TOP_K_ROUTING, BT, KP)
        z = _pick(coeff, sk, s)[None, :] * _load_slot(rows, e, tok, BT, RP)
        _store_cols(z_rows, e * RP, tok, z, RP)
    _zero_inactive(z_rows, tok, active, BT, EP, RP)


@triton.jit
def _store_scaled(out_rows, scale_ptr, offs_t, rows, tok, active, idx, coeff, K: tl.constexpr,
                  TOP_K_ROUTING: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr,
                  KP: tl.constexpr, RP: tl.constexpr):
    """The MMA operand format of a [T, EP·RP] row (16-bit inputs): out[t] = fp16(v_t ·
    2^-e_t) and scale[t] = 2^e_t (fp32), v_t = coeff[s] ⊙ rows[t, slot s] over the active
    slots (coeff = 1: the rows themselves), e_t from the row's fp32 max (_pow2_scales), so
    every value enters fp16 with 11 significant bits whatever the row's magnitude. Two
    passes over the slots: the max, then the stores (the second pass re-reads the row,
    which its own thread wrote or read)."""
    sk = tl.arange(0, KP)[:, None]
    amax = tl.zeros((BT, ), dtype=tl.float32)
    for s in range(K):
        e = _expert_of(idx, s, TOP_K_ROUTING, BT, KP)
        v = (_pick(coeff, sk, s)[None, :] * _load_slot(rows, e, tok, BT, RP)).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(v), axis=0))
    scale, unscale = _pow2_scales(amax)
    for s in range(K):
        e = _expert_of(idx, s, TOP_K_ROUTING, BT, KP)
        v = (_pick(coeff, sk, s)[None, :] * _load_slot(rows, e, tok, BT, RP)).to(tl.float32)
        _store_cols(out_rows, e * RP, tok, v * scale[None, :], RP)
    _zero_inactive(out_rows, tok, active, BT, EP, RP)
    tl.store(scale_ptr + offs_t, unscale, mask=tok)


@triton.jit
def _token_forward_block(h_ptr, l_ptr, g_ptr, z_ptr, start, count, T, E, top_k, eps,
                         stride_ht, stride_lt, stride_zt,
                         K: tl.constexpr, TOP_K_ROUTING: tl.constexpr,
                         ORTHOGONALIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                         BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr,
                         ERP: tl.constexpr):
    offs_t, tok, rows, active, idx, gates, coeff, C, SC, P, nsq = _token_setup(
        h_ptr, l_ptr, g_ptr, start, count, T, E, top_k, eps, stride_ht, stride_lt, K,
        TOP_K_ROUTING, ORTHOGONALIZE, NORMALIZE, BT, EP, KP, RP, ERP)
    _store_z(_rows(z_ptr, offs_t, stride_zt), rows, tok, active, idx, coeff, K, TOP_K_ROUTING,
             BT, EP, KP, RP)


@triton.jit
def token_forward_kernel(h_ptr, l_ptr, g_ptr, z_ptr, zs_ptr, T, per_program, E, top_k, eps,
                         stride_ht, stride_lt, stride_zt,
                         K: tl.constexpr, TOP_K_ROUTING: tl.constexpr,
                         ORTHOGONALIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                         BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr,
                         ERP: tl.constexpr, SCALED: tl.constexpr = False):
    """Z[t] = a ⊙ h for the `per_program` (<= BT) tokens of this program (float64
    inside): fp32, or with SCALED the expand's operand format (_store_scaled: fp16 Z
    scaled per row, the row's scale in zs)."""
    offs_t, tok, rows, active, idx, gates, coeff, C, SC, P, nsq = _token_setup(
        h_ptr, l_ptr, g_ptr, tl.program_id(0) * per_program, per_program, T, E, top_k, eps,
        stride_ht, stride_lt, K, TOP_K_ROUTING, ORTHOGONALIZE, NORMALIZE, BT, EP, KP, RP, ERP)
    z_rows = _rows(z_ptr, offs_t, stride_zt)
    if SCALED:
        _store_scaled(z_rows, zs_ptr, offs_t, rows, tok, active, idx, coeff, K, TOP_K_ROUTING,
                      BT, EP, KP, RP)
    else:
        _store_z(z_rows, rows, tok, active, idx, coeff, K, TOP_K_ROUTING, BT, EP, KP, RP)


@triton.jit
def _reverse_mgs(C, SC, P, nsq, dC, eps, K: tl.constexpr, NORMALIZE: tl.constexpr,
                 BT: tl.constexpr, KP: tl.constexpr):
    """Reverse of _mgs_slots (docs/algorithm.md, "Reverse of the MGS loop"), given dC.

    Returns M = dS + dSᵀ over the slots ([KP, KP, BT]): every dS term of step j is
    u_j C_jᵀ or a symmetric outer product, so M is built directly.
    """
    si = tl.arange(0, KP)[:, None, None]
    sl = tl.arange(0, KP)[None, :, None]
    s2 = tl.arange(0, KP)[:, None]
    R = tl.zeros((KP, KP, BT), dtype=tl.float64)     # running c of each row
    RS = tl.zeros((KP, KP, BT), dtype=tl.float64)    # running S c
    M = tl.zeros((KP, KP, BT), dtype=tl.float64)
    for step in tl.static_range(K):
        j = K - 1 - step
        c_j = _pick(C, si, j)
        sc_j = _pick(SC, si, j)
        nsq_j = _pick(nsq, s2, j)
        if NORMALIZE:
            n_j = tl.full((BT, ), 1.0, tl.float64)
        else:
            n_j = nsq_j + eps
        later = (s2 > j) & (s2 < K)
        later3 = later[:, :, None]
        coef = tl.sum(tl.where(sl == j, P, 0.0), axis=1)                 # P[:, j]
        # Rows i > j: back to their value before step (i, j).
        R = tl.where(later3, R + coef[:, None, :] * c_j[None, :, :], R)
        RS = tl.where(later3, RS + coef[:, None, :] * sc_j[None, :, :], RS)
        dc_dot = tl.sum(dC * c_j[None, :, :], axis=1)                     # <dc'_i, C_j>
        dp = tl.where(later, -dc_dot / n_j[None, :], 0.0)
        dcj_add = tl.sum(tl.where(later3, -coef[:, None, :] * dC + dp[:, None, :] * RS, 0.0), axis=0)
        u_j = tl.sum(tl.where(later3, dp[:, None, :] * R, 0.0), axis=0)
        if not NORMALIZE:
            dn = tl.where(later & (nsq_j != 0.0)[None, :], dc_dot * coef / n_j[None, :], 0.0)
            dn_total = tl.sum(dn, axis=0)
            dcj_add = dcj_add + 2.0 * dn_total[None, :] * sc_j
            u_j = u_j + dn_total[None, :] * c_j
        dC = tl.where(later3, dC + dp[:, None, :] * sc_j[None, :, :], dC)
        dC = tl.where(si == j, dC + dcj_add[None, :, :], dC)
        M = M + u_j[:, None, :] * c_j[None, :, :] + c_j[:, None, :] * u_j[None, :, :]
        if NORMALIZE:
            dc_j = _pick(dC, si, j)
            nu = nsq_j + eps
            root = tl.sqrt(nu)
            inv = 1.0 / root
            c_pre = c_j * root[None, :]
            sc_pre = sc_j * root[None, :]
            # No gradient through the clamp; nsq_j is >= 0 or NaN, and a NaN flows on.
            dnu = tl.where(nsq_j != 0.0, -0.5 * inv * inv * inv * tl.sum(dc_j * c_pre, axis=0), 0.0)
            dc_j = inv[None, :] * dc_j + 2.0 * dnu[None, :] * sc_pre
            M = M + 2.0 * dnu[None, None, :] * c_pre[:, None, :] * c_pre[None, :, :]
            dC = tl.where(si == j, dc_j[None, :, :], dC)
            R = tl.where(si == j, c_pre[None, :, :], R)
            RS = tl.where(si == j, sc_pre[None, :, :], RS)
        else:
            R = tl.where(si == j, c_j[None, :, :], R)
            RS = tl.where(si == j, sc_j[None, :, :], RS)
    return tl.where((si < K) & (sl < K), M, 0.0)


@triton.jit
def token_backward_kernel(h_ptr, l_ptr, g_ptr, dz_ptr, z_ptr, dhl_ptr, ds_ptr, slots_ptr,
                          dh16_ptr, dhs_ptr, T, per_program, E, top_k, eps,
                          stride_ht, stride_lt, stride_dzt, stride_zt, stride_dhlt,
                          dz_splits, stride_dzs, K: tl.constexpr, TOP_K_ROUTING: tl.constexpr,
                          ORTHOGONALIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                          BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr,
                          ERP: tl.constexpr, EPL: tl.constexpr, SCALED: tl.constexpr = False):
    """Per-token reverse of the `per_program` (<= BT) tokens of this program. Writes Z (recomputed), dH into dHL[:, :ERP], dlogits into
    dHL[:, ERP:ERP+E] (zeros up to ERP+EPL), and, when orthogonalizing, the symmetric
    part (dS + dSᵀ)/2 of dS per slot pair into ds [T, KP, KP] (float64; zeros in padding
    slots; dG only enters as dG + dGᵀ, which is the same from either) and, under top-k,
    the expert of each slot into slots [T, KP] (int32, -1 in padding slots). SCALED: dH
    also in dX's operand format (_store_scaled: fp16 [T, ERP] into dh16, its row scales
    into dhs); the fp32 dH stays for [dA; dW], whose contraction runs over the tokens.
    dZ is the sum of the dZ GEMM's `dz_splits` split-K partials, `stride_dzs` apart."""
    offs_t, tok, rows, active, idx, gates, coeff, C, SC, P, nsq = _token_setup(
        h_ptr, l_ptr, g_ptr, tl.program_id(0) * per_program, per_program, T, E, top_k, eps,
        stride_ht, stride_lt, K, TOP_K_ROUTING, ORTHOGONALIZE, NORMALIZE, BT, EP, KP, RP, ERP)
    _store_z(_rows(z_ptr, offs_t, stride_zt), rows, tok, active, idx, coeff, K, TOP_K_ROUTING,
             BT, EP, KP, RP)
    sk = tl.arange(0, KP)[:, None]
    si = tl.arange(0, KP)[:, None, None]
    dz_rows = _rows(dz_ptr, offs_t, stride_dzt)
    # z = a ⊙ h: da_s = <dz_s, h_s>.
    dcoeff = tl.zeros((KP, BT), dtype=tl.float64)
    for s in range(K):
        e = _expert_of(idx, s, TOP_K_ROUTING, BT, KP)
        dz = _load_dz(dz_rows, e, tok, dz_splits, stride_dzs, BT, RP)
        da = tl.sum(dz * _load_slot(rows, e, tok, BT, RP), axis=0)
        dcoeff = tl.where(sk == s, da[None, :], dcoeff)
    if ORTHOGONALIZE:
        dgate = tl.sum(C * dcoeff[None, :, :], axis=1)                    # <C_i, da>
        dC = tl.where(si < K, gates[:, None, :] * dcoeff[None, :, :], 0.0)
        M = _reverse_mgs(C, SC, P, nsq, dC, eps, K, NORMALIZE, BT, KP)
        ds_rows = _rows(ds_ptr, offs_t, KP * KP)
        for s1 in range(KP):
            _store_cols(ds_rows, s1 * KP, tok, 0.5 * _pick(M, si, s1), KP)
        if TOP_K_ROUTING:
            _store_cols(_rows(slots_ptr, offs_t, KP), 0, tok, tl.where(sk < K, idx, -1), KP)
    else:
        dgate = dcoeff
    # dh of slot s1: a_s1 dz_s1 + Σ_s2 M[s1, s2] G_(s1,s2) h_s2.
    dhl_rows = _rows(dhl_ptr, offs_t, stride_dhlt)
    for s1 in tl.static_range(K):
        e1 = _expert_of(idx, s1, TOP_K_ROUTING, BT, KP)
        dh = _pick(coeff, sk, s1)[None, :] * _load_dz(dz_rows, e1, tok, dz_splits, stride_dzs, BT, RP)
        if ORTHOGONALIZE:
            m1 = _pick(M, si, s1)
            for s2 in range(K):
                e2 = _expert_of(idx, s2, TOP_K_ROUTING, BT, KP)
                dh = _add_g_h(dh, _pick(m1, sk, s2), rows, g_ptr, e1, e2, tok, BT, RP, ERP)
        _store_cols(dhl_rows, e1 * RP, tok, dh, RP)
    _zero_inactive(dhl_rows, tok, active, BT, EP, RP)
    if SCALED:
        # From the fp32 dH just stored (each thread re-reads its own row).
        _store_scaled(_rows(dh16_ptr, offs_t, ERP), dhs_ptr, offs_t, dhl_rows, tok, active, idx,
                      tl.full((KP, BT), 1.0, tl.float64), K, TOP_K_ROUTING, BT, EP, KP, RP)
    # Softmax over the active set: dlogit_i = g_i (dg_i − Σ_j g_j dg_j), widened to the
    # EPL router columns of dHL (zeros past E) so that one store writes them all.
    mean = tl.sum(gates * dgate, axis=0)
    dl_slots = tl.where(sk < K, gates * (dgate - mean[None, :]), 0.0)
    cols = tl.arange(0, EPL)[:, None]
    wide = tl.zeros((EPL, BT), dtype=tl.float64)
    for s in range(K):
        e = _expert_of(idx, s, TOP_K_ROUTING, BT, KP)
        wide = tl.where(cols == e[None, :], _pick(dl_slots, sk, s)[None, :], wide)
    _store_cols(dhl_rows, ERP, tok, wide, EPL)


@triton.jit
def _triangle(p, NT: tl.constexpr):
    """(i, j) with i <= j < NT of the p-th tile of an NT × NT upper triangle, row by row
    (row i starts at i·NT − i(i−1)/2): a float64 root, then a correction of ±1."""
    n2 = 2.0 * NT + 1.0
    i = ((n2 - tl.sqrt(n2 * n2 - 8.0 * p.to(tl.float64))) * 0.5).to(tl.int32)
    i = tl.minimum(tl.maximum(i, 0), NT - 1)
    i = tl.where(p < i * NT - (i * (i - 1)) // 2, i - 1, i)
    i = tl.where(p >= (i + 1) * NT - ((i + 1) * i) // 2, i + 1, i)
    return i, i + p - (i * NT - (i * (i - 1)) // 2)


@triton.jit
def _pair_outer(ds_ptrs, h_rows, i, j, mask, offs_a, RP: tl.constexpr):
    """Σ_t dS_t h[t, i, :] h[t, j, :]ᵀ ([RP, RP] float64) over the tokens in `mask`, dS_t
    read at `ds_ptrs` (one per token). RP >= 16: a float64 dot over the block's tokens
    (its registers do not grow with BLOCK_T); below, the [BLOCK_T, RP, RP] products summed."""
    ds = tl.load(ds_ptrs, mask=mask, other=0.0)
    h_i = tl.load(h_rows + i * RP + offs_a[None, :], mask=mask[:, None], other=0.0).to(tl.float64)
    h_j = tl.load(h_rows + j * RP + offs_a[None, :], mask=mask[:, None], other=0.0).to(tl.float64)
    if RP >= 16:
        # out_dtype named: triton 3.6 defaults it to float32 (see gemm_kernels._dot_acc).
        return tl.dot(tl.trans(ds[:, None] * h_i), h_j, out_dtype=tl.float64)
    else:
        return tl.sum((ds[:, None] * h_i)[:, :, None] * h_j[:, None, :], axis=0)


@triton.jit
def gram_grad_kernel(h_ptr, ds_ptr, slots_ptr, out_ptr, T, E, tokens_per_split, stride_ht,
                     TOP_K_ROUTING: tl.constexpr, KP: tl.constexpr, RP: tl.constexpr,
                     ERP: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[s, (i,a), (j,b)] = Σ_{t in split s} dS[t, i, j] h[t, i, a] h[t, j, b] (float64),
    with dS[t, i, j] = ds[t, slot of i, slot of j] where both are active, 0 elsewhere.

    ds is symmetric per token (token_backward stores (dS + dSᵀ)/2), so dG is: grid
    (EP(EP+1)/2, splits), one expert block (i, j), i <= j, of one split's partial per
    program (_triangle), a diagonal block stored as its symmetric part. Every element of
    the upper triangle of blocks is written (padding experts' blocks: zeros); the lower is
    not (finalize_grads_kernel reads the triangle). Top-k: a block of BLOCK_T tokens in
    which no token has both i and j active is skipped (no h loads, no FMAs); dense: slot =
    expert, every block counts.
    """
    EP: tl.constexpr = ERP // RP
    i, j = _triangle(tl.program_id(0), EP)
    s = tl.program_id(1)
    offs_a = tl.arange(0, RP)
    offs_tb = tl.arange(0, BLOCK_T)
    slot_ids = tl.arange(0, KP)
    acc = tl.zeros((RP, RP), dtype=tl.float64)
    t_begin = s * tokens_per_split
    # Blocks of padding experts run no iteration and store zeros.
    t_end = tl.where((i < E) & (j < E), tl.minimum(T, t_begin + tokens_per_split), t_begin)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + offs_tb
        ok = offs_t < t_end
        h_rows = _rows(h_ptr, offs_t, stride_ht)[:, None]
        ds_rows = _rows(ds_ptr, offs_t, KP * KP)
        if TOP_K_ROUTING:
            experts = tl.load(_rows(slots_ptr, offs_t, KP)[:, None] + slot_ids[None, :],
                              mask=ok[:, None], other=-1)                  # [BLOCK_T, KP]
            slot_i = tl.max(tl.where(experts == i, slot_ids[None, :], -1), axis=1)
            slot_j = tl.max(tl.where(experts == j, slot_ids[None, :], -1), axis=1)
            pair = (slot_i >= 0) & (slot_j >= 0)
            if tl.max(pair.to(tl.int32), axis=0) != 0:
                acc += _pair_outer(ds_rows + slot_i * KP + slot_j, h_rows, i, j, pair, offs_a, RP)
        else:
            acc += _pair_outer(ds_rows + i * KP + j, h_rows, i, j, ok, offs_a, RP)
    acc = tl.where(i == j, 0.5 * (acc + tl.trans(acc)), acc)
    tl.store(out_ptr + s.to(tl.int64) * (ERP * ERP) + (i * RP + offs_a[:, None]) * ERP
             + j * RP + offs_a[None, :], acc)
