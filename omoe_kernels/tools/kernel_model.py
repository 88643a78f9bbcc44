"""A model of the Triton kernels on a Hopper GPU: FLOPs, bytes, latency, estimated time.

kernel_report attaches a `Work` to each kernel it compiles at a GPU shape of
docs/contract.md §6 (`llama7b`, `llama7b-top2`, `wide`): the FLOPs the kernel issues
(its tiles and grid over the padded dimensions, the hi+lo split counted twice), the FLOPs
the problem needs (the unpadded dimensions, each product once), and the bytes it must
move (each input read once, each output written once). The estimate is

    time = max(issued FLOPs / peak of the unit that runs them, bytes / copy bandwidth)

(`Work.estimate_s`), a lower bound that ignores latency, occupancy and launch gaps. The
latency model (`timing`) adds what that bound leaves out, as a (low, high) range from the
one calibration table below (`CALIBRATION`, `CARDS`):

    programs     the launch grid's programs; CTAs per SM from registers, shared memory and
                 warps (`ctas_per_sm`); waves = programs / (CTAs per SM · SMs)
    flop bound   issued FLOPs / (peak · achieved efficiency · share of SMs the grid fills)
    byte bound   max(DRAM bytes / copy rate, (DRAM + L2 re-read bytes) / L2 rate), same share
    latency      ceil(waves) · (one program's fixed cost + its longest serial loop: trips ·
                 the time of one trip, by the rule of its `Loop`)
    time         max of the three + the per-launch gap; `bound` names the largest

All of it is an ESTIMATE, not a measurement. No GPU is needed.

The dense/top-k distinction: the GEMMs run over all E·r columns (useful = all of them),
the per-token kernels' useful work counts only the top_k active experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

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
    programs: int = 0              # programs in the launch grid (0: unknown)
    loop: "Loop | None" = None     # the longest serial loop of one program
    l2_bytes: float = 0.0          # re-reads served by L2 (beyond `bytes`, which is DRAM)
    appended: "Work | None" = None # programs appended to the launch (G), modelled apart

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
                    l2_bytes=self.l2_bytes, unit=self.unit, grid=list(self.grid),
                    estimate_us=round(self.estimate_s * 1e6, 2), bound=self.bound)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


def split_k(M: int, N: int, K: int, cfg: GemmConfig, per_sm: int = 2) -> tuple[int, int]:
    """(splits, k_per_split) of a long-K GEMM (weight gradients, dZ) on an H200: the
    launchers' rule (configs.split_k)."""
    return C.split_k(M, N, K, cfg, H200_SMS, per_sm=per_sm)


def gemm_work(M: int, N: int, K: int, useful: tuple[int, int, int], cfg: GemmConfig, unit: str,
              a_bytes: int, b_bytes: int, c_bytes: int, add_bytes: int = 0,
              hi_lo: bool = False, long_k: bool = False, router_k: int = 0,
              router_n: int = 0, extra: "Work | None" = None, per_sm: int = 2) -> Work:
    """matmul_kernel / weight_grad_kernel at [M, K] @ [K, N] in its launch config `cfg`;
    `useful` = the unpadded (M, N, K); *_bytes = element sizes (0: no such operand);
    hi_lo: one operand enters as hi + lo 16-bit parts (two MMAs per tile); router_k: a
    narrow dot of that K width per tile (dX's router term); router_n: a narrow tile of that
    width beside the first n-tile (the router columns of [dA; dW]ᵀ); extra: programs
    appended to the launch (G), whose bytes and time are added; per_sm: split-K's programs
    per SM (configs.split_k)."""
    splits, k_per_split = split_k(M, N, K, cfg, per_sm) if long_k else (1, K)
    k_issued = splits * _round_up(k_per_split, cfg.block_k)
    rows = _round_up(M, cfg.block_m)
    issued = 2 * rows * _round_up(N, cfg.block_n) * (k_issued + router_k)
    issued += 2 * rows * router_n * k_issued
    issued *= 2 if hi_lo else 1
    out_bytes = splits * M * N * 4 if long_k else M * N * c_bytes
    moved = M * K * a_bytes + K * N * b_bytes + out_bytes + M * N * add_bytes
    grid = (cfg.programs(M, N), splits)
    # L2 re-reads: every program reads its rows of a again (one per n-tile, or one per
    # group of cfg.n_group n-tiles: scaled_matmul_kernel), every m-tile its columns of b.
    m_tiles, n_reads = _cdiv(M, cfg.block_m), _cdiv(_cdiv(N, cfg.block_n), cfg.n_group or 1)
    l2 = (n_reads - 1) * M * K * a_bytes + (m_tiles - 1) * K * N * b_bytes
    work = Work(issued, 2 * math.prod(useful), moved, unit, grid, l2_bytes=l2)
    if extra is not None:
        work = replace(work, bytes=work.bytes + extra.bytes, extra_s=extra.estimate_s,
                       appended=extra)
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


def repeated(work: Work, n: int) -> Work:
    """`n` copies of `work` in one launch (a mixed batch's G, one per adapter): n× the
    FLOPs, bytes and programs."""
    grid = (math.prod(work.grid) * n,) if work.grid else ()
    return replace(work, flops_issued=n * work.flops_issued, flops_useful=n * work.flops_useful,
                   bytes=n * work.bytes, grid=grid, programs=n * work.programs)


def mixed_forward_works(T: int, P: int, d: int, L, N: int, top_k: int, shrink_cfg: GemmConfig,
                        expand_cfg: GemmConfig, block_t: int, el: int,
                        gram_tile: int) -> dict[str, Work]:
    """The grouped forward of a mixed batch (ops/triton/mixed_launch.py): T tokens of N
    adapters in P padded segment rows. The single-adapter forward's work on P rows (the
    useful FLOPs on T), plus what N adapters add: N G's in the shrink's appended programs,
    every adapter's A, W and B read (once each: a segment's tiles share them in L2) and
    N G's read by the per-token kernel."""
    unit, R = "bf16 MMA" if el == 2 else "fp32 FMA", L.num_experts * L.rank
    useful = T / P
    shrink = shrink_work(P, d, L, shrink_cfg, unit, el,
                         extra=repeated(gram_work(d, L, el, gram_tile), N))
    shrink = replace(shrink, flops_useful=shrink.flops_useful * useful,
                     bytes=shrink.bytes + (N - 1) * (L.ERP + L.EPL) * d * el)
    token = token_forward_work(P, L, top_k, block_t)
    token = replace(token, flops_useful=token.flops_useful * useful,
                    bytes=token.bytes + (N - 1) * L.ERP * L.ERP * 8)
    expand = gemm_work(P, d, L.ERP, (T, d, R), expand_cfg, unit, 4, el, el, el)
    expand = replace(expand, bytes=expand.bytes + (N - 1) * L.ERP * d * el)
    return dict(shrink=shrink, token_forward=token, expand=expand)


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
    return Work(issued, useful, moved, unit, (_cdiv(T, cfg.block_m) * n_tiles,), extra_s,
                appended=extra)


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


def _z_row_bytes(L, scaled: bool) -> int:
    """Bytes of one written row of Z or dH for a GEMM's a operand: fp32, or the MMA
    operand format (fp16 and one fp32 scale: configs.scaled_operand)."""
    return L.ERP * 2 + 4 if scaled else L.ERP * 4


def token_forward_work(T: int, L, top_k: int, block_t: int, scaled: bool = False) -> Work:
    """Reads h and the logits, writes Z (fp32, or `scaled`: the expand's fp16 format)."""
    issued, useful = _token_flops(L, top_k)
    moved = T * (L.ERP * 4 + _z_row_bytes(L, scaled) + L.num_experts * 4) + L.ERP * L.ERP * 8
    return Work(T * issued, T * useful, moved, "fp64 FMA", (_cdiv(T, block_t),),
                programs=_cdiv(T, block_t), loop=token_loop(issued))


def token_backward_work(T: int, L, top_k: int, block_t: int, scaled: bool = False,
                        dz_splits: int = 1) -> Work:
    """Recomputes the forward, then reverses it: the Gram part of dH over all K² slot pairs
    (2·K²·RP² FLOPs) and the MGS reverse (about 20 KP² per step). `scaled`: dH also in
    dX's fp16 operand format (re-read from the fp32 row the thread just wrote, in L1/L2).
    dz_splits: dZ read as that many fp32 split-K partials."""
    issued, useful = _token_flops(L, top_k)
    K, KP = top_k, next_pow2(top_k)
    issued += 2 * K * K * L.RP * L.RP + 20 * K * KP * KP
    useful += 2 * K * K * L.rank * L.rank + 8 * K ** 3
    slots = KP if top_k < L.num_experts else 0                  # slot experts, top-k only
    moved = (T * (L.ERP * 4 * (2 + dz_splits) + L.num_experts * 4)  # h, dz in; z out; logits
             + T * L.NW * 4 + T * (KP * KP * 8 + slots * 4)      # dHL, dS per slot pair out
             + L.ERP * L.ERP * 8 + (T * _z_row_bytes(L, True) if scaled else 0))
    return Work(T * issued, T * useful, moved, "fp64 FMA", (_cdiv(T, block_t),),
                programs=_cdiv(T, block_t), loop=token_loop(issued))


def gram_grad_splits(T: int, L, block_t: int) -> int:
    """Token splits of gram_grad on an H200: the launcher's rule (configs.gram_grad_splits)."""
    return C.gram_grad_splits(T, L.num_experts, block_t, H200_SMS)[0]


def active_pair_blocks(T: int, E: int, top_k: int, block_t: int) -> float:
    """Expected (expert pair i <= j, token block) iterations gram_grad runs: every block of
    every pair of dG's upper triangle when dense; under top-k, a block counts when one of
    its tokens routes to both experts, here for routing that picks each k-subset of the E
    experts alike (an assumption: real routers are skewed, which makes fewer active)."""
    blocks = _cdiv(T, block_t)
    if top_k >= E:
        return float(E * (E + 1) // 2 * blocks)
    p_same = top_k / E                                      # pair (i, i)
    p_other = top_k * (top_k - 1) / (E * (E - 1))           # pair (i, j), i < j
    active = lambda p: 1.0 - (1.0 - p) ** block_t
    return blocks * (E * active(p_same) + E * (E - 1) // 2 * active(p_other))


def gram_grad_work(T: int, L, top_k: int, block_t: int) -> Work:
    """dG = Σ_t dS_t,ij h_i h_jᵀ: an RP × RP block i <= j per program (dG is symmetric),
    grid (EP(EP+1)/2, splits);
    issued = the active (pair, block) iterations (active_pair_blocks) at BLOCK_T tokens ×
    RP² multiply-adds; useful = each token's k(k+1)/2 active pairs at the real rank. Bytes:
    h, dS per slot pair and (top-k) the slot experts once, and the split partials."""
    E = L.num_experts
    splits = gram_grad_splits(T, L, block_t)
    KP = next_pow2(min(top_k, E))
    issued = 2 * block_t * L.RP * L.RP * active_pair_blocks(T, E, top_k, block_t)
    useful = T * top_k * (top_k + 1) * L.rank * L.rank
    slots = KP if top_k < E else 0
    moved = T * L.ERP * 4 + T * (KP * KP * 8 + slots * 4) + splits * L.ERP * L.ERP * 8
    return Work(issued, useful, moved, "fp64 FMA", (L.EP * (L.EP + 1) // 2, splits))


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


# ---- the latency model -------------------------------------------------------------------
# One calibration table. Each entry is (low, high): the optimistic and the pessimistic end
# of the step's range. Sources: the copy and bf16 rates were measured on this workplace's
# H100 and H200 machines (bench/README.md, "The GPU step model", Calibration); latencies are public microbenchmarks (Chips and Cheese, "Nvidia's
# H100: Funny L2, and Tons of Bandwidth", 2023: L2 hits about 200–300 cycles, DRAM about
# 500–800; Jia et al., arXiv:1804.06826: a dependent DFMA about 8 cycles on Volta);
# the efficiencies and the launch gap are assumptions that stage 1 of bench/gpu_check.sh
# measures (bench/README.md lists which row of its output checks which entry).


@dataclass(frozen=True)
class Card:
    name: str
    sms: int
    copy_bytes_per_s: float    # device copy, bytes read + written (measured here)
    l2_bytes_per_s: tuple      # (low, high) L2 read rate an SM-filling grid reaches
    clock_hz: float = 1.98e9   # SM clock under load (seen on the H200 machine)


CARDS = {
    "h200": Card("H200", 132, 4.3e12, (8e12, 5.5e12)),
    "h100": Card("H100 SXM 80GB", 132, 3.0e12, (8e12, 5.5e12)),
}

CALIBRATION = dict(
    # fraction of the measured copy rate a streaming kernel reaches
    copy_efficiency=(1.0, 0.85),
    # fraction of the 790 TFLOP/s square-matmul rate reached by tiles of N <= 128 over a
    # short K loop (skinny N: the accumulator per warp is small, the epilogue is long)
    mma_efficiency=(0.7, 0.45),
    # fraction of the plain float64 FMA peak (34 TFLOP/s) reached when the grid fills the GPU
    fp64_efficiency=(0.8, 0.5),
    # GPU-side gap between dependent launches: CUDA-graph replay at the low end, eager
    # stream launches that keep ahead of the GPU at the high end (host time not included)
    launch_gap_us=(1.0, 4.0),
    # a program's fixed cost: its first global loads (one round trip) and its epilogue store
    program_ns=(250.0, 600.0),
    # one trip of a loop whose loads the compiler pipelines or that do not depend on the
    # carried value (num_stages >= 2): about one L2 hit's issue cost, not its latency
    pipelined_trip_ns=(60.0, 150.0),
    # one trip of a loop that waits for its own global loads (no prefetch, a barrier):
    # an L2 hit to a DRAM access, 200–800 cycles at 1.98 GHz
    round_trip_ns=(250.0, 600.0),
    # one float64 operation in a thread's dependent chain (DFMA latency ~8 cycles over an
    # ILP of 2–4, at 1.98 GHz); the per-token kernels hold one token per thread
    fp64_op_ns=(1.0, 4.0),
)

# Register file, shared memory and warp slots of one Hopper SM (CUDA C Programming Guide,
# "Compute Capabilities", 9.0).
SM_REGISTERS = 65536
SM_SHARED = 228 * 1024
SM_SHARED_PER_CTA_RESERVED = 1024
SM_MAX_WARPS = 64
SM_MAX_CTAS = 32


def ctas_per_sm(registers: int, shared: int, num_warps: int) -> int:
    """CTAs of one kernel resident on one SM at a time: the least of the register file
    (registers per thread rounded up to 8, allocated per warp), shared memory (1 KiB
    reserved per CTA), the 64 warp slots and the 32 CTA slots. Unknown registers (< 0): 1."""
    if registers < 0:
        return 1
    regs_per_warp = _round_up(max(registers, 1), 8) * 32
    by_regs = SM_REGISTERS // (regs_per_warp * num_warps)
    by_shared = SM_SHARED // (max(shared, 0) + SM_SHARED_PER_CTA_RESERVED)
    return max(0, min(by_regs, by_shared, SM_MAX_WARPS // num_warps, SM_MAX_CTAS))


@dataclass(frozen=True)
class Loop:
    """The longest serial loop of one program: `trips` steps over `over` ("K", "n-tiles", "d_out",
    "splits", "tokens", "token chain"). A trip costs: its loads (`load`: "pipelined",
    "round trip" or "" for none), `fp64_ops` dependent float64 operations per thread, and
    `mma_flops` of tensor-core work by the program (shared with the CTAs beside it).
    `prologue`: load-only pipelined trips before the loop (SCALED_A's weight maxima)."""

    trips: int
    over: str
    load: str = "pipelined"
    fp64_ops: float = 0.0
    mma_flops: float = 0.0
    prologue: int = 0

    def total_s(self, end: int, co_resident: int, card: "Card") -> float:
        """The loop's time in one program, its prologue included."""
        prologue = self.prologue * CALIBRATION["pipelined_trip_ns"][end] * 1e-9
        return self.trips * self.trip_s(end, co_resident, card) + prologue

    def trip_s(self, end: int, co_resident: int, card: Card) -> float:
        c = CALIBRATION
        load = {"pipelined": c["pipelined_trip_ns"][end], "round trip": c["round_trip_ns"][end],
                "": 0.0}[self.load] * 1e-9
        ops = self.fp64_ops * c["fp64_op_ns"][end] * 1e-9
        mma = 0.0
        if self.mma_flops:
            per_sm = PEAK_FLOPS["bf16 MMA"] * c["mma_efficiency"][end] / card.sms
            mma = self.mma_flops * co_resident / per_sm
        return max(load, mma) + ops if self.load == "pipelined" else load + ops + mma


@dataclass(frozen=True)
class Timing:
    """A launch's modelled time at one end of the range."""

    programs: int
    ctas_per_sm: int
    waves: float
    flops_s: float
    bytes_s: float
    latency_s: float
    gap_s: float
    appended_s: float = 0.0

    @property
    def total_s(self) -> float:
        return max(self.flops_s, self.bytes_s, self.latency_s, self.appended_s) + self.gap_s

    @property
    def bound(self) -> str:
        parts = dict(flops=self.flops_s, bytes=self.bytes_s, latency=self.latency_s,
                     appended=self.appended_s)
        return max(parts, key=parts.get)


def timing(work: Work, ctas: int, end: int, card: Card = CARDS["h200"],
           gap: bool = True) -> Timing:
    """`work`'s time at one end of the range (0: low, 1: high) with `ctas` CTAs per SM."""
    c = CALIBRATION
    programs = work.programs or card.sms
    ctas = max(1, ctas)
    waves = programs / (ctas * card.sms)
    fill = min(1.0, programs / card.sms)          # SMs with work at all
    eff = c["mma_efficiency"][end] if work.unit.endswith("MMA") else c["fp64_efficiency"][end]
    flops_s = work.flops_issued / (PEAK_FLOPS[work.unit] * eff * fill)
    dram_s = work.bytes / (card.copy_bytes_per_s * c["copy_efficiency"][end] * fill)
    l2_s = (work.bytes + work.l2_bytes) / (card.l2_bytes_per_s[end] * fill)
    bytes_s = max(dram_s, l2_s)
    co_resident = min(ctas, math.ceil(programs / card.sms))
    latency_s = math.ceil(waves) * c["program_ns"][end] * 1e-9
    if work.loop is not None:
        latency_s += math.ceil(waves) * work.loop.total_s(end, co_resident, card)
    appended_s = 0.0
    if work.appended is not None:
        appended_s = timing(work.appended, ctas, end, card, gap=False).total_s
    gap_s = c["launch_gap_us"][end] * 1e-6 if gap else 0.0
    return Timing(programs, ctas, waves, flops_s, bytes_s, latency_s, gap_s, appended_s)


def time_range(work: Work, ctas: int, card: Card = CARDS["h200"]) -> tuple[Timing, Timing]:
    return timing(work, ctas, 0, card), timing(work, ctas, 1, card)


# Loops of the kernels, by the structure of their source (ops/triton/*_kernels.py).

def gemm_loop(k_per_split: int, block_m: int, block_n: int, block_k: int) -> Loop:
    """The K loop of a GEMM tile: pipelined loads (num_stages >= 2), one MMA per trip."""
    return Loop(_cdiv(max(k_per_split, 1), block_k), "K", "pipelined",
                mma_flops=2 * block_m * block_n * block_k)


def grouped_loop(n_group: int, block_m: int, block_n: int, block_k: int) -> Loop:
    """scaled_matmul_kernel's walk over its group of n-tiles: the a tile loaded once before
    it, then per trip pipelined loads (the weight's and base's tiles) and one MMA over all
    of K (BLOCK_K >= K)."""
    return Loop(n_group, "n-tiles", "pipelined", mma_flops=2 * block_m * block_n * block_k)


def gram_loop(d_out: int, rows_per_trip: int, tile: int, threads: int) -> Loop:
    """A gram program's walk over d_out: its loads wait (no prefetch), then float64
    converts and FMAs of a tile × tile × rows product spread over the program's threads."""
    return Loop(_cdiv(d_out, rows_per_trip), "d_out", "round trip",
                fp64_ops=2 * tile * tile * rows_per_trip / threads)


def token_loop(fp64_flops_per_token: float) -> Loop:
    """The per-token kernels: one token per thread, its float64 algebra one dependent
    chain (FMAs = FLOPs / 2)."""
    return Loop(1, "token chain", "", fp64_ops=fp64_flops_per_token / 2)


def gram_grad_loop(tokens_per_split: int, block_t: int, rp: int, threads: int,
                   active: float = 1.0) -> Loop:
    """gram_grad's walk over its split's token blocks: each trip waits for its loads (under
    top-k the block's slot experts, even when the pair is inactive there), then, in the
    `active` share of trips, a [BLOCK_T, RP, RP] float64 product spread over the threads
    (at RP >= 16 a float64 dot, DMMA: the same multiply-adds, timed as dependent FMAs,
    which makes its time an upper end)."""
    return Loop(_cdiv(tokens_per_split, block_t), "tokens", "round trip",
                fp64_ops=active * block_t * rp * rp / threads)


def finalize_loop(b_splits: int, a_splits: int, g_splits: int, erp: int, block_g: int) -> Loop:
    """finalize_grads: a grad_B program sums b_splits partials, then per BLOCK_G chunk of
    ERP the g_splits dG partials (one load each: dG + dGᵀ = 2 dG) and one dot; grad_A
    programs sum a_splits."""
    b_trips = b_splits + (_cdiv(erp, block_g) * (g_splits + 1) if g_splits else 0)
    return Loop(max(b_trips, a_splits), "splits", "pipelined")


def plain_lora_timing(T: int, d: int, R: int, end: int, card: Card = CARDS["h200"],
                      el: int = 2) -> dict[str, float]:
    """An eager bf16 LoRA of rank R at one end of the range, seconds per phase: each
    torch op one launch (with its gap), GEMMs in 128 × 128 tiles with split-K enough to
    fill the GPU (as cuBLAS picks), modelled like the kernels."""
    dims = {"U = s·x·A_catᵀ": (T, R, d), "V = U·B_catᵀ": (T, d, R), "dU = dY·B_cat": (T, R, d),
            "dB = dYᵀ·U": (d, R, T), "dA = s·dUᵀ·x": (R, d, T), "dX = s·dU·A_cat": (T, d, R)}
    out = {}
    for phase, works in plain_lora_works(T, d, R, el).items():
        total = 0.0
        for label, w in works:
            if label in dims:
                M_, N_, K_ = dims[label]
                tiles = _cdiv(M_, 128) * _cdiv(N_, 128)
                splits = max(1, min(card.sms // tiles, K_ // 512)) if tiles < card.sms else 1
                w = replace(w, programs=tiles * splits,
                            loop=gemm_loop(_cdiv(K_, splits), 128, 128, 64))
            else:
                w = replace(w, programs=_cdiv(T * d, 4096))
            total += timing(w, 1, end, card).total_s
        out[phase] = total
    return out
