"""docs/contract.md §4: bad input.

At the Python API every bad argument gets a ValueError or TypeError that names it, raised
before any kernel runs. The raw torch.ops.omoe ops check their inputs too: malformed
tensors raise RuntimeError and never crash.
"""
from __future__ import annotations

import re

import pytest
import torch

import omoe_kernels
import omoe_kernels.functional
from helpers import BACKENDS, COMPILED_BACKENDS, DEVICE, make_problem
from omoe_kernels import omoe_lora

T, D_IN, D_OUT, E, R = 4, 6, 5, 3, 2


def _good():
    p = make_problem(T, D_IN, D_OUT, E, R, with_router_input=True)
    return dict(x=p.x, A=p.A, B=p.B, router_weight=p.router_weight, base_out=p.base_out,
                router_input=p.router_input)


def _other_device():
    """A device that is not DEVICE: the CPU next to a GPU, else the meta device."""
    return torch.device("cpu") if DEVICE.type == "cuda" else torch.device("meta")


def _unavailable_backend():
    return next(b for b in omoe_kernels.BACKENDS if b not in BACKENDS)


# (argument named in the message, exception type, changes to the good call)
BAD_CALLS = {
    "x_not_tensor": ("x", TypeError, lambda k: {"x": k["x"].tolist()}),
    "x_int": ("x", TypeError, lambda k: {"x": k["x"].long()}),
    "x_bool": ("x", TypeError, lambda k: {"x": k["x"] > 0}),
    "x_scalar": ("x", ValueError, lambda k: {"x": k["x"][0, 0]}),
    "x_d_in": ("x", ValueError, lambda k: {"x": k["x"][:, :-1]}),
    "A_2d": ("A", ValueError, lambda k: {"A": k["A"][0]}),
    "A_4d": ("A", ValueError, lambda k: {"A": k["A"][None]}),
    "A_int": ("A", TypeError, lambda k: {"A": k["A"].int()}),
    "A_dtype": ("A", TypeError, lambda k: {"A": k["A"].double()}),
    "A_device": ("A", ValueError, lambda k: {"A": k["A"].to(_other_device())}),
    "A_no_experts": ("A", ValueError, lambda k: {"A": k["A"][:0], "B": k["B"][:0],
                                                  "router_weight": k["router_weight"][:0]}),
    "A_rank0": ("A", ValueError, lambda k: {"A": k["A"][:, :0], "B": k["B"][:, :, :0]}),
    "B_2d": ("B", ValueError, lambda k: {"B": k["B"][0]}),
    "B_experts": ("B", ValueError, lambda k: {"B": k["B"][:-1]}),
    "B_rank": ("B", ValueError, lambda k: {"B": k["B"][:, :, :-1]}),
    "B_d_out0": ("B", ValueError, lambda k: {"B": k["B"][:, :0], "base_out": None}),
    "B_dtype": ("B", TypeError, lambda k: {"B": k["B"].bfloat16()}),
    "B_int": ("B", TypeError, lambda k: {"B": k["B"].short()}),
    "B_device": ("B", ValueError, lambda k: {"B": k["B"].to(_other_device())}),
    "router_weight_1d": ("router_weight", ValueError,
                         lambda k: {"router_weight": k["router_weight"][0]}),
    "router_weight_experts": ("router_weight", ValueError,
                              lambda k: {"router_weight": k["router_weight"][:-1]}),
    "router_weight_d_in": ("router_weight", ValueError,
                           lambda k: {"router_weight": k["router_weight"][:, :-1]}),
    "router_weight_dtype": ("router_weight", TypeError,
                            lambda k: {"router_weight": k["router_weight"].half()}),
    "router_weight_int": ("router_weight", TypeError,
                          lambda k: {"router_weight": k["router_weight"].int()}),
    "router_weight_device": ("router_weight", ValueError,
                             lambda k: {"router_weight": k["router_weight"].to(_other_device())}),
    "base_out_not_tensor": ("base_out", TypeError, lambda k: {"base_out": 1.0}),
    "base_out_d_out": ("base_out", ValueError, lambda k: {"base_out": k["base_out"][:, :-1]}),
    "base_out_tokens": ("base_out", ValueError, lambda k: {"base_out": k["base_out"][:-1]}),
    "base_out_lead": ("base_out", ValueError, lambda k: {"base_out": k["base_out"][None]}),
    "base_out_dtype": ("base_out", TypeError, lambda k: {"base_out": k["base_out"].double()}),
    "base_out_int": ("base_out", TypeError, lambda k: {"base_out": k["base_out"].int()}),
    "base_out_device": ("base_out", ValueError,
                        lambda k: {"base_out": k["base_out"].to(_other_device())}),
    "router_input_d_in": ("router_input", ValueError,
                          lambda k: {"router_input": k["router_input"][:, :-1]}),
    "router_input_tokens": ("router_input", ValueError,
                            lambda k: {"router_input": k["router_input"][1:]}),
    "router_input_dtype": ("router_input", TypeError,
                           lambda k: {"router_input": k["router_input"].bfloat16()}),
    "router_input_int": ("router_input", TypeError,
                         lambda k: {"router_input": k["router_input"].long()}),
    "router_input_device": ("router_input", ValueError,
                            lambda k: {"router_input": k["router_input"].to(_other_device())}),
    "top_k_zero": ("top_k", ValueError, lambda k: {"top_k": 0}),
    "top_k_negative": ("top_k", ValueError, lambda k: {"top_k": -1}),
    "top_k_above_E": ("top_k", ValueError, lambda k: {"top_k": E + 1}),
    "top_k_float": ("top_k", TypeError, lambda k: {"top_k": 1.5}),
    "top_k_bool": ("top_k", TypeError, lambda k: {"top_k": True}),
    "top_k_str": ("top_k", TypeError, lambda k: {"top_k": "2"}),
    "eps_zero": ("eps", ValueError, lambda k: {"eps": 0.0}),
    "eps_negative": ("eps", ValueError, lambda k: {"eps": -1e-6}),
    "eps_nan": ("eps", ValueError, lambda k: {"eps": float("nan")}),
    "eps_inf": ("eps", ValueError, lambda k: {"eps": float("inf")}),
    "eps_str": ("eps", TypeError, lambda k: {"eps": "1e-6"}),
    "eps_none": ("eps", TypeError, lambda k: {"eps": None}),
    "scaling_str": ("scaling", TypeError, lambda k: {"scaling": "1"}),
    "scaling_none": ("scaling", TypeError, lambda k: {"scaling": None}),
    "orthogonalize_int": ("orthogonalize", TypeError, lambda k: {"orthogonalize": 1}),
    "normalize_none": ("normalize", TypeError, lambda k: {"normalize": None}),
    "backend_int": ("backend", TypeError, lambda k: {"backend": 3}),
    "backend_unknown": ("backend", ValueError, lambda k: {"backend": "fastest"}),
    "backend_unavailable": ("backend", ValueError, lambda k: {"backend": _unavailable_backend()}),
}


def _names_argument(message: str, name: str) -> bool:
    return re.search(rf"(?<![A-Za-z_]){re.escape(name)}(?![A-Za-z_])", message) is not None


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_argument_is_named_before_any_kernel(case, monkeypatch):
    name, error, change = BAD_CALLS[case]

    def no_kernel(*args, **kwargs):
        raise AssertionError("a backend was called with bad input")

    monkeypatch.setattr(omoe_kernels.functional, "backend_function", no_kernel)
    kwargs = _good()
    kwargs.update(change(kwargs))
    x, A, B, W = (kwargs.pop(n) for n in ("x", "A", "B", "router_weight"))
    with pytest.raises(error) as info:
        omoe_lora(x, A, B, W, **kwargs)
    assert _names_argument(str(info.value), name), f"message does not name `{name}`: {info.value}"


def test_good_call_passes_validation():
    kwargs = _good()
    x, A, B, W = (kwargs.pop(n) for n in ("x", "A", "B", "router_weight"))
    assert omoe_lora(x, A, B, W, top_k=2, **kwargs).shape == (T, D_OUT)


# ---- raw ops --------------------------------------------------------------------------

needs_compiled = pytest.mark.skipif(
    not COMPILED_BACKENDS, reason=f"no compiled backend on {DEVICE.type} (available: {BACKENDS})")

OPTIONS = dict(scaling=1.0, top_k=2, orthogonalize=True, normalize=True, eps=1e-6)


def _raw_forward(x, A, B, router_weight, router_input=None, base_out=None, **options):
    o = dict(OPTIONS, **options)
    return torch.ops.omoe.forward(x, A, B, router_weight, router_input, base_out, o["scaling"],
                                  o["top_k"], o["orthogonalize"], o["normalize"], o["eps"])


def _experts(num, rank=R):
    p = make_problem(T, D_IN, D_OUT, num, rank)
    return dict(A=p.A, B=p.B, router_weight=p.router_weight)


RAW_FORWARD_BAD = {
    "x_1d": lambda k: {"x": k["x"][0]},
    "x_3d": lambda k: {"x": k["x"][None]},
    "x_int": lambda k: {"x": k["x"].int()},
    "x_d_in": lambda k: {"x": k["x"][:, :-1]},
    "A_2d": lambda k: {"A": k["A"][0]},
    "A_int": lambda k: {"A": k["A"].long()},
    "A_dtype": lambda k: {"A": k["A"].double()},
    "B_2d": lambda k: {"B": k["B"][0]},
    "B_experts": lambda k: {"B": k["B"][:-1]},
    "B_rank": lambda k: {"B": k["B"][:, :, :-1]},
    "B_dtype": lambda k: {"B": k["B"].bfloat16()},
    "d_out_0": lambda k: {"B": k["B"][:, :0]},
    "router_weight_1d": lambda k: {"router_weight": k["router_weight"][0]},
    "router_weight_3d": lambda k: {"router_weight": k["router_weight"][None]},
    "router_weight_experts": lambda k: {"router_weight": k["router_weight"][:-1]},
    "router_weight_d_in": lambda k: {"router_weight": k["router_weight"][:, :-1]},
    "router_weight_dtype": lambda k: {"router_weight": k["router_weight"].half()},
    "no_experts": lambda k: {"A": k["A"][:0], "B": k["B"][:0],
                             "router_weight": k["router_weight"][:0], "top_k": 1},
    # Any E works; the CPU pass takes up to 256 active experts, CUDA's up to 32.
    "too_many_active_experts": lambda k: dict(_experts(257, 1), top_k=257),
    "rank_0": lambda k: {"A": k["A"][:, :0], "B": k["B"][:, :, :0]},
    "router_input_tokens": lambda k: {"router_input": k["x"][1:]},
    "router_input_d_in": lambda k: {"router_input": k["x"][:, :-1]},
    "router_input_1d": lambda k: {"router_input": k["x"][0]},
    "router_input_dtype": lambda k: {"router_input": k["x"].double()},
    "router_input_int": lambda k: {"router_input": k["x"].int()},
    "base_out_shape": lambda k: {"base_out": torch.zeros(T, D_OUT + 1, device=DEVICE)},
    "base_out_tokens": lambda k: {"base_out": torch.zeros(T + 1, D_OUT, device=DEVICE)},
    "base_out_1d": lambda k: {"base_out": torch.zeros(D_OUT, device=DEVICE)},
    "base_out_dtype": lambda k: {"base_out": torch.zeros(T, D_OUT, device=DEVICE,
                                                         dtype=torch.float64)},
    "top_k_0": lambda k: {"top_k": 0},
    "top_k_negative": lambda k: {"top_k": -3},
    "top_k_above_E": lambda k: {"top_k": E + 1},
    "eps_0": lambda k: {"eps": 0.0},
    "eps_negative": lambda k: {"eps": -1.0},
    "eps_nan": lambda k: {"eps": float("nan")},
    "A_device": lambda k: {"A": k["A"].to(_other_device())},
    "router_weight_device": lambda k: {"router_weight": k["router_weight"].to(_other_device())},
}


@needs_compiled
@pytest.mark.parametrize("case", list(RAW_FORWARD_BAD))
def test_raw_forward_rejects_malformed_input(case):
    p = make_problem(T, D_IN, D_OUT, E, R)
    kwargs = dict(x=p.x, A=p.A, B=p.B, router_weight=p.router_weight)
    kwargs.update(RAW_FORWARD_BAD[case](kwargs))
    with pytest.raises(RuntimeError):
        _raw_forward(**kwargs)


def _raw_backward_inputs(with_router_input):
    p = make_problem(T, D_IN, D_OUT, E, R, with_router_input=with_router_input)
    y, h, logits = _raw_forward(p.x, p.A, p.B, p.router_weight, p.router_input)
    return dict(grad_y=torch.randn_like(y), x=p.x, A=p.A, B=p.B,
                router_weight=p.router_weight, router_input=p.router_input, h=h,
                logits=logits)


def _raw_backward(grad_y, x, A, B, router_weight, router_input, h, logits, **options):
    o = dict(OPTIONS, **options)
    return torch.ops.omoe.backward(grad_y, x, A, B, router_weight, router_input, h, logits,
                                   o["scaling"], o["top_k"], o["orthogonalize"],
                                   o["normalize"], o["eps"])


RAW_BACKWARD_BAD = {
    "grad_y_shape": lambda k: {"grad_y": k["grad_y"][:, :-1]},
    "grad_y_tokens": lambda k: {"grad_y": k["grad_y"][1:]},
    "grad_y_1d": lambda k: {"grad_y": k["grad_y"][0]},
    "grad_y_int": lambda k: {"grad_y": k["grad_y"].int()},
    "h_shape": lambda k: {"h": k["h"][:, :-1]},
    "h_tokens": lambda k: {"h": k["h"][1:]},
    "h_1d": lambda k: {"h": k["h"].flatten()},
    "h_dtype": lambda k: {"h": k["h"].double()},
    "h_int": lambda k: {"h": k["h"].int()},
    "logits_shape": lambda k: {"logits": k["logits"][:, :-1]},
    "logits_tokens": lambda k: {"logits": k["logits"][1:]},
    "logits_3d": lambda k: {"logits": k["logits"][None]},
    "logits_dtype": lambda k: {"logits": k["logits"].half()},
    "x_d_in": lambda k: {"x": k["x"][:, :-1]},
    "x_int": lambda k: {"x": k["x"].int()},
    "A_dtype": lambda k: {"A": k["A"].double()},
    "B_experts": lambda k: {"B": k["B"][:-1]},
    "router_weight_experts": lambda k: {"router_weight": k["router_weight"][:-1]},
    "router_input_tokens": lambda k: {"router_input": k["x"][1:]},
    "top_k_above_E": lambda k: {"top_k": E + 1},
    "eps_0": lambda k: {"eps": 0.0},
    "h_device": lambda k: {"h": k["h"].to(_other_device())},
    "grad_y_device": lambda k: {"grad_y": k["grad_y"].to(_other_device())},
}


@needs_compiled
@pytest.mark.parametrize("case", list(RAW_BACKWARD_BAD))
def test_raw_backward_rejects_malformed_input(case):
    kwargs = _raw_backward_inputs(with_router_input=case.startswith("router_input"))
    kwargs.update(RAW_BACKWARD_BAD[case](kwargs))
    with pytest.raises(RuntimeError):
        _raw_backward(**kwargs)


@needs_compiled
@pytest.mark.parametrize("with_router_input", [False, True])
def test_raw_ops_accept_good_input(with_router_input):
    """The good calls the malformed ones above are derived from do run."""
    grads = _raw_backward(**_raw_backward_inputs(with_router_input))
    assert grads[0].shape == (T, D_IN) and grads[1].shape == (E, R, D_IN)
