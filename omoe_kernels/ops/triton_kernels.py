"""Triton kernels of the `triton` backend (docs/algorithm.md).

Layout. Expert `i`'s rank-`r` block lives in columns `i·RP … i·RP + r − 1` of every
`[*, ERP]` buffer, with `EP = next_pow2(E)`, `RP = next_pow2(r)` and `ERP = EP·RP`
(raised so that `ERP >= 16` for `tl.dot`); padding columns hold zeros.

Kernels:
- `shrink_kernel`: `H = X A_padᵀ` and the router logits `L = R Wᵀ` in one pass over X.
- `matmul_kernel`: `C = scale · A B (+ ADD)`, optional split-K into fp32 partials. Used
  for the expand (`Y = base + s Z B_padᵀ`) and every backward GEMM. One operand may be an
  fp32 intermediate (Z, dH) while the other is bf16/fp16: that operand is split into a
  high and a low 16-bit part (two dots), so it is not rounded to one 16-bit number.
- `token_forward_kernel`, `token_backward_kernel` (triton_token_kernels.py): the per-token
  algebra in float64, tokens on lanes, over the k active experts only.
- `gram_grad_kernel` (triton_token_kernels.py): `dG_ij = Σ_t dS_t,ij h_t,i h_t,jᵀ`
  (float64 partial sums per token split, over the active expert pairs).
"""
from __future__ import annotations

import triton
import triton.language as tl

# The DOT_KIND values live in triton_configs.py (the launchers also read them as K.DOT_*).
# The per-token kernels live in their own module; re-exported here so the launchers and
# kernel_report find every kernel as K.<name>.
from .triton_configs import DOT_BF16, DOT_FP16, DOT_FP32_IEEE, DOT_FP32_TF32, DOT_FP64
from .triton_token_kernels import (  # noqa: F401
    _token_forward_block,
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
                  K: tl.constexpr = 1, BT: tl.constexpr = 1, EP: tl.constexpr = 1,
                  KP: tl.constexpr = 1, RP: tl.constexpr = 1, ERP: tl.constexpr = 16):
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
                                 stride_ht, stride_lt, stride_zt, K, TOP_K_ROUTING, ORTHOGONALIZE,
                                 NORMALIZE, BT, EP, KP, RP, ERP)


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
