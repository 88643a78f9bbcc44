"""The correctness check of a benchmark run: one training step of each provider against
the operator evaluated in float64 on the same inputs."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

import omoe_kernels as ok
from omoe_kernels.testing.shapes import RANDOM_TOLERANCE

from .memory import _release
from .providers import SCALING, Inputs, Provider
from .report import Record, _short_error
from .shapes import Shape
from .timing import _free_grads


def rel_err(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.detach().double(), expected.detach().double()
    return ((value - expected).norm() / expected.norm().clamp_min(1e-300)).item()


@dataclass
class Expected:
    """The operator (docs/contract.md §1) evaluated in float64 on float64 copies of the inputs."""

    y: torch.Tensor
    grads: dict[str, torch.Tensor]


GRAD_NAMES = ("x", "A", "B", "router_weight", "base_out")


def float64_reference(shape: Shape, inp: Inputs, max_elements: int = 2**27) -> Expected:
    """The reference in float64, over chunks of tokens so that its T × E × d_out tensors
    (and the MGS intermediates autograd keeps) stay bounded at the GPU shapes. Tokens are
    independent; the weight gradients are sums over tokens, accumulated across chunks."""
    T = shape.num_tokens
    chunk = max(1, min(T, max_elements // (shape.num_experts * shape.d_model)))
    x, A, B, W, base = (t.detach().double() for t in inp.omoe_leaves())
    weights = [t.requires_grad_(True) for t in (A, B, W)]
    ys, grad_xs, grad_bases = [], [], []
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        x_part = x[rows].clone().requires_grad_(True)
        base_part = base[rows].clone().requires_grad_(True)
        y = ok.omoe_lora(x_part, *weights, scaling=SCALING, top_k=shape.top_k, base_out=base_part,
                         backend="reference")
        y.backward(inp.grad_y[rows].double())
        ys.append(y.detach())
        grad_xs.append(x_part.grad)
        grad_bases.append(base_part.grad)
        del y
    grads = {"x": torch.cat(grad_xs), "A": A.grad, "B": B.grad, "router_weight": W.grad,
             "base_out": torch.cat(grad_bases)}
    return Expected(torch.cat(ys), grads)


def check_against(forward: Callable[[], torch.Tensor], inp: Inputs, expected: Expected) -> tuple[float, float, str]:
    """(forward rel err, worst gradient rel err, name of that gradient) after one training step."""
    leaves = inp.omoe_leaves()
    _free_grads(leaves)
    y = forward()
    y.backward(inp.grad_y)
    err_y = rel_err(y, expected.y)
    grad_errs = {n: (rel_err(t.grad, expected.grads[n]) if t.grad is not None else math.inf)
                 for n, t in zip(GRAD_NAMES, leaves)}
    _free_grads(leaves)
    worst = max(grad_errs, key=grad_errs.get)
    return err_y, grad_errs[worst], worst


def check_providers(shape: Shape, inp: Inputs, providers: list[Provider],
                    forwards: dict[str, Callable[[], torch.Tensor]], records: dict[str, Record],
                    progress) -> None:
    """Checks every provider that computes the operator against float64, at the bounds of
    the contract's "random" rows for the inputs' dtype; fills the records' error fields."""
    progress.stage(f"{shape.name}: float64 reference")
    try:
        expected = float64_reference(shape, inp)
    except Exception as exc:  # noqa: BLE001  (e.g. out of memory: time without the check)
        expected = None
        progress.note(f"  {shape.name}: no correctness check, the float64 reference failed: "
                      + _short_error(exc))
        _release(inp.x.device)
    tol_y, tol_g = RANDOM_TOLERANCE[inp.x.dtype]
    for p in providers:
        progress.stage(f"{shape.name}: check {p.name}")
        rec = records[p.name]
        if expected is None or not p.same_function or p.name not in forwards or rec.error:
            continue
        try:
            rec.err_forward, rec.err_grad, rec.err_grad_name = check_against(forwards[p.name], inp, expected)
            rec.check_ok = rec.err_forward <= tol_y and rec.err_grad <= tol_g
        except Exception as exc:  # noqa: BLE001
            rec.error = "check: " + _short_error(exc)
        progress.note(f"  {shape.name:13s} {p.name:12s} " + (
            f"rel err forward {rec.err_forward:.2e}, worst grad {rec.err_grad:.2e} "
            f"({rec.err_grad_name}) {'ok' if rec.check_ok else 'FAIL: beyond the §2 bound'}"
            if rec.error is None else rec.error))
