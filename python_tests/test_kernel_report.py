"""`python -m omoe_kernels.tools.kernel_report --arch sm_90a`: the Triton kernels compile ahead
of time for Hopper without a GPU, with no spills, and every 16-bit GEMM uses wgmma; the
report's SASS counts and its roofline model (kernel_model.py) are what they claim."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A subset, so that the test's compile time stays bounded (the full report is a CLI run,
# `python -m omoe_kernels.tools.kernel_report`): every kernel at the `wide` shape, the dense
# llama7b per-token backward (the register-hungry one), the gram gradient,
# and the fp16 GEMMs (their power-of-2 scaling is register-hungry too). From a cold Triton
# cache that takes about 2–2.5 minutes on a loaded 2-core machine.
SUBSET = ["wide]", "token_backward[llama7b]", "gram_grad", "fp16"]


def test_kernel_report_sm90a_passes(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out_json = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "omoe_kernels.tools.kernel_report", "--arch", "sm_90a",
                           "--json", str(out_json), "--only", *SUBSET],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    report = json.loads(out_json.read_text())
    kernels = report["kernels"]
    names = [k["name"] for k in kernels]
    for kernel in ("shrink", "matmul", "weight_grad", "finalize", "token_forward",
                   "token_backward", "gram_grad", "mixed_shrink", "mixed_token_forward",
                   "mixed_expand"):
        assert any(n.startswith(kernel) for n in names), f"{kernel} missing from the report"
    for k in kernels:
        assert k["problems"] == [] and k["spill_stores"] == 0 and k["spill_loads"] == 0, k
        if k["work"] and k["work"]["unit"] in ("bf16 MMA", "fp16 MMA"):   # a 16-bit GEMM
            assert k["hgmma"] > 0, f"{k['name']}: no HGMMA in its SASS"
        for count in ("shfl", "bar", "hgmma", "hmma", "dmma"):
            assert isinstance(k[count], int) and k[count] >= 0
        if k["name"].startswith(("token_forward", "token_backward", "mixed_token_forward")):
            # Tokens on lanes: every reduction over experts and ranks stays in a thread.
            assert k["shfl"] == 0 and k["bar"] == 0, k
        if k["step"]:                 # a kernel of the default step carries its model
            assert k["programs"] >= 1 and k["ctas_per_sm"] >= 1 and k["waves"] > 0, k
            assert k["serial_trips"] >= 1 and k["bound"] in ("flops", "bytes", "latency", "appended")
            low, high = k["est_us"]
            assert 0 < low <= high, k
            w = k["work"]
            assert w["flops_issued"] >= w["flops_useful"] > 0 and w["bytes"] > 0, k
            assert w["estimate_us"] > 0 and w["bound"] in ("bytes", "flops")
            if w["unit"] == "bf16 MMA":   # no GEMM of the bf16 step wastes tensor-core work
                assert w["flops_issued"] <= 1.3 * w["flops_useful"], k
            if re.search(r"\] (expand|dX) ", k["name"]):   # one accumulator on fp16 operands
                assert k["ctas_per_sm"] >= 2, k
    # Every kernel of the wide step was compiled, so its estimate is in the output.
    wide = report["steps"]["wide"]
    assert wide["fwd+bwd"]["omoe_us"] == pytest.approx(
        wide["forward"]["omoe_us"] + wide["backward"]["omoe_us"])
    assert wide["fwd+bwd"]["ratio"] > 0 and "llama7b" not in report["steps"]
    for card in ("h200", "h100"):         # the latency model's range, against a plain LoRA
        low, high = wide[card]["omoe_us"]
        assert 0 < low <= high and min(wide[card]["ratio"]) > 0   # either end's ratio may be larger
        assert low > wide["fwd+bwd"]["omoe_us"]      # latency and launch gaps only add
    for card in ("h200", "h100"):         # the mixed-batch forward of SUBSET's "wide]" kernels
        assert min(wide["mixed"][card]["ratio"]) > 1.0
    assert "calibration" in report and "launch_gap_us" in report["calibration"]
    assert "compiling" in proc.stderr             # a progress line per kernel
    table = proc.stdout.splitlines()
    assert any(line.startswith("| kernel ") and "SHFL" in line and "est µs" in line for line in table)
    assert any("ESTIMATE" in line for line in table)


# The per-token kernels of SUBSET (dense and top-k; compiled there already, so the Triton
# cache answers).
PER_TOKEN_SUBSET = ["token_backward[llama7b]", "token_forward[wide]", "token_backward[wide]"]


def test_per_token_kernels_access_memory_one_token_per_lane():
    """Every global load and store of the per-token kernels is a [BT] vector (or a scalar):
    for a multi-dimensional one, Triton's coalescing pass chooses the layout, and triton
    3.6 (the H200 machine's version) put the non-token axis of the [RP, BT] G loads over
    lanes, which brought SHFL, BAR and spills back (3.8 did not, so the SASS counts above
    cannot catch it here)."""
    pytest.importorskip("triton")
    from omoe_kernels.backends import triton_interpreting

    if triton_interpreting():
        pytest.skip("TRITON_INTERPRET=1: no ahead-of-time compile in this process")
    import triton
    from triton.backends.compiler import GPUTarget

    from omoe_kernels.tools.kernel_report import _ast_source, kernel_specs, select_specs

    specs = select_specs(kernel_specs(), PER_TOKEN_SUBSET)
    assert [s.name for s in specs] == PER_TOKEN_SUBSET
    for spec in specs:
        compiled = triton.compile(_ast_source(spec), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=spec.num_warps,
                                               num_stages=spec.num_stages))
        memory_ops = re.findall(r"tt\.(?:load|store) [^\n]*", compiled.asm["ttir"])
        assert len(memory_ops) > 3, spec.name
        multi = [op for op in memory_ops if re.search(r"tensor<\d+x\d+", op)]
        assert not multi, f"{spec.name}: multi-dimensional memory accesses: {multi[:3]}"


def test_sass_counts():
    from omoe_kernels.tools.kernel_report import sass_counts

    sass = """
        /*0100*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0110*/  HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0120*/  SHFL.BFLY PT, R3, R2, 0x10, 0x1f ;
        /*0130*/  SHFL.IDX PT, R5, R4, RZ, 0x1f ;
        /*0140*/  BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0150*/  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0160*/  DMMA.8x8x4 R0, R2, R4, R0 ;
        /*0170*/  WARPSYNC.ALL ;
    """
    assert sass_counts(sass) == dict(hgmma=2, hmma=1, dmma=1, shfl=2, bar=1)


def test_gemm_work_counts_padding_split_and_bytes():
    from omoe_kernels.ops.triton.configs import GemmConfig
    from omoe_kernels.tools import kernel_model as M

    cfg = GemmConfig(64, 64, 64)
    # [100, 80] @ [80, 64]: M pads to 128, K to 128; useful is the problem, K = 72 real.
    w = M.gemm_work(100, 64, 80, (100, 64, 72), cfg, "bf16 MMA", 2, 2, 4)
    assert w.flops_issued == 2 * 128 * 64 * 128
    assert w.flops_useful == 2 * 100 * 64 * 72
    assert w.bytes == 100 * 80 * 2 + 80 * 64 * 2 + 100 * 64 * 4
    assert w.estimate_s == max(w.flops_issued / 790e12, w.bytes / 4.3e12)
    hi_lo = M.gemm_work(100, 64, 80, (100, 64, 72), cfg, "bf16 MMA", 2, 2, 4, hi_lo=True)
    assert hi_lo.flops_issued == 2 * w.flops_issued and hi_lo.bytes == w.bytes
    # Long K: 1 output tile -> min(2·132, K/512) splits, each writing an fp32 partial.
    long = M.gemm_work(64, 64, 8192, (64, 64, 8192), cfg, "bf16 MMA", 2, 2, 4, long_k=True)
    assert long.grid == (1, 16)
    assert long.bytes == 64 * 8192 * 2 + 8192 * 64 * 2 + 16 * 64 * 64 * 4


def test_step_estimate_compares_with_plain_lora():
    """The roofline sums (the lower bound) and the latency model's range per card."""
    from omoe_kernels.tools import kernel_model as M
    from omoe_kernels.tools.kernel_report import KernelResult, kernel_specs, step_estimates

    specs = [s for s in kernel_specs() if s.shape == "llama7b" and s.step in ("forward", "backward")]
    assert len(specs) == 10
    steps = step_estimates([KernelResult(s) for s in specs])
    assert list(steps) == ["llama7b"]       # the other shapes' kernels were not given
    lora = M.plain_lora_works(8192, 4096, 64)
    expected = sum(w.estimate_s for phase in lora.values() for _, w in phase) * 1e6
    assert steps["llama7b"]["fwd+bwd"]["lora_us"] == pytest.approx(expected)
    omoe = sum(s.work.estimate_s for s in specs) * 1e6
    assert steps["llama7b"]["fwd+bwd"]["ratio"] == pytest.approx(omoe / expected)
    h200 = steps["llama7b"]["h200"]
    lora_low = sum(M.plain_lora_timing(8192, 4096, 64, 0).values()) * 1e6
    assert h200["lora_us"][0] == pytest.approx(lora_low)
    assert h200["ratio"][0] == pytest.approx(h200["omoe_us"][0] / lora_low)
    assert h200["omoe_us"][0] <= h200["omoe_us"][1]
    assert step_estimates([KernelResult(s) for s in specs[1:]]) == {}


def test_mixed_batch_estimate_sets_the_grouped_forward_beside_one_adapters():
    """The grouped forward's three kernels carry Work: one adapter's forward on the padded
    rows plus every adapter's G and weights; "mixed" sums their range per card."""
    from omoe_kernels.tools import kernel_model as M
    from omoe_kernels.tools.kernel_report import MIXED_ADAPTERS, KernelResult, kernel_specs, step_estimates

    specs = [s for s in kernel_specs() if s.shape == "llama7b"]
    mixed = {s.name.split("[")[0]: s for s in specs if s.step == "mixed"}
    assert set(mixed) == {"mixed_shrink", "mixed_token_forward", "mixed_expand"}
    single = {s.name.split("[")[0]: s for s in specs if s.step == "forward"}
    shrink, one = mixed["mixed_shrink"].work, single["shrink"].work
    # N G's appended, each as many programs as the single-adapter shrink's.
    assert shrink.appended.programs == MIXED_ADAPTERS * one.appended.programs
    assert shrink.appended.bytes == pytest.approx(MIXED_ADAPTERS * one.appended.bytes)
    assert shrink.flops_useful == pytest.approx(one.flops_useful)    # the same T tokens
    assert shrink.flops_issued >= one.flops_issued                      # padded segments
    # Every adapter's B read: more bytes than the one adapter's expand (single["matmul"]).
    assert mixed["mixed_expand"].work.bytes > single["matmul"].work.bytes
    steps = step_estimates([KernelResult(s) for s in specs])["llama7b"]
    for card in ("h200", "h100"):
        m = steps["mixed"][card]
        assert m["single_forward_us"] == steps[card]["forward_us"]
        assert 1.0 < m["ratio"][0] and m["ratio"][0] == pytest.approx(
            m["forward_us"][0] / m["single_forward_us"][0])
    without = [KernelResult(s) for s in specs if s.name != mixed["mixed_expand"].name]
    assert "mixed" not in step_estimates(without)["llama7b"]
    assert M.repeated(M.Work(1.0, 1.0, 2.0, "fp64 FMA", (3,), programs=3), 4).programs == 12


def test_problems_flags_spills_and_missing_wgmma():
    from omoe_kernels.tools.kernel_report import KernelResult, KernelSpec, problems

    gemm = KernelSpec("gemm", None, {}, 4, 2, needs_wgmma=True)
    good = KernelResult(gemm, registers=128, spill_stores=0, spill_loads=0, hgmma=8)
    assert problems(good, 90) == []
    spilling = KernelResult(gemm, registers=255, spill_stores=64, spill_loads=64, hgmma=8)
    assert problems(spilling, 90) == ["spills"]
    no_wgmma = KernelResult(gemm, registers=128, spill_stores=0, spill_loads=0, hgmma=0, hmma=16)
    assert problems(no_wgmma, 90) == ["no wgmma"]
    assert problems(no_wgmma, 80) == []          # sm_80 has no wgmma to ask for
    assert problems(KernelResult(gemm), 90) == ["no ptxas report", "no wgmma"]


def test_unknown_only_name_lists_the_valid_names():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "omoe_kernels.tools.kernel_report", "--only", "BADNAME"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "'BADNAME' matches no kernel" in proc.stderr, proc.stderr[-3000:]
    for kernel in ("shrink", "matmul", "token_forward", "token_backward", "gram_grad"):
        assert f"\n  {kernel}" in proc.stderr, f"{kernel} not listed"


def test_report_compiles_the_launchers_configs():
    """kernel_report reads its configs from ops/triton/configs.py, like the launchers."""
    pytest.importorskip("triton")
    from omoe_kernels.ops.triton import configs as C
    from omoe_kernels.ops.triton import launch as triton_ops
    from omoe_kernels.tools.kernel_report import kernel_specs

    specs = {s.name: s for s in kernel_specs()}
    expand = specs["matmul[bf16, llama7b] expand base+s·Z·Bᵀ"]
    cfg = C.grouped_tile(8192, 4096, triton_ops.layout(4, 16).ERP, 132)   # the scaled a's tile
    assert expand.args["FP16_A"] == C.a_operand_flags(C.DOT_BF16, C.EXPAND_Z)["fp16_a"]
    assert expand.args["SCALED_A"] == C.scaled_operand(C.DOT_BF16, C.EXPAND_Z)
    assert (expand.num_warps, expand.num_stages) == (cfg.num_warps, cfg.num_stages)
    assert all(expand.args[k] == v for k, v in cfg.meta().items())
    L = triton_ops.layout(16, 8)
    token = C.TokenConfig.of(L, 2, True, True)
    backward = specs["token_backward[wide]"]
    assert backward.num_warps == token.num_warps and backward.args["BT"] == token.block_t
    assert backward.num_stages == C.TOKEN_STAGES
    assert specs["gram_grad[wide]"].args["BLOCK_T"] == C.gram_grad_block(L)
    dz = specs["matmul[bf16, wide] dZ = s·dY·B (split-K)"]
    dz_cfg = C.GemmConfig.matmul(C.DOT_BF16, L.ERP)
    assert all(dz.args[k] == v for k, v in dz_cfg.meta().items()) and dz.args["PACKED_BN"]
    assert dz.num_warps == dz_cfg.num_warps and not dz.args["WITH_GRAM"] and dz.work.appended is None
    assert specs["matmul[fp16, llama7b] dZ = s·dY·B + G"].args["GB"] == C.GRAM_TILE
    weight_grad = specs["weight_grad[bf16, wide] [dA;dW]ᵀ = Xᵀ·[dH|dL] (split-K)"]
    wcfg = C.GemmConfig.weight_grad(C.DOT_BF16, L.ERP)
    assert all(weight_grad.args[k] == v for k, v in wcfg.meta().items())
    assert weight_grad.args["BLOCK_E"] == L.EPL
    finalize = specs["finalize[bf16, wide] grad_B, grad_A, grad_W"]
    assert all(finalize.args[k] == v for k, v in C.FINALIZE.meta().items())
    assert finalize.num_warps == C.FINALIZE.num_warps
    fp32 = specs["finalize[fp32, llama7b] grad_B, grad_A, grad_W"]
    assert fp32.num_warps == C.finalize_config(4).num_warps == 8


def test_report_signatures_come_from_the_launchers():
    """A spec's signature is the launcher's own arguments specialised as Triton does at a
    launch: every kernel parameter present, pointer dtypes of the tensors passed, ints
    divisible by 16 hinted, stride 1 folded; split counts from the launchers' rules."""
    pytest.importorskip("triton")
    from omoe_kernels.ops.triton import configs as C
    from omoe_kernels.ops.triton import launch as triton_ops
    from omoe_kernels.tools import kernel_model as M
    from omoe_kernels.tools.kernel_report import kernel_specs

    specs = {s.name: s for s in kernel_specs()}
    for spec in specs.values():
        assert set(spec.args) == set(spec.fn.arg_names), spec.name
    dx = specs["matmul[bf16, wide] dX = dH·A + dL·W"].args
    assert (dx["a_ptr"], dx["b_ptr"], dx["c_ptr"], dx["a2_ptr"], dx["as_ptr"]) == (
        "*fp16:16", "*bf16:16", "*bf16:16", "*fp32:16", "*fp32:16")   # dH as scaled fp16
    assert dx["stride_ak"] == "i32:1" and dx["M"] == "i32:16" and dx["ROUTER"] == 1
    L = triton_ops.layout(16, 8)
    wcfg = C.GemmConfig.weight_grad(C.DOT_BF16, L.ERP)
    splits = C.split_k(4096, L.ERP, 8192, wcfg, M.H200_SMS)[0]
    assert M.split_k(4096, L.ERP, 8192, wcfg)[0] == splits
    assert f"[dA;dW] {splits}," in specs["finalize[bf16, wide] grad_B, grad_A, grad_W"].note


def test_configs_are_frozen_records():
    """A launch config is read, never edited: a variant is a new record."""
    import dataclasses

    from omoe_kernels.ops.triton import configs as C

    cfg = C.GemmConfig.matmul(C.DOT_BF16, 4096)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_warps = 4
    assert C.GemmConfig.matmul(C.DOT_BF16, 4096) == cfg
    assert "GROUP_M" not in C.GemmConfig.weight_grad(C.DOT_BF16, 64).meta()
    assert C.GemmConfig.matmul(C.DOT_FP32_IEEE, 64, interpret=True).options() == {}
    with pytest.raises(ValueError, match="bf16 operand mode"):
        C.a_operand_flags(C.DOT_BF16, "fp8")


def test_target_misses_flag_wasted_mma_and_per_token_shuffles():
    from omoe_kernels.tools.kernel_model import Work
    from omoe_kernels.tools.kernel_report import KernelResult, KernelSpec, target_misses

    def result(name, work, shfl):
        return KernelResult(KernelSpec(name, None, {}, 4, 3, False, work=work), shfl=shfl)

    tight = Work(1.3e9, 1e9, 1e6, "bf16 MMA")
    padded = Work(2.0e9, 1e9, 1e6, "bf16 MMA")
    fp64 = Work(50e9, 1e9, 1e6, "fp64 FMA")      # not tensor-core work: not a GEMM target
    misses = target_misses([result("matmul[bf16, x] ok", tight, 4),
                            result("matmul[bf16, x] padded", padded, 0),
                            result("token_forward[x]", fp64, 3),
                            result("gram_grad[x]", fp64, 2)])     # reduces over tokens
    assert misses == dict(mma_issued_over_useful=["matmul[bf16, x] padded (2.0×)"],
                          per_token_shfl=["token_forward[x] (3)"])


def test_every_triton_kernel_is_in_the_report():
    """A kernel added to triton/gemm_kernels.py or mixed_kernels.py must get a spec (and its Work, when it runs in
    the default step): the report and the model cover what the backend launches."""
    pytest.importorskip("triton")
    import triton

    from omoe_kernels.ops.triton import gemm_kernels as K
    from omoe_kernels.ops.triton import mixed_kernels as MK
    from omoe_kernels.tools.kernel_report import kernel_specs

    kernels = {name for module in (K, MK) for name, obj in vars(module).items()
               if isinstance(obj, triton.runtime.KernelInterface) and name.endswith("_kernel")}
    assert kernels, "no kernels found in triton/gemm_kernels.py"
    assert {"mixed_shrink_kernel", "mixed_expand_kernel"} <= kernels
    specs = kernel_specs()
    reported = {s.fn.__name__ for s in specs}
    assert kernels <= reported, f"not in kernel_report's kernel_specs(): {sorted(kernels - reported)}"
    assert all(s.work is not None for s in specs if s.step)


def test_gram_grad_model_counts_active_pair_blocks():
    """kernel_model's expected (pair i <= j, block) steps of gram_grad under top-k match a
    count over routing that picks each k-subset alike; dense runs every block of every pair
    of dG's upper triangle of expert blocks."""
    import torch

    from omoe_kernels.tools import kernel_model as M

    T, E, k, block_t = 4096, 16, 2, 16
    gen = torch.Generator().manual_seed(0)
    chosen = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    routed = torch.zeros(T, E, dtype=torch.bool).scatter_(1, chosen, True).view(-1, block_t, E)
    both = (routed[:, :, :, None] & routed[:, :, None, :]).any(dim=1)
    counted = both.triu().sum().item()
    assert M.active_pair_blocks(T, E, k, block_t) == pytest.approx(counted, rel=0.03)
    assert M.active_pair_blocks(T, E, E, block_t) == E * (E + 1) // 2 * T // block_t


def test_ctas_per_sm_from_registers_shared_memory_and_warps():
    from omoe_kernels.tools.kernel_model import ctas_per_sm

    assert ctas_per_sm(212, 88 * 1024, 8) == 1        # 216 regs × 256 threads: one CTA
    assert ctas_per_sm(128, 0, 4) == 4                 # 65536 / (128 · 128)
    assert ctas_per_sm(40, 1024, 4) == 12              # 40 regs: 12 CTAs of 4 warps
    assert ctas_per_sm(32, 0, 1) == 32                 # the CTA slots bind
    assert ctas_per_sm(64, 120 * 1024, 4) == 1         # shared memory binds
    assert ctas_per_sm(-1, 0, 4) == 1                  # not compiled: assume one


def test_latency_bound_counts_waves_and_serial_trips():
    """Half the SMs busy with a long serial loop: the latency bound wins over the
    roofline, the time grows with the trips and with the waves, and the range is ordered."""
    from omoe_kernels.tools import kernel_model as M

    loop = M.Loop(256, "d_out", "round trip")
    w = M.Work(1e6, 1e6, 1e6, "fp64 FMA", programs=64, loop=loop)
    lo, hi = M.time_range(w, ctas=1)
    assert lo.bound == hi.bound == "latency" and lo.waves == pytest.approx(64 / 132)
    c = M.CALIBRATION
    assert lo.latency_s == pytest.approx((c["program_ns"][0] + 256 * c["round_trip_ns"][0]) * 1e-9)
    assert lo.total_s == pytest.approx(lo.latency_s + c["launch_gap_us"][0] * 1e-6)
    assert lo.total_s < hi.total_s
    two_waves = M.timing(M.Work(1e6, 1e6, 1e6, "fp64 FMA", programs=264, loop=loop), 1, 0)
    assert two_waves.latency_s == pytest.approx(2 * lo.latency_s)
    # A grid that fills a quarter of the SMs gets a quarter of the bandwidth.
    small = M.timing(M.Work(0, 0, 1e9, "bf16 MMA", programs=33), 1, 0)
    full = M.timing(M.Work(0, 0, 1e9, "bf16 MMA", programs=132), 1, 0)
    assert small.bytes_s == pytest.approx(4 * full.bytes_s)


def test_model_sees_the_serial_gram_loop_and_the_per_token_grid():
    """At the GPU shapes the model reads the launchers' grids: the G programs' loop over
    d_out (configs.gram_trips, at most 32) and the per-token programs
    (T / configs.tokens_per_program: two waves on 132 SMs)."""
    from omoe_kernels.ops.triton import configs as C
    from omoe_kernels.tools.kernel_report import kernel_specs

    specs = {s.name: s for s in kernel_specs()}
    dz = specs["matmul[fp16, llama7b] dZ = s·dY·B + G"]   # the backward op called without G
    gram_loop = dz.work.appended.loop
    assert gram_loop.over == "d_out"
    assert gram_loop.trips == C.gram_trips(4096, dz.num_warps) <= 32
    token = specs["token_forward[llama7b]"].work
    assert token.programs == -(-8192 // C.tokens_per_program(8192, 132)) >= 2 * 132


def test_gram_grad_walk_is_capped_and_fills_the_machine():
    """gram_grad's token splits at the GPU shapes: no program walks more than
    GRAM_GRAD_MAX_BLOCKS token blocks, and the expert-pair programs cover the 132 SMs."""
    from omoe_kernels.ops.triton import configs as C
    from omoe_kernels.ops.triton import launch as ops
    from omoe_kernels.testing.shapes import SHAPES
    from omoe_kernels.tools.kernel_steps import GPU_SHAPES

    for name in GPU_SHAPES:
        shape = SHAPES[name]
        L = ops.layout(shape.num_experts, shape.rank)
        block_t = C.gram_grad_block(L)
        splits, per_split = C.gram_grad_splits(shape.num_tokens, shape.num_experts, block_t, 132)
        assert splits * per_split >= shape.num_tokens > (splits - 1) * per_split, name
        assert per_split % block_t == 0 and per_split // block_t <= C.GRAM_GRAD_MAX_BLOCKS, name
        assert L.EP * (L.EP + 1) // 2 * splits >= 132, name


def test_scaled_operand_prologue_counts_load_only_trips():
    """SCALED_A's prologue (the weight's per-column max over K) adds pipelined load trips
    to the expand's and dX's loop, with no MMA in them."""
    from dataclasses import replace

    from omoe_kernels.tools import kernel_model as M

    loop, card = M.gemm_loop(128, 128, 64, 32), M.CARDS["h200"]
    scaled = replace(loop, prologue=loop.trips)
    for end in (0, 1):
        extra = scaled.total_s(end, 2, card) - loop.total_s(end, 2, card)
        assert extra == pytest.approx(loop.trips * M.CALIBRATION["pipelined_trip_ns"][end] * 1e-9)
        assert 0 < extra < loop.total_s(end, 2, card)


def test_grouped_expand_and_dx_model_one_a_read_per_group():
    """The expand and dX as launched (scaled_matmul_kernel): the model counts one L2 read
    of a program's rows of Z / dH per group of n-tiles, not one per n-tile, and walks the
    group's n-tiles as the serial loop (one MMA over all of K each, no prologue)."""
    pytest.importorskip("triton")
    from dataclasses import replace

    from omoe_kernels.ops.triton import configs as C
    from omoe_kernels.tools import kernel_model as M
    from omoe_kernels.tools.kernel_report import kernel_specs

    T, d, K = 8192, 4096, 128
    cfg = C.grouped_tile(T, d, K, M.H200_SMS)
    b_reads = (T // 128 - 1) * K * d * 2
    per_tile, grouped = (M.gemm_work(T, d, K, (T, d, K), c, "bf16 MMA", 2, 2, 2, 2)
                         for c in (replace(cfg, n_group=1), cfg))
    assert per_tile.l2_bytes - b_reads == (d // 64 - 1) * T * K * 2
    assert grouped.l2_bytes - b_reads == (d // 64 // cfg.n_group - 1) * T * K * 2
    assert grouped.grid == (cfg.programs(T, d), 1) == (512, 1)
    specs = {s.name: s for s in kernel_specs()}
    for gemm in ("expand base+s·Z·Bᵀ", "dX = dH·A + dL·W"):
        work = specs[f"matmul[bf16, llama7b-top2] {gemm}"].work
        assert work.programs == 512 and work.l2_bytes < per_tile.l2_bytes
        assert (work.loop.trips, work.loop.over, work.loop.prologue) == (cfg.n_group, "n-tiles", 0)
        assert work.loop.mma_flops == 2 * 128 * 64 * K
