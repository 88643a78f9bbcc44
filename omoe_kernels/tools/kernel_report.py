"""Ahead-of-time resource report of the Triton kernels (no GPU needed).

    python -m omoe_kernels.tools.kernel_report [--arch sm_90a] [--card h200|h100]
        [--only NAME ...] [--launches] [--json out.json]   (defaults: sm_90a, h200)

Compiles every Triton kernel of the `triton` backend in the launch configs it uses by
default (ops/triton/configs.py): the bf16 path at each GPU shape of docs/contract.md §6
(`llama7b`, `llama7b-top2`, `wide`), the fp16 and fp32 GEMMs at llama7b (there dZ builds
G, as a backward op called without the forward's G does), the opt-in
fused shrink, and the grouped forward of a mixed batch of several adapters (bf16, each
shape; registers, spills and MMA only: the GPU model does not cover it yet). Each kernel's arguments, constexprs and options come from the launcher's
own plan (ops/triton/launch.py, `plan_*`), built on meta tensors at the shape and
specialised as Triton specialises a launch. For each it reports registers and spills (`ptxas -v` on the PTX), the
shared memory Triton allocates, static counts of MMA (HGMMA/HMMA/DMMA), SHFL and BAR
instructions in the SASS (`cuobjdump`), and from kernel_model.py the FLOPs it issues vs
those the problem needs, the bytes it must move, and its latency model: programs, CTAs
per SM (registers, shared memory, warps), waves over the SMs, the longest serial loop,
and an estimated time as a (low, high) range naming its bound; then the step's range per
shape against a plain bf16 LoRA of rank E·r modelled the same way. One line per kernel
goes to stderr as it compiles.
`--launches` adds the launch count of one step (launch_count.py, on CPU).

Exits non-zero when a kernel spills or a bf16/fp16 GEMM kernel has no wgmma (`HGMMA`).
fp32 GEMMs run IEEE fp32 (docs/contract.md §2), which tensor cores do not offer, so they
are FMA by design and only checked for spills.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from ..backends import triton_interpreting
from . import kernel_model as M
from . import kernel_steps as S
from .kernel_model import Work
from .kernel_steps import format_steps, latency_dict, with_launch  # noqa: F401  (re-exported)


@dataclass
class KernelSpec:
    name: str          # row label
    fn: object         # the @triton.jit function
    args: dict         # parameter -> type string ("*bf16", "i32", "fp32"; ":16" / ":1" hints) or constexpr value
    num_warps: int
    num_stages: int
    needs_wgmma: bool  # a bf16/fp16 GEMM: must use HGMMA on sm_90a
    note: str = ""
    shape: str = ""    # the docs/contract.md §6 shape it is launched at
    step: str = ""     # "forward"/"backward": in that pass of the default step at `shape`;
                       # "mixed": the grouped forward of a mixed batch of adapters there
    work: Optional[Work] = None   # FLOPs, bytes, roofline estimate at `shape`


@dataclass
class KernelResult:
    spec: KernelSpec
    registers: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1
    hgmma: int = 0
    hmma: int = 0
    dmma: int = 0
    shfl: int = 0      # static counts of SASS instructions
    bar: int = 0
    compile_s: float = 0.0
    error: str = ""
    problems: list = field(default_factory=list)

    def timing(self, card: str = "h200") -> Optional[tuple]:
        """(low, high) kernel_model.Timing of this kernel at its shape, from the CTAs per
        SM its registers, shared memory and warps allow; None without a Work."""
        if self.spec.work is None:
            return None
        ctas = M.ctas_per_sm(self.registers, self.shared, self.spec.num_warps)
        return M.time_range(self.spec.work, ctas, M.CARDS[card])

    def grid(self, card: str = "h200") -> tuple[int, float]:
        """(programs in the launch grid, appended gram programs included; waves of them
        over the card's SMs at this kernel's CTAs per SM)."""
        w = self.spec.work
        programs = w.programs + (w.appended.programs if w.appended else 0)
        ctas = max(1, M.ctas_per_sm(self.registers, self.shared, self.spec.num_warps))
        return programs, programs / (ctas * M.CARDS[card].sms)

    def serial_loop(self) -> tuple[int, str]:
        """(trips, what it walks) of the longest serial loop of one program, the appended
        gram programs' included."""
        w = self.spec.work
        loops = [lp for lp in (w.loop if w else None,
                               w.appended.loop if w and w.appended else None) if lp]
        if not loops:
            return 0, ""
        longest = max(loops, key=lambda lp: lp.trips)
        return longest.trips, longest.over


def _triton_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path}")
    return path


def _ast_source(spec: KernelSpec):
    import triton

    fn = spec.fn
    defaults = {name: p.default for name, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = spec.args[name] if name in spec.args else defaults[name]
        if isinstance(value, str):
            ty, _, hint = value.partition(":")
            if hint == "1":
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = ty
            if hint == "16":
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[name] = value
    return triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def compile_spec(spec: KernelSpec, capability: int, workdir: str) -> KernelResult:
    import triton
    from triton.backends.compiler import GPUTarget

    result = KernelResult(spec)
    start = time.time()
    try:
        compiled = triton.compile(_ast_source(spec), target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    except Exception as exc:  # report the kernel as failed, keep going
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        result.problems.append("compile failed")
        return result
    result.compile_s = time.time() - start
    result.shared = int(getattr(compiled.metadata, "shared", -1))
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    base = os.path.join(workdir, re.sub(r"\W", "_", spec.name))
    with open(base + ".ptx", "w") as f:
        f.write(compiled.asm["ptx"])
    with open(base + ".cubin", "wb") as f:
        f.write(compiled.asm["cubin"])
    ptxas = subprocess.run([_triton_bin("ptxas"), "-v", f"--gpu-name={arch}", base + ".ptx",
                            "-o", base + ".ptxas.cubin"], capture_output=True, text=True)
    info = ptxas.stdout + ptxas.stderr
    m = re.search(r"Used (\d+) registers", info)
    result.registers = int(m.group(1)) if m else -1
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
    if m:
        result.stack, result.spill_stores, result.spill_loads = map(int, m.groups())
    sass = subprocess.run([_triton_bin("cuobjdump"), "--dump-sass", base + ".cubin"],
                          capture_output=True, text=True).stdout
    for name, count in sass_counts(sass).items():
        setattr(result, name, count)
    result.problems += problems(result, capability)
    return result


SASS_PATTERNS = dict(hgmma=r"\bHGMMA\.", hmma=r"\bHMMA\.", dmma=r"\bDMMA\.",
                     shfl=r"\bSHFL\.", bar=r"\bBAR\.")


def sass_counts(sass: str) -> dict[str, int]:
    """Static counts of the instructions kernel_report tracks in a `cuobjdump --dump-sass`
    listing: matrix (HGMMA: wgmma, HMMA: mma.sync, DMMA: fp64), warp shuffles, barriers."""
    return {name: len(re.findall(pattern, sass)) for name, pattern in SASS_PATTERNS.items()}


def problems(result: KernelResult, capability: int) -> list[str]:
    """What is wrong with a compiled kernel: no ptxas report, spills, or (sm_90) a 16-bit
    GEMM without wgmma."""
    found = []
    if result.registers < 0:
        found.append("no ptxas report")
    if result.spill_stores > 0 or result.spill_loads > 0:
        found.append("spills")
    if result.spec.needs_wgmma and capability == 90 and result.hgmma == 0:
        found.append("no wgmma")
    return found


GPU_SHAPES = ("llama7b", "llama7b-top2", "wide")     # docs/contract.md §6


def launch_signature(launch) -> dict:
    """The compile signature of a launcher's `Launch`, as KernelSpec.args: each runtime
    argument specialised by Triton's own rule (pointer/int/float type, divisibility by 16,
    ints equal to 1 as constants) and each constexpr from the launch or the kernel's
    default. The launchers' plans are built from meta tensors, so no GPU is needed."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kernel = launch.kernel
    runtime = [p.name for p in kernel.params if not p.is_constexpr]
    if len(runtime) != len(launch.args):
        raise ValueError(f"{kernel.__name__}: {len(launch.args)} arguments for "
                         f"{len(runtime)} runtime parameters")
    args = {}
    for name, value in zip(runtime, launch.args):
        ty, key = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        if ty == "constexpr":   # Triton folds an int equal to 1 (or None) into the kernel
            args[name] = "i32:1" if value == 1 else value
        else:
            args[name] = ty + (":16" if key == "D" else "")
    for p in kernel.params:
        if p.is_constexpr:
            if p.name not in launch.meta and p.default is inspect.Parameter.empty:
                raise ValueError(f"{kernel.__name__}: the launch gives no {p.name}")
            args[p.name] = launch.meta.get(p.name, p.default)
    return args


def _spec(name: str, launch, needs_wgmma: bool, note: str, shape: str, step: str,
          work: Optional[Work]) -> KernelSpec:
    return KernelSpec(name, launch.kernel, launch_signature(launch), launch.options["num_warps"],
                      launch.options["num_stages"], needs_wgmma, note, shape, step,
                      with_launch(launch, work))


def _h200():
    from ..ops.triton.launch import Target

    return Target(M.H200_SMS)


def _meta(*shape: int, dtype):
    """An unallocated tensor: the plans read only shapes, strides and dtypes."""
    import torch

    return torch.empty(shape, device="meta", dtype=dtype)


def _step_launches(shape, dtype, fuse_token: bool = False, saved_gram: bool = True) -> dict:
    """The launches of one training step at `shape` by name (shrink + G, token_forward,
    expand; dZ (+ G unless `saved_gram`), token_backward, gram_grad, dB, weight_grad, finalize,
    dX): the ops' own plans on meta tensors, orthogonalized, normalized, for an H200."""
    from ..ops.triton import launch as ops

    T, d, E, r = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank
    top_k = shape.top_k or E
    x, base, grad_y = (_meta(T, d, dtype=dtype) for _ in range(3))
    A, B, W = _meta(E, r, d, dtype=dtype), _meta(E, d, r, dtype=dtype), _meta(E, d, dtype=dtype)
    options = (2.0, top_k, True, True, 1e-6)
    forward, (_, h, logits, G) = ops.plan_forward(x, A, B, W, None, base, *options, _h200(),
                                                  fuse_token=fuse_token)
    if fuse_token:
        return forward
    backward, _ = ops.plan_backward(grad_y, x, A, B, W, None, h, logits, *options, _h200(),
                                    G if saved_gram else None)
    return {**forward, **backward}


def _gemm_specs(shape, dtype_name: str, launches: dict, step: bool) -> list[KernelSpec]:
    """The GEMM-side launches of a step at `shape`, each with its Work (kernel_model.py):
    shrink (+ G), expand, dZ (+ G where its launch builds it), dB, [dA; dW], finalize, dX.
    step: they are the default GPU path at this shape (bf16), so they count in the step's
    estimate."""
    T, d, E, r = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank
    shrink = launches["shrink"]
    L = _layout(shape)
    R = E * r
    sixteen = dtype_name != "fp32"
    el = 4 if dtype_name == "fp32" else 2
    unit = f"{dtype_name} MMA" if sixteen else "fp32 FMA"
    note = "" if sixteen else "IEEE fp32: FMA by design"
    tag = f"{dtype_name}, {shape.name}"
    phase = lambda p: p if step else ""  # noqa: E731
    gram = M.gram_work(d, L, el, shrink.meta["GB"])
    specs = [_spec(f"shrink[{tag}] x·[A;W]ᵀ + G", shrink, sixteen, note, shape.name,
                   phase("forward"), M.shrink_work(T, d, L, shrink.config, unit, el, extra=gram))]

    def gemm(label, key, dims, useful, sizes, when, **kw):   # kw: gemm_work's long_k, router_k, ...
        launch = launches[key]
        hi_lo = sixteen and (launch.meta["SPLIT_A"] or launch.meta["SPLIT_B"])
        work = M.gemm_work(*dims, useful, launch.config, unit, *sizes, hi_lo=hi_lo, **kw)
        specs.append(_spec(f"matmul[{tag}] {label}", launch, sixteen, note, shape.name,
                           phase(when), work))

    # Element sizes (a, b, c, add); B_cat, A_cat read in place; Z, dH in fp16 where SCALED_A.
    z_el = {k: 2 if launches[k].meta["SCALED_A"] else 4 for k in ("expand", "dX")}
    gemm("expand base+s·Z·Bᵀ", "expand", (T, d, L.ERP), (T, d, R), (z_el["expand"], el, el, el), "forward")
    dz_g = launches["dZ"].arg("num_gram") > 0   # the backward op called without the forward's G
    gemm("dZ = s·dY·B" + (" + G" if dz_g else " (split-K)"), "dZ", (T, L.ERP, d), (T, R, d), (el, el, 4),
         "backward", extra=gram if dz_g else None, long_k=not dz_g, per_sm=1)
    gemm("dB = s·dYᵀ·Z (split-K)", "dB", (d, L.ERP, T), (d, R, T), (el, 4, 4), "backward",
         long_k=True)
    gemm("dX = dH·A + dL·W", "dX", (T, d, L.ERP), (T, d, R + E), (z_el["dX"], el, el), "backward", router_k=L.EPL)
    wg = launches["weight_grad"]
    specs.append(_spec(
        f"weight_grad[{tag}] [dA;dW]ᵀ = Xᵀ·[dH|dL] (split-K)", wg, sixteen, note, shape.name,
        phase("backward"),
        M.gemm_work(d, L.ERP, T, (d, R + E, T), wg.config, unit, el, 4, 4,
                    hi_lo=sixteen and wg.meta["SPLIT_B"], long_k=True, router_n=L.EPL)))
    fin = launches["finalize"]
    b_splits, a_splits, g_splits = (fin.arg(k) for k in ("b_splits", "a_splits", "g_splits"))
    specs.append(_spec(
        f"finalize[{tag}] grad_B, grad_A, grad_W", fin, False,
        f"splits dB {b_splits}, [dA;dW] {a_splits}, dG {g_splits}", shape.name,
        phase("backward"), M.finalize_work(d, d, L, b_splits, a_splits, g_splits, el)))
    return specs


def _layout(shape):
    from ..ops.triton import launch as ops

    return ops.layout(shape.num_experts, shape.rank)


def _token_specs(shape, launches: dict) -> list[KernelSpec]:
    """The per-token kernels and gram_grad at `shape` (float64 algebra, no MMA)."""
    T, E, r = shape.num_tokens, shape.num_experts, shape.rank
    top_k = shape.top_k or E
    L = _layout(shape)
    label = shape.name
    fwd, bwd, gg = launches["token_forward"], launches["token_backward"], launches["gram_grad"]
    note = f"E={E} r={r} top{top_k}, BT={fwd.config.block_t}"
    block_t = gg.meta["BLOCK_T"]
    return [
        _spec(f"token_forward[{label}]", fwd, False, note, label, "forward",
              M.token_forward_work(T, L, top_k, fwd.config.block_t, fwd.meta["SCALED"])),
        _spec(f"token_backward[{label}]", bwd, False, note, label, "backward",
              M.token_backward_work(T, L, top_k, bwd.config.block_t, bwd.meta["SCALED"], bwd.arg("dz_splits"))),
        _spec(f"gram_grad[{label}]", gg, False, "float64 FMA", label, "backward",
              M.gram_grad_work(T, L, top_k, block_t)),
    ]


def _fused_shrink_specs() -> list[KernelSpec]:
    """The opt-in shrink with the per-token algebra in its epilogue
    (OMOE_TRITON_FUSE_TOKEN=1), at llama7b and wide; not in the step's estimate."""
    import torch

    from ..testing.shapes import SHAPES

    specs = []
    for label in ("llama7b", "wide"):
        shape = SHAPES[label]
        launch = _step_launches(shape, torch.bfloat16, fuse_token=True)["shrink"]
        specs.append(_spec(f"shrink+token[bf16, {label}]", launch, True,
                           f"opt-in OMOE_TRITON_FUSE_TOKEN=1, E={shape.num_experts} r={shape.rank}",
                           label, "", None))
    return specs


MIXED_ADAPTERS = 4


def _mixed_specs() -> list[KernelSpec]:
    """The grouped forward of a mixed batch (omoe_kernels/mixed.py, triton) at each GPU
    shape, bf16: T split evenly over MIXED_ADAPTERS adapters, each segment padded; their
    Work (kernel_model.mixed_forward_works) makes step_estimates' "mixed" estimate."""
    import torch

    from ..ops.triton import mixed_launch as MX
    from ..testing.shapes import SHAPES

    specs, N, target = [], MIXED_ADAPTERS, _h200()
    for label in GPU_SHAPES:
        shape = SHAPES[label]
        T, d, E, r, k = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank, shape.top_k
        L, dtype = _layout(shape), torch.bfloat16
        seg = MX.segment_length(_bf16_kind(), L.ERP, target)
        P = N * -(-T // (N * seg)) * seg
        rows = MX.SegmentRows(_meta(P, dtype=torch.int64), _meta(P // seg, dtype=torch.int32), seg)
        launches, _ = MX.plan_mixed_forward(
            _meta(T, d, dtype=dtype), _meta(N, E, r, d, dtype=dtype), _meta(N, E, d, r, dtype=dtype),
            _meta(N, E, d, dtype=dtype), None, _meta(T, d, dtype=dtype),
            _meta(N, dtype=torch.float32), rows, k or E, True, True, 1e-6, target)
        note = f"{N} adapters, E={E} r={r} top{k or E}, SEG={seg}"
        works = M.mixed_forward_works(T, P, d, L, N, k or E, launches["shrink"].config,
                                      launches["expand"].config,
                                      launches["token_forward"].config.block_t, 2,
                                      launches["shrink"].meta["GB"])
        for key, wgmma in (("shrink", True), ("token_forward", False), ("expand", True)):
            specs.append(_spec(f"mixed_{key}[bf16, {label}]", launches[key], wgmma, note,
                               label, S.MIXED, works[key]))
    return specs


def _bf16_kind() -> int:
    from ..ops.triton import configs

    return configs.DOT_BF16


def kernel_specs() -> list[KernelSpec]:
    """Every kernel in the launch config the `triton` backend uses on a GPU by default
    (ops/triton/configs.py, which the launchers read too): the bf16 path at each GPU
    shape of docs/contract.md §6, the fp16 and fp32 GEMMs at llama7b, and the opt-in
    fused shrink."""
    import torch

    from ..testing.shapes import SHAPES

    specs = []
    for name in GPU_SHAPES:
        shape = SHAPES[name]
        launches = _step_launches(shape, torch.bfloat16)
        specs += _gemm_specs(shape, "bf16", launches, step=True)
        specs += _token_specs(shape, launches)
    for dtype_name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        shape = SHAPES["llama7b"]   # the backward op called without G: dZ builds it
        specs += _gemm_specs(shape, dtype_name, _step_launches(shape, dtype, False, False), step=False)
    specs += _fused_shrink_specs()
    specs += _mixed_specs()
    return specs


def select_specs(specs: list[KernelSpec], names: list[str] | None) -> list[KernelSpec]:
    """The specs whose name contains one of `names` (all when none given); a name that
    matches nothing raises SystemExit listing the valid kernel names."""
    if not names:
        return specs
    unknown = [n for n in names if not any(n in s.name for s in specs)]
    if unknown:
        valid = "\n  ".join(s.name for s in specs)
        raise SystemExit(f"kernel_report: --only {' '.join(map(repr, unknown))} matches no kernel. "
                         f"Give substrings of these names:\n  {valid}")
    return [s for s in specs if any(n in s.name for n in names)]


def _compile_key(spec: KernelSpec) -> tuple:
    return (spec.fn.__name__, tuple(sorted((k, str(v)) for k, v in spec.args.items())),
            spec.num_warps, spec.num_stages)


def run_report(arch: str, names: list[str] | None = None) -> list[KernelResult]:
    """Compile the selected specs; a kernel compiled identically at another shape (same
    arguments and config) is compiled once and its results reused."""
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise SystemExit(f"--arch must look like sm_90a, got {arch!r}")
    capability = int(m.group(1))
    specs = select_specs(kernel_specs(), names)
    compiled: dict[tuple, KernelResult] = {}
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for index, spec in enumerate(specs, 1):
            key = _compile_key(spec)
            if key not in compiled:
                print(f"kernel_report: [{index}/{len(specs)}] compiling {spec.name}",
                      file=sys.stderr, flush=True)
                compiled[key] = compile_spec(spec, capability, workdir)
            else:
                print(f"kernel_report: [{index}/{len(specs)}] {spec.name}: same as compiled",
                      file=sys.stderr, flush=True)
            results.append(replace(compiled[key], spec=spec, problems=list(compiled[key].problems)))
    return results


def _fmt_work(w: Optional[Work]) -> tuple[str, str]:
    if w is None:
        return "-", "-"
    ratio = f"{w.flops_issued / 1e9:.2f}/{w.flops_useful / 1e9:.2f} ({w.issued_per_useful:.1f}×)"
    return ratio, f"{w.bytes / 1e6:.1f}"


def format_table(results: list[KernelResult], arch: str, card: str = "h200") -> str:
    head = ["kernel", "warps", "regs", "spill st/ld", "smem KiB", "MMA", "SHFL", "BAR",
            "GFLOP issued/useful", "MB", "programs", "CTAs/SM", "waves", "serial loop",
            "est µs (bound)", "status", "note"]
    rows = []
    for r in results:
        s = r.spec
        status = "ok" if not r.problems else ", ".join(r.problems)
        if r.error:
            status += f" ({r.error})"
        mma = r.hgmma + r.hmma + r.dmma
        rows.append([s.name, str(s.num_warps), str(r.registers), f"{r.spill_stores}/{r.spill_loads}",
                     f"{r.shared / 1024:.1f}" if r.shared >= 0 else "-", str(mma), str(r.shfl),
                     str(r.bar), *_fmt_work(s.work), *S.fmt_latency(r, card), status, s.note])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [f"Triton kernels, ahead-of-time for {arch} (triton {__import__('triton').__version__}); "
           "MMA/SHFL/BAR: static SASS instruction counts; GFLOP, MB, programs, waves and est µs: "
           f"ESTIMATE on an {M.CARDS[card].name} at the kernel's shape (kernel_model.py; est µs = "
           "low–high of max(FLOPs, bytes, latency) + launch gap, bound at the high end)",
           line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


# The static targets (docs/contract.md §5, bench/NOTES.md): no tensor-core work wasted, no shuffles in the per-token algebra.
MAX_ISSUED_PER_USEFUL = 1.3
# The kernels whose loops run over experts and ranks per token (gram_grad reduces over
# tokens, where a cross-lane sum is expected).
PER_TOKEN_KERNELS = ("token_forward", "token_backward")


def target_misses(results: list[KernelResult]) -> dict[str, list[str]]:
    """The kernels that miss the static targets (informational: the exit status
    does not depend on them yet): GEMMs issuing more than 1.3× the useful MMA FLOPs, and
    per-token kernels with SHFL instructions."""
    gemms = [f"{r.spec.name} ({r.spec.work.issued_per_useful:.1f}×)" for r in results
             if r.spec.work and r.spec.work.unit.endswith("MMA")
             and r.spec.work.issued_per_useful > MAX_ISSUED_PER_USEFUL]
    shuffles = [f"{r.spec.name} ({r.shfl})" for r in results
                if r.spec.name.startswith(PER_TOKEN_KERNELS) and r.shfl > 0]
    return dict(mma_issued_over_useful=gemms, per_token_shfl=shuffles)


def step_estimates(results: list[KernelResult], cards=("h200", "h100")) -> dict:
    """kernel_steps.step_estimates over every kernel of the report."""
    return S.step_estimates(results, kernel_specs(), cards)


def result_dict(r: KernelResult, card: str = "h200") -> dict:
    return dict(**latency_dict(r, card),
                name=r.spec.name, shape=r.spec.shape, step=r.spec.step, num_warps=r.spec.num_warps,
                num_stages=r.spec.num_stages, registers=r.registers, spill_stores=r.spill_stores,
                spill_loads=r.spill_loads, stack=r.stack, shared=r.shared, hgmma=r.hgmma, hmma=r.hmma,
                dmma=r.dmma, shfl=r.shfl, bar=r.bar, compile_s=round(r.compile_s, 2),
                work=r.spec.work.as_dict() if r.spec.work else None, problems=r.problems, error=r.error)


def count_launches_json() -> dict:
    """launch_count's step counts (triton and cpu backends), run in a child process with
    TRITON_INTERPRET=1 (the interpreter must be on before triton is imported)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "omoe_kernels.tools.launch_count", "--backends",
                           "triton,cpu", "--json", "-"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kernel_report --launches: launch_count failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omoe_kernels.tools.kernel_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a",
                        help="target, e.g. sm_90a (Hopper) or sm_80 (default: %(default)s)")
    parser.add_argument("--card", default="h200", choices=sorted(M.CARDS),
                        help="the card of the per-kernel estimates (default: %(default)s)")
    parser.add_argument("--only", nargs="*", help="substrings of kernel names to compile")
    parser.add_argument("--launches", action="store_true",
                        help="also count one step's launches on CPU (omoe_kernels.tools.launch_count)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if triton_interpreting():
        print("kernel_report: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    results = run_report(args.arch, args.only)
    steps = step_estimates(results)
    print(format_table(results, args.arch, args.card))
    if steps:
        print("\n" + format_steps(steps))
    misses = target_misses(results)
    for what, names in (("MMA issued > 1.3× useful", misses["mma_issued_over_useful"]),
                        ("SHFL in per-token kernels", misses["per_token_shfl"])):
        if names:
            print(f"\nstatic target missed, {what} ({len(names)}): " + "; ".join(names))
    launches = None
    if args.launches:

        launches = count_launches_json()
        print(f"\nLaunches of one step on CPU (T={launches['num_tokens']}, "
              "Triton interpreted + ATen ops that would launch on a GPU):")
        for s in launches["steps"]:
            print(f"  {s['backend']:7s} {s['routing']:6s} " + ", ".join(
                f"{phase} {s[phase]['total']} ({s[phase]['triton']} triton)"
                for phase in ("forward", "backward", "no_grad_forward")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(arch=args.arch, card=args.card,
                           kernels=[result_dict(r, args.card) for r in results],
                           steps=steps, target_misses=misses, launches=launches,
                           ceilings=dict(copy_bytes_per_s=M.COPY_BYTES_PER_S, peak_flops=M.PEAK_FLOPS),
                           calibration=dict(M.CALIBRATION, cards={k: vars(v) for k, v in M.CARDS.items()})),
                      f, indent=1)
    bad = [r for r in results if r.problems]
    if bad:
        print(f"FAIL: {len(bad)} kernel(s): " + "; ".join(f"{r.spec.name}: {', '.join(r.problems)}"
                                                       for r in bad), file=sys.stderr)
        return 1
    print(f"OK: {len(results)} kernels, no spills, every 16-bit GEMM uses wgmma")
    return 0


if __name__ == "__main__":
    sys.exit(main())
