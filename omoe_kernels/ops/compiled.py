"""The `cpu` and `cuda` backends: the compiled `torch.ops.omoe` ops.

csrc/ defines `omoe::forward` and `omoe::backward` (docs/algorithm.md); this module
loads them and registers their fake kernels and autograd through the glue shared with the
Triton ops (registration.py).
"""
from __future__ import annotations

import warnings

import torch

from .limits import MAX_ACTIVE_EXPERTS
from .problem import Problem
from .registration import (
    OpFamily,
    call_forward,
    check_autograd_mode,
    register_family,
    save_context,
    tensor_grads,
)

LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.omoe.*)
except Exception as exc:  # a missing or broken build must not break `import omoe_kernels`
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "omoe_kernels: the compiled extension could not be loaded "
        f"({LOAD_ERROR}); the 'cpu' and 'cuda' backends are unavailable and 'auto' "
        "falls back to 'reference'. Rebuild with `make install`.",
        RuntimeWarning,
        stacklevel=2,
    )

LOADED = LOAD_ERROR is None


# Looked up once at import: a dispatcher query inside `forward` would be a graph break
# under torch.compile(fullgraph=True), while a module-level dict is a constant to dynamo.
_HAS_KERNELS = {
    device_type: LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("omoe::forward", key)
    for device_type, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}


def has_kernels(device_type: str) -> bool:
    """Whether the compiled ops have kernels for `device_type` ("cpu" or "cuda")."""
    return _HAS_KERNELS.get(device_type, False)


def _max_active_experts(device_type: str) -> int:
    # max_active_experts in csrc/omoe_ops.cpp: the CPU pass's bound on CPU, the CUDA one elsewhere.
    return MAX_ACTIVE_EXPERTS["cpu" if device_type == "cpu" else "cuda"]


FAMILY = OpFamily(namespace="omoe", backends="'cpu'/'cuda'", hidden_width=lambda E, r: E * r,
                  max_active_experts=_max_active_experts)

if LOADED:
    register_family(FAMILY)
    _FORWARD = FAMILY.op("forward")  # looked up once: torch.ops attribute lookups cost µs


class _CompiledOp(torch.autograd.Function):
    """The ops' registered autograd (registration.py), for eager calls without its per-call
    Python (argument wrapping, output checks, the Python kernel at the Autograd key): about
    50 µs of a 1-token step. Same saved tensors, refusals and gradients (save_context,
    tensor_grads)."""

    @staticmethod
    def forward(ctx, x, A, B, router_weight, router_input, base_out, options):
        with torch._C._AutoDispatchBelowAutograd():
            y, h, logits = _FORWARD(x, A, B, router_weight, router_input, base_out, *options)
        save_context(ctx, (x, A, B, router_weight, router_input, base_out), options, h, logits)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return tensor_grads(FAMILY, ctx, grad_y) + (None,)   # options


def omoe_lora_compiled(x, A, B, router_weight, router_input, base_out, p: Problem) -> torch.Tensor:
    """Runs the compiled ops on x: [T, d_in] (the device picks the CPU or CUDA kernels)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        # Traced graphs and torch.func transforms take the op with its registered autograd.
        return call_forward(FAMILY, x, A, B, router_weight, router_input, base_out, p)
    tensors = (x, A, B, router_weight, router_input, base_out)
    # check_autograd_mode's other refusals are for transforms, sent to call_forward above;
    # forward-mode AD needs a dual level open.
    if torch.autograd.forward_ad._current_level >= 0:
        check_autograd_mode(FAMILY, tensors)
    options = (p.scaling, p.top_k, p.orthogonalize, p.normalize, p.eps)
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad
                                    or router_weight.requires_grad
                                    or (router_input is not None and router_input.requires_grad)
                                    or (base_out is not None and base_out.requires_grad)):
        return _CompiledOp.apply(*tensors, options)
    with torch._C._AutoDispatchBelowAutograd():  # nothing to differentiate: no graph
        return _FORWARD(*tensors, *options)[0]
