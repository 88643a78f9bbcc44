"""pytest-benchmark cases: one per (device, shape, provider, pass) and per raw compiled op.

    pytest bench/test_bench_ops.py --benchmark-save=before
    pytest bench/test_bench_ops.py --benchmark-compare --benchmark-compare-fail=median:10%
    pytest bench/test_bench_ops.py -k "cpu-small and not compile"

Not part of `make test` (pyproject's testpaths is python_tests). Providers and inputs are
the ones of `python -m bench.bench_omoe`; the shapes are `small` and the device's first
§6 shape. Gradients are set to None before every round (pytest-benchmark's `setup`).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench.providers import SCALING, Inputs, make_inputs, providers_for  # noqa: E402
from bench.shapes import SHAPES  # noqa: E402
from bench.timing import _free_grads  # noqa: E402
from omoe_kernels.backends import backend_usable  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES_BY_DEVICE = {"cpu": ("small", "cpu"), "cuda": ("small", "llama7b")}
ROUNDS = {"small": 30, "cpu": 8, "llama7b": 20}
PASSES = ("forward", "fwd+bwd")

_inputs: dict[tuple[str, str], Inputs] = {}
_forwards: dict[tuple[str, str, str], object] = {}


def _get_inputs(device: str, shape_name: str) -> Inputs:
    key = (device, shape_name)
    if key not in _inputs:
        _inputs.clear()  # one shape's tensors at a time
        _forwards.clear()
        shape = SHAPES[shape_name]
        _inputs[key] = make_inputs(shape, torch.device(device), shape.torch_dtype)
    return _inputs[key]


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _provider_cases():
    for device in DEVICES:
        for shape_name in SHAPES_BY_DEVICE[device]:
            for provider in providers_for(torch.device(device), None):
                for pass_name in PASSES:
                    yield pytest.param(device, shape_name, provider.name, pass_name,
                                       id=f"{device}-{shape_name}-{provider.name}-{pass_name}")


@pytest.mark.parametrize(("device", "shape_name", "provider_name", "pass_name"), list(_provider_cases()))
def test_provider(benchmark, device, shape_name, provider_name, pass_name):
    shape = SHAPES[shape_name]
    provider = next(p for p in providers_for(torch.device(device), None) if p.name == provider_name)
    inp = _get_inputs(device, shape_name)
    key = (device, shape_name, provider_name)
    if key not in _forwards:
        _forwards[key] = provider.build(shape, inp)
    forward = _forwards[key]
    leaves = provider.leaves(inp)
    sync = _sync(device)

    if pass_name == "forward":
        def step():
            forward()
            sync()
    else:
        def step():
            forward().backward(inp.grad_y)
            sync()

    benchmark.group = f"{device} {shape_name} {pass_name}"
    benchmark.extra_info.update(shape=shape.describe(), provider=provider.label, threads=torch.get_num_threads())
    benchmark.pedantic(step, setup=lambda: _free_grads(leaves), rounds=ROUNDS[shape_name],
                       warmup_rounds=2, iterations=1)
    _free_grads(leaves)


def _raw_op_cases():
    for device in DEVICES:
        if not backend_usable(device, device):  # the compiled backend is named after its device
            continue
        for shape_name in SHAPES_BY_DEVICE[device]:
            for op in ("forward", "backward"):
                yield pytest.param(device, shape_name, op, id=f"{device}-{shape_name}-omoe.{op}")


@pytest.mark.parametrize(("device", "shape_name", "op"), list(_raw_op_cases()))
def test_compiled_op(benchmark, device, shape_name, op):
    """torch.ops.omoe.forward / .backward alone: no autograd, no Python validation."""
    shape = SHAPES[shape_name]
    inp = _get_inputs(device, shape_name)
    x, A, B, W, base = (t.detach() for t in inp.omoe_leaves())
    options = (SCALING, shape.top_k or shape.num_experts, True, True, 1e-6)
    sync = _sync(device)
    if op == "forward":
        def step():
            torch.ops.omoe.forward(x, A, B, W, None, base, *options)
            sync()
    else:
        _, h, logits = torch.ops.omoe.forward(x, A, B, W, None, base, *options)

        def step():
            torch.ops.omoe.backward(inp.grad_y, x, A, B, W, None, h, logits, *options)
            sync()

    benchmark.group = f"{device} {shape_name} omoe.{op}"
    benchmark.extra_info.update(shape=shape.describe(), threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=ROUNDS[shape_name], warmup_rounds=2, iterations=1)
