"""`python -m omoe_kernels.kernel_report --arch sm_90a`: the Triton kernels compile ahead
of time for Hopper without a GPU, with no spills, and every 16-bit GEMM uses wgmma."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_report_sm90a_passes():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "omoe_kernels.kernel_report", "--arch", "sm_90a"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "kernel" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    for kernel in ("shrink", "matmul", "token_forward", "token_backward", "gram_grad"):
        assert any(n.startswith(kernel) for n in names), f"{kernel} missing from the report"
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        name, spills, hgmma, status = cells[0], cells[4], int(cells[7]), cells[11]
        assert status == "ok" and spills == "0/0", row
        if "[bf16" in name or "[fp16" in name:
            assert hgmma > 0, f"{name}: no HGMMA in its SASS"


def test_problems_flags_spills_and_missing_wgmma():
    from omoe_kernels.kernel_report import KernelResult, KernelSpec, problems

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
    proc = subprocess.run([sys.executable, "-m", "omoe_kernels.kernel_report", "--only", "BADNAME"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "'BADNAME' matches no kernel" in proc.stderr, proc.stderr[-3000:]
    for kernel in ("shrink", "matmul", "token_forward", "token_backward", "gram_grad"):
        assert f"\n  {kernel}" in proc.stderr, f"{kernel} not listed"


def test_report_compiles_the_launchers_configs():
    """kernel_report reads its configs from ops/triton_configs.py, like the launchers."""
    pytest.importorskip("triton")
    from omoe_kernels.kernel_report import kernel_specs
    from omoe_kernels.ops import triton_configs as C
    from omoe_kernels.ops import triton_omoe

    specs = {s.name: s for s in kernel_specs()}
    expand = specs["matmul[bf16] expand base+s·Z·Bᵀ"]
    cfg = C.matmul_default_config(C.DOT_BF16, 4096)
    assert (expand.num_warps, expand.num_stages) == (cfg["num_warps"], cfg["num_stages"])
    assert all(expand.args[k] == cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"))
    L = triton_omoe.layout(16, 8)
    flags = C.token_flags(L, 2, True, True, backward=True)
    backward = specs["token_backward[wide]"]
    assert backward.num_warps == flags["num_warps"] and backward.args["BT"] == flags["BT"]
    assert backward.num_stages == C.TOKEN_STAGES
    assert specs["gram_grad[wide]"].args["BLOCK_T"] == C.gram_grad_block(L)
