"""Launch configurations of the Triton kernels, and the rules that size their grids.

The launchers (`triton/launch.py`), the ahead-of-time resource report
(`tools/kernel_report.py`) and the roofline model (`tools/kernel_model.py`) all read this
module, so the report compiles and the model counts exactly what runs. Configs are
frozen records: a caller that needs another shape makes a new one (`dataclasses.replace`)
instead of editing a shared dict. Nothing here imports triton except `autotuned_configs`.

`L` below is a `launch.Layout` (padded expert layout: EP, RP, ERP, EPL).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from ..limits import next_pow2

# DOT_KIND values: how the matmul operands are multiplied. The launchers pass these plain
# ints; triton/gemm_kernels.py holds the same values as `tl.constexpr` for the kernel bodies.
DOT_FP32_IEEE = 0
DOT_FP32_TF32 = 1
DOT_FP16 = 2
DOT_BF16 = 3
DOT_FP64 = 4

SIXTEEN_BIT_KINDS = (DOT_FP16, DOT_BF16)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of a GEMM kernel (shrink, matmul, weight_grad).

    group_m: matmul_kernel's grouped tile order (None for the kernels without one);
    n_group: scaled_matmul_kernel's column tiles per program (None for the others);
    num_warps / num_stages None: Triton's defaults (the interpreter ignores them)."""

    block_m: int
    block_n: int
    block_k: int
    group_m: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    n_group: Optional[int] = None

    def meta(self) -> dict:
        """The kernel's tile constexprs (BLOCK_M, BLOCK_N, BLOCK_K[, GROUP_M][, N_GROUP])."""
        meta = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k)
        if self.group_m is not None:
            meta["GROUP_M"] = self.group_m
        if self.n_group is not None:
            meta["N_GROUP"] = self.n_group
        return meta

    def options(self) -> dict:
        """num_warps / num_stages for the launch, those left to Triton omitted."""
        return {k: v for k, v in (("num_warps", self.num_warps), ("num_stages", self.num_stages))
                if v is not None}

    def tiles(self, M: int, N: int) -> int:
        """Output tiles of an [M, N] result."""
        return _cdiv(M, self.block_m) * _cdiv(N, self.block_n)

    def programs(self, M: int, N: int) -> int:
        """Programs of a one-split launch over an [M, N] result (n_group column tiles each)."""
        return _cdiv(M, self.block_m) * _cdiv(_cdiv(N, self.block_n), self.n_group or 1)

    @classmethod
    def matmul(cls, kind: int, N: int, fp16_a: bool = False, interpret: bool = False,
               scaled_a: bool = False) -> "GemmConfig":
        """matmul_kernel's fixed config (on a GPU also the autotuner's fallback shape).
        fp16_a (scaled fp16 operands, `_dot_fp16_scaled`): the partial product of each K
        chunk takes a second [BLOCK_M, BLOCK_N] of registers, so the tile is half as wide
        (128 wide spills at E·r = 128). scaled_a (the expand and dX on the per-token
        kernels' fp16 operands): one accumulator, sized by SCALED_TILE for two CTAs per SM."""
        if interpret:
            return INTERPRET_MATMUL
        if scaled_a:
            return SCALED_TILE
        if kind in SIXTEEN_BIT_KINDS:
            block_n = 64 if N <= 64 or fp16_a else 128
            return cls(128, block_n, 64, group_m=8, num_warps=8, num_stages=3)
        if kind == DOT_FP32_TF32:
            return cls(128, 64, 32, group_m=8, num_warps=8, num_stages=3)
        return cls(64, 64, 32, group_m=8, num_warps=4, num_stages=2)

    @classmethod
    def weight_grad(cls, kind: int, ERP: int, interpret: bool = False) -> "GemmConfig":
        """weight_grad_kernel ([dA; dW]ᵀ = [Xᵀ dH | Rᵀ dL]): rows are d_in, BLOCK_N covers
        the E·r columns (one n-tile up to 128), the router's E columns take a BLOCK_E-wide
        tile of their own; matmul's tile without the grouped order."""
        return replace(cls.matmul(kind, ERP, interpret=interpret), group_m=None)

    @classmethod
    def shrink(cls, kind: int, ERP: int, fuse_token: bool = False,
               interpret: bool = False) -> "GemmConfig":
        """shrink_kernel's fixed config; with the per-token epilogue fused in, one program
        covers all ERP columns of its rows."""
        if interpret:
            return cls(32, ERP if fuse_token else min(ERP, 64), 32)
        block_n = min(ERP, 256 if kind in SIXTEEN_BIT_KINDS else 128)
        if kind in SIXTEEN_BIT_KINDS:
            # BLOCK_M 64: T = 8192 gives 128 programs, about one per SM (128 would leave half
            # the SMs idle on a pass that is bound by reading x).
            cfg = cls(64, block_n, 64, num_warps=4 if block_n <= 128 else 8, num_stages=4)
        else:
            cfg = cls(64, block_n, 32, num_warps=4, num_stages=2)
        if fuse_token:
            # The per-token epilogue holds one token per thread: a program's rows are
            # exactly the 32 · num_warps tokens of one per-token block.
            return replace(cfg, block_m=32 * cfg.num_warps, block_n=ERP)
        return cfg


# The expand and dX on scaled fp16 operands where K = E·r passes GROUPED_MAX_K
# (matmul_kernel's SCALED_A path; below it scaled_matmul_kernel): plain fp16 MMAs into one
# accumulator, the base tile loaded before the mainloop; sized so that registers and shared
# memory leave room for two CTAs per SM (tools/kernel_report prints both); not autotuned,
# so that the tile that runs is the one the report checks.
SCALED_TILE = GemmConfig(128, 64, 32, group_m=8, num_warps=8, num_stages=3)
# The most column tiles one scaled_matmul_kernel program walks: 8 × 64 columns re-read its
# [128, K] tile of Z / dH 8× less often than one tile per program, with 512 programs at
# T = 8192, d = 4096 (about 2 waves at 2 CTAs per SM).
GROUP_MAX_N_TILES = 8

# scaled_matmul_kernel (the expand and dX on scaled fp16 operands where K = ERP <=
# GROUPED_MAX_K): a program holds its [128, K] tile of Z or dH and walks column tiles of
# 64; registers and shared memory leave room for two CTAs per SM (tools/kernel_report;
# with 3 stages triton 3.6 took dX at E·r = 64 to one).
# BLOCK_K is set to K and n_group to the grid's rule at plan time (grouped_tile).
GROUPED_TILE = GemmConfig(128, 64, 16, num_warps=8, num_stages=2, n_group=GROUP_MAX_N_TILES)
GROUPED_MAX_K = 128


def grouped_tile(M: int, N: int, K: int, num_sms: int, interpret: bool = False
                 ) -> Optional[GemmConfig]:
    """scaled_matmul_kernel's config for [M, K] @ [K, N], or None where K is too wide for
    one tile (matmul_kernel's SCALED_A path then runs). Column tiles per program: the most,
    up to GROUP_MAX_N_TILES, that still leaves two programs per SM (2 CTAs per SM at one
    wave); under the interpreter 2, so that small test shapes walk a group."""
    if K > GROUPED_MAX_K:
        return None
    if interpret:
        return GemmConfig(32, 32, max(16, next_pow2(K)), n_group=2)
    cfg = replace(GROUPED_TILE, block_k=max(16, next_pow2(K)))
    n_group = GROUP_MAX_N_TILES
    while n_group > 1 and replace(cfg, n_group=n_group).programs(M, N) < 2 * num_sms:
        n_group //= 2
    return replace(cfg, n_group=n_group)


# Under TRITON_INTERPRET=1: small tiles, so that small test shapes still use several programs.
INTERPRET_MATMUL = GemmConfig(32, 32, 32, group_m=2)


def split_k(M: int, N: int, K: int, cfg: GemmConfig, num_sms: int,
            interpret: bool = False, per_sm: int = 2) -> tuple[int, int]:
    """(splits, k_per_split) of a long-K GEMM: K is split over several programs into
    partials, so that the few output tiles still fill the GPU's `num_sms` with `per_sm`
    programs each (2: the weight gradients; 1: dZ, whose partials token_backward sums)."""
    if interpret:
        splits = min(3, _cdiv(K, 32))
    else:
        splits = min(per_sm * num_sms // cfg.tiles(M, N), _cdiv(K, 512))
    splits = max(1, splits)
    k_per_split = max(64, _cdiv(_cdiv(K, splits), 64) * 64)
    return _cdiv(max(K, 1), k_per_split), k_per_split


# bf16: how an fp32 intermediate (Z, dH) meets a bf16 operand in a GEMM. In the a operand
# (EXPAND_Z, DX_DH) one of A_OPERAND_MODES: "bf16" rounds it to bf16 (8 significant bits,
# one MMA); "fp16" takes both operands to fp16, scaled by powers of 2 (11 bits, one MMA at
# the same rate; the bf16 weight converts exactly: gemm_kernels._dot_fp16_scaled);
# "hi_lo" splits it into hi + lo bf16 parts (16 bits, two MMAs). In the b operand (SPLIT_*)
# hi + lo or not. fp16 inputs: every fp32 intermediate enters as scaled fp16 (one MMA; the
# scaling keeps Z, which grows like κ/‖e‖, inside fp16's range).
# Why these choices: the errors of each mode near collapse and at random, and what each
# costs, are in bench/README.md, "Accuracy choices".
A_OPERAND_MODES = ("bf16", "fp16", "hi_lo")
EXPAND_Z = "fp16"
DX_DH = "fp16"
SPLIT_DB = False
SPLIT_DAW = False


def a_operand_flags(kind: int, bf16_mode: str) -> dict:
    """matmul's split_a / fp16_a for an fp32 intermediate in the a operand of a bf16 GEMM,
    by the mode above (fp16 GEMMs always take it as scaled fp16: fp16_a is implied)."""
    if bf16_mode not in A_OPERAND_MODES:
        raise ValueError(f"bf16 operand mode must be one of {A_OPERAND_MODES}, got {bf16_mode!r}")
    bf16 = kind == DOT_BF16
    return dict(split_a=bf16 and bf16_mode == "hi_lo", fp16_a=bf16 and bf16_mode == "fp16")


def scaled_operand(kind: int, bf16_mode: str) -> bool:
    """Whether the per-token kernels write Z / dH in the MMA operand format (fp16, a
    power-of-2 scale per row) for a GEMM of `kind`: fp16 always, bf16 in the "fp16" mode."""
    return kind == DOT_FP16 or (kind == DOT_BF16 and bf16_mode == "fp16")


def b_operand_split(kind: int, bf16_split: bool) -> bool:
    """Whether an fp32 intermediate in the b operand of a bf16 GEMM enters as hi + lo."""
    return kind == DOT_BF16 and bf16_split


# G = B_catᵀB_cat is built by GRAM_TILE × GRAM_TILE float64 tiles appended to a GEMM
# launch, one program per tile of the upper triangle (ERP is a multiple). Each thread
# holds GRAM_TILE² float64 sums: 4 keeps that below the GEMM side's registers.
GRAM_TILE = 4
# Trips of a gram program's loop over d_out, at most (d_out rows on lanes; a trip reads
# GR vectors of 32 · num_warps rows).
GRAM_TRIPS = 16


def gram_programs(ERP: int) -> int:
    """Programs that build G when appended to a GEMM launch (one per upper-triangle tile)."""
    tiles = ERP // GRAM_TILE
    return tiles * (tiles + 1) // 2


def gram_rows(d_out: int, num_warps: Optional[int]) -> dict:
    """_gram_tile's constexprs: GB (tile), GD (rows a vector: one per thread) and GR
    (vectors a trip), so that the loop over d_out runs at most GRAM_TRIPS trips."""
    lanes = 32 * (num_warps or 4)
    return dict(GB=GRAM_TILE, GD=lanes, GR=max(1, _cdiv(_cdiv(d_out, GRAM_TRIPS), lanes)))


def gram_trips(d_out: int, num_warps: Optional[int]) -> int:
    """Trips of a gram program's loop over d_out."""
    rows = gram_rows(d_out, num_warps)
    return _cdiv(d_out, rows["GD"] * rows["GR"])


@dataclass(frozen=True)
class FinalizeConfig:
    """finalize_grads_kernel: tiles of block_r rows × block_c columns, dG read in block_g
    chunks."""

    block_r: int = 64
    block_c: int = 64
    block_g: int = 16
    num_warps: int = 4

    def meta(self) -> dict:
        return dict(BLOCK_R=self.block_r, BLOCK_C=self.block_c, BLOCK_G=self.block_g)

    def options(self) -> dict:
        return dict(num_warps=self.num_warps)


FINALIZE = FinalizeConfig()
# fp32 weights: the B·(dG + dGᵀ) term is a float64 dot with float64 operands (a 16-bit B
# goes through an fp32 dot), twice the registers per element; 8 warps keep it from
# spilling under triton 3.6 (bench/notes/triton-3.6.md).
FINALIZE_FP32 = FinalizeConfig(num_warps=8)


def finalize_config(weight_bytes: int) -> FinalizeConfig:
    """The finalize's config for weights of `weight_bytes` per element."""
    return FINALIZE_FP32 if weight_bytes == 4 else FINALIZE


# Autotune candidates (GPU, 16-bit and TF32 kinds): (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
# for matmul_kernel, (BLOCK_M, BLOCK_K, warps, stages) for shrink_kernel (its BLOCK_N is
# fixed by GemmConfig.shrink).
MATMUL_AUTOTUNE = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                   (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)]
# Keys on dimensions rounded up to powers of 2 (the launchers' *_bucket arguments), not
# on T itself: a new token count re-tunes only when it crosses a power of 2.
MATMUL_AUTOTUNE_KEY = ["m_bucket", "n_bucket", "k_bucket", "HAS_ADD", "SPLIT_A", "SPLIT_B",
                       "FP16_A", "DOT_KIND", "PACKED_BK", "PACKED_BN", "ROUTER", "WITH_GRAM",
                       "SCALED_A"]
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
    if kernel == "shrink":
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk), num_warps=w, num_stages=s)
                for bm, bk, w, s in SHRINK_AUTOTUNE]
    raise ValueError(f"no autotune candidates for {kernel!r} (matmul or shrink)")


# ---- per-token kernels -----------------------------------------------------------------

# Warps of the per-token kernels: each thread holds one token (tokens on lanes), so that
# reductions over experts and ranks stay in one thread's registers; a program's tensors
# span TOKEN_BLOCK = 32 · TOKEN_WARPS lanes (BT, triton/token_kernels.py). One warp, so
# that the programs are many: a lane holds at most one token (tokens_per_program).
TOKEN_WARPS = 1
TOKEN_BLOCK = 32 * TOKEN_WARPS

# num_stages of the per-token kernels and gram_grad: Triton's CUDA default, passed
# explicitly so the report compiles the same (their loops have no loads to pipeline:
# sm_90a code is identical at 1 and 3 stages).
TOKEN_STAGES = 3

# Waves of per-token programs over the SMs that tokens_per_program aims for.
TOKEN_WAVES = 2


def tokens_per_program(T: int, num_sms: int, lanes: int = TOKEN_BLOCK,
                       interpret: bool = False) -> int:
    """Tokens of one per-token program (at most one per lane): few enough that the grid
    makes TOKEN_WAVES waves over `num_sms` (T = 8192 on 132 SMs: 31 tokens, 265
    programs). The lanes past the count idle: the float64 work of a token stays in one
    thread. Interpreter: two programs (the program loop is slow there)."""
    if interpret:
        return max(1, min(lanes, _cdiv(T, 2)))
    return max(1, min(lanes, T // (TOKEN_WAVES * num_sms)))


@dataclass(frozen=True)
class TokenConfig:
    """Compile-time flags of token_forward_kernel / token_backward_kernel (the same for
    both) and of the per-token epilogue of the fused shrink, and the tokens a program
    takes (`block_t`, a run-time argument: a new T does not recompile). K = top_k slots,
    KP its power of 2: a kernel is compiled per (E, top_k), which a model fixes."""

    top_k: int
    top_k_routing: bool
    orthogonalize: bool
    normalize: bool
    block_t: int     # tokens per program (<= lanes)
    EP: int
    RP: int
    ERP: int
    num_warps: int = TOKEN_WARPS
    num_stages: int = TOKEN_STAGES

    @classmethod
    def of(cls, L, top_k: int, orthogonalize: bool, normalize: bool,
           block_t: int = TOKEN_BLOCK) -> "TokenConfig":
        return cls(top_k, top_k < L.num_experts, orthogonalize, normalize, block_t,
                   L.EP, L.RP, L.ERP)

    @property
    def KP(self) -> int:
        return next_pow2(self.top_k)

    @property
    def lanes(self) -> int:
        """BT: the token axis of the kernels' tensors, one lane per token."""
        return 32 * self.num_warps

    def meta(self) -> dict:
        return dict(K=self.top_k, TOP_K_ROUTING=self.top_k_routing,
                    ORTHOGONALIZE=self.orthogonalize, NORMALIZE=self.normalize, BT=self.lanes,
                    EP=self.EP, KP=self.KP, RP=self.RP, ERP=self.ERP)

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def gram_grad_block(L) -> int:
    """Tokens per loop step of gram_grad_kernel: a power of 2, at most 64; below RP = 16
    (no float64 dot) at most 4096 products of [BLOCK_T, RP, RP] float64 held by the
    program. Under top-k too, though a smaller block skips more of the blocks in which no
    token activates a program's pair (kernel_model.active_pair_blocks): each step waits for
    its loads, and the walk's steps, not the float64 FLOPs they skip, bound the kernel
    (bench/notes/triton-gram-grad.md)."""
    block_t = 64 if L.RP >= 16 else max(1, min(64, 4096 // (L.RP * L.RP)))
    return 1 << (block_t.bit_length() - 1)


GRAM_GRAD_WARPS = 4
GRAM_GRAD_MAX_BLOCKS = 32


def gram_grad_splits(T: int, num_experts: int, block_t: int, num_sms: int,
                     interpret: bool = False) -> tuple[int, int]:
    """(splits, tokens per split) of gram_grad: enough token splits for the E(E+1)/2
    expert-pair programs (dG's upper triangle of blocks) to fill `num_sms`, and for no
    program to walk more than GRAM_GRAD_MAX_BLOCKS token blocks (each a round trip for its
    loads); each split a whole number of `block_t` blocks. More splits lengthen the
    finalize's serial sum over the dG partials, so no more than that
    (bench/notes/triton-gram-grad.md, "Token splits")."""
    if interpret:
        wanted = min(2, _cdiv(T, block_t))
    else:
        wanted = max(min(_cdiv(T, 256), 2 * num_sms // (num_experts * (num_experts + 1) // 2) + 1),
                     _cdiv(T, GRAM_GRAD_MAX_BLOCKS * block_t))
    per_split = max(1, _cdiv(_cdiv(T, max(1, wanted)), block_t)) * block_t
    return max(1, _cdiv(T, per_split)), per_split
