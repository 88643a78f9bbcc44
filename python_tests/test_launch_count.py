"""The launch counter (omoe_kernels/tools/launch_count.py): it counts a hand-written function's
launches exactly, and pins the launches of one triton-backend step (bench/NOTES.md, Triton
section: <= 4 forward, <= 8 backward, <= 3 no-grad forward are the targets)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a child process: TRITON_INTERPRET must be set before triton is imported.
KNOWN_LAUNCHES = textwrap.dedent("""
    import json
    import torch
    import triton
    import triton.language as tl
    from omoe_kernels.tools.launch_count import count_launches

    @triton.jit
    def double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    def step():
        a = torch.zeros(8, 8)                 # zeros
        b = a + 1                             # add
        c = b.t().contiguous()                # clone (transposed, so a real copy)
        d = c.view(64)[:32].unsqueeze(0)      # views: nothing
        e = torch.cat([d, d])                 # cat
        y = torch.empty(64)                   # allocation only: nothing
        double_kernel[(2,)](c, y, 64, BLOCK=32)   # one Triton launch (2 programs)
        double_kernel[(1,)](e, y, 64, BLOCK=64)   # another
        return (e.sum() + y.sum()).item()     # sum, sum, add; item is a host read

    launches = count_launches(step)
    print(json.dumps(launches.as_dict()))
""")


def _run(code_or_args: list[str], timeout: int) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, *code_or_args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_counts_a_hand_written_function_exactly():
    pytest.importorskip("triton")
    counted = json.loads(_run(["-c", KNOWN_LAUNCHES], 120).strip().splitlines()[-1])
    assert counted["triton_kernels"] == {"double_kernel": 2}
    assert counted["aten_ops"] == {"zeros": 1, "add": 2, "clone": 1, "cat": 1, "sum": 2}
    assert counted["total"] == 9


# The triton backend's step (T=64, fp32 on CPU), dense and top-2 alike: forward = shrink
# (+ G), per-token, expand; backward = dZ (+ G), per-token reverse, gram_grad, dB,
# [dA; dW], finalize, dX. No ATen launch beyond these.
TRITON_STEP_KERNELS = dict(forward=3, backward=7, no_grad_forward=3)
TRITON_STEP_MAX = dict(forward=3, backward=7, no_grad_forward=3)


def test_triton_step_launches_meet_the_targets():
    pytest.importorskip("triton")
    out = _run(["-m", "omoe_kernels.tools.launch_count", "--backends", "triton", "--d-model", "32",
                "--rank", "4", "--adapters", "2", "--json", "-"], 300)
    report = json.loads(out[out.index("{"):])
    assert [s["routing"] for s in report["steps"]] == ["dense", "top-2"]
    for step in report["steps"]:
        for phase, limit in TRITON_STEP_MAX.items():
            counted = step[phase]
            assert counted["triton"] == TRITON_STEP_KERNELS[phase], (step["routing"], phase, counted)
            assert counted["total"] <= limit, (
                f"{step['routing']} {phase}: {counted['total']} launches > {limit} "
                f"({counted['triton_kernels']}, {counted['aten_ops']})")
    # A mixed batch: a layer's no-grad forward launches as many kernels as the
    # single-adapter one, whatever the number of adapters.
    assert [m["routing"] for m in report["mixed"]] == ["dense", "top-2"]
    for step, mixed in zip(report["steps"], report["mixed"]):
        single, counted = step["no_grad_forward"], mixed["no_grad_forward"]
        assert counted["triton"] == single["triton"] and counted["total"] == single["total"], (
            mixed["routing"], counted, single)


def test_counts_the_compiled_cpu_backends_aten_ops():
    """The compiled backend's torch calls from C++ count too (the CUDA fallback's launches
    besides its own kernels); no Triton launch appears."""
    import omoe_kernels
    from omoe_kernels.tools.launch_count import step_launches

    if "cpu" not in omoe_kernels.available_backends("cpu"):
        pytest.skip("the compiled extension is not built")
    step = step_launches("cpu", top_k=2, num_tokens=16, d_model=32)
    for phase in (step.forward, step.backward, step.no_grad_forward):
        assert phase.triton == [] and phase.total == len(phase.aten) > 0
        assert "mm" in phase.aten or "bmm" in phase.aten
    assert step.no_grad_forward.total <= step.forward.total
