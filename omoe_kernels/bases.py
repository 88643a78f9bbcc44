"""The base layers `OMoELinear` wraps: one dispatcher per kind, tried in order (as peft's
`dispatch_*`), so that the layer class holds no special case for any of them.

A kind says which modules it takes, the device and dtype the adapter's parameters get
on such a base, and how to run the base's forward. The last kind takes any linear-like
module: int `in_features`/`out_features` and a forward mapping [..., in_features] to
[..., out_features] (docs/contract.md §3).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class _QuantizedBaseLinear(torch.autograd.Function):
    """`base(x)` for a torch.ao quantized Linear. Its op has no autograd kernel, so autograd
    would pass no gradient to `x` (silently); this gives x the gradient of the linear map
    the layer computes, with the dequantized weight. The base is frozen: no weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        return base(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.base.weight().dequantize().to(grad.dtype)
        return grad @ weight, None


def _is_ao_quantized_linear(base: nn.Module) -> bool:
    return (type(base).__module__.startswith("torch.ao.nn.quantized")
            and callable(getattr(base, "weight", None)))


def _cpu_float32(base: nn.Module) -> dict:
    """torch.ao's packed int8 weights run on the CPU, with float32 activations."""
    return {"device": torch.device("cpu"), "dtype": torch.float32}


def _ao_quantized_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _QuantizedBaseLinear.apply(x, base)


def _has_integer_weight(base: nn.Module) -> bool:
    weight = getattr(base, "weight", None)
    return isinstance(weight, torch.Tensor) and not weight.is_floating_point()


def _integer_weight_factory(base: nn.Module) -> dict:
    """A quantized linear keeping an integer weight (bitsandbytes' 8-bit): the adapter
    computes in float32 on the weight's device."""
    if type(base).forward is nn.Linear.forward:  # F.linear cannot run an integer weight
        raise TypeError(f"`base` is a {type(base).__name__} with a {base.weight.dtype} weight, "
                        "which its forward cannot compute with; wrap a quantized module "
                        "(e.g. torch.ao.nn.quantized.dynamic.Linear) or a float layer")
    return {"device": base.weight.device, "dtype": torch.float32}


def _float_factory(base: nn.Module) -> dict:
    """The weight's device and dtype, else those of its first float tensor (4-bit
    layers keep a packed weight and float scales), else CPU float32."""
    weight = getattr(base, "weight", None)
    tensors = [weight] if isinstance(weight, torch.Tensor) else [
        t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()]
    if tensors:
        return {"device": tensors[0].device, "dtype": tensors[0].dtype}
    return {"device": torch.device("cpu"), "dtype": torch.float32}


def _call(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return base(x)  # under autocast this runs in the autocast dtype, as usual


@dataclass(frozen=True)
class BaseKind:
    """One kind of base layer."""

    name: str
    matches: Callable[[nn.Module], bool]
    # Device and dtype for the adapter's parameters; raises TypeError for a base it cannot run.
    factory: Callable[[nn.Module], dict]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]


BASE_KINDS: tuple[BaseKind, ...] = (
    BaseKind("torch.ao quantized Linear", _is_ao_quantized_linear, _cpu_float32,
             _ao_quantized_forward),
    BaseKind("integer-weight linear", _has_integer_weight, _integer_weight_factory, _call),
    BaseKind("linear-like module", lambda base: True, _float_factory, _call),
)


def dispatch(base: nn.Module) -> BaseKind:
    """The first kind in BASE_KINDS that takes `base` (the last takes every module)."""
    for kind in BASE_KINDS:
        if kind.matches(base):
            return kind
    raise AssertionError("BASE_KINDS ends with a kind that takes every module")


def check_base(base) -> None:
    """TypeError unless `base` is an nn.Module with positive int in/out_features."""
    if not isinstance(base, nn.Module):
        raise TypeError(f"`base` must be an nn.Module, got {type(base).__name__}")
    sizes = [getattr(base, n, None) for n in ("in_features", "out_features")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise TypeError(f"`base` must be an nn.Linear or a linear-like module with int "
                        f"`in_features`/`out_features`, got {type(base).__name__}")


def base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`base(x)`, by the base's kind."""
    if type(base) is nn.Linear:  # every kind that takes an nn.Linear runs base(x)
        return base(x)
    return dispatch(base).forward(base, x)
