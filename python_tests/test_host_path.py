"""The host side of a triton training step, measured on the CPU with the device launches
stubbed out (omoe_kernels/tools/launch_count.py, `--host`): it makes no host
synchronisation, plans once per call signature (a repeated call replays the plan with
the same launch arguments), chooses each autotuned config once per launch signature,
and the command prints its per-shape figure. The CUDA-graph path (bench/graphs.py) runs on a GPU."""
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
    from triton.runtime.jit import JITFunction
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
        stub, launched = JITFunction.run, []
        def counted_stub(self, *args, **kwargs):
            launched.append(1)
            return stub(self, *args, **kwargs)
        JITFunction.run = counted_stub
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
            before = len(launched)
            names = traced(step)
            launches = len(launched) - before
            step()
            out["steps"][str(top_k)] = dict(ops=names, tuner_first=first, launches=launches,
                                            tuner_later=len(tuner_calls) - first)
        out["planted"] = traced(lambda: (x.sum() > 0).item())
    print("RESULT" + json.dumps(out))
""")


# Runs in a child, launches stubbed: which calls plan, and what every launch of a step
# is given (tensors as sizes, strides, dtype, storage offset and which storage, in order
# of first use), on a first call and on its replay.
PLAN_CACHE = textwrap.dedent("""
    import json, os, torch
    from triton.runtime.jit import JITFunction
    from omoe_kernels.functional import omoe_lora
    from omoe_kernels.ops.triton import launch
    from omoe_kernels.tools.launch_count import stubbed_launches

    planned, calls, keep = [], [], []
    for name in ("plan_forward", "plan_backward"):
        def counting(*args, _plan=getattr(launch, name), **kwargs):
            planned.append(1)
            return _plan(*args, **kwargs)
        setattr(launch, name, counting)

    def describe(a, storages):
        if not isinstance(a, torch.Tensor):
            return repr(a)
        keep.append(a)                          # no address is reused within a step
        where = storages.setdefault(a.untyped_storage().data_ptr(), len(storages))
        return [list(a.shape), list(a.stride()), str(a.dtype), a.storage_offset(), where]

    def recording(self, *args, grid, warmup, **kwargs):
        grid = grid(kwargs) if callable(grid) else grid
        storages = calls[-1]["storages"]
        calls[-1]["launches"].append([self.fn.__name__, list(grid),
                                      [describe(a, storages) for a in args],
                                      sorted((k, repr(v)) for k, v in kwargs.items())])

    def step(T=64, dtype=torch.bfloat16, transpose=False, router=False, base=True, fuse="0",
             **options):
        os.environ["OMOE_TRITON_FUSE_TOKEN"] = fuse       # a switch the plans read
        gen = torch.Generator().manual_seed(0)
        d, E, r = 64, 4, 16
        kw = dict(generator=gen, dtype=dtype)
        x = torch.randn(d, T, **kw).t() if transpose else torch.randn(T, d, **kw)
        leaves = [x.requires_grad_(), torch.randn(E, r, d, **kw).requires_grad_(),
                  torch.randn(E, d, r, **kw).requires_grad_(), torch.randn(E, d, **kw).requires_grad_()]
        extra = dict(base_out=torch.randn(T, d, **kw) if base else None,
                     router_input=torch.randn(T, d, **kw) if router else None)
        calls.append(dict(storages={}, launches=[]))
        before = len(planned)
        y = omoe_lora(*leaves, backend="triton", **extra, **dict(dict(scaling=2.0), **options))
        y.backward(torch.randn(T, d, **kw))
        keep.clear()
        return len(planned) - before, calls[-1]["launches"]

    variants = dict(base={}, tokens=dict(T=65), fp16=dict(dtype=torch.float16),
                    fp32=dict(dtype=torch.float32), top_k=dict(top_k=2),
                    scaling=dict(scaling=0.5), eps=dict(eps=1e-3),
                    orthogonalize=dict(orthogonalize=False), normalize=dict(normalize=False),
                    strides=dict(transpose=True), router_input=dict(router=True),
                    no_base=dict(base=False), fused_token=dict(fuse="1"))
    out = {}
    with stubbed_launches():
        JITFunction.run = recording
        for name, kw in variants.items():
            first, again = step(**kw), step(**kw)
            out[name] = dict(first_planned=first[0], again_planned=again[0],
                             launches=len(again[1]), same_launches=first[1] == again[1])
        out["all_kept"] = sum(step(**kw)[0] for kw in variants.values()) == 0
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
        assert step["launches"] == 10, step     # the traced step is the whole step
        found = set(SYNC_OPS) & set(step["ops"])
        assert not found, f"top_k={routing}: host synchronisation in the step: {sorted(found)}"


def test_a_step_plans_once_per_key():
    """A repeated call replays its recorded plans (no planning), and every launch gets
    what the planned call gave it: the same arguments, grid and options, and tensors of
    the same sizes, strides, dtypes and aliasing. A changed token count, dtype, option,
    stride, optional tensor or switch gets plans of its own."""
    pytest.importorskip("triton")
    proc = _child(["-c", PLAN_CACHE], 300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    out = json.loads(line[len("RESULT"):])
    assert out.pop("all_kept")
    for name, case in out.items():
        launches = 9 if name == "orthogonalize" else 10    # no gram_grad without G
        assert case == dict(first_planned=2, again_planned=0, launches=launches,
                            same_launches=True), (name, case)


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
