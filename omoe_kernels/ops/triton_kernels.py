"""Triton kernels of the `triton` backend (docs/algorithm.md).

Layout. Expert `i`'s rank-`r` block lives in columns `i·RP … i·RP + r − 1` of every
`[*, ERP]` buffer, with `EP = next_pow2(E)`, `RP = next_pow2(r)` and `ERP = EP·RP`
(raised so that `ERP >= 16` for `tl.dot`); padding columns hold zeros. The padded
layout lets the per-token kernels view `h` as a `[tokens, EP, RP]` block.

Kernels:
- `shrink_kernel`: `H = X A_padᵀ` and the router logits `L = R Wᵀ` in one pass over X.
- `matmul_kernel`: `C = scale · A B (+ ADD)`, optional split-K into fp32 partials. Used
  for the expand (`Y = base + s Z B_padᵀ`) and every backward GEMM. One operand may be an
  fp32 intermediate (Z, dH) while the other is bf16/fp16: that operand is split into a
  high and a low 16-bit part (two dots), so it is not rounded to one 16-bit number.
- `token_forward_kernel`: per token routing, Gram `S = h_iᵀ G_ij h_j` and modified
  Gram–Schmidt in coefficient space (float64), writes `Z = a ⊙ h`.
- `token_backward_kernel`: recomputes the forward and reverses it: `Z`, `dH`, `dlogits`,
  `dS` (float64).
- `gram_grad_kernel`: `dG_ij = Σ_t dS_t,ij h_t,i h_t,jᵀ` (float64 partial sums).

Triton has no indexed register arrays, so a block of tokens keeps its `E × E` MGS state
as `[BT, EP, EP]` tensors; rows are read with a masked sum and written with `tl.where`
inside loops over the experts (run-time loops: the number of experts and top_k are
plain arguments, so one compiled kernel serves every E up to EP).
"""
from __future__ import annotations

import triton
import triton.language as tl

# The DOT_KIND values live in triton_configs.py (the launchers also read them as K.DOT_*).
from .triton_configs import DOT_BF16, DOT_FP16, DOT_FP32_IEEE, DOT_FP32_TF32, DOT_FP64

# The same values as compile-time constants for the kernel bodies: a @triton.jit
# function can only read module globals that are tl.constexpr.
KIND_FP32_IEEE: tl.constexpr = tl.constexpr(DOT_FP32_IEEE)
KIND_FP32_TF32: tl.constexpr = tl.constexpr(DOT_FP32_TF32)
KIND_FP16: tl.constexpr = tl.constexpr(DOT_FP16)
KIND_BF16: tl.constexpr = tl.constexpr(DOT_BF16)
KIND_FP64: tl.constexpr = tl.constexpr(DOT_FP64)


@triton.jit
def _to_compute(v, DOT_KIND: tl.constexpr, UPCAST: tl.constexpr):
    """A loaded operand in the dtype its dot runs in."""
    if UPCAST:
        return v.to(tl.float32)
    elif DOT_KIND == KIND_FP64:
        return v.to(tl.float64)
    elif DOT_KIND == KIND_BF16:
        return v.to(tl.bfloat16)
    elif DOT_KIND == KIND_FP16:
        return v.to(tl.float16)
    else:
        return v.to(tl.float32)


@triton.jit
def _split_hi(v, DOT_KIND: tl.constexpr):
    if DOT_KIND == KIND_BF16:
        return v.to(tl.bfloat16)
    else:
        return v.to(tl.float16)


@triton.jit
def _split_lo(v, hi, DOT_KIND: tl.constexpr):
    if DOT_KIND == KIND_BF16:
        return (v - hi.to(tl.float32)).to(tl.bfloat16)
    else:
        return (v - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _pow2_scales(amax):
    """(2^(127-e), 2^(e-127)) with e the fp32 exponent field of amax (at least 1):
    amax · scale < 2. Built from exponent bits, so both are exact powers of 2 and
    scale · unscale = 1; Inf/NaN give non-finite scales, which propagate as they should."""
    exponent = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 1)
    scale = ((254 - exponent) << 23).to(tl.float32, bitcast=True)
    unscale = (exponent << 23).to(tl.float32, bitcast=True)
    return scale, unscale


@triton.jit
def _dot_acc(a, b, acc, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, DOT_KIND: tl.constexpr,
             UPCAST: tl.constexpr):
    """acc + a·b. With a 16-bit DOT_KIND, the SPLIT operand is fp32 and enters as hi + lo."""
    if UPCAST:
        # Interpreter with bf16 data: the interpreter cannot do bf16 arithmetic.
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_KIND == KIND_FP64:
        acc = tl.dot(a.to(tl.float64), b.to(tl.float64), acc)
    elif DOT_KIND == KIND_FP32_IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_KIND == KIND_FP32_TF32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif SPLIT_A and DOT_KIND == KIND_FP16:
        # fp16: scale each row of the chunk by a power of 2 into [-2, 2] first (fp16 tops
        # out at 65504; Z grows like κ / ‖e‖), and undo it on the partial product. Exact.
        a32 = a.to(tl.float32)
        scale, unscale = _pow2_scales(tl.max(tl.abs(a32), axis=1))
        a32 = a32 * scale[:, None]
        a_hi = _split_hi(a32, DOT_KIND)
        a_lo = _split_lo(a32, a_hi, DOT_KIND)
        b16 = _to_compute(b, DOT_KIND, False)
        part = tl.dot(a_hi, b16)
        part = tl.dot(a_lo, b16, part)
        acc += part * unscale[:, None]
    elif SPLIT_B and DOT_KIND == KIND_FP16:
        b32 = b.to(tl.float32)
        scale, unscale = _pow2_scales(tl.max(tl.abs(b32), axis=0))
        b32 = b32 * scale[None, :]
        b_hi = _split_hi(b32, DOT_KIND)
        b_lo = _split_lo(b32, b_hi, DOT_KIND)
        a16 = _to_compute(a, DOT_KIND, False)
        part = tl.dot(a16, b_hi)
        part = tl.dot(a16, b_lo, part)
        acc += part * unscale[None, :]
    elif SPLIT_A:
        a32 = a.to(tl.float32)
        a_hi = _split_hi(a32, DOT_KIND)
        a_lo = _split_lo(a32, a_hi, DOT_KIND)
        b16 = _to_compute(b, DOT_KIND, False)
        acc = tl.dot(a_hi, b16, acc)
        acc = tl.dot(a_lo, b16, acc)
    elif SPLIT_B:
        b32 = b.to(tl.float32)
        b_hi = _split_hi(b32, DOT_KIND)
        b_lo = _split_lo(b32, b_hi, DOT_KIND)
        a16 = _to_compute(a, DOT_KIND, False)
        acc = tl.dot(a16, b_hi, acc)
        acc = tl.dot(a16, b_lo, acc)
    else:
        acc = tl.dot(_to_compute(a, DOT_KIND, False), _to_compute(b, DOT_KIND, False), acc)
    return acc


@triton.jit
def shrink_kernel(x_ptr, r_ptr, a_ptr, w_ptr, h_ptr, l_ptr,
                  T, D, N, E,
                  stride_xt, stride_xd, stride_rt, stride_rd,
                  stride_an, stride_ad, stride_we, stride_wd,
                  stride_ht, stride_lt,
                  g_ptr, z_ptr, top_k, eps, stride_zt,
                  SEPARATE_ROUTER: tl.constexpr, DOT_KIND: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr,
                  FUSE_TOKEN: tl.constexpr = False, TOP_K_ROUTING: tl.constexpr = False,
                  ORTHOGONALIZE: tl.constexpr = True, NORMALIZE: tl.constexpr = True,
                  BT: tl.constexpr = 1, EP: tl.constexpr = 1, RP: tl.constexpr = 1,
                  ERP: tl.constexpr = 16):
    """H[:, n-tile] = X A_padᵀ and logits = R Wᵀ, sharing the loads of X when R is X.

    Logits are stored by the programs of the first n-tile only (N ≤ BLOCK_N in the usual
    case, so there is one n-tile and no wasted work).

    FUSE_TOKEN (one n-tile only): after storing its H rows and logits, the program runs the
    per-token algebra on them in blocks of BT tokens (re-read from global memory after a
    barrier: Triton cannot slice the accumulator) and writes Z — the shrink-epilogue
    variant of token_forward_kernel. g_ptr … stride_zt are only read then.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # int64 rows: T · stride can pass 2^31 on large inputs.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    ACC = tl.float64 if DOT_KIND == KIND_FP64 else tl.float32
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_l = tl.zeros((BLOCK_M, BLOCK_E), dtype=ACC)
    row_ok = offs_m[:, None] < T
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + offs_k) < D
        x = tl.load(x_ptr + offs_m[:, None] * stride_xt + (k0 + offs_k)[None, :] * stride_xd,
                    mask=row_ok & k_ok[None, :], other=0.0)
        a = tl.load(a_ptr + offs_n[None, :] * stride_an + (k0 + offs_k)[:, None] * stride_ad,
                    mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        w = tl.load(w_ptr + offs_e[None, :] * stride_we + (k0 + offs_k)[:, None] * stride_wd,
                    mask=k_ok[:, None] & (offs_e[None, :] < E), other=0.0)
        acc_h = _dot_acc(x, a, acc_h, False, False, DOT_KIND, UPCAST)
        if SEPARATE_ROUTER:
            rt = tl.load(r_ptr + offs_m[:, None] * stride_rt + (k0 + offs_k)[None, :] * stride_rd,
                         mask=row_ok & k_ok[None, :], other=0.0)
            acc_l = _dot_acc(rt, w, acc_l, False, False, DOT_KIND, UPCAST)
        else:
            acc_l = _dot_acc(x, w, acc_l, False, False, DOT_KIND, UPCAST)
    tl.store(h_ptr + offs_m[:, None] * stride_ht + offs_n[None, :], acc_h,
             mask=row_ok & (offs_n[None, :] < N))
    tl.store(l_ptr + offs_m[:, None] * stride_lt + offs_e[None, :], acc_l,
             mask=row_ok & (offs_e[None, :] < E) & (pid_n == 0))
    if FUSE_TOKEN:
        tl.debug_barrier()   # this program's H and logits stores are visible to all its threads
        for sub in range(0, BLOCK_M, BT):
            _token_forward_block(h_ptr, l_ptr, g_ptr, z_ptr, pid_m * BLOCK_M + sub, T, E, top_k, eps,
                                 stride_ht, stride_lt, stride_zt, TOP_K_ROUTING, ORTHOGONALIZE,
                                 NORMALIZE, BT, EP, RP, ERP)


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, add_ptr,
                  M, N, K, k_per_split,
                  stride_am, stride_ak, stride_bk, stride_bn,
                  stride_cs, stride_cm, stride_cn, stride_addm, stride_addn,
                  scale,
                  HAS_ADD: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr,
                  DOT_KIND: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr):
    """C[s] = scale · A[:, K-slice s] B[K-slice s, :] (+ ADD), grid (tiles, splits).

    With one split, C is the output (any dtype); with several, C is an fp32 partial
    buffer [splits, M, N] that the caller sums.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row tiles share their column tiles in L2.
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size
    # int64 offsets: rows × stride (and the K walk of transposed operands) can pass 2^31.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    ACC = tl.float64 if DOT_KIND == KIND_FP64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n[None, :] < N
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak,
                    mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_ok[:, None] & n_ok, other=0.0)
        acc = _dot_acc(a, b, acc, SPLIT_A, SPLIT_B, DOT_KIND, UPCAST)
    acc = acc * scale
    if HAS_ADD:
        base = tl.load(add_ptr + offs_m[:, None] * stride_addm + offs_n[None, :] * stride_addn,
                       mask=m_ok & n_ok, other=0.0)
        acc = acc + base.to(ACC)
    c_ptrs = c_ptr + pid_s * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok & n_ok)


# ----------------------------------------------------------------------------------------
# Per-token algebra, float64. Shapes: BT tokens, EP experts (padded), RP rank (padded).


@triton.jit
def _select_row(M3, idx3, j):
    """M3[:, j, :] of a [BT, EP, X] tensor (idx3 indexes axis 1)."""
    return tl.sum(tl.where(idx3 == j, M3, 0.0), axis=1)


@triton.jit
def _select_col(M2, idx2, j):
    """M2[:, j] of a [BT, EP] tensor (idx2 indexes axis 1)."""
    return tl.sum(tl.where(idx2 == j, M2, 0.0), axis=1)


@triton.jit
def _route(logits, e2, E, top_k, TOP_K_ROUTING: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr):
    """Active set and gates of a [BT, EP] block of float64 logits (padding experts: -inf).

    Top-k: expert i is active when fewer than k experts rank above it (larger logit,
    ties to the lower index, NaN above everything, as torch.sort orders them).
    """
    real = e2 < E
    if TOP_K_ROUTING:
        ei = tl.arange(0, EP)[None, :, None]
        ej = tl.arange(0, EP)[None, None, :]
        li = logits[:, :, None]
        lj = logits[:, None, :]
        li_nan = li != li
        lj_nan = lj != lj
        above = (lj > li) | ((lj == li) & (ej < ei))
        above_nan = lj_nan & ((~li_nan) | (ej < ei))
        above = tl.where(li_nan | lj_nan, above_nan, above)
        above = above & (ej != ei) & (ej < E)
        rank = tl.sum(above.to(tl.int32), axis=2)
        active = real & (rank < top_k)
    else:
        active = tl.broadcast_to(real, (BT, EP))
    masked = tl.where(active, logits, float("-inf"))
    top = tl.max(masked, axis=1)
    ex = tl.where(active, tl.exp(masked - top[:, None]), 0.0)
    gates = ex / tl.sum(ex, axis=1)[:, None]
    return active, gates


@triton.jit
def _gram_block(h3, g_ptr, j, ERP: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr):
    """V[t, i, a] = Σ_b G[(i,a), (j,b)] h[t, j, b]  ([BT, EP, RP], float64)."""
    ei = tl.arange(0, EP)[:, None, None]
    ea = tl.arange(0, RP)[None, :, None]
    eb = tl.arange(0, RP)[None, None, :]
    g_j = tl.load(g_ptr + (ei * RP + ea) * ERP + j * RP + eb)          # [EP, RP, RP]
    h_j = _select_row(h3, tl.arange(0, EP)[None, :, None], j)           # [BT, RP]
    return tl.sum(g_j[None, :, :, :] * h_j[:, None, None, :], axis=3)


@triton.jit
def _token_forward(h3, logits, g_ptr, E, top_k, eps,
                   TOP_K_ROUTING: tl.constexpr, ORTHOGONALIZE: tl.constexpr,
                   NORMALIZE: tl.constexpr, BT: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr,
                   ERP: tl.constexpr):
    """Routing, Gram and MGS of a block of tokens.

    Returns active [BT, EP], gates, coefficients a, and the MGS tape: C (row i = C_i),
    SC = S C_i rows, P[:, i, j] = p/n of step (i, j), nsq[:, j] = max(<v_j, v_j>, 0) (NaN kept).
    MGS runs right-looking: at step j, row j is final, it is normalized and projected out
    of every later row at once. Each row sees the same operations in the same order as
    docs/contract.md §1's loop.
    """
    e2 = tl.arange(0, EP)[None, :]
    i3 = tl.arange(0, EP)[None, :, None]
    l3 = tl.arange(0, EP)[None, None, :]
    active, gates = _route(logits, e2, E, top_k, TOP_K_ROUTING, BT, EP)
    act_i = active[:, :, None]
    act_l = active[:, None, :]
    C = tl.zeros((BT, EP, EP), dtype=tl.float64)
    SC = tl.zeros((BT, EP, EP), dtype=tl.float64)
    P = tl.zeros((BT, EP, EP), dtype=tl.float64)
    nsq = tl.zeros((BT, EP), dtype=tl.float64)
    if ORTHOGONALIZE:
        S = tl.zeros((BT, EP, EP), dtype=tl.float64)
        for j in range(E):
            v = _gram_block(h3, g_ptr, j, ERP, EP, RP)
            s_col = tl.sum(h3 * v, axis=2)                               # S[:, i, j]
            # Upper triangle from this column, mirrored into the lower one.
            S = tl.where((l3 == j) & (i3 <= j), s_col[:, :, None], S)
            S = tl.where((i3 == j) & (l3 < j), s_col[:, None, :], S)
        S = tl.where(act_i & act_l, S, 0.0)
        C = tl.where((i3 == l3) & act_i, 1.0, 0.0).to(tl.float64)
        SC = S
        for j in range(E):
            c_j = _select_row(C, i3, j)
            sc_j = _select_row(SC, i3, j)
            raw = tl.sum(c_j * sc_j, axis=1)
            # Clamp rounding below 0 (identical experts), but keep a NaN: clamped to 0 it
            # would scale q by 1/sqrt(eps) and hide the NaN.
            nsq_j = tl.where((raw > 0.0) | (raw != raw), raw, 0.0)
            nsq = tl.where(e2 == j, nsq_j[:, None], nsq)
            if NORMALIZE:
                inv = 1.0 / tl.sqrt(nsq_j + eps)
                c_j = c_j * inv[:, None]
                sc_j = sc_j * inv[:, None]
                C = tl.where(i3 == j, c_j[:, None, :], C)
                SC = tl.where(i3 == j, sc_j[:, None, :], SC)
                n_j = tl.full((BT, ), 1.0, tl.float64)
            else:
                n_j = nsq_j + eps
            later = (e2 > j) & active
            coef = tl.where(later, tl.sum(C * sc_j[:, None, :], axis=2) / n_j[:, None], 0.0)
            P = tl.where(l3 == j, coef[:, :, None], P)
            later3 = later[:, :, None]
            C = tl.where(later3, C - coef[:, :, None] * c_j[:, None, :], C)
            SC = tl.where(later3, SC - coef[:, :, None] * sc_j[:, None, :], SC)
        coeff = tl.sum(gates[:, :, None] * C, axis=1)
    else:
        coeff = gates
    coeff = tl.where(active, coeff, 0.0)
    return active, gates, coeff, C, SC, P, nsq


@triton.jit
def _load_token_block(h_ptr, l_ptr, start, T, E, stride_ht, stride_lt,
                      BT: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr):
    offs_t = start + tl.arange(0, BT)
    t3 = offs_t[:, None, None]
    e3 = tl.arange(0, EP)[None, :, None]
    a3 = tl.arange(0, RP)[None, None, :]
    tok3 = t3 < T
    h3 = tl.load(h_ptr + t3 * stride_ht + e3 * RP + a3, mask=tok3, other=0.0).to(tl.float64)
    e2 = tl.arange(0, EP)[None, :]
    logits = tl.load(l_ptr + offs_t[:, None] * stride_lt + e2,
                     mask=(offs_t[:, None] < T) & (e2 < E), other=0.0).to(tl.float64)
    logits = tl.where(e2 < E, logits, float("-inf"))   # padding tokens keep finite logits
    return offs_t, h3, logits


@triton.jit
def token_forward_kernel(h_ptr, l_ptr, g_ptr, z_ptr, T, E, top_k, eps,
                         stride_ht, stride_lt, stride_zt,
                         TOP_K_ROUTING: tl.constexpr,
                         ORTHOGONALIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                         BT: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr):
    """Z[t] = a ⊙ h for a block of BT tokens (fp32 out, float64 inside)."""
    _token_forward_block(h_ptr, l_ptr, g_ptr, z_ptr, tl.program_id(0) * BT, T, E, top_k, eps,
                         stride_ht, stride_lt, stride_zt, TOP_K_ROUTING, ORTHOGONALIZE, NORMALIZE,
                         BT, EP, RP, ERP)


@triton.jit
def _token_forward_block(h_ptr, l_ptr, g_ptr, z_ptr, start, T, E, top_k, eps,
                         stride_ht, stride_lt, stride_zt,
                         TOP_K_ROUTING: tl.constexpr,
                         ORTHOGONALIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                         BT: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr):
    offs_t, h3, logits = _load_token_block(h_ptr, l_ptr, start, T, E, stride_ht, stride_lt, BT, EP, RP)
    active, gates, coeff, C, SC, P, nsq = _token_forward(
        h3, logits, g_ptr, E, top_k, eps, TOP_K_ROUTING, ORTHOGONALIZE, NORMALIZE, BT, EP, RP, ERP)
    z3 = tl.where(active[:, :, None], coeff[:, :, None] * h3, 0.0)
    t3 = offs_t[:, None, None]
    e3 = tl.arange(0, EP)[None, :, None]
    a3 = tl.arange(0, RP)[None, None, :]
    tl.store(z_ptr + t3 * stride_zt + e3 * RP + a3, z3.to(z_ptr.dtype.element_ty), mask=t3 < T)


@triton.jit
def token_backward_kernel(h_ptr, l_ptr, g_ptr, dz_ptr, z_ptr, dhl_ptr, ds_ptr, T, E, top_k, eps,
                          stride_ht, stride_lt, stride_dzt, stride_zt, stride_dhlt,
                          TOP_K_ROUTING: tl.constexpr,
                          ORTHOGONALIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                          BT: tl.constexpr, EP: tl.constexpr, RP: tl.constexpr,
                          ERP: tl.constexpr, EPL: tl.constexpr):
    """Per-token reverse. Writes Z (recomputed), dH into dHL[:, :ERP], dlogits into
    dHL[:, ERP:ERP+E] (zeros up to ERP+EPL), and dS [T, EP, EP] (float64, when orthogonalizing)."""
    offs_t, h3, logits = _load_token_block(h_ptr, l_ptr, tl.program_id(0) * BT, T, E, stride_ht,
                                           stride_lt, BT, EP, RP)
    active, gates, coeff, C, SC, P, nsq = _token_forward(
        h3, logits, g_ptr, E, top_k, eps, TOP_K_ROUTING, ORTHOGONALIZE, NORMALIZE, BT, EP, RP, ERP)
    e2 = tl.arange(0, EP)[None, :]
    i3 = tl.arange(0, EP)[None, :, None]
    l3 = tl.arange(0, EP)[None, None, :]
    t3 = offs_t[:, None, None]
    a3 = tl.arange(0, RP)[None, None, :]
    tok3 = t3 < T
    act3 = active[:, :, None]
    dz3 = tl.load(dz_ptr + t3 * stride_dzt + i3 * RP + a3, mask=tok3, other=0.0).to(tl.float64)
    z3 = tl.where(act3, coeff[:, :, None] * h3, 0.0)
    tl.store(z_ptr + t3 * stride_zt + i3 * RP + a3, z3.to(z_ptr.dtype.element_ty), mask=tok3)
    # z = a ⊙ h: da_l = <dz_l, h_l>, direct part of dh_l = a_l dz_l.
    dcoeff = tl.where(active, tl.sum(dz3 * h3, axis=2), 0.0)
    dh3 = coeff[:, :, None] * dz3
    if ORTHOGONALIZE:
        dgate = tl.sum(C * dcoeff[:, None, :], axis=2)                   # <C_i, da>
        dC = tl.where(active[:, :, None], gates[:, :, None] * dcoeff[:, None, :], 0.0)
        R = tl.zeros((BT, EP, EP), dtype=tl.float64)     # running c of each row
        RS = tl.zeros((BT, EP, EP), dtype=tl.float64)    # running S c
        dS = tl.zeros((BT, EP, EP), dtype=tl.float64)
        dST = tl.zeros((BT, EP, EP), dtype=tl.float64)   # dSᵀ, built alongside
        for jj in range(E):
            j = E - 1 - jj
            c_j = _select_row(C, i3, j)
            sc_j = _select_row(SC, i3, j)
            nsq_j = _select_col(nsq, e2, j)
            if NORMALIZE:
                n_j = tl.full((BT, ), 1.0, tl.float64)
            else:
                n_j = nsq_j + eps
            later = (e2 > j) & active
            later3 = later[:, :, None]
            coef = tl.sum(tl.where(l3 == j, P, 0.0), axis=2)                # P[:, i, j]
            # Rows i > j: back to their value before step (i, j).
            R = tl.where(later3, R + coef[:, :, None] * c_j[:, None, :], R)
            RS = tl.where(later3, RS + coef[:, :, None] * sc_j[:, None, :], RS)
            dc_dot = tl.sum(dC * c_j[:, None, :], axis=2)                 # <dc'_i, C_j>
            dp = tl.where(later, -dc_dot / n_j[:, None], 0.0)
            dcj_add = tl.sum(tl.where(later3, -coef[:, :, None] * dC + dp[:, :, None] * RS, 0.0),
                             axis=1)
            u_j = tl.sum(tl.where(later3, dp[:, :, None] * R, 0.0), axis=1)
            if not NORMALIZE:
                dn = tl.where(later & (nsq_j != 0.0)[:, None], dc_dot * coef / n_j[:, None], 0.0)
                dn_total = tl.sum(dn, axis=1)
                dcj_add = dcj_add + 2.0 * dn_total[:, None] * sc_j
                u_j = u_j + dn_total[:, None] * c_j
            dC = tl.where(later3, dC + dp[:, :, None] * sc_j[:, None, :], dC)
            dC = tl.where(i3 == j, dC + dcj_add[:, None, :], dC)
            dS = dS + u_j[:, :, None] * c_j[:, None, :]
            dST = dST + c_j[:, :, None] * u_j[:, None, :]
            if NORMALIZE:
                dc_j = _select_row(dC, i3, j)
                nu = nsq_j + eps
                root = tl.sqrt(nu)
                inv = 1.0 / root
                c_pre = c_j * root[:, None]
                sc_pre = sc_j * root[:, None]
                # No gradient through the clamp; nsq_j is >= 0 or NaN, and a NaN flows on.
                dnu = tl.where(nsq_j != 0.0, -0.5 * inv * inv * inv * tl.sum(dc_j * c_pre, axis=1), 0.0)
                dc_j = inv[:, None] * dc_j + 2.0 * dnu[:, None] * sc_pre
                outer = dnu[:, None, None] * c_pre[:, :, None] * c_pre[:, None, :]
                dS = dS + outer
                dST = dST + outer
                dC = tl.where(i3 == j, dc_j[:, None, :], dC)
                R = tl.where(i3 == j, c_pre[:, None, :], R)
                RS = tl.where(i3 == j, sc_pre[:, None, :], RS)
            else:
                R = tl.where(i3 == j, c_j[:, None, :], R)
                RS = tl.where(i3 == j, sc_j[:, None, :], RS)
        dS = tl.where(act3 & active[:, None, :], dS, 0.0)
        dST = tl.where(act3 & active[:, None, :], dST, 0.0)
        tl.store(ds_ptr + t3 * (EP * EP) + i3 * EP + l3, dS, mask=tok3)
        # Gram part of dh: dh_i += Σ_j (dS_ij + dS_ji) G_ij h_j.
        M = dS + dST
        for j in range(E):
            v = _gram_block(h3, g_ptr, j, ERP, EP, RP)
            m_col = tl.sum(tl.where(l3 == j, M, 0.0), axis=2)              # M[:, i, j]
            dh3 = dh3 + m_col[:, :, None] * v
    else:
        dgate = dcoeff
    dh3 = tl.where(act3, dh3, 0.0)
    tl.store(dhl_ptr + t3 * stride_dhlt + i3 * RP + a3, dh3.to(dhl_ptr.dtype.element_ty), mask=tok3)
    # Softmax over the active set: dlogit_i = g_i (dg_i − Σ_j g_j dg_j).
    mean = tl.sum(gates * dgate, axis=1)
    dlogits = tl.where(active, gates * (dgate - mean[:, None]), 0.0)
    # Widen to the EPL router columns of dHL (zeros past E), so one store writes them all.
    cols = tl.arange(0, EPL)[None, :, None]
    wide = tl.sum(tl.where(cols == l3, dlogits[:, None, :], 0.0), axis=2)      # [BT, EPL]
    tl.store(dhl_ptr + offs_t[:, None] * stride_dhlt + ERP + tl.arange(0, EPL)[None, :],
             wide.to(dhl_ptr.dtype.element_ty), mask=offs_t[:, None] < T)


@triton.jit
def gram_grad_kernel(h_ptr, ds_ptr, out_ptr, T, tokens_per_split, stride_ht,
                     EP: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr,
                     BLOCK_T: tl.constexpr):
    """out[s, (i,a), (j,b)] = Σ_{t in split s} dS[t, i, j] h[t, i, a] h[t, j, b] (float64).

    Grid (E, E, splits): one (i, j) expert block per program.
    """
    i = tl.program_id(0)
    j = tl.program_id(1)
    s = tl.program_id(2)
    offs_a = tl.arange(0, RP)
    offs_tb = tl.arange(0, BLOCK_T)
    acc = tl.zeros((RP, RP), dtype=tl.float64)
    t_begin = s * tokens_per_split
    t_end = tl.minimum(T, t_begin + tokens_per_split)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + offs_tb
        ok = offs_t < t_end
        h_i = tl.load(h_ptr + offs_t[:, None] * stride_ht + i * RP + offs_a[None, :],
                      mask=ok[:, None], other=0.0).to(tl.float64)
        h_j = tl.load(h_ptr + offs_t[:, None] * stride_ht + j * RP + offs_a[None, :],
                      mask=ok[:, None], other=0.0).to(tl.float64)
        ds = tl.load(ds_ptr + offs_t * (EP * EP) + i * EP + j, mask=ok, other=0.0)
        acc += tl.sum((ds[:, None] * h_i)[:, :, None] * h_j[:, None, :], axis=0)
    tl.store(out_ptr + s * (ERP * ERP) + (i * RP + offs_a[:, None]) * ERP + j * RP + offs_a[None, :], acc)
