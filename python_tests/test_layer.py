"""OMoELinear (docs/contract.md §3): frozen base, parameters and their shapes, scaling = alpha / rank,
output = base at init, dropout on the adapter input only (the router reads undropped x).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import BACKENDS, DEVICE, assert_rel_close, random_grad
from omoe_kernels import OMoELinear, omoe_lora

D_IN, D_OUT, E, R = 12, 10, 3, 4


def _layer(backend="auto", dtype=torch.float32, randomize_B=True, **kwargs):
    torch.manual_seed(71)
    base = nn.Linear(D_IN, D_OUT).to(device=DEVICE, dtype=dtype)
    layer = OMoELinear(base, E, R, backend=backend, **kwargs)
    if randomize_B:
        with torch.no_grad():
            layer.lora_B.normal_()
    return layer


def _functional(layer, x, adapter_in=None, router_input=None, backend=None):
    """What the layer must compute, spelled out with omoe_lora."""
    return omoe_lora(x if adapter_in is None else adapter_in, layer.lora_A, layer.lora_B,
                     layer.router_weight, scaling=layer.scaling, top_k=layer.top_k,
                     orthogonalize=layer.orthogonalize, normalize=layer.normalize,
                     eps=layer.eps, base_out=layer.base(x), router_input=router_input,
                     backend=backend or layer.backend)


def test_parameters_names_shapes_and_frozen_base():
    base = nn.Linear(D_IN, D_OUT).to(DEVICE)
    weight_before = base.weight.detach().clone()
    layer = OMoELinear(base, E, R)
    assert layer.base is base
    trainable = {n: p.shape for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A": (E, R, D_IN), "lora_B": (E, D_OUT, R),
                         "router_weight": (E, D_IN)}
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert torch.equal(base.weight, weight_before)
    assert torch.all(layer.lora_B == 0), "lora_B starts at 0 (LoRA's init)"
    assert layer.lora_A.abs().sum() > 0 and layer.router_weight.abs().sum() > 0
    assert all(p.device.type == DEVICE.type for p in layer.parameters())


@pytest.mark.parametrize("alpha,expected", [(None, 1.0), (8, 2.0), (2.0, 0.5), (16, 4.0)])
def test_scaling_is_alpha_over_rank(alpha, expected):
    layer = OMoELinear(nn.Linear(D_IN, D_OUT), E, R, alpha=alpha)
    assert layer.scaling == expected


@pytest.mark.parametrize("adapter_dtype", [None, "base"], ids=["default", "base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_output_equals_base_at_init(backend, lead, dtype, adapter_dtype):
    layer = _layer(backend, dtype, randomize_B=False, top_k=2, adapter_dtype=adapter_dtype)
    # On a half-precision base the adapter defaults to float32 parameters, as peft's do.
    expected = torch.float32 if adapter_dtype is None and dtype != torch.float32 else dtype
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.router_weight.dtype == expected
    x = torch.randn(lead + (D_IN,), device=DEVICE, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == lead + (D_OUT,)
    assert torch.equal(y, layer.base(x))


@pytest.mark.parametrize("options", [{}, dict(top_k=2), dict(normalize=False),
                                     dict(orthogonalize=False, top_k=1)],
                         ids=["dense", "top2", "no_normalize", "no_orthogonalize-top1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradients_equal_functional(backend, options):
    layer = _layer(backend, alpha=6, **options)
    x = torch.randn(2, 5, D_IN, device=DEVICE, requires_grad=True)
    grad_y = random_grad((2, 5, D_OUT), torch.float32)
    y = layer(x)
    y.backward(grad_y)
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    got["x"] = x.grad.clone()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    layer.zero_grad()
    x.grad = None
    y_ref = _functional(layer, x)
    y_ref.backward(grad_y)
    assert_rel_close(y, y_ref, 1e-6, "forward")
    for name, p in list(layer.named_parameters()) + [("x", x)]:
        if name in got:
            assert_rel_close(got[name], p.grad, 1e-6, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_applies_to_adapter_input_only(backend):
    layer = _layer(backend, dropout=0.5, top_k=2)
    x = torch.randn(16, D_IN, device=DEVICE, requires_grad=True)
    grad_y = random_grad((16, D_OUT), torch.float32)

    torch.manual_seed(5)
    y = layer(x)
    y.backward(grad_y)
    grad_x = x.grad.clone()
    x.grad = None

    # Same seed: the same dropout mask, applied to the adapter input; the router and the
    # base layer read the undropped x.
    torch.manual_seed(5)
    dropped = F.dropout(x, 0.5, training=True)
    y_ref = _functional(layer, x, adapter_in=dropped, router_input=x)
    y_ref.backward(grad_y)
    assert_rel_close(y, y_ref, 1e-6, "forward")
    assert_rel_close(grad_x, x.grad, 1e-6, "grad x")

    # The test can tell: a router reading the dropped x, or no dropout, gives another output.
    wrong_router = _functional(layer, x, adapter_in=dropped)
    assert (y - wrong_router).abs().max() > 1e-3
    assert (y - _functional(layer, x)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_off_in_eval(backend):
    layer = _layer(backend, dropout=0.5).eval()
    x = torch.randn(9, D_IN, device=DEVICE)
    y = layer(x)
    assert torch.equal(y, layer(x))
    assert_rel_close(y, _functional(layer, x), 1e-6, "eval forward")


def test_base_output_uses_base_weights():
    layer = _layer()
    with torch.no_grad():
        layer.base.weight.mul_(3.0)  # a changed base shows in the output
    x = torch.randn(4, D_IN, device=DEVICE)
    assert_rel_close(layer(x), _functional(layer, x), 1e-6, "forward")


# (argument named in the message, exception type, constructor keyword changes)
def int8_linear(d_in: int, d_out: int) -> nn.Linear:
    """An nn.Linear whose weight was cast to int8 (its forward cannot run)."""
    linear = nn.Linear(d_in, d_out)
    linear.weight = nn.Parameter(linear.weight.detach().to(torch.int8), requires_grad=False)
    return linear


BAD_LAYER_ARGS = {
    "base_not_linear": ("base", TypeError, dict(base=nn.Conv1d(2, 2, 1))),
    "experts_zero": ("num_experts", ValueError, dict(num_experts=0)),
    "experts_float": ("num_experts", TypeError, dict(num_experts=2.0)),
    "rank_zero": ("rank", ValueError, dict(rank=0)),
    "rank_negative": ("rank", ValueError, dict(rank=-2)),
    "rank_float": ("rank", TypeError, dict(rank=1.5)),
    "top_k_above_E": ("top_k", ValueError, dict(top_k=E + 1)),
    "top_k_zero": ("top_k", ValueError, dict(top_k=0)),
    "eps_zero": ("eps", ValueError, dict(eps=0.0)),
    "alpha_str": ("alpha", TypeError, dict(alpha="8")),
    "dropout_one": ("dropout", ValueError, dict(dropout=1.0)),
    "dropout_negative": ("dropout", ValueError, dict(dropout=-0.1)),
    "orthogonalize_int": ("orthogonalize", TypeError, dict(orthogonalize=1)),
    "normalize_str": ("normalize", TypeError, dict(normalize="yes")),
    "backend_int": ("backend", TypeError, dict(backend=0)),
    "backend_unknown": ("backend", ValueError, dict(backend="tpu")),
    "adapter_dtype_int": ("adapter_dtype", ValueError, dict(adapter_dtype=torch.int8)),
    "adapter_dtype_name": ("adapter_dtype", ValueError, dict(adapter_dtype="half precision")),
    "adapter_name_dotted": ("adapter_name", ValueError, dict(adapter_name="a.b")),
    "base_int8_linear": ("base", TypeError,
                         dict(base=int8_linear(D_IN, D_OUT))),
}


@pytest.mark.parametrize("case", list(BAD_LAYER_ARGS))
def test_bad_layer_argument_is_named(case):
    name, error, change = BAD_LAYER_ARGS[case]
    kwargs = dict(base=nn.Linear(D_IN, D_OUT), num_experts=E, rank=R)
    kwargs.update(change)
    with pytest.raises(error) as info:
        OMoELinear(kwargs.pop("base"), kwargs.pop("num_experts"), kwargs.pop("rank"), **kwargs)
    assert re.search(rf"(?<![A-Za-z_]){name}(?![A-Za-z_])", str(info.value)), str(info.value)

