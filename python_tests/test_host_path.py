"""The host side of a triton training step, measured on the CPU with the device launches
stubbed out (omoe_kernels/tools/launch_count.py, `--host`): it makes no host
synchronisation, chooses each autotuned config once per launch signature, and the
command prints its per-shape figure. The CUDA-graph path (bench/graphs.py) runs on a GPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Ops that read device memory on the host or give outputs a data-dependent shape: each is
# a host synchronisation on a GPU.
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::equal",
            "aten::is_nonzero", "aten::masked_select", "aten::unique", "aten::_unique2",
            "aten::unique_consecutive", "aten::unique_dim", "aten::repeat_interleave",
            "aten::tolist", "aten::allclose", "aten::_assert_async")

# Runs in a child: the compiled (not interpreted) Triton path, its launches stubbed.
STEP_TRACE = textwrap.dedent("""
    import json, torch
    from torch.profiler import ProfilerActivity, profile
    from triton.runtime.autotuner import Autotuner
    from omoe_kernels.functional import omoe_lora
    from omoe_kernels.tools.launch_count import stubbed_launches

    def traced(fn):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        return sorted({e.name for e in prof.events()})

    tuner_calls = []
    original = Autotuner.run
    def counting(self, *args, **kwargs):
        tuner_calls.append(1)
        return original(self, *args, **kwargs)
    Autotuner.run = counting

    gen = torch.Generator().manual_seed(0)
    T, d, E, r = 64, 64, 4, 16
    kw = dict(generator=gen, dtype=torch.bfloat16)   # bf16: the kinds that autotune on a GPU
    out = dict(steps={}, planted=None)
    with stubbed_launches():
        for top_k in (None, 2):
            leaves = [torch.randn(T, d, **kw), torch.randn(E, r, d, **kw),
                      torch.randn(E, d, r, **kw), torch.randn(E, d, **kw)]
            for t in leaves:
                t.requires_grad_()
            x, A, B, W = leaves
            base, grad_y = torch.randn(T, d, **kw), torch.randn(T, d, **kw)

            def step():
                omoe_lora(x, A, B, W, scaling=2.0, top_k=top_k, base_out=base,
                          backend="triton").backward(grad_y)
                for t in leaves:
                    t.grad = None

            step()
            first = len(tuner_calls)
            names = traced(step)
            step()
            out["steps"][str(top_k)] = dict(ops=names, tuner_first=first,
                                            tuner_later=len(tuner_calls) - first)
        out["planted"] = traced(lambda: (x.sum() > 0).item())
    print("RESULT" + json.dumps(out))
""")


def _child(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "OMOE_TRITON_FIXED_CONFIG")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def step_trace() -> dict:
    pytest.importorskip("triton")
    proc = _child(["-c", STEP_TRACE], 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_the_step_makes_no_host_synchronisation(step_trace):
    # The check sees a planted one (so an empty result below means something).
    assert set(SYNC_OPS) & set(step_trace["planted"]), step_trace["planted"]
    for routing, step in step_trace["steps"].items():
        assert any(name.startswith("omoe_triton::") for name in step["ops"]), step["ops"]
        found = set(SYNC_OPS) & set(step["ops"])
        assert not found, f"top_k={routing}: host synchronisation in the step: {sorted(found)}"


def test_autotuned_configs_are_chosen_once_per_signature(step_trace):
    """After the first step at a shape, no launch goes through the autotuner wrapper."""
    for routing, step in step_trace["steps"].items():
        assert step["tuner_first"] > 0, routing      # the GPU sizing autotunes at all
        assert step["tuner_later"] == 0, (routing, step)


def test_launch_count_host_prints_per_shape():
    pytest.importorskip("triton")
    proc = _child(["-m", "omoe_kernels.tools.launch_count", "--host", "--repeats", "3"], 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shapes = re.findall(r"^\s*(\S+)\s+host µs per step: ([0-9.]+)", proc.stdout, re.M)
    assert [s for s, _ in shapes] == ["llama7b", "llama7b-top2", "wide"], proc.stdout
    assert all(float(us) > 0 for _, us in shapes)


def test_graphed_step_replays_the_step_on_a_gpu():
    """The CUDA-graph path of bench/graphs.py: a replay gives the eager step's gradients,
    and the step makes no host synchronisation (torch's sync debug mode raises on one)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: CUDA graphs capture GPU launches")
    pytest.importorskip("triton")
    import omoe_kernels as ok
    from bench.graphs import graphed_step

    if "triton" not in ok.available_backends("cuda"):
        pytest.skip("the triton backend is unavailable on this GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, d, E, r = 256, 128, 4, 16
    x = torch.randn(T, d, device="cuda", generator=gen, requires_grad=True)
    A = (torch.randn(E, r, d, device="cuda", generator=gen) / d ** 0.5).requires_grad_()
    B = (torch.randn(E, d, r, device="cuda", generator=gen) / r ** 0.5).requires_grad_()
    W = (torch.randn(E, d, device="cuda", generator=gen) / d ** 0.5).requires_grad_()
    grad_y = torch.randn(T, d, device="cuda", generator=gen)
    leaves = [x, A, B, W]

    def step():
        ok.omoe_lora(x, A, B, W, scaling=2.0, top_k=2, backend="triton").backward(grad_y)

    step()
    eager = [t.grad.clone() for t in leaves]
    replay = graphed_step(step, leaves)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in leaves:
            t.grad.fill_(float("nan"))
        replay()
        step_grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        step()                                   # eager, under the sync check too
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for got, want in zip(step_grads, eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
