"""Triton kernels of the `triton` backend (docs/algorithm.md).

Layout. Expert `i`'s rank-`r` block lives in columns `i·RP … i·RP + r − 1` of every
`[*, ERP]` buffer, with `EP = next_pow2(E)`, `RP = next_pow2(r)` and `ERP = EP·RP`
(raised so that `ERP >= 16` for `tl.dot`); padding columns hold zeros.

Weights are read in place: `A [E, r, d_in]` and `B [E, d_out, r]` enter the GEMMs in that
layout through `_offsets` (expert stride + rank stride, padding masked).

Kernels:
- `shrink_kernel`: `H = X A_catᵀ` and the router logits `L = R Wᵀ` in one pass over X;
  its first programs build `G = B_catᵀ B_cat` in float64 (`_gram_tile`).
- `matmul_kernel`: `C = scale · A B (+ ADD)`, optional split-K into partials, optional
  router term (a BLOCK_E-wide dot) and gram programs. The expand (`Y = base + s Z B_catᵀ`),
  dZ (+ G), dB and dX. An fp32 intermediate (Z, dH) meeting a 16-bit operand enters as
  scaled fp16, as hi + lo bf16 parts or as bf16 (`_dot_acc`, triton_configs); the expand
  and dX of 16-bit inputs read Z / dH already in fp16 with a scale per row (SCALED_A;
  where E·r fits one tile, `scaled_matmul_kernel` in triton/scaled_kernels.py runs them).
- `weight_grad_kernel`: split-K partials of `[dA_cat; dW]ᵀ = [Xᵀ dH | Rᵀ dL]`, the
  router's E columns in a narrow tile beside the E·r wide one.
- `finalize_grads_kernel`: sums the split-K and gram partials and writes grad_B (with
  `B_cat (dG + dGᵀ)`), grad_A and grad_W in their layout and dtype.
- `token_forward_kernel`, `token_backward_kernel` (triton/token_kernels.py): the per-token
  algebra in float64, tokens on lanes, over the k active experts only.
- `gram_grad_kernel` (triton/token_kernels.py): `dG_ij = Σ_t dS_t,ij h_t,i h_t,jᵀ`
  (float64 partial sums per token split, over the active expert pairs).
"""
from __future__ import annotations

import triton
import triton.language as tl

# The DOT_KIND values live in triton/configs.py (the launchers also read them as K.DOT_*).
# The per-token kernels live in their own module; re-exported here so the launchers and
# kernel_report find every kernel as K.<name>.
from .configs import DOT_BF16, DOT_FP16, DOT_FP32_IEEE, DOT_FP32_TF32, DOT_FP64
from .token_kernels import (  # noqa: F401
    _pow2_scales,
    _token_forward_block,
    _triangle,
    gram_grad_kernel,
    token_backward_kernel,
    token_forward_kernel,
)

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
def _round_bf16(v):
    """fp32 → nearest bf16 (ties to even), returned as fp32, from the bits: the
    interpreter's own fp32 → bf16 cast does not round to nearest. NaN and Inf stay."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


@triton.jit
def _dot_fp16_scaled(a, b, acc, UPCAST: tl.constexpr):
    """acc + a·b in one fp16 MMA, for an fp32 intermediate (Z, dH, dL) meeting a 16-bit
    operand. Each operand that is not fp16 already is scaled by powers of 2 (rows of `a`,
    columns of `b`, each to its max: exact) and the partial product scaled back. An fp32
    operand keeps 11 significant bits (bf16: 8) and stays inside fp16's range whatever its
    magnitude (Z grows like κ/‖e‖); a bf16 weight converts exactly (8 bits fit in 11; a
    scaled value below 2^-17 of its max may round, by 2^-25 of that max at most)."""
    if a.dtype == tl.float16:
        a16 = a
    else:
        a32 = a.to(tl.float32)
        a_scale, a_unscale = _pow2_scales(tl.max(tl.abs(a32), axis=1))
        a16 = (a32 * a_scale[:, None]).to(tl.float16)
    if b.dtype == tl.float16:
        b16 = b
    else:
        b32 = b.to(tl.float32)
        b_scale, b_unscale = _pow2_scales(tl.max(tl.abs(b32), axis=0))
        b16 = (b32 * b_scale[None, :]).to(tl.float16)
    if UPCAST:
        # Interpreter: fp16 products are exact in fp32, as on the tensor cores.
        part = tl.dot(a16.to(tl.float32), b16.to(tl.float32), input_precision="ieee")
    else:
        part = tl.dot(a16, b16)
    # The weight's scale first: it is moderate, Z's may not be (a Z row past 2^120 times
    # its unscale alone would overflow before the weight's brought it back).
    if b.dtype != tl.float16:
        part = part * b_unscale[None, :]
    if a.dtype != tl.float16:
        part = part * a_unscale[:, None]
    return acc + part


@triton.jit
def _dot_acc(a, b, acc, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, FP16_A: tl.constexpr,
             DOT_KIND: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b. An fp32 intermediate meeting a 16-bit operand: in an fp16 dot always, and
    in a bf16 dot with FP16_A, both enter one scaled fp16 MMA (_dot_fp16_scaled); in a
    bf16 dot with SPLIT_A/SPLIT_B it enters as hi + lo bf16 parts (two MMAs), else as one
    bf16 rounding."""
    if FP16_A or (DOT_KIND == KIND_FP16 and (a.dtype == tl.float32 or b.dtype == tl.float32)):
        acc = _dot_fp16_scaled(a, b, acc, UPCAST)
    elif UPCAST:
        # Interpreter with bf16 data: it cannot do bf16 arithmetic, so the dot runs in fp32
        # on operands rounded to bf16 exactly as the GPU path rounds them (products of bf16
        # values are exact in fp32, which is what the tensor cores compute).
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        if SPLIT_A:
            a_hi = _round_bf16(a32)
            acc = tl.dot(a_hi, _round_bf16(b32), acc, input_precision="ieee")
            acc = tl.dot(_round_bf16(a32 - a_hi), _round_bf16(b32), acc, input_precision="ieee")
        elif SPLIT_B:
            b_hi = _round_bf16(b32)
            acc = tl.dot(_round_bf16(a32), b_hi, acc, input_precision="ieee")
            acc = tl.dot(_round_bf16(a32), _round_bf16(b32 - b_hi), acc, input_precision="ieee")
        else:
            acc = tl.dot(_round_bf16(a32), _round_bf16(b32), acc, input_precision="ieee")
    elif DOT_KIND == KIND_FP64:
        # out_dtype named: triton 3.6's tl.dot defaults it to float32 and asserts that the
        # accumulator has that dtype (3.8 takes the accumulator's).
        acc = tl.dot(a.to(tl.float64), b.to(tl.float64), acc, out_dtype=tl.float64)
    elif DOT_KIND == KIND_FP32_IEEE:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_KIND == KIND_FP32_TF32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    elif SPLIT_A:
        a32 = a.to(tl.float32)
        a_hi = a32.to(tl.bfloat16)
        a_lo = (a32 - a_hi.to(tl.float32)).to(tl.bfloat16)
        b16 = _to_compute(b, DOT_KIND, False)
        acc = tl.dot(a_hi, b16, acc)
        acc = tl.dot(a_lo, b16, acc)
    elif SPLIT_B:
        b32 = b.to(tl.float32)
        b_hi = b32.to(tl.bfloat16)
        b_lo = (b32 - b_hi.to(tl.float32)).to(tl.bfloat16)
        a16 = _to_compute(a, DOT_KIND, False)
        acc = tl.dot(a16, b_hi, acc)
        acc = tl.dot(a16, b_lo, acc)
    else:
        acc = tl.dot(_to_compute(a, DOT_KIND, False), _to_compute(b, DOT_KIND, False), acc)
    return acc


@triton.jit
def _offsets(idx, stride, stride_expert, limit, E, rank, RP: tl.constexpr, PACKED: tl.constexpr):
    """(element offsets, mask) of indices `idx` along one dimension of an operand.

    PACKED: the dimension is the padded expert layout (idx = expert·RP + k) of a weight
    stored with separate expert and rank strides (A [E, r, d_in], B [E, d_out, r]); the
    padding (expert >= E or k >= rank) is masked. Otherwise a plain dimension of `limit`.
    """
    if PACKED:
        expert = idx // RP
        k = idx % RP
        return expert * stride_expert + k * stride, (expert < E) & (k < rank)
    else:
        return idx * stride, idx < limit


@triton.jit
def _gram_cols(b_ptr, rows, row_ok, first, E, rank, stride_be, stride_bd, stride_br,
               RP: tl.constexpr, GB: tl.constexpr, GD: tl.constexpr):
    """B_cat[rows, first + c] for c < GB as [GB, GD] float64 (padding columns: 0), one
    [GD] load per column: rows on lanes, the GB columns in each thread's registers."""
    out = tl.zeros((GB, GD), dtype=tl.float64)
    c_idx = tl.arange(0, GB)[:, None]
    row_ptrs = b_ptr + rows * stride_bd
    for c in tl.static_range(GB):
        expert = (first + c) // RP
        k = (first + c) % RP
        ok = row_ok & (expert < E) & (k < rank)
        col = tl.load(row_ptrs + expert * stride_be + k * stride_br, mask=ok, other=0.0)
        out = tl.where(c_idx == c, col.to(tl.float64)[None, :], out)
    return out


@triton.jit
def _gram_tile(b_ptr, g_ptr, tile, E, rank, d_out, stride_be, stride_bd, stride_br,
               RP: tl.constexpr, ERP: tl.constexpr, GB: tl.constexpr, GD: tl.constexpr,
               GR: tl.constexpr):
    """One GB × GB tile of G = B_catᵀ B_cat ([ERP, ERP] float64), read straight from
    B [E, d_out, r] (products of 16-bit or fp32 values are exact in float64).

    Tile `tile` of the upper triangle of the (ERP/GB)² tiles (_triangle) writes itself and,
    off the diagonal, its transpose (G is exactly symmetric). A "gram program" appended to
    the grid of a GEMM launch (shrink, dZ), so G costs no launch of its own.

    Rows of B on lanes (GD = 32 · num_warps a vector, GR vectors a trip, configs.gram_rows
    keeps the trips over d_out few): every thread accumulates its rows' GB² products in
    float64 registers, and the rows are summed across threads once, after the loop.
    """
    NT: tl.constexpr = ERP // GB
    ti, tj = _triangle(tile, NT)
    offs_d = tl.arange(0, GD).to(tl.int64)
    acc = tl.zeros((GB, GB, GD), dtype=tl.float64)
    for d0 in range(0, d_out, GD * GR):
        for rr in tl.static_range(GR):
            rows = d0 + rr * GD + offs_d
            row_ok = rows < d_out
            b_i = _gram_cols(b_ptr, rows, row_ok, ti * GB, E, rank, stride_be, stride_bd,
                             stride_br, RP, GB, GD)
            b_j = _gram_cols(b_ptr, rows, row_ok, tj * GB, E, rank, stride_be, stride_bd,
                             stride_br, RP, GB, GD)
            acc += b_i[:, None, :] * b_j[None, :, :]
    g = tl.sum(acc, axis=2)
    cols_i = ti * GB + tl.arange(0, GB)
    cols_j = tj * GB + tl.arange(0, GB)
    tl.store(g_ptr + cols_i[:, None] * ERP + cols_j[None, :], g)
    if ti < tj:
        tl.store(g_ptr + cols_j[:, None] * ERP + cols_i[None, :], tl.trans(g))


@triton.jit
def _paired_tile(a_ptr, r_ptr, b_ptr, w_ptr, offs_m, m_ok, off_bn, n_ok, k_begin, k_end, E,
                 stride_am, stride_ak, stride_rm, stride_rk, stride_bk, stride_wk, stride_we,
                 with_router, SEPARATE_ROUTER: tl.constexpr, SPLIT_B: tl.constexpr,
                 DOT_KIND: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """(A·B, R·W) over K in [k_begin, k_end): the wide product [BLOCK_M, BLOCK_N] and the
    router's narrow one [BLOCK_M, BLOCK_E] (BLOCK_E >= E, only where `with_router`),
    sharing the loads of A when R is A. B's columns come as offsets `off_bn` (plain or
    packed expert layout); W[k, e] is masked to e < E."""
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    ACC = tl.float64 if DOT_KIND == KIND_FP64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc_r = tl.zeros((BLOCK_M, BLOCK_E), dtype=ACC)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak,
                    mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + (k0 + offs_k)[:, None] * stride_bk + off_bn[None, :],
                    mask=k_ok[:, None] & n_ok, other=0.0)
        acc = _dot_acc(a, b, acc, False, SPLIT_B, False, DOT_KIND, UPCAST)
        if with_router:
            w = tl.load(w_ptr + (k0 + offs_k)[:, None] * stride_wk + offs_e[None, :] * stride_we,
                        mask=k_ok[:, None] & (offs_e[None, :] < E), other=0.0)
            if SEPARATE_ROUTER:
                rt = tl.load(r_ptr + offs_m[:, None] * stride_rm + (k0 + offs_k)[None, :] * stride_rk,
                             mask=m_ok & k_ok[None, :], other=0.0)
                acc_r = _dot_acc(rt, w, acc_r, False, SPLIT_B, False, DOT_KIND, UPCAST)
            else:
                acc_r = _dot_acc(a, w, acc_r, False, SPLIT_B, False, DOT_KIND, UPCAST)
    return acc, acc_r


@triton.jit
def shrink_kernel(x_ptr, r_ptr, a_ptr, w_ptr, h_ptr, l_ptr, b_ptr, gram_ptr,
                  T, D, N, E, rank, d_out, num_gram, t_bucket,
                  stride_xt, stride_xd, stride_rt, stride_rd,
                  stride_ae, stride_ar, stride_ad, stride_we, stride_wd,
                  stride_ht, stride_lt, stride_be, stride_bd, stride_br,
                  g_ptr, z_ptr, top_k, eps, stride_zt,
                  SEPARATE_ROUTER: tl.constexpr, DOT_KIND: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_K: tl.constexpr, GB: tl.constexpr = 4, GD: tl.constexpr = 128,
                  GR: tl.constexpr = 1,
                  FUSE_TOKEN: tl.constexpr = False, TOP_K_ROUTING: tl.constexpr = False,
                  ORTHOGONALIZE: tl.constexpr = True, NORMALIZE: tl.constexpr = True,
                  K: tl.constexpr = 1, BT: tl.constexpr = 1, EP: tl.constexpr = 1,
                  KP: tl.constexpr = 1, RP: tl.constexpr = 1, ERP: tl.constexpr = 16):
    """H = X A_catᵀ ([T, ERP], A read from [E, r, d_in]) and logits = R Wᵀ ([T, E]),
    sharing the loads of X when R is X; the first `num_gram` programs build G = B_catᵀB_cat
    instead (_gram_tile). 1-D grid: gram programs, then (m-tile, n-tile) GEMM tiles.

    Every n-tile computes the logits (a runtime branch around them spilled the fp32 kernel),
    the first stores them (N <= BLOCK_N at the docs/contract.md §6 shapes: one n-tile). `t_bucket` (T rounded up to a power
    of 2) is only an autotune key.

    FUSE_TOKEN (one n-tile, num_gram = 0, G from an earlier launch): after storing its H
    rows and logits, the program runs the per-token algebra on them in blocks of BT
    tokens (re-read from global memory after a barrier: Triton cannot slice the
    accumulator) and writes Z. g_ptr … stride_zt are only read then.
    """
    pid = tl.program_id(0)
    is_gram = False   # the fused variant has no gram programs: keep their code out of it
    if not FUSE_TOKEN:
        is_gram = pid < num_gram
    if is_gram:
        _gram_tile(b_ptr, gram_ptr, pid, E, rank, d_out, stride_be, stride_bd, stride_br,
                   RP, ERP, GB, GD, GR)
    else:
        tile = pid - num_gram
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_m = tile // n_tiles
        pid_n = tile % n_tiles
        # int64 rows: T · stride can pass 2^31 on large inputs.
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, BLOCK_E)
        row_ok = offs_m[:, None] < T
        off_an, an_ok = _offsets(offs_n, stride_ar, stride_ae, N, E, rank, RP, True)
        acc_h, acc_l = _paired_tile(x_ptr, r_ptr, a_ptr, w_ptr, offs_m, row_ok, off_an,
                                    an_ok[None, :], 0, D, E, stride_xt, stride_xd, stride_rt,
                                    stride_rd, stride_ad, stride_wd, stride_we, True,
                                    SEPARATE_ROUTER, False, DOT_KIND, UPCAST, BLOCK_M, BLOCK_N,
                                    BLOCK_E, BLOCK_K)
        tl.store(h_ptr + offs_m[:, None] * stride_ht + offs_n[None, :], acc_h,
                 mask=row_ok & (offs_n[None, :] < N))
        tl.store(l_ptr + offs_m[:, None] * stride_lt + offs_e[None, :], acc_l,
                 mask=row_ok & (offs_e[None, :] < E) & (pid_n == 0))
        if FUSE_TOKEN:
            tl.debug_barrier()   # this program's H and logits stores are visible to all its threads
            for sub in range(0, BLOCK_M, BT):
                _token_forward_block(h_ptr, l_ptr, g_ptr, z_ptr, pid_m * BLOCK_M + sub, BT, T, E,
                                     top_k, eps, stride_ht, stride_lt, stride_zt, K,
                                     TOP_K_ROUTING, ORTHOGONALIZE, NORMALIZE, BT, EP, KP, RP, ERP)


@triton.jit
def weight_grad_kernel(x_ptr, r_ptr, dh_ptr, dl_ptr, out_ptr,
                       T, D, N, E, k_per_split, t_bucket,
                       stride_xt, stride_xd, stride_rt, stride_rd, stride_dht, stride_dlt,
                       stride_os, stride_od,
                       SEPARATE_ROUTER: tl.constexpr, SPLIT_B: tl.constexpr,
                       DOT_KIND: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """Split-K partials of [dA_cat; dW]ᵀ = [Xᵀ dH | Rᵀ dL] over the tokens of split s:
    out[s, d, n] for n < N (= ERP) and out[s, d, N + e] for e < BLOCK_E (the router's
    narrow tile, so the wide GEMM's N is E·r exactly). Grid (d-tiles × n-tiles, splits);
    finalize_grads_kernel sums the splits and writes grad_A, grad_W."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_E)
    m_ok = offs_m[:, None] < D
    n_ok = offs_n < N
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(T, k_begin + k_per_split)
    acc, acc_r = _paired_tile(x_ptr, r_ptr, dh_ptr, dl_ptr, offs_m, m_ok, offs_n, n_ok[None, :],
                              k_begin, k_end, E, stride_xd, stride_xt, stride_rd, stride_rt,
                              stride_dht, stride_dlt, 1, pid_n == 0, SEPARATE_ROUTER, SPLIT_B,
                              DOT_KIND, UPCAST, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K)
    rows = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_od
    tl.store(rows + offs_n[None, :], acc, mask=m_ok & n_ok[None, :])
    tl.store(rows + N + offs_e[None, :], acc_r, mask=m_ok & (pid_n == 0))


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, add_ptr, a2_ptr, b2_ptr, c2_ptr, gram_ptr, as_ptr,
                  M, N, K, k_per_split, E, rank, d_out, num_gram, m_bucket, n_bucket, k_bucket,
                  stride_am, stride_ak, stride_bk, stride_bn, stride_b_expert,
                  stride_cs, stride_cm, stride_cn, stride_addm, stride_addn,
                  stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_c2m, stride_c2n,
                  stride_ge, stride_gd, stride_gr,
                  scale,
                  HAS_ADD: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr,
                  FP16_A: tl.constexpr, DOT_KIND: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  GROUP_M: tl.constexpr, PACKED_BK: tl.constexpr = False,
                  PACKED_BN: tl.constexpr = False, ROUTER: tl.constexpr = 0,
                  BLOCK_E: tl.constexpr = 16, RP: tl.constexpr = 1, ERP: tl.constexpr = 16,
                  WITH_GRAM: tl.constexpr = False, GB: tl.constexpr = 4,
                  GD: tl.constexpr = 128, GR: tl.constexpr = 1, SCALED_A: tl.constexpr = False):
    """C[s] = scale · A[:, K-slice s] B[K-slice s, :] (+ ADD), grid (gram + tiles, splits).

    With one split, C is the output (any dtype); with several, C is a partial buffer
    [splits, M, N] in the accumulator dtype that finalize_grads_kernel sums.
    B may be a weight in the padded expert layout read in place from [E, d_out, r] (B_cat
    along K: PACKED_BK, or along N: PACKED_BN; `stride_b_expert` is its expert stride).
    ROUTER = 1 adds the router term A2 [M, E] · B2 [E, N] (one BLOCK_E-wide dot, masked to
    E) into C; ROUTER = 2 stores it as a second output C2 (dX and d router_input).
    WITH_GRAM: the first `num_gram` programs of axis 0 build G = B_catᵀB_cat into
    gram_ptr from B_cat = b (_gram_tile, one split only). m/n/k_bucket (M, N, K rounded up to powers of
    2) are only autotune keys.
    SCALED_A (the expand and dX of 16-bit inputs): a is fp16 with a power-of-2 scale per
    row in as_ptr (the per-token kernels' operand format). b enters fp16 scaled per
    column n to its max over all of K (a prologue over this tile's columns), so both
    scales factor out of the sum: one fp16 MMA per chunk into one accumulator, unscaled
    once in the epilogue.
    """
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    is_gram = False   # compiled in only where a launch has gram programs (WITH_GRAM)
    if WITH_GRAM:
        is_gram = pid < num_gram
    if is_gram:
        _gram_tile(b_ptr, gram_ptr, pid, E, rank, d_out, stride_ge, stride_gd, stride_gr,
                   RP, ERP, GB, GD, GR)
    else:
        tile = pid - num_gram
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped tile order: GROUP_M row tiles share their column tiles in L2.
        group = tile // (GROUP_M * num_pid_n)
        first_m = group * GROUP_M
        group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_size
        pid_n = (tile % (GROUP_M * num_pid_n)) // group_size
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
        off_bn, bn_ok = _offsets(offs_n, stride_bn, stride_b_expert, N, E, rank, RP, PACKED_BN)
        add_ptrs = add_ptr + offs_m[:, None] * stride_addm + offs_n[None, :] * stride_addn
        if HAS_ADD and SCALED_A:
            # Before the mainloop, its latency behind the MMAs; the other operand paths load
            # it after (the fp32 FMA tile has no registers to spare for it).
            base = tl.load(add_ptrs, mask=m_ok & n_ok, other=0.0)
        if SCALED_A:
            b_max = tl.zeros((BLOCK_N, ), dtype=tl.float32)
            for k0 in range(k_begin, k_end, BLOCK_K):
                off_bk, bk_ok = _offsets(k0 + offs_k, stride_bk, stride_b_expert, k_end, E, rank,
                                         RP, PACKED_BK)
                b = tl.load(b_ptr + off_bk[:, None] + off_bn[None, :],
                            mask=(((k0 + offs_k) < k_end) & bk_ok)[:, None] & bn_ok[None, :],
                            other=0.0)
                b_max = tl.maximum(b_max, tl.max(tl.abs(b.to(tl.float32)), axis=0))
            b_scale, b_unscale = _pow2_scales(b_max)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k_ok = (k0 + offs_k) < k_end
            off_bk, bk_ok = _offsets(k0 + offs_k, stride_bk, stride_b_expert, k_end, E, rank, RP,
                                     PACKED_BK)
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak,
                        mask=m_ok & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + off_bk[:, None] + off_bn[None, :],
                        mask=(k_ok & bk_ok)[:, None] & bn_ok[None, :], other=0.0)
            if SCALED_A:
                b16 = (b.to(tl.float32) * b_scale[None, :]).to(tl.float16)
                if UPCAST:
                    # Interpreter: fp16 products are exact in fp32, as on the tensor cores.
                    acc = tl.dot(a.to(tl.float32), b16.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b16, acc)
            else:
                acc = _dot_acc(a, b, acc, SPLIT_A, SPLIT_B, FP16_A, DOT_KIND, UPCAST)
        if SCALED_A:
            # The weight's scale first, as in _dot_fp16_scaled (a row's may be extreme).
            a_unscale = tl.load(as_ptr + offs_m, mask=offs_m < M, other=1.0)
            acc = acc * b_unscale[None, :] * a_unscale[:, None]
        if ROUTER != 0:
            offs_e = tl.arange(0, BLOCK_E)
            a2 = tl.load(a2_ptr + offs_m[:, None] * stride_a2m + offs_e[None, :] * stride_a2k,
                         mask=m_ok & (offs_e[None, :] < E), other=0.0)
            b2 = tl.load(b2_ptr + offs_e[:, None] * stride_b2k + offs_n[None, :] * stride_b2n,
                         mask=(offs_e[:, None] < E) & n_ok, other=0.0)
            if ROUTER == 1:
                acc = _dot_acc(a2, b2, acc, SPLIT_A, False, FP16_A, DOT_KIND, UPCAST)
            else:
                acc2 = _dot_acc(a2, b2, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC), SPLIT_A, False,
                                FP16_A, DOT_KIND, UPCAST)
                tl.store(c2_ptr + offs_m[:, None] * stride_c2m + offs_n[None, :] * stride_c2n,
                         acc2.to(c2_ptr.dtype.element_ty), mask=m_ok & n_ok)
        acc = acc * scale
        if HAS_ADD:
            if not SCALED_A:
                base = tl.load(add_ptrs, mask=m_ok & n_ok, other=0.0)
            acc = acc + base.to(ACC)
        c_ptrs = c_ptr + pid_s * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok & n_ok)


@triton.jit
def _narrow(acc, ptr):
    """A float64 sum in the dtype of `ptr`'s tensor, through fp32 unless that is float64
    (one rounding either way; the interpreter cannot convert float64 to bf16 directly)."""
    if ptr.dtype.element_ty == tl.float64:
        return acc
    else:
        return acc.to(tl.float32).to(ptr.dtype.element_ty)


@triton.jit
def finalize_grads_kernel(pb_ptr, pa_ptr, pg_ptr, b_ptr, grad_b_ptr, grad_a_ptr, grad_w_ptr,
                          b_splits, a_splits, g_splits, d_out, d_in, E, rank, b_programs,
                          stride_be, stride_bd, stride_br,
                          stride_gbe, stride_gbd, stride_gbr,
                          stride_gae, stride_gar, stride_gad,
                          stride_gwe, stride_gwd,
                          ORTHOGONALIZE: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr,
                          NW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_G: tl.constexpr):
    """The weight gradients in their final layout and dtype, from the split-K partials:

    - programs [0, b_programs): grad_B [E, d_out, r] = Σ_s PB[s] (PB [splits, d_out, ERP],
      s·dYᵀZ) + B_cat (dG + dGᵀ) with dG = Σ_s PG[s] (gram_grad's [splits, ERP, ERP]
      float64 partials, upper triangle of expert blocks), tiles of BLOCK_R rows × BLOCK_C
      columns of B_cat;
    - the rest: grad_A [E, r, d_in] and grad_W [E, d_in] = Σ_s PA[s] (PA [splits, d_in,
      NW], weight_grad_kernel's [dA_cat; dW]ᵀ), the same tiles over (d_in, NW).
    Sums run in float64; padding columns of the expert layout are dropped.
    """
    pid = tl.program_id(0)
    offs_c0 = tl.arange(0, BLOCK_C)
    if pid < b_programs:
        c_tiles: tl.constexpr = (ERP + BLOCK_C - 1) // BLOCK_C
        rows = (pid // c_tiles).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (pid % c_tiles) * BLOCK_C + offs_c0
        r_ok = rows[:, None] < d_out
        c_ok = cols[None, :] < ERP
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
        for s in range(b_splits):
            acc += tl.load(pb_ptr + (s * d_out + rows[:, None]) * ERP + cols[None, :],
                           mask=r_ok & c_ok, other=0.0).to(tl.float64)
        if ORTHOGONALIZE:
            offs_g = tl.arange(0, BLOCK_G)
            for k0 in range(0, ERP, BLOCK_G):
                ks = k0 + offs_g
                # gram_grad writes the upper triangle of expert blocks of the symmetric dG
                # (diagonal blocks symmetric): dG + dGᵀ = 2 dG, one load per split.
                upper = (ks[:, None] // RP) <= (cols[None, :] // RP)
                at = tl.where(upper, ks[:, None] * ERP + cols[None, :], cols[None, :] * ERP + ks[:, None])
                dg = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float64)
                for s in range(g_splits):
                    dg += tl.load(pg_ptr + s * ERP * ERP + at, mask=c_ok, other=0.0)
                dg = 2.0 * dg
                off_k, k_ok = _offsets(ks, stride_br, stride_be, ERP, E, rank, RP, True)
                b = tl.load(b_ptr + rows[:, None] * stride_bd + off_k[None, :],
                            mask=r_ok & k_ok[None, :], other=0.0)
                if b_ptr.dtype.element_ty.primitive_bitwidth == 16:
                    # fp32 dot (a float64 one cannot take 16-bit loads, see _gram_tile): the
                    # products with the 16-bit B are exact, dG is rounded to fp32 once.
                    acc += tl.dot(b.to(tl.float32), dg.to(tl.float32),
                                  input_precision="ieee").to(tl.float64)
                else:
                    acc = tl.dot(b.to(tl.float64), dg, acc, out_dtype=tl.float64)   # see _dot_acc
        off_c, valid = _offsets(cols, stride_gbr, stride_gbe, ERP, E, rank, RP, True)
        tl.store(grad_b_ptr + rows[:, None] * stride_gbd + off_c[None, :],
                 _narrow(acc, grad_b_ptr), mask=r_ok & valid[None, :])
    else:
        c_tiles_a: tl.constexpr = (NW + BLOCK_C - 1) // BLOCK_C
        tile = pid - b_programs
        rows = (tile // c_tiles_a).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (tile % c_tiles_a) * BLOCK_C + offs_c0
        r_ok = rows[:, None] < d_in
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float64)
        for s in range(a_splits):
            acc += tl.load(pa_ptr + (s * d_in + rows[:, None]) * NW + cols[None, :],
                           mask=r_ok & (cols[None, :] < NW), other=0.0).to(tl.float64)
        off_a, a_ok = _offsets(cols, stride_gar, stride_gae, ERP, E, rank, RP, True)
        tl.store(grad_a_ptr + rows[:, None] * stride_gad + off_a[None, :],
                 _narrow(acc, grad_a_ptr), mask=r_ok & (a_ok & (cols < ERP))[None, :])
        e = cols - ERP
        w_ok = (e >= 0) & (e < E)
        tl.store(grad_w_ptr + rows[:, None] * stride_gwd + e[None, :] * stride_gwe,
                 _narrow(acc, grad_w_ptr), mask=r_ok & w_ok[None, :])
