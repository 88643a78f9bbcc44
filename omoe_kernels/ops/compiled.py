"""The `cpu` and `cuda` backends: the compiled `torch.ops.omoe` ops.

csrc/ defines `omoe::forward` and `omoe::backward` (docs/algorithm.md); this module
loads them, registers their fake (meta) implementations so `torch.compile` can trace
them, and ties them together with `torch.library.register_autograd`.
"""
from __future__ import annotations

import warnings

import torch

from .._validate import Problem

LOAD_ERROR: str | None = None
try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.omoe.*)
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


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_same_device_and_dtype(x, **tensors):
    """The fake kernels' share of the C++ checks: a mixed-device call (say CPU and meta)
    dispatches here rather than to a real kernel, and must raise like one."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != x.device:
            raise RuntimeError(f"omoe: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise RuntimeError(f"omoe: {name} has dtype {t.dtype} but x has {x.dtype}")


if LOADED:

    @torch.library.register_fake("omoe::forward")
    def _forward_fake(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                      orthogonalize, normalize, eps):
        _check_same_device_and_dtype(x, A=A, B=B, router_weight=router_weight,
                                     router_input=router_input, base_out=base_out)
        T = x.shape[0]
        E, r, _ = A.shape
        acc = _accumulate_dtype(x.dtype)
        y = x.new_empty((T, B.shape[1]))
        return y, x.new_empty((T, E * r), dtype=acc), x.new_empty((T, E), dtype=acc)

    @torch.library.register_fake("omoe::backward")
    def _backward_fake(grad_y, x, A, B, router_weight, router_input, h, logits, scaling,
                       top_k, orthogonalize, normalize, eps):
        _check_same_device_and_dtype(x, A=A, B=B, router_weight=router_weight,
                                     router_input=router_input)
        for name, t in (("grad_y", grad_y), ("h", h), ("logits", logits)):
            if t.device != x.device:
                raise RuntimeError(f"omoe: {name} is on {t.device} but x is on {x.device}")
        grad_router_input = (torch.empty_like(router_input) if router_input is not None
                             else x.new_empty((0,)))
        return (torch.empty_like(x), torch.empty_like(A), torch.empty_like(B),
                torch.empty_like(router_weight), grad_router_input)

    def _setup_context(ctx, inputs, output):
        x, A, B, router_weight, router_input, base_out, scaling, top_k, orth, norm, eps = inputs
        _, h, logits = output
        ctx.save_for_backward(x, A, B, router_weight, router_input, h, logits)
        ctx.options = (scaling, top_k, orth, norm, eps)
        ctx.has_base = base_out is not None
        ctx.mark_non_differentiable(h, logits)

    def _backward(ctx, grad_y, _grad_h, _grad_logits):
        x, A, B, router_weight, router_input, h, logits = ctx.saved_tensors
        grad_x, grad_A, grad_B, grad_W, grad_router_input = torch.ops.omoe.backward(
            grad_y.contiguous(), x, A, B, router_weight, router_input, h, logits, *ctx.options)
        if router_input is None:
            grad_router_input = None
        grad_base = grad_y if ctx.has_base else None
        return (grad_x, grad_A, grad_B, grad_W, grad_router_input, grad_base,
                None, None, None, None, None)

    torch.library.register_autograd("omoe::forward", _backward, setup_context=_setup_context)


def omoe_lora_compiled(x, A, B, router_weight, router_input, base_out, p: Problem) -> torch.Tensor:
    """Runs the compiled ops on x: [T, d_in] (the device picks the CPU or CUDA kernels)."""
    y, _, _ = torch.ops.omoe.forward(
        x, A, B, router_weight, router_input, base_out, p.scaling, p.top_k,
        p.orthogonalize, p.normalize, p.eps)
    return y
