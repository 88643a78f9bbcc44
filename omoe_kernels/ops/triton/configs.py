"""Launch configurations of the Triton kernels, in one place.

The launchers (`triton/launch.py`) and the ahead-of-time resource report
(`kernel_report.py`) both read these functions, so the report compiles exactly what runs.
Nothing here imports triton except the autotune lists, which are built on demand.

`L` below is a `triton_omoe.Layout` (padded expert layout: EP, RP, ERP, EPL).
"""
from __future__ import annotations

from ..limits import next_pow2

# DOT_KIND values: how the matmul operands are multiplied. The launchers pass these plain
# ints; triton/gemm_kernels.py holds the same values as `tl.constexpr` for the kernel bodies.
DOT_FP32_IEEE = 0
DOT_FP32_TF32 = 1
DOT_FP16 = 2
DOT_BF16 = 3
DOT_FP64 = 4

SIXTEEN_BIT_KINDS = (DOT_FP16, DOT_BF16)


# ---- GEMM kernels (matmul_kernel, shrink_kernel) --------------------------------------

def matmul_default_config(kind: int, N: int, fp16_a: bool = False) -> dict:
    """The fixed GPU config of matmul_kernel (also the autotuner's fallback shape).
    fp16_a (scaled fp16 operands, `_dot_fp16_scaled`): the partial product of each K chunk
    takes a second [BLOCK_M, BLOCK_N] of registers, so the tile is half as wide (128 wide
    spilled 176 B at E·r = 128)."""
    if kind in SIXTEEN_BIT_KINDS:
        block_n = 64 if N <= 64 or fp16_a else 128
        return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    if kind == DOT_FP32_TF32:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)


def shrink_default_config(kind: int, ERP: int, fuse_token: bool = False) -> dict:
    """The fixed GPU config of shrink_kernel; with the per-token epilogue fused in, one
    program covers all ERP columns of its rows."""
    block_n = min(ERP, 256 if kind in SIXTEEN_BIT_KINDS else 128)
    if kind in SIXTEEN_BIT_KINDS:
        # BLOCK_M 64: T = 8192 gives 128 programs, about one per SM (128 would leave half
        # the SMs idle on a pass that is bound by reading x).
        cfg = dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=64, num_warps=4 if block_n <= 128 else 8,
                   num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=32, num_warps=4, num_stages=2)
    if fuse_token:
        # The per-token epilogue holds one token per thread: a program's rows are exactly
        # the 32 · num_warps tokens of one per-token block.
        return dict(cfg, BLOCK_N=ERP, BLOCK_M=32 * cfg["num_warps"])
    return cfg


def weight_grad_config(kind: int, ERP: int) -> dict:
    """The fixed GPU config of weight_grad_kernel ([dA; dW]ᵀ = [Xᵀ dH | Rᵀ dL]): rows are
    d_in, BLOCK_N covers the E·r columns (one n-tile up to 128), the router's E columns
    take a BLOCK_E-wide tile of their own."""
    cfg = matmul_default_config(kind, ERP)
    return {k: v for k, v in cfg.items() if k != "GROUP_M"}


# bf16: how an fp32 intermediate (Z, dH) meets a bf16 operand in a GEMM. In the a operand
# (EXPAND_Z, DX_DH) one of A_OPERAND_MODES: "bf16" rounds it to bf16 (8 significant bits,
# one MMA); "fp16" takes both operands to fp16, scaled by powers of 2 (11 bits, one MMA at
# the same rate; the bf16 weight converts exactly: triton_kernels._dot_fp16_scaled);
# "hi_lo" splits it into hi + lo bf16 parts (16 bits, two MMAs). In the b operand (SPLIT_*)
# hi + lo or not. fp16 inputs: every fp32 intermediate enters as scaled fp16 (one MMA; the
# scaling keeps Z, which grows like κ/‖e‖, inside fp16's range).
# Measured under the interpreter, which rounds operands as the GPU does (bench/NOTES.md,
# "Accuracy choices"), worst over seeds:
# - Z in the expand, collapse 0.99 forward (bound 3e-2): hi_lo 3.3e-3 (the rounding of y
#   itself), bf16 up to 2.3e-2 (near collapse B_cat z cancels: κ·2^-9), fp16 4e-3 at
#   hi_lo's MMA count halved.
# - dH in dX, grad x at collapse 0.99 (bound: finite): hi_lo 3.5e-3, bf16 1.3e-1; at random
#   3.6e-3 (bound 2e-2). Z in dB and dH in [dA; dW]: no visible change.
A_OPERAND_MODES = ("bf16", "fp16", "hi_lo")
EXPAND_Z = "fp16"
DX_DH = "fp16"
SPLIT_DB = False
SPLIT_DAW = False


def a_operand_flags(kind: int, bf16_mode: str) -> dict:
    """matmul's split_a / fp16_a for an fp32 intermediate in the a operand of a bf16 GEMM,
    by the mode above (fp16 GEMMs always take it as scaled fp16: fp16_a is implied)."""
    assert bf16_mode in A_OPERAND_MODES, bf16_mode
    bf16 = kind == DOT_BF16
    return dict(split_a=bf16 and bf16_mode == "hi_lo", fp16_a=bf16 and bf16_mode == "fp16")


def b_operand_split(kind: int, bf16_split: bool) -> bool:
    """Whether an fp32 intermediate in the b operand of a bf16 GEMM enters as hi + lo."""
    return kind == DOT_BF16 and bf16_split

# G = B_catᵀB_cat is built by GRAM_TILE × GRAM_TILE float64 tiles appended to a GEMM
# launch (a power of 2 >= 16 for tl.dot; ERP is a multiple).
GRAM_TILE = 16

# finalize_grads_kernel: tiles of BLOCK_R rows × BLOCK_C columns, dG read in BLOCK_G chunks.
FINALIZE = dict(BLOCK_R=64, BLOCK_C=64, BLOCK_G=16, num_warps=4)


# Under TRITON_INTERPRET=1: small tiles, so that small test shapes still use several programs.
INTERPRET_MATMUL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def interpret_shrink_config(ERP: int, fuse_token: bool = False) -> dict:
    return dict(BLOCK_M=32, BLOCK_N=ERP if fuse_token else min(ERP, 64), BLOCK_K=32)


# Autotune candidates (GPU, 16-bit and TF32 kinds): (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
# for matmul_kernel, (BLOCK_M, BLOCK_K, warps, stages) for shrink_kernel (its BLOCK_N is
# fixed by shrink_default_config).
MATMUL_AUTOTUNE = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                   (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)]
# Keys on dimensions rounded up to powers of 2 (the launchers' *_bucket arguments), not
# on T itself: a new token count re-tunes only when it crosses a power of 2.
MATMUL_AUTOTUNE_KEY = ["m_bucket", "n_bucket", "k_bucket", "HAS_ADD", "SPLIT_A", "SPLIT_B",
                       "FP16_A", "DOT_KIND", "PACKED_BK", "PACKED_BN", "ROUTER", "WITH_GRAM"]
SHRINK_AUTOTUNE = [(128, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 4, 3)]
SHRINK_AUTOTUNE_KEY = ["t_bucket", "D", "N", "E", "SEPARATE_ROUTER", "DOT_KIND", "BLOCK_N",
                       "BLOCK_E"]


def autotuned_configs(kernel: str) -> list:
    """`triton.Config`s of the autotune candidates of "matmul" or "shrink"."""
    import triton

    if kernel == "matmul":
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                              num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in MATMUL_AUTOTUNE]
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s)
            for bm, bk, w, s in SHRINK_AUTOTUNE]


# ---- per-token kernels -----------------------------------------------------------------

# Warps of the per-token kernels: each thread holds one token, so a program covers
# 32 · TOKEN_WARPS tokens (triton/token_kernels.py).
TOKEN_WARPS = 4


def token_block(L) -> int:
    """Tokens per program of the per-token kernels: one per thread (tokens on lanes), so
    that reductions over experts and ranks stay in one thread's registers."""
    return 32 * TOKEN_WARPS


def token_flags(L, top_k: int, orthogonalize: bool, normalize: bool,
                backward: bool = False) -> dict:
    """Compile-time flags and num_warps of token_forward_kernel / token_backward_kernel
    (the same for both; `backward` is accepted for symmetry). K = top_k slots, KP its
    power of 2: a kernel is compiled per (E, top_k), which a model fixes."""
    return dict(K=top_k, TOP_K_ROUTING=top_k < L.num_experts, ORTHOGONALIZE=orthogonalize,
                NORMALIZE=normalize, BT=token_block(L), EP=L.EP, KP=next_pow2(top_k), RP=L.RP,
                ERP=L.ERP, num_warps=TOKEN_WARPS)


# num_stages of the per-token kernels and gram_grad: Triton's CUDA default, passed
# explicitly so the report compiles the same (their loops have no loads to pipeline:
# sm_90a code is identical at 1 and 3 stages).
TOKEN_STAGES = 3


def gram_grad_block(L, top_k_routing: bool = False) -> int:
    """Tokens per loop step of gram_grad_kernel (a power of 2, at most 64). Top-k: at most
    16, because a block in which no token activates a program's expert pair is skipped,
    and smaller blocks skip more (kernel_model.active_pair_blocks: at `wide`, 17 % of the
    (pair, block) steps run at 16 tokens, 45 % at 64)."""
    block_t = max(1, min(16 if top_k_routing else 64, 4096 // (L.RP * L.RP)))
    return 1 << (block_t.bit_length() - 1)


GRAM_GRAD_WARPS = 4
