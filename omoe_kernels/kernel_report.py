"""Ahead-of-time resource report of the Triton kernels (no GPU needed).

    python -m omoe_kernels.kernel_report --arch sm_90a [--json out.json]

Compiles every Triton kernel of the `triton` backend in the launch configs it uses by
default (at the llama7b layout, E=4 r=16, and for the per-token kernels also at E=8
and E=16 r=8), runs `ptxas -v` on the PTX for registers and spills, reads the shared
memory Triton allocates, and counts matrix instructions in the SASS (`cuobjdump`).
Prints a table and exits non-zero when a kernel spills or a bf16/fp16 GEMM kernel has no
wgmma (`HGMMA`). fp32 GEMMs run IEEE fp32 (docs/contract.md §2), which tensor cores do not offer, so
they are FMA by design and only checked for spills.
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
from dataclasses import dataclass, field


@dataclass
class KernelSpec:
    name: str          # row label
    fn: object         # the @triton.jit function
    args: dict         # parameter -> type string ("*bf16", "i32", "fp32"; ":16" / ":1" hints) or constexpr value
    num_warps: int
    num_stages: int
    needs_wgmma: bool  # a bf16/fp16 GEMM: must use HGMMA on sm_90a
    note: str = ""


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
    result.hgmma = len(re.findall(r"\bHGMMA\b", sass))
    result.hmma = len(re.findall(r"\bHMMA\b", sass))
    result.dmma = len(re.findall(r"\bDMMA\b", sass))
    result.problems += problems(result, capability)
    return result


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


def kernel_specs() -> list[KernelSpec]:
    """Every kernel in the launch config the `triton` backend uses on a GPU by default
    (ops/triton_configs.py, which the launchers read too)."""
    from .ops import triton_configs as C
    from .ops import triton_kernels as K
    from .ops import triton_omoe as ops

    specs = []
    d = 4096                       # d_in = d_out
    for dtype_name, kind in (("bf16", C.DOT_BF16), ("fp16", C.DOT_FP16), ("fp32", C.DOT_FP32_IEEE)):
        ptr = f"*{dtype_name}:16"
        sixteen = kind in C.SIXTEEN_BIT_KINDS
        L = ops.layout(4, 16)
        cfg = C.shrink_default_config(kind, L.ERP)
        specs.append(KernelSpec(
            f"shrink[{dtype_name}] x·[A;W]ᵀ", K.shrink_kernel,
            dict(x_ptr=ptr, r_ptr=ptr, a_ptr=ptr, w_ptr=ptr, h_ptr="*fp32:16", l_ptr="*fp32:16",
                 T="i32:16", D="i32:16", N="i32:16", E="i32", stride_xt="i32:16", stride_xd="i32:1",
                 stride_rt="i32:16", stride_rd="i32:1", stride_an="i32:16", stride_ad="i32:1",
                 stride_we="i32:16", stride_wd="i32:1", stride_ht="i32:16", stride_lt="i32",
                 g_ptr="*fp32:16", z_ptr="*fp32:16", top_k="i32", eps="fp32", stride_zt="i32",
                 SEPARATE_ROUTER=False, DOT_KIND=kind, UPCAST=False, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], BLOCK_E=L.EPL, BLOCK_K=cfg["BLOCK_K"]),
            cfg["num_warps"], cfg["num_stages"], sixteen,
            "" if sixteen else "IEEE fp32: FMA by design"))
        if kind == C.DOT_BF16:
            # The opt-in variant with the per-token algebra in the epilogue
            # (OMOE_TRITON_FUSE_TOKEN=1), at llama7b and wide.
            for E, r, top_k, label in ((4, 16, 4, "llama7b"), (16, 8, 2, "wide")):
                Lf = ops.layout(E, r)
                cfg = C.shrink_default_config(kind, Lf.ERP, fuse_token=True)
                flags = C.token_flags(Lf, top_k, True, True)
                flags.pop("num_warps")
                specs.append(KernelSpec(
                    f"shrink+token[{dtype_name}, {label}]", K.shrink_kernel,
                    dict(specs[-1].args, g_ptr="*fp64:16", z_ptr="*fp32:16", stride_zt="i32:16",
                         N="i32:16", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_E=Lf.EPL, BLOCK_K=cfg["BLOCK_K"], FUSE_TOKEN=True, **flags),
                    cfg["num_warps"], cfg["num_stages"], True,
                    f"opt-in OMOE_TRITON_FUSE_TOKEN=1, E={E} r={r}"))

        def gemm(label, a_ptr, b_ptr, c_ptr, a_strides, b_strides, N, has_add, split_a, split_b):
            cfg = C.matmul_default_config(kind, N)
            specs.append(KernelSpec(
                f"matmul[{dtype_name}] {label}", K.matmul_kernel,
                dict(a_ptr=a_ptr, b_ptr=b_ptr, c_ptr=c_ptr, add_ptr=ptr, M="i32:16", N="i32:16",
                     K="i32:16", k_per_split="i32:16", stride_am=a_strides[0], stride_ak=a_strides[1],
                     stride_bk=b_strides[0], stride_bn=b_strides[1], stride_cs="i32:16",
                     stride_cm="i32:16", stride_cn="i32:1", stride_addm="i32:16", stride_addn="i32:1",
                     scale="fp32", HAS_ADD=has_add, SPLIT_A=split_a and sixteen,
                     SPLIT_B=split_b and sixteen, DOT_KIND=kind, UPCAST=False,
                     BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                     GROUP_M=cfg["GROUP_M"]),
                cfg["num_warps"], cfg["num_stages"], sixteen,
                "" if sixteen else "IEEE fp32: FMA by design"))

        row, col = ("i32:16", "i32:1"), ("i32:1", "i32:16")
        gemm("expand base+s·Z·Bᵀ", "*fp32:16", ptr, ptr, row, col, d, True, True, False)
        gemm("dZ = s·dY·B", ptr, ptr, "*fp32:16", row, row, 64, False, False, False)
        gemm("dB = s·dYᵀ·Z (split-K)", ptr, "*fp32:16", "*fp32:16", col, row, 64, False, False, True)
        gemm("[dA;dW] = dHLᵀ·X (split-K)", "*fp32:16", ptr, "*fp32:16", col, row, d, False, True, False)
        gemm("dX = dHL·[A;W]", "*fp32:16", ptr, ptr, row, row, d, False, True, False)

    for E, r, top_k, label in ((4, 16, 4, "llama7b"), (8, 16, 2, "llama7b-top2"), (16, 8, 2, "wide")):
        L = ops.layout(E, r)
        flags = C.token_flags(L, top_k, True, True)
        num_warps = flags.pop("num_warps")
        bwd_flags = C.token_flags(L, top_k, True, True, backward=True)
        bwd_warps = bwd_flags.pop("num_warps")
        specs.append(KernelSpec(
            f"token_forward[{label}]", K.token_forward_kernel,
            dict(h_ptr="*fp32:16", l_ptr="*fp32:16", g_ptr="*fp64:16", z_ptr="*fp32:16", T="i32",
                 E="i32", top_k="i32", eps="fp32", stride_ht="i32:16", stride_lt="i32", stride_zt="i32:16", **flags),
            num_warps, C.TOKEN_STAGES, False, f"E={E} r={r} top{top_k}, BT={flags['BT']}"))
        specs.append(KernelSpec(
            f"token_backward[{label}]", K.token_backward_kernel,
            dict(h_ptr="*fp32:16", l_ptr="*fp32:16", g_ptr="*fp64:16", dz_ptr="*fp32:16",
                 z_ptr="*fp32:16", dhl_ptr="*fp32:16", ds_ptr="*fp64:16", T="i32", E="i32", top_k="i32", eps="fp32",
                 stride_ht="i32:16", stride_lt="i32", stride_dzt="i32:16", stride_zt="i32:16",
                 stride_dhlt="i32:16", EPL=L.EPL, **bwd_flags),
            bwd_warps, C.TOKEN_STAGES, False, f"E={E} r={r} top{top_k}, BT={bwd_flags['BT']}"))
        specs.append(KernelSpec(
            f"gram_grad[{label}]", K.gram_grad_kernel,
            dict(h_ptr="*fp32:16", ds_ptr="*fp64:16", out_ptr="*fp64:16", T="i32",
                 tokens_per_split="i32:16", stride_ht="i32:16", EP=L.EP, RP=L.RP, ERP=L.ERP,
                 BLOCK_T=C.gram_grad_block(L)),
            C.GRAM_GRAD_WARPS, C.TOKEN_STAGES, False, "float64 FMA"))
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


def run_report(arch: str, names: list[str] | None = None) -> list[KernelResult]:
    m = re.fullmatch(r"sm_(\d+)a?", arch)
    if not m:
        raise SystemExit(f"--arch must look like sm_90a, got {arch!r}")
    capability = int(m.group(1))
    specs = select_specs(kernel_specs(), names)
    with tempfile.TemporaryDirectory() as workdir:
        return [compile_spec(s, capability, workdir) for s in specs]


def format_table(results: list[KernelResult], arch: str) -> str:
    head = ["kernel", "warps", "stages", "regs", "spill st/ld", "stack", "smem KiB", "HGMMA",
            "HMMA", "DMMA", "compile s", "status", "note"]
    rows = []
    for r in results:
        s = r.spec
        status = "ok" if not r.problems else ", ".join(r.problems)
        if r.error:
            status += f" ({r.error})"
        rows.append([s.name, str(s.num_warps), str(s.num_stages), str(r.registers),
                     f"{r.spill_stores}/{r.spill_loads}", str(r.stack),
                     f"{r.shared / 1024:.1f}" if r.shared >= 0 else "-", str(r.hgmma), str(r.hmma),
                     str(r.dmma), f"{r.compile_s:.1f}", status, s.note])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [f"Triton kernels, ahead-of-time for {arch} (triton {__import__('triton').__version__})",
           line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", help="target, e.g. sm_90a (Hopper) or sm_80")
    parser.add_argument("--only", nargs="*", help="substrings of kernel names to compile")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("kernel_report: unset TRITON_INTERPRET (the interpreter cannot compile)", file=sys.stderr)
        return 2
    results = run_report(args.arch, args.only)
    print(format_table(results, args.arch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(name=r.spec.name, registers=r.registers, spill_stores=r.spill_stores,
                            spill_loads=r.spill_loads, stack=r.stack, shared=r.shared, hgmma=r.hgmma,
                            hmma=r.hmma, dmma=r.dmma, problems=r.problems, error=r.error)
                       for r in results], f, indent=1)
    bad = [r for r in results if r.problems]
    if bad:
        print(f"FAIL: {len(bad)} kernel(s): " + "; ".join(f"{r.spec.name}: {', '.join(r.problems)}"
                                                       for r in bad), file=sys.stderr)
        return 1
    print(f"OK: {len(results)} kernels, no spills, every 16-bit GEMM uses wgmma")
    return 0


if __name__ == "__main__":
    sys.exit(main())
