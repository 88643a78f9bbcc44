"""Grouped Triton kernels of a mixed batch: N adapters stacked, every token its own
(omoe_kernels/mixed.py; launched by triton/mixed_launch.py).

Rows are in segment order: the tokens sorted by adapter, each adapter's segment padded
to a multiple of SEG rows (`rows[p]`: the token of padded row p, -1 for padding;
`tiles[p // SEG]`: the adapter of that stretch, -1 for tokens with no adapter). Every
GEMM tile (BLOCK_M divides SEG) then belongs to one adapter and reads that adapter's
slice of the stacked weights, as segment GEMMs of batched-LoRA servers do. The three
launches mirror the single-adapter forward:

- `mixed_shrink_kernel`: H and the logits of each padded row (x gathered through
  `rows`; zeros for padding and no-adapter rows), and in its first N·num_gram programs
  every adapter's G_n = B_n,catᵀB_n,cat ([N, ERP, ERP] float64);
- `mixed_token_forward_kernel`: the per-token algebra of triton/token_kernels.py, each
  token reading its adapter's G (rows with zero H give Z = 0);
- `mixed_expand_kernel`: Y[rows] = base[rows] + s_n Z B_n,catᵀ, scattered back to token
  order; no-adapter rows get base (or 0).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .gemm_kernels import KIND_FP64, _dot_acc, _gram_tile, _offsets, _paired_tile
from .token_kernels import _token_forward_block


@triton.jit
def _tile_rows(rows_ptr, tile_ptr, pid_m, SEG, BLOCK_M: tl.constexpr):
    """(padded rows, tokens of the rows (0 where none), rows holding a token of an adapter,
    the tile's adapter clamped to >= 0, whether it has one)."""
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    adapter = tl.load(tile_ptr + (pid_m * BLOCK_M) // SEG)
    tokens = tl.load(rows_ptr + offs_m)
    has = adapter >= 0
    valid = tokens >= 0
    return offs_m, tl.where(valid, tokens, 0), valid, tl.maximum(adapter, 0).to(tl.int64), has


@triton.jit
def mixed_shrink_kernel(x_ptr, r_ptr, a_ptr, w_ptr, h_ptr, l_ptr, b_ptr, g_ptr,
                        rows_ptr, tile_ptr,
                        D, N, E, rank, d_out, num_gram, num_adapters, SEG,
                        stride_xt, stride_xd, stride_rt, stride_rd,
                        stride_an, stride_ae, stride_ar, stride_ad,
                        stride_wn, stride_we, stride_wd, stride_ht, stride_lt,
                        stride_bn, stride_be, stride_bd, stride_br,
                        SEPARATE_ROUTER: tl.constexpr, DOT_KIND: tl.constexpr,
                        UPCAST: tl.constexpr, WITH_GRAM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_K: tl.constexpr, GB: tl.constexpr, GD: tl.constexpr,
                        GR: tl.constexpr, RP: tl.constexpr, ERP: tl.constexpr):
    """shrink_kernel over segment rows: 1-D grid of N·num_gram gram programs (adapter
    pid // num_gram), then (m-tile, n-tile) GEMM tiles of the padded rows. Every padded
    row of H and the logits is written (zeros where no adapter's token is)."""
    pid = tl.program_id(0)
    is_gram = False
    if WITH_GRAM:
        is_gram = pid < num_gram * num_adapters
    if is_gram:
        n = (pid // num_gram).to(tl.int64)
        _gram_tile(b_ptr + n * stride_bn, g_ptr + n * (ERP * ERP), pid % num_gram, E, rank,
                   d_out, stride_be, stride_bd, stride_br, RP, ERP, GB, GD, GR)
    else:
        tile = pid
        if WITH_GRAM:
            tile = pid - num_gram * num_adapters
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_m = tile // n_tiles
        pid_n = tile % n_tiles
        offs_m, tokens, valid, n, has = _tile_rows(rows_ptr, tile_ptr, pid_m, SEG, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_e = tl.arange(0, BLOCK_E)
        off_an, an_ok = _offsets(offs_n, stride_ar, stride_ae, N, E, rank, RP, True)
        k_end = tl.where(has, D, 0)   # a no-adapter tile reads nothing and stores zeros
        acc_h, acc_l = _paired_tile(x_ptr, r_ptr, a_ptr + n * stride_an, w_ptr + n * stride_wn,
                                    tokens, (valid & has)[:, None], off_an, an_ok[None, :], 0,
                                    k_end, E, stride_xt, stride_xd, stride_rt, stride_rd,
                                    stride_ad, stride_wd, stride_we, True, SEPARATE_ROUTER,
                                    False, DOT_KIND, UPCAST, BLOCK_M, BLOCK_N, BLOCK_E, BLOCK_K)
        tl.store(h_ptr + offs_m[:, None] * stride_ht + offs_n[None, :], acc_h,
                 mask=offs_n[None, :] < N)
        tl.store(l_ptr + offs_m[:, None] * stride_lt + offs_e[None, :], acc_l,
                 mask=(offs_e[None, :] < E) & (pid_n == 0))


@triton.jit
def mixed_token_forward_kernel(h_ptr, l_ptr, g_ptr, z_ptr, tile_ptr, P, per_program, E,
                               top_k, eps, SEG, stride_ht, stride_lt, stride_zt,
                               K: tl.constexpr, TOP_K_ROUTING: tl.constexpr,
                               ORTHOGONALIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                               BT: tl.constexpr, EP: tl.constexpr, KP: tl.constexpr,
                               RP: tl.constexpr, ERP: tl.constexpr):
    """token_forward_kernel over the P padded rows, each token reading its adapter's G
    (a per-lane pointer into the stacked [N, ERP, ERP])."""
    start = tl.program_id(0) * per_program
    offs = start.to(tl.int64) + tl.arange(0, BT)
    adapter = tl.load(tile_ptr + offs // SEG, mask=offs < P, other=0)
    g_tok = g_ptr + tl.maximum(adapter, 0).to(tl.int64) * (ERP * ERP)
    _token_forward_block(h_ptr, l_ptr, g_tok, z_ptr, start, per_program, P, E, top_k, eps,
                         stride_ht, stride_lt, stride_zt, K, TOP_K_ROUTING, ORTHOGONALIZE,
                         NORMALIZE, BT, EP, KP, RP, ERP)


@triton.jit
def mixed_expand_kernel(z_ptr, b_ptr, y_ptr, add_ptr, scale_ptr, rows_ptr, tile_ptr,
                        N, K, E, rank, SEG,
                        stride_zm, stride_zk, stride_b_adapter, stride_bk, stride_bn,
                        stride_b_expert, stride_ym, stride_yn, stride_addm, stride_addn,
                        HAS_ADD: tl.constexpr, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr,
                        FP16_A: tl.constexpr, DOT_KIND: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        RP: tl.constexpr):
    """Y[token] = base[token] + s_n · Z[row] B_n,catᵀ for the padded rows of each tile
    (B_n read in place from the stacked [N, E, d_out, r], K = ERP); matmul_kernel's
    expand, with the adapter's weight and scale picked per tile and the rows scattered."""
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    offs_m, tokens, valid, n, has = _tile_rows(rows_ptr, tile_ptr, pid_m, SEG, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    ACC = tl.float64 if DOT_KIND == KIND_FP64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    n_ok = offs_n[None, :] < N
    m_ok = valid[:, None]
    b_base = b_ptr + n * stride_b_adapter
    off_bn = offs_n * stride_bn
    k_end = tl.where(has, K, 0)   # no adapter: base only (Z of these rows is not read)
    for k0 in range(0, k_end, BLOCK_K):
        k_ok = (k0 + offs_k) < k_end
        off_bk, bk_ok = _offsets(k0 + offs_k, stride_bk, stride_b_expert, k_end, E, rank, RP,
                                 True)
        a = tl.load(z_ptr + offs_m[:, None] * stride_zm + (k0 + offs_k)[None, :] * stride_zk,
                    mask=m_ok & k_ok[None, :], other=0.0)
        b = tl.load(b_base + off_bk[:, None] + off_bn[None, :],
                    mask=(k_ok & bk_ok)[:, None] & n_ok, other=0.0)
        acc = _dot_acc(a, b, acc, SPLIT_A, SPLIT_B, FP16_A, DOT_KIND, UPCAST)
    acc = acc * tl.load(scale_ptr + n)
    if HAS_ADD:
        base = tl.load(add_ptr + tokens[:, None] * stride_addm + offs_n[None, :] * stride_addn,
                       mask=m_ok & n_ok, other=0.0)
        acc = acc + base.to(ACC)
    tl.store(y_ptr + tokens[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_ok & n_ok)
