"""Argument checks shared by every backend (docs/contract.md §4).

Every check runs in Python before any kernel, and every error names the argument.
"""
from __future__ import annotations

import math

import torch

from .ops.problem import Problem
from .options import check_eps, check_finite, check_flag, check_top_k

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, t, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"`{name}` must be a floating tensor (float16, bfloat16, float32 or float64), "
            f"got {t.dtype}"
        )
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(t.shape)}")


def check_options(num_experts: int, top_k, eps, scaling=1.0) -> tuple[int, float, float]:
    """top_k, eps and scaling by `OMoEOptions`'s rules (options.py); returns
    (k = min(top_k, E), eps, scaling) as the kernels take them."""
    return check_top_k(top_k, num_experts), check_eps(eps), check_finite("scaling", scaling)


# The smallest positive value of each dtype (a subnormal): a number at or below half of
# it rounds to 0 there.
_SMALLEST_POSITIVE = {torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -133,
                      torch.float32: 2.0 ** -149, torch.float64: 5e-324}


def check_eps_fits(eps: float, dtype: torch.dtype) -> None:
    """`eps` must not round to 0 in the inputs' dtype (rsqrt(0) would turn B = 0 into NaN)."""
    smallest = _SMALLEST_POSITIVE.get(dtype)
    if smallest is not None and eps <= smallest / 2:
        raise ValueError(
            f"`eps`={eps:g} underflows to 0 in {dtype} (the inputs' dtype); "
            f"use an eps of at least {smallest:.3g}"
        )


def check_inputs(x, A, B, router_weight, *, scaling, top_k, orthogonalize, normalize, eps,
                 base_out, router_input) -> Problem:
    """Checks the arguments of `omoe_lora` and returns the problem sizes."""
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("`x` must have at least 1 dimension [..., d_in], got a scalar")
    _check_tensor("A", A, 3)
    _check_tensor("B", B, 3)
    _check_tensor("router_weight", router_weight, 2)
    E, r, d_in = A.shape
    d_out = B.shape[1]
    if E < 1:
        raise ValueError("`A` must hold at least one expert (A.shape[0] >= 1)")
    if r < 1:
        raise ValueError("`A` must have rank >= 1 (A.shape[1] >= 1)")
    if x.shape[-1] != d_in:
        raise ValueError(f"`x` has d_in={x.shape[-1]} but `A` is [E, r, d_in] with d_in={d_in}")
    if B.shape[0] != E or B.shape[2] != r:
        raise ValueError(
            f"`B` must be [E, d_out, r] = [{E}, d_out, {r}] to match `A`, got {tuple(B.shape)}"
        )
    if d_out < 1:
        raise ValueError("`B` must have d_out >= 1")
    if tuple(router_weight.shape) != (E, d_in):
        raise ValueError(
            f"`router_weight` must be [E, d_in] = [{E}, {d_in}], got {tuple(router_weight.shape)}"
        )
    lead = tuple(x.shape[:-1])
    if base_out is not None:
        _check_tensor("base_out", base_out)
        if tuple(base_out.shape) != lead + (d_out,):
            raise ValueError(
                f"`base_out` must have shape {lead + (d_out,)} (x's leading dims, d_out), "
                f"got {tuple(base_out.shape)}"
            )
    if router_input is not None:
        _check_tensor("router_input", router_input)
        if tuple(router_input.shape) != lead + (d_in,):
            raise ValueError(
                f"`router_input` must have shape {lead + (d_in,)} (x's leading dims, d_in), "
                f"got {tuple(router_input.shape)}"
            )
    named = [("A", A), ("B", B), ("router_weight", router_weight),
             ("base_out", base_out), ("router_input", router_input)]
    for name, t in named:
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"`{name}` is on {t.device} but `x` is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"`{name}` has dtype {t.dtype} but `x` has dtype {x.dtype}")
    k, eps, scaling = check_options(E, top_k, eps, scaling)
    check_eps_fits(eps, x.dtype)
    return Problem(math.prod(lead), d_in, d_out, E, r, k, scaling,
                   check_flag("orthogonalize", orthogonalize), check_flag("normalize", normalize),
                   eps)
