"""A roofline model of the Triton kernels on an H200: FLOPs, bytes, estimated time.

kernel_report attaches a `Work` to each kernel it compiles at a GPU shape of
docs/contract.md §6 (`llama7b`, `llama7b-top2`, `wide`): the FLOPs the kernel issues
(its tiles and grid over the padded dimensions, the hi+lo split counted twice), the FLOPs
the problem needs (the unpadded dimensions, each product once), and the bytes it must
move (each input read once, each output written once). The estimate is

    time = max(issued FLOPs / peak of the unit that runs them, bytes / copy bandwidth)

a lower bound that ignores latency, shuffles, barriers, occupancy and launch gaps: an
ESTIMATE, not a measurement. No GPU is needed.

The dense/top-k distinction: the GEMMs run over all E·r columns (useful = all of them),
the per-token kernels' useful work counts only the top_k active experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..ops.limits import next_pow2
from ..ops.triton import configs as C
from ..ops.triton.configs import GemmConfig

# H200 ceilings: the bf16 matrix-product and device-copy rates are measured ones
# (bench/README.md, "Cost model and floors"); the FMA rates are the vendor datasheet's
# (fp64 tensor-core DMMA is the rate cuBLAS DGEMM uses).
COPY_BYTES_PER_S = 4.3e12
PEAK_FLOPS = {
    "bf16 MMA": 790e12,
    "fp16 MMA": 790e12,       # same rate as bf16 on Hopper (datasheet)
    "fp32 FMA": 67e12,
    "fp64 FMA": 34e12,
    "fp64 DMMA": 67e12,
}
H200_SMS = 132


@dataclass(frozen=True)
class Work:
    """What one launch of a kernel does at one problem size."""

    flops_issued: float
    flops_useful: float
    bytes: float
    unit: str                # a key of PEAK_FLOPS: which ceiling the FLOPs run against
    grid: tuple = ()
    # Time of other programs in the same launch (the gram programs appended to a GEMM),
    # modelled apart and added: they share the launch, not the roofline.
    extra_s: float = 0.0

    @property
    def issued_per_useful(self) -> float:
        return self.flops_issued / self.flops_useful if self.flops_useful else math.inf

    @property
    def flops_s(self) -> float:
        return self.flops_issued / PEAK_FLOPS[self.unit]

    @property
    def bytes_s(self) -> float:
        return self.bytes / COPY_BYTES_PER_S

    @property
    def estimate_s(self) -> float:
        return max(self.flops_s, self.bytes_s) + self.extra_s

    @property
    def bound(self) -> str:
        return "bytes" if self.bytes_s >= self.flops_s else "flops"

    def as_dict(self) -> dict:
        return dict(flops_issued=self.flops_issued, flops_useful=self.flops_useful,
                    issued_per_useful=round(self.issued_per_useful, 3), bytes=self.bytes,
                    unit=self.unit, grid=list(self.grid), estimate_us=round(self.estimate_s * 1e6, 2),
                    bound=self.bound)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def split_k(M: int, N: int, K: int, cfg: GemmConfig) -> tuple[int, int]:
    """(splits, k_per_split) of a long-K (weight-gradient) GEMM on an H200: the launchers'
    rule (configs.split_k)."""
    return C.split_k(M, N, K, cfg, H200_SMS)


def gemm_work(M: int, N: int, K: int, useful: tuple[int, int, int], cfg: GemmConfig, unit: str,
              a_bytes: int, b_bytes: int, c_bytes: int, add_bytes: int = 0,
              hi_lo: bool = False, long_k: bool = False, router_k: int = 0,
              router_n: int = 0, extra: "Work | None" = None) -> Work:
    """matmul_kernel / weight_grad_kernel at [M, K] @ [K, N] in its launch config `cfg`;
    `useful` = the unpadded (M, N, K); *_bytes = element sizes (0: no such operand);
    hi_lo: one operand enters as hi + lo 16-bit parts (two MMAs per tile); router_k: a
    narrow dot of that K width per tile (dX's router term); router_n: a narrow tile of that
    width beside the first n-tile (the router columns of [dA; dW]ᵀ); extra: programs
    appended to the launch (G), whose bytes and time are added."""
    splits, k_per_split = split_k(M, N, K, cfg) if long_k else (1, K)
    k_issued = splits * _round_up(k_per_split, cfg.block_k)
    rows = _round_up(M, cfg.block_m)
    issued = 2 * rows * _round_up(N, cfg.block_n) * (k_issued + router_k)
    issued += 2 * rows * router_n * k_issued
    issued *= 2 if hi_lo else 1
    out_bytes = splits * M * N * 4 if long_k else M * N * c_bytes
    moved = M * K * a_bytes + K * N * b_bytes + out_bytes + M * N * add_bytes
    grid = (cfg.tiles(M, N), splits)
    work = Work(issued, 2 * math.prod(useful), moved, unit, grid)
    if extra is not None:
        work = Work(work.flops_issued, work.flops_useful, work.bytes + extra.bytes, unit, grid,
                    extra.estimate_s)
    return work


def gram_work(d_out: int, L, el: int, tile: int = 16) -> Work:
    """The gram programs of a launch: G = B_catᵀB_cat in float64 tiles of tile × tile
    (upper triangle of tiles only), B read in place. FLOPs run on the fp64 FMA pipe
    (kernel_report's SASS shows whether Triton used DMMA)."""
    nt = L.ERP // tile
    tiles = nt * (nt + 1) // 2
    R = L.num_experts * L.rank
    issued = 2 * tiles * tile * tile * _round_up(d_out, 64)
    moved = tiles * 2 * d_out * tile * el + L.ERP * L.ERP * 8
    return Work(issued, d_out * R * (R + 1), moved, "fp64 FMA", (nt * nt,))


def shrink_work(T: int, D: int, L, cfg: GemmConfig, unit: str, el: int,
                extra: "Work | None" = None) -> Work:
    """shrink_kernel: H = X A_catᵀ (ERP columns) and logits = X Wᵀ (BLOCK_E columns,
    computed by every n-tile, stored by the first), plus its gram programs (`extra`)."""
    n_tiles = _cdiv(L.ERP, cfg.block_n)
    rows = _round_up(T, cfg.block_m)
    issued = 2 * rows * _round_up(D, cfg.block_k) * n_tiles * (cfg.block_n + L.EPL)
    useful = 2 * T * D * (L.num_experts * L.rank + L.num_experts)
    moved = (n_tiles * T * D * el + (L.ERP + L.EPL) * D * el
             + T * L.ERP * 4 + T * L.num_experts * 4)
    extra_s = 0.0
    if extra is not None:
        moved += extra.bytes
        extra_s = extra.estimate_s
    return Work(issued, useful, moved, unit, (_cdiv(T, cfg.block_m) * n_tiles,), extra_s)


def finalize_work(d_out: int, d_in: int, L, b_splits: int, a_splits: int, g_splits: int,
                  el: int) -> Work:
    """finalize_grads_kernel: sums the fp32 split-K partials of dB and [dA; dW]ᵀ, adds
    B_cat (dG + dGᵀ) and writes grad_B, grad_A, grad_W. The g_splits dG partials
    (< 1.2 MB at the §6 shapes) are counted once: every row tile re-reads them, from L2."""
    R = L.num_experts * L.rank
    moved = (b_splits * d_out * L.ERP * 4 + a_splits * d_in * L.NW * 4 + d_out * R * el
             + (d_out * R + d_in * R + L.num_experts * d_in) * el
             + g_splits * L.ERP * L.ERP * 8)
    flops = 2 * d_out * L.ERP * L.ERP
    return Work(flops, 2 * d_out * R * R, moved, "fp64 FMA")


def _token_flops(L, top_k: int) -> tuple[float, float]:
    """float64 FLOPs per token of the forward per-token algebra over the K = top_k active
    slots: (issued, useful). Issued: S over the K(K+1)/2 slot pairs, h1ᵀ G h2 at the padded
    rank (RP² + RP multiply-adds each), and the MGS sweep over [KP, KP] state (about
    10 KP² per step, K steps). Useful: the same at the real rank, MGS O(k³)."""
    K, KP, RP, r = top_k, next_pow2(top_k), L.RP, L.rank
    pairs = K * (K + 1) // 2
    issued = 2 * pairs * (RP * RP + RP) + 10 * K * KP * KP
    useful = 2 * pairs * (r * r + r) + 4 * K ** 3
    return issued, useful


def token_forward_work(T: int, L, top_k: int, block_t: int) -> Work:
    issued, useful = _token_flops(L, top_k)
    moved = T * (L.ERP * 4 * 2 + L.num_experts * 4) + L.ERP * L.ERP * 8
    return Work(T * issued, T * useful, moved, "fp64 FMA", (_cdiv(T, block_t),))


def token_backward_work(T: int, L, top_k: int, block_t: int) -> Work:
    """Recomputes the forward, then reverses it: the Gram part of dH over all K² slot pairs
    (2·K²·RP² FLOPs) and the MGS reverse (about 20 KP² per step)."""
    issued, useful = _token_flops(L, top_k)
    K, KP = top_k, next_pow2(top_k)
    issued += 2 * K * K * L.RP * L.RP + 20 * K * KP * KP
    useful += 2 * K * K * L.rank * L.rank + 8 * K ** 3
    slots = KP if top_k < L.num_experts else 0                  # slot experts, top-k only
    moved = (T * (L.ERP * 4 * 3 + L.num_experts * 4)          # h, dz in; z out; logits in
             + T * L.NW * 4 + T * (KP * KP * 8 + slots * 4)      # dHL, dS per slot pair out
             + L.ERP * L.ERP * 8)
    return Work(T * issued, T * useful, moved, "fp64 FMA", (_cdiv(T, block_t),))


def gram_grad_splits(T: int, L, block_t: int) -> int:
    """Token splits of gram_grad on an H200: the launcher's rule (configs.gram_grad_splits)."""
    return C.gram_grad_splits(T, L.num_experts, block_t, H200_SMS)[0]


def active_pair_blocks(T: int, E: int, top_k: int, block_t: int) -> float:
    """Expected (expert pair, token block) iterations gram_grad runs: every block of every
    pair when dense; under top-k, a block counts when one of its tokens routes to both
    experts, here for routing that picks each k-subset of the E experts alike (an
    assumption: real routers are skewed, which makes fewer blocks active)."""
    blocks = _cdiv(T, block_t)
    if top_k >= E:
        return float(E * E * blocks)
    p_same = top_k / E                                      # pair (i, i)
    p_other = top_k * (top_k - 1) / (E * (E - 1))           # pair (i, j), i != j
    active = lambda p: 1.0 - (1.0 - p) ** block_t
    return blocks * (E * active(p_same) + E * (E - 1) * active(p_other))


def gram_grad_work(T: int, L, top_k: int, block_t: int) -> Work:
    """dG = Σ_t dS_t,ij h_i h_jᵀ: an RP × RP block per program, grid (EP, EP, splits);
    issued = the active (pair, block) iterations (active_pair_blocks) at BLOCK_T tokens ×
    RP² multiply-adds; useful = each token's k² active pairs at the real rank. Bytes:
    h, dS per slot pair and (top-k) the slot experts once, and the split partials."""
    E = L.num_experts
    splits = gram_grad_splits(T, L, block_t)
    KP = next_pow2(min(top_k, E))
    issued = 2 * block_t * L.RP * L.RP * active_pair_blocks(T, E, top_k, block_t)
    useful = 2 * T * top_k * top_k * L.rank * L.rank
    slots = KP if top_k < E else 0
    moved = T * L.ERP * 4 + T * (KP * KP * 8 + slots * 4) + splits * L.ERP * L.ERP * 8
    return Work(issued, useful, moved, "fp64 FMA", (L.EP, L.EP, splits))


def plain_lora_works(T: int, d: int, R: int, el: int = 2) -> dict[str, list[tuple[str, Work]]]:
    """An eager bf16 LoRA of rank R = E·r (y = base + s·(x A_catᵀ) B_catᵀ), each torch op
    modelled like the kernels above (useful = issued, no padding)."""
    def mm(M: int, N: int, K: int) -> Work:
        return Work(2 * M * N * K, 2 * M * N * K, (M * K + K * N + M * N) * el, "bf16 MMA")

    add = Work(0, 0, 3 * T * d * el, "bf16 MMA")       # base + V: read two T×d, write one
    forward = [("U = s·x·A_catᵀ", mm(T, R, d)), ("V = U·B_catᵀ", mm(T, d, R)), ("y = base + V", add)]
    backward = [("dU = dY·B_cat", mm(T, R, d)), ("dB = dYᵀ·U", mm(d, R, T)),
                ("dA = s·dUᵀ·x", mm(R, d, T)), ("dX = s·dU·A_cat", mm(T, d, R))]
    return dict(forward=forward, backward=backward)
