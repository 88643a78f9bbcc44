"""The call path from `omoe_lora` / `OMoELinear.forward` to the op: a lean call
path. A repeated call skips the checks and the backend lookup it has passed, a changed
call is checked in full, and the Python frames of a call stay few. The cost per call in
µs is bench/call_cost.py's (timings live in the benchmark, not here)."""
from __future__ import annotations

import sys

import pytest
import torch

import omoe_kernels
import omoe_kernels._validate as validate
import omoe_kernels.functional as functional
from helpers import COMPILED_BACKENDS, DEVICE, make_problem
from omoe_kernels import omoe_lora

T, D_IN, D_OUT, E, R = 3, 6, 5, 4, 2


def _inputs():
    p = make_problem(T, D_IN, D_OUT, E, R, with_router_input=False)
    return p.x, p.A, p.B, p.router_weight, p.base_out


def test_a_repeated_call_skips_the_checks_it_passed(monkeypatch):
    x, A, B, W, base_out = _inputs()
    first = omoe_lora(x, A, B, W, scaling=0.5, base_out=base_out, backend="reference")

    def refuse(*args, **kwargs):
        raise AssertionError("the option checks ran again for a call they had passed")

    monkeypatch.setattr(validate, "check_options", refuse)
    again = omoe_lora(x, A, B, W, scaling=0.5, base_out=base_out, backend="reference")
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_a_repeated_call_resolves_its_backend_once(monkeypatch):
    x, A, B, W, base_out = _inputs()
    calls = []

    def counting(backend, device, active_experts=1):
        calls.append(backend)
        return "reference"

    monkeypatch.setattr(functional, "resolve_backend", counting)
    functional._RESOLVED.clear()
    for _ in range(3):
        omoe_lora(x, A, B, W, base_out=base_out, top_k=2, backend="auto")
    assert calls == ["auto"]


@pytest.mark.parametrize("change, error", [
    (lambda k: {"x": k["x"].double()}, TypeError),
    (lambda k: {"base_out": k["base_out"][:, :-1]}, ValueError),
    (lambda k: {"base_out": k["base_out"].reshape(1, T, D_OUT)}, ValueError),
    (lambda k: {"router_weight": k["router_weight"][:-1]}, ValueError),
    (lambda k: {"B": k["B"].double()}, TypeError),
    (lambda k: {"router_input": k["x"].long()}, TypeError),
    (lambda k: {"scaling": float("nan")}, ValueError),
    (lambda k: {"scaling": True}, TypeError),
    (lambda k: {"top_k": 2.0}, TypeError),
    (lambda k: {"top_k": [2]}, TypeError),
    (lambda k: {"eps": 1e-300}, ValueError),   # underflows in float32 only
    (lambda k: {"orthogonalize": 1}, TypeError),
])
def test_a_call_that_differs_from_a_passed_one_is_checked_in_full(change, error):
    x, A, B, W, base_out = _inputs()
    good = dict(x=x, A=A, B=B, router_weight=W, base_out=base_out, scaling=2.0, top_k=2,
                eps=1e-6, orthogonalize=True)
    for _ in range(2):  # the second call takes the kept Problem
        omoe_lora(**good, backend="reference")
    with pytest.raises(error):
        omoe_lora(**(good | change(good)), backend="reference")


def test_a_kept_problem_is_the_checked_one():
    x, A, B, W, base_out = _inputs()
    kwargs = dict(scaling=2, top_k=None, orthogonalize=True, normalize=False, eps=1e-5,
                  base_out=base_out, router_input=None)
    functional._PLANS.clear()
    for _ in range(2):
        omoe_lora(x, A, B, W, **kwargs, backend="reference")
    [(kept, _)] = functional._PLANS.values()
    assert kept == validate.check_inputs(x, A, B, W, **kwargs)
    assert (kept.num_tokens, kept.top_k, kept.scaling, kept.normalize) == (T, E, 2.0, False)
    assert isinstance(kept.scaling, float)


def test_a_kept_call_reads_the_backend_variable_again(monkeypatch):
    x, A, B, W, base_out = _inputs()
    monkeypatch.delenv("OMOE_BACKEND", raising=False)
    for _ in range(2):
        omoe_lora(x, A, B, W, base_out=base_out)
    monkeypatch.setenv("OMOE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="OMOE_BACKEND"):
        omoe_lora(x, A, B, W, base_out=base_out)
    monkeypatch.setenv("OMOE_BACKEND", "reference")
    used = []
    monkeypatch.setattr(functional, "resolve_backend",
                        lambda backend, device, active_experts=1: used.append(backend) or "reference")
    omoe_lora(x, A, B, W, base_out=base_out)
    assert used == ["auto"]


def test_a_kept_call_sees_a_registry_entry_replaced(monkeypatch):
    import dataclasses

    from omoe_kernels.backends import REGISTRY

    x, A, B, W, base_out = _inputs()
    first = omoe_lora(x, A, B, W, base_out=base_out, backend="reference")
    omoe_lora(x, A, B, W, base_out=base_out, backend="reference")  # kept
    real = REGISTRY["reference"].load()
    doubled = dataclasses.replace(REGISTRY["reference"],
                                  load=lambda: lambda *args: 2 * real(*args))
    monkeypatch.setitem(REGISTRY, "reference", doubled)
    again = omoe_lora(x, A, B, W, base_out=base_out, backend="reference")
    torch.testing.assert_close(again, 2 * first, rtol=0, atol=0)
    monkeypatch.undo()
    restored = omoe_lora(x, A, B, W, base_out=base_out, backend="reference")
    torch.testing.assert_close(restored, first, rtol=0, atol=0)


def test_the_layer_reads_a_parametrized_weight_through_its_parametrization():
    from torch.nn.utils import parametrize

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    layer = omoe_kernels.OMoELinear(torch.nn.Linear(D_IN, D_OUT), E, R, backend="reference")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(T, D_IN)
    parametrize.register_parametrization(layer, "lora_B", Doubled())
    expected = omoe_lora(x, layer.lora_A, 2 * layer.parametrizations.lora_B.original,
                         layer.router_weight, scaling=layer.scaling, base_out=layer.base(x),
                         backend="reference")
    torch.testing.assert_close(layer(x), expected)


def _python_calls(fn) -> int:
    """Python function calls (frames) made by fn(), after a warm-up call."""
    fn()
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event == "call"

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.skipif(not COMPILED_BACKENDS, reason="needs the compiled extension")
def test_an_inference_call_of_the_layer_makes_few_python_calls():
    # The layer's own frames plus torch.nn.Module's and the base Linear's; the checks and
    # the backend lookup of a repeated call add a handful, not one frame per argument.
    torch.manual_seed(0)
    layer = omoe_kernels.OMoELinear(torch.nn.Linear(D_IN, D_OUT), E, R,
                                    backend=COMPILED_BACKENDS[0]).to(DEVICE)
    x = torch.randn(1, D_IN, device=DEVICE)
    with torch.no_grad():
        assert _python_calls(lambda: layer(x)) <= 45


def test_an_eps_kept_for_float64_is_checked_again_for_float32():
    x, A, B, W, base_out = _inputs()
    wide = [t.double() for t in (x, A, B, W, base_out)]
    for _ in range(2):
        omoe_lora(*wide[:4], base_out=wide[4], eps=1e-300, backend="reference")
    with pytest.raises(ValueError, match="eps"):
        omoe_lora(x, A, B, W, base_out=base_out, eps=1e-300, backend="reference")



@pytest.mark.skipif("cpu" not in COMPILED_BACKENDS, reason="needs the compiled CPU op")
def test_a_layer_step_adds_x_gradients_in_place_and_copies_grad_y_once():
    # The base's gradient of x and the op's meet in autograd's buffer for x. The op's
    # arrives first (the base ran first); were it a view of the op's output, the shared
    # storage would make autograd add the base's into a new tensor instead of in place.
    # sum()'s gradient is expanded: the op makes it contiguous and hands that on as
    # base_out's gradient, so the base's backward does not copy it again.
    torch.manual_seed(0)
    layer = omoe_kernels.OMoELinear(torch.nn.Linear(16, 12), E, R, backend="cpu")
    x = torch.randn(8, 16, requires_grad=True)
    with torch.profiler.profile() as prof:
        layer(x).sum().backward()

    def under(event, name):
        while event is not None and name not in event.name:
            event = event.cpu_parent
        return event is not None

    events = prof.events()
    adds = [e.name for e in events if e.name in ("aten::add", "aten::add_")
            and under(e, "AddmmBackward0")]
    assert adds == ["aten::add_"], adds
    copies = [e for e in events if e.name == "aten::clone" and under(e, "AddmmBackward0")]
    assert not copies, "the base's backward copied grad_y"
    x64 = x.detach().double().requires_grad_()
    weights = (t.detach().double() for t in (layer.lora_A, layer.lora_B, layer.router_weight))
    base_out = torch.nn.functional.linear(x64, layer.base.weight.double(),
                                          layer.base.bias.double())
    omoe_lora(x64, *weights, base_out=base_out, scaling=layer.scaling,
              backend="reference").sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
