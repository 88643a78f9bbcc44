"""Ahead-of-time resource report of the Triton kernels (no GPU needed).

    python -m omoe_kernels.tools.kernel_report --arch sm_90a [--only NAME ...] [--launches] [--json out.json]

Compiles every Triton kernel of the `triton` backend in the launch configs it uses by
default (ops/triton/configs.py): the bf16 path at each GPU shape of docs/contract.md §6
(`llama7b`, `llama7b-top2`, `wide`), the fp16 and fp32 GEMMs at llama7b, and the opt-in
fused shrink. For each it reports registers and spills (`ptxas -v` on the PTX), the
shared memory Triton allocates, static counts of MMA (HGMMA/HMMA/DMMA), SHFL and BAR
instructions in the SASS (`cuobjdump`), and from kernel_model.py the FLOPs it issues vs
those the problem needs, the bytes it must move, and a roofline ESTIMATE of its H200 time;
then the summed estimate of a step per shape against a plain bf16 LoRA of rank E·r.
`--launches` adds the launch count of one step (launch_count.py, on CPU).

Exits non-zero when a kernel spills or a bf16/fp16 GEMM kernel has no wgmma (`HGMMA`).
fp32 GEMMs run IEEE fp32 (docs/contract.md §2), which tensor cores do not offer, so they
are FMA by design and only checked for spills.
"""
from __future__ import annotations

import argparse
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
from .kernel_model import Work


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
    step: str = ""     # "forward"/"backward": in that pass of the default step at `shape`
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


def _triton_bin(tool: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{tool} not found at {path}")
    return path


def _ast_source(spec: KernelSpec):
    import inspect

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


def _gemm_specs(shape, dtype_name: str, kind: int, step: bool) -> list[KernelSpec]:
    """The GEMM-side launches of a step at `shape` in the launchers' configs, each with its
    Work (kernel_model.py): shrink (+ G), expand, dZ (+ G), dB, [dA; dW], finalize, dX.
    step: they are the default GPU path at this shape (bf16), so they count in the step's
    estimate."""
    from ..ops.triton import configs as C
    from ..ops.triton import gemm_kernels as K
    from ..ops.triton import launch as ops

    T, d, E, r = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank
    L = ops.layout(E, r)
    R = E * r
    ptr = f"*{dtype_name}:16"
    f32 = "*fp32:16"
    sixteen = kind in C.SIXTEEN_BIT_KINDS
    el = 4 if dtype_name == "fp32" else 2
    unit = f"{dtype_name} MMA" if sixteen else "fp32 FMA"
    note = "" if sixteen else "IEEE fp32: FMA by design"
    tag = f"{dtype_name}, {shape.name}"
    split = lambda bf16_flag: C.b_operand_split(kind, bf16_flag)  # noqa: E731
    a_operand = lambda mode: {k.upper(): v for k, v in C.a_operand_flags(kind, mode).items()}  # noqa: E731
    gram = M.gram_work(d, L, el, C.GRAM_TILE)
    i32, i16, one = "i32", "i32:16", "i32:1"

    def hint(v: int) -> str:   # what the launcher specializes a stride of value v to
        return one if v == 1 else (i16 if v % 16 == 0 else i32)

    s_dr, s_r, s_d = hint(d * r), hint(r), hint(d)   # strides of A [E, r, d] and B [E, d, r]
    cfg = C.shrink_default_config(kind, L.ERP)
    specs = [KernelSpec(
        f"shrink[{tag}] x·[A;W]ᵀ + G", K.shrink_kernel,
        dict(x_ptr=ptr, r_ptr=ptr, a_ptr=ptr, w_ptr=ptr, h_ptr=f32, l_ptr=f32, b_ptr=ptr,
             gram_ptr="*fp64:16", T=i16, D=i16, N=i16, E=i32, rank=i32, d_out=i16, num_gram=i32,
             t_bucket=i32, stride_xt=i16, stride_xd=one, stride_rt=i16, stride_rd=one,
             stride_ae=s_dr, stride_ar=s_d, stride_ad=one, stride_we=i16, stride_wd=one,
             stride_ht=i16, stride_lt=hint(E), stride_be=s_dr, stride_bd=s_r, stride_br=one,
             g_ptr=f32, z_ptr=f32, top_k=i32, eps="fp32", stride_zt=i32,
             SEPARATE_ROUTER=False, DOT_KIND=kind, UPCAST=False, BLOCK_M=cfg["BLOCK_M"],
             BLOCK_N=cfg["BLOCK_N"], BLOCK_E=L.EPL, BLOCK_K=cfg["BLOCK_K"], GB=C.GRAM_TILE,
             RP=L.RP, ERP=L.ERP),
        cfg["num_warps"], cfg["num_stages"], sixteen, note, shape.name,
        "forward" if step else "", M.shrink_work(T, d, L, cfg, unit, el, extra=gram))]

    def gemm(label, a_ptr, b_ptr, c_ptr, a_strides, b_strides, dims, useful, flags, sizes,
             phase, long_k=False, router_k=0, extra=None, a2_ptr=f32, b2_ptr=ptr):
        Mdim, Ndim, Kdim = dims
        cfg = C.matmul_default_config(kind, Ndim, flags.get("FP16_A", False))
        hi_lo = flags.get("SPLIT_A", False) or flags.get("SPLIT_B", False)
        work = M.gemm_work(Mdim, Ndim, Kdim, useful, cfg, unit, *sizes, hi_lo=hi_lo and sixteen,
                           long_k=long_k, router_k=router_k, extra=extra)
        args = dict(a_ptr=a_ptr, b_ptr=b_ptr, c_ptr=c_ptr, add_ptr=ptr, a2_ptr=a2_ptr,
                    b2_ptr=b2_ptr, c2_ptr=ptr, gram_ptr="*fp64:16", M=i16, N=i16, K=i16,
                    k_per_split=i16, E=i32, rank=i32, d_out=i16, num_gram=i32, m_bucket=i32,
                    n_bucket=i32, k_bucket=i32, stride_am=a_strides[0], stride_ak=a_strides[1],
                    stride_bk=b_strides[0], stride_bn=b_strides[1], stride_b_expert=b_strides[2],
                    stride_cs=i16, stride_cm=i16, stride_cn=one, stride_addm=i16, stride_addn=one,
                    stride_a2m=i16, stride_a2k=one, stride_b2k=i16, stride_b2n=one,
                    stride_c2m=i16, stride_c2n=one, stride_ge=s_dr, stride_gd=s_r, stride_gr=one,
                    scale="fp32", HAS_ADD=False, SPLIT_A=False, SPLIT_B=False, FP16_A=False, DOT_KIND=kind,
                    UPCAST=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], BLOCK_E=L.EPL, RP=L.RP,
                    ERP=L.ERP, GB=C.GRAM_TILE)
        args.update(flags)
        specs.append(KernelSpec(f"matmul[{tag}] {label}", K.matmul_kernel, args,
                                cfg["num_warps"], cfg["num_stages"], sixteen, note, shape.name,
                                phase if step else "", work))

    row, col = (i16, one), (one, i16)
    # (element sizes: a, b, c, add). B_cat and A_cat are read in place from [E, d, r] / [E, r, d].
    gemm("expand base+s·Z·Bᵀ", f32, ptr, ptr, row, (one, s_r, s_dr), (T, d, L.ERP), (T, d, R),
         dict(HAS_ADD=True, **a_operand(C.EXPAND_Z), PACKED_BK=True), (4, el, el, el),
         "forward")
    gemm("dZ = s·dY·B + G", ptr, ptr, f32, row, (s_r, one, s_dr), (T, L.ERP, d), (T, R, d),
         dict(PACKED_BN=True, WITH_GRAM=True), (el, el, 4), "backward", extra=gram)
    gemm("dB = s·dYᵀ·Z (split-K)", ptr, f32, f32, col, (i16, one, i32), (d, L.ERP, T), (d, R, T),
         dict(SPLIT_B=split(C.SPLIT_DB)), (el, 4, 4), "backward", long_k=True)
    gemm("dX = dH·A + dL·W", f32, ptr, ptr, row, (s_d, one, s_dr), (T, d, L.ERP), (T, d, R + E),
         dict(**a_operand(C.DX_DH), PACKED_BK=True, ROUTER=1), (4, el, el), "backward",
         router_k=L.EPL)
    wcfg = C.weight_grad_config(kind, L.ERP)
    wsplit = split(C.SPLIT_DAW)
    specs.append(KernelSpec(
        f"weight_grad[{tag}] [dA;dW]ᵀ = Xᵀ·[dH|dL] (split-K)", K.weight_grad_kernel,
        dict(x_ptr=ptr, r_ptr=ptr, dh_ptr=f32, dl_ptr=f32, out_ptr=f32, T=i16, D=i16, N=i16,
             E=i32, k_per_split=i16, t_bucket=i32, stride_xt=i16, stride_xd=one, stride_rt=i16,
             stride_rd=one, stride_dht=i16, stride_dlt=i16, stride_os=i16, stride_od=i16,
             SEPARATE_ROUTER=False, SPLIT_B=wsplit, DOT_KIND=kind, UPCAST=False,
             BLOCK_M=wcfg["BLOCK_M"], BLOCK_N=wcfg["BLOCK_N"], BLOCK_E=L.EPL, BLOCK_K=wcfg["BLOCK_K"]),
        wcfg["num_warps"], wcfg["num_stages"], sixteen, note, shape.name, "backward" if step else "",
        M.gemm_work(d, L.ERP, T, (d, R + E, T), wcfg, unit, el, 4, 4, hi_lo=wsplit and sixteen,
                    long_k=True, router_n=L.EPL)))
    b_splits = M.split_k(d, L.ERP, T, C.matmul_default_config(kind, L.ERP))[0]
    a_splits = M.split_k(d, L.ERP, T, wcfg)[0]
    g_splits = M.gram_grad_splits(T, L, C.gram_grad_block(L, (shape.top_k or E) < E))
    fin = C.FINALIZE
    specs.append(KernelSpec(
        f"finalize[{tag}] grad_B, grad_A, grad_W", K.finalize_grads_kernel,
        dict(pb_ptr=f32, pa_ptr=f32, pg_ptr="*fp64:16", b_ptr=ptr, grad_b_ptr=ptr, grad_a_ptr=ptr,
             grad_w_ptr=ptr, b_splits=i32, a_splits=i32, g_splits=i32, d_out=i16, d_in=i16,
             E=i32, rank=i32, b_programs=i32, stride_be=s_dr, stride_bd=s_r, stride_br=one,
             stride_gbe=s_dr, stride_gbd=s_r, stride_gbr=one, stride_gae=s_dr, stride_gar=s_d,
             stride_gad=one, stride_gwe=i16, stride_gwd=one, ORTHOGONALIZE=True, RP=L.RP,
             ERP=L.ERP, NW=L.NW, BLOCK_R=fin["BLOCK_R"], BLOCK_C=fin["BLOCK_C"],
             BLOCK_G=fin["BLOCK_G"]),
        fin["num_warps"], C.TOKEN_STAGES, False, f"splits dB {b_splits}, [dA;dW] {a_splits}, dG {g_splits}",
        shape.name, "backward" if step else "",
        M.finalize_work(d, d, L, b_splits, a_splits, g_splits, el)))
    return specs


def _token_specs(shape) -> list[KernelSpec]:
    """The per-token kernels and gram_grad at `shape` (float64 algebra, no MMA)."""
    from ..ops.triton import configs as C
    from ..ops.triton import gemm_kernels as K
    from ..ops.triton import launch as ops

    T, E, r = shape.num_tokens, shape.num_experts, shape.rank
    top_k = shape.top_k or E
    L = ops.layout(E, r)
    flags = C.token_flags(L, top_k, True, True)
    num_warps = flags.pop("num_warps")
    bwd_flags = C.token_flags(L, top_k, True, True, backward=True)
    bwd_warps = bwd_flags.pop("num_warps")
    label = shape.name
    block_t = C.gram_grad_block(L, flags["TOP_K_ROUTING"])
    return [
        KernelSpec(
            f"token_forward[{label}]", K.token_forward_kernel,
            dict(h_ptr="*fp32:16", l_ptr="*fp32:16", g_ptr="*fp64:16", z_ptr="*fp32:16", T="i32",
                 E="i32", top_k="i32", eps="fp32", stride_ht="i32:16", stride_lt="i32", stride_zt="i32:16", **flags),
            num_warps, C.TOKEN_STAGES, False, f"E={E} r={r} top{top_k}, BT={flags['BT']}", label,
            "forward", M.token_forward_work(T, L, top_k, flags["BT"])),
        KernelSpec(
            f"token_backward[{label}]", K.token_backward_kernel,
            dict(h_ptr="*fp32:16", l_ptr="*fp32:16", g_ptr="*fp64:16", dz_ptr="*fp32:16",
                 z_ptr="*fp32:16", dhl_ptr="*fp32:16", ds_ptr="*fp64:16", slots_ptr="*i32:16",
                 T="i32", E="i32", top_k="i32", eps="fp32",
                 stride_ht="i32:16", stride_lt="i32", stride_dzt="i32:16", stride_zt="i32:16",
                 stride_dhlt="i32:16", EPL=L.EPL, **bwd_flags),
            bwd_warps, C.TOKEN_STAGES, False, f"E={E} r={r} top{top_k}, BT={bwd_flags['BT']}", label,
            "backward", M.token_backward_work(T, L, top_k, bwd_flags["BT"])),
        KernelSpec(
            f"gram_grad[{label}]", K.gram_grad_kernel,
            dict(h_ptr="*fp32:16", ds_ptr="*fp64:16", slots_ptr="*i32:16", out_ptr="*fp64:16",
                 T="i32", E="i32", tokens_per_split="i32:16", stride_ht="i32:16",
                 TOP_K_ROUTING=flags["TOP_K_ROUTING"], KP=flags["KP"], RP=L.RP, ERP=L.ERP,
                 BLOCK_T=block_t),
            C.GRAM_GRAD_WARPS, C.TOKEN_STAGES, False, "float64 FMA", label, "backward",
            M.gram_grad_work(T, L, top_k, block_t)),
    ]


def _fused_shrink_specs(base: KernelSpec) -> list[KernelSpec]:
    """The opt-in shrink with the per-token algebra in its epilogue
    (OMOE_TRITON_FUSE_TOKEN=1), at llama7b and wide; not in the step's estimate."""
    from ..ops.triton import configs as C
    from ..ops.triton import launch as ops

    specs = []
    for E, r, top_k, label in ((4, 16, 4, "llama7b"), (16, 8, 2, "wide")):
        L = ops.layout(E, r)
        cfg = C.shrink_default_config(C.DOT_BF16, L.ERP, fuse_token=True)
        flags = C.token_flags(L, top_k, True, True)
        flags.pop("num_warps")
        specs.append(KernelSpec(
            f"shrink+token[bf16, {label}]", base.fn,
            dict(base.args, g_ptr="*fp64:16", z_ptr="*fp32:16", stride_zt="i32:16",
                 N="i32:16", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_E=L.EPL, BLOCK_K=cfg["BLOCK_K"], FUSE_TOKEN=True,
                 **{**flags, "RP": L.RP, "ERP": L.ERP}),
            cfg["num_warps"], cfg["num_stages"], True, f"opt-in OMOE_TRITON_FUSE_TOKEN=1, E={E} r={r}",
            label))
    return specs


def kernel_specs() -> list[KernelSpec]:
    """Every kernel in the launch config the `triton` backend uses on a GPU by default
    (ops/triton/configs.py, which the launchers read too): the bf16 path at each GPU
    shape of docs/contract.md §6, the fp16 and fp32 GEMMs at llama7b, and the opt-in
    fused shrink."""
    from ..ops.triton import configs as C
    from ..testing.shapes import SHAPES

    specs = []
    for name in GPU_SHAPES:
        shape = SHAPES[name]
        specs += _gemm_specs(shape, "bf16", C.DOT_BF16, step=True)
        specs += _token_specs(shape)
    for dtype_name, kind in (("fp16", C.DOT_FP16), ("fp32", C.DOT_FP32_IEEE)):
        specs += _gemm_specs(SHAPES["llama7b"], dtype_name, kind, step=False)
    specs += _fused_shrink_specs(specs[0])
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
        for spec in specs:
            key = _compile_key(spec)
            if key not in compiled:
                compiled[key] = compile_spec(spec, capability, workdir)
            results.append(replace(compiled[key], spec=spec, problems=list(compiled[key].problems)))
    return results


def _fmt_work(w: Optional[Work]) -> tuple[str, str, str]:
    if w is None:
        return "-", "-", "-"
    ratio = f"{w.flops_issued / 1e9:.2f}/{w.flops_useful / 1e9:.2f} ({w.issued_per_useful:.1f}×)"
    return ratio, f"{w.bytes / 1e6:.1f}", f"{w.estimate_s * 1e6:.1f} ({w.bound[0]})"


def format_table(results: list[KernelResult], arch: str) -> str:
    head = ["kernel", "warps", "regs", "spill st/ld", "smem KiB", "MMA", "SHFL", "BAR",
            "GFLOP issued/useful", "MB", "est µs", "status", "note"]
    rows = []
    for r in results:
        s = r.spec
        status = "ok" if not r.problems else ", ".join(r.problems)
        if r.error:
            status += f" ({r.error})"
        mma = r.hgmma + r.hmma + r.dmma
        rows.append([s.name, str(s.num_warps), str(r.registers), f"{r.spill_stores}/{r.spill_loads}",
                     f"{r.shared / 1024:.1f}" if r.shared >= 0 else "-", str(mma), str(r.shfl),
                     str(r.bar), *_fmt_work(s.work), status, s.note])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [f"Triton kernels, ahead-of-time for {arch} (triton {__import__('triton').__version__}); "
           "MMA/SHFL/BAR: static SASS instruction counts; GFLOP, MB and est µs: H200 roofline "
           "ESTIMATE at the kernel's shape (kernel_model.py; (b)/(f): bound by bytes/FLOPs)",
           line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def step_estimates(results: list[KernelResult]) -> dict:
    """Per GPU shape: the summed roofline estimate of the kernels of a default bf16 step
    (forward, backward) against a plain bf16 LoRA of rank E·r modelled the same way.
    Only shapes whose step kernels were all selected are summed."""
    from ..testing.shapes import SHAPES

    out = {}
    all_specs = kernel_specs()
    for name in GPU_SHAPES:
        in_step = [r for r in results if r.spec.shape == name and r.spec.step and r.spec.work]
        if len(in_step) != sum(1 for s in all_specs if s.shape == name and s.step):
            continue
        shape = SHAPES[name]
        lora = M.plain_lora_works(shape.num_tokens, shape.d_model, shape.num_experts * shape.rank)
        entry = {}
        for phase in ("forward", "backward"):
            works = [r.spec.work for r in in_step if r.spec.step == phase]
            entry[phase] = dict(omoe_us=sum(w.estimate_s for w in works) * 1e6,
                                omoe_mb=sum(w.bytes for w in works) / 1e6,
                                lora_us=sum(w.estimate_s for _, w in lora[phase]) * 1e6,
                                lora_mb=sum(w.bytes for _, w in lora[phase]) / 1e6,
                                kernels=len(works))
        total = lambda key: entry["forward"][key] + entry["backward"][key]
        entry["fwd+bwd"] = dict(omoe_us=total("omoe_us"), lora_us=total("lora_us"),
                                ratio=total("omoe_us") / total("lora_us"))
        out[name] = entry
    return out


def format_steps(steps: dict) -> str:
    if not steps:
        return ""
    lines = ["Step ESTIMATE on an H200 (roofline sums of the step's Triton kernels; torch glue, "
             "launch gaps and host time left out) vs a plain bf16 LoRA of rank E·r, same model:",
             "| shape | fwd µs OMoE / LoRA | bwd µs OMoE / LoRA | fwd+bwd µs OMoE / LoRA | ratio |",
             "|---|---|---|---|---|"]
    for name, e in steps.items():
        f, b, t = e["forward"], e["backward"], e["fwd+bwd"]
        lines.append(f"| {name} | {f['omoe_us']:.1f} / {f['lora_us']:.1f} | {b['omoe_us']:.1f} / "
                     f"{b['lora_us']:.1f} | {t['omoe_us']:.1f} / {t['lora_us']:.1f} | {t['ratio']:.2f}× |")
    return "\n".join(lines)


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


def result_dict(r: KernelResult) -> dict:
    return dict(name=r.spec.name, shape=r.spec.shape, step=r.spec.step, num_warps=r.spec.num_warps,
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="target, e.g. sm_90a (Hopper) or sm_80")
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
    print(format_table(results, args.arch))
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
            json.dump(dict(arch=args.arch, kernels=[result_dict(r) for r in results],
                           steps=steps, target_misses=misses, launches=launches,
                           ceilings=dict(copy_bytes_per_s=M.COPY_BYTES_PER_S, peak_flops=M.PEAK_FLOPS)),
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
