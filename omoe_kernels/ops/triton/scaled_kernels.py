"""The expand and dX of a 16-bit step on the per-token kernels' operand format, each
program over a group of output column tiles (`scaled_matmul_kernel`).

`a` (Z or dH) is fp16 with a power-of-2 scale per row (`as_ptr`); its contraction is the
padded expert layout, K = ERP <= configs.GROUPED_MAX_K, so one [BLOCK_M, K] tile holds a
program's rows whole. A program loads that tile and its row scales once, then walks
N_GROUP column tiles of BLOCK_N: per tile one fp16 MMA over all of K into a fresh
accumulator, the weight's columns scaled to their max over K (exact powers of 2) and both
scales factored out after. A column tile's a is not read again from L2 (matmul_kernel's
SCALED_A path re-reads it for every column tile). The walk is the pipelined loop: the
weight and `base` tiles of the next column tiles load while this one's MMA runs.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gemm_kernels import KIND_BF16, _dot_acc, _offsets, _pow2_scales


@triton.jit
def scaled_matmul_kernel(a_ptr, b_ptr, c_ptr, add_ptr, a2_ptr, b2_ptr, c2_ptr, gram_ptr, as_ptr,
                         M, N, K, k_per_split, E, rank, d_out, num_gram, m_bucket, n_bucket,
                         k_bucket, stride_am, stride_ak, stride_bk, stride_bn, stride_b_expert,
                         stride_cs, stride_cm, stride_cn, stride_addm, stride_addn,
                         stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_c2m, stride_c2n,
                         stride_ge, stride_gd, stride_gr,
                         scale,
                         HAS_ADD: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr,
                         FP16_A: tl.constexpr, DOT_KIND: tl.constexpr, UPCAST: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PACKED_BK: tl.constexpr = False, PACKED_BN: tl.constexpr = False,
                         ROUTER: tl.constexpr = 0, BLOCK_E: tl.constexpr = 16,
                         RP: tl.constexpr = 1, ERP: tl.constexpr = 16,
                         WITH_GRAM: tl.constexpr = False, GB: tl.constexpr = 4,
                         GD: tl.constexpr = 128, GR: tl.constexpr = 1,
                         SCALED_A: tl.constexpr = True, N_GROUP: tl.constexpr = 1,
                         BN_ALIGN: tl.constexpr = 1, FULL_RANK: tl.constexpr = False):
    """C = scale · A B (+ ADD) (+ the router term, ROUTER 1 or 2 as in matmul_kernel),
    A = a · diag(row scales), BLOCK_K >= K. matmul_kernel's arguments (one launch plan
    builds both; the gram, split-K and operand-split ones are unused here: the plan
    refuses them). BN_ALIGN (a power of 2 dividing stride_bn) and FULL_RANK (rank = RP)
    tell the compiler what it cannot see, so that the weight loads in vectors and its
    loads pipeline (sizing.grouped_meta). Grid: (m-tiles × column groups, 1), the m-tile
    fastest, so that the programs beside each other share a group's weight columns in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid % num_pid_m
    first_n = (pid // num_pid_m) * N_GROUP
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    m_ok = offs_m[:, None] < M
    if FULL_RANK:   # no rank padding to mask: the mask is constant over each expert's RP
        off_bk, bk_ok = _offsets(offs_k, stride_bk, stride_b_expert, K, E, RP, RP, PACKED_BK)
    else:
        off_bk, bk_ok = _offsets(offs_k, stride_bk, stride_b_expert, K, E, rank, RP, PACKED_BK)
    k_ok = (offs_k < K) & bk_ok
    a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                mask=m_ok & (offs_k < K)[None, :], other=0.0)
    a_unscale = tl.load(as_ptr + offs_m, mask=offs_m < M, other=1.0)
    if UPCAST:
        a = a.to(tl.float32)   # interpreter: fp16 products are exact in fp32
    if ROUTER != 0:
        a2 = tl.load(a2_ptr + offs_m[:, None] * stride_a2m + offs_e[None, :] * stride_a2k,
                     mask=m_ok & (offs_e[None, :] < E), other=0.0)
    for j in range(0, tl.minimum(N_GROUP, n_tiles - first_n)):
        offs_n = (first_n + j).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n[None, :] < N
        # stride_bn as (stride_bn / BN_ALIGN) · BN_ALIGN: the compiler then sees the alignment.
        off_bn, bn_ok = _offsets(offs_n, (stride_bn // BN_ALIGN) * BN_ALIGN, stride_b_expert, N, E,
                                 rank, RP, PACKED_BN)
        if HAS_ADD:
            base = tl.load(add_ptr + offs_m[:, None] * stride_addm + offs_n[None, :] * stride_addn,
                           mask=m_ok & n_ok, other=0.0)
        b = tl.load(b_ptr + off_bk[:, None] + off_bn[None, :], mask=k_ok[:, None] & bn_ok[None, :],
                    other=0.0).to(tl.float32)
        b_scale, b_unscale = _pow2_scales(tl.max(tl.abs(b), axis=0))
        b16 = (b * b_scale[None, :]).to(tl.float16)
        if UPCAST:
            acc = tl.dot(a, b16.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(a, b16)
        # The weight's scale first, as in _dot_fp16_scaled (a row's may be extreme).
        acc = acc * b_unscale[None, :] * a_unscale[:, None]
        if ROUTER != 0:
            b2 = tl.load(b2_ptr + offs_e[:, None] * stride_b2k + offs_n[None, :] * stride_b2n,
                         mask=(offs_e[:, None] < E) & n_ok, other=0.0)
            router = _dot_acc(a2, b2, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
                              DOT_KIND == KIND_BF16, False, DOT_KIND != KIND_BF16, DOT_KIND, UPCAST)
            if ROUTER == 1:
                acc = acc + router
            else:
                tl.store(c2_ptr + offs_m[:, None] * stride_c2m + offs_n[None, :] * stride_c2n,
                         router.to(c2_ptr.dtype.element_ty), mask=m_ok & n_ok)
        acc = acc * scale
        if HAS_ADD:
            acc = acc + base.to(tl.float32)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=m_ok & n_ok)
