"""The `cpu` and `cuda` backends: the compiled `torch.ops.omoe` ops.

csrc/ defines `omoe::forward` and `omoe::backward` (docs/algorithm.md); this module
loads them and registers their fake kernels and autograd through the glue shared with the
Triton ops (registration.py).
"""
from __future__ import annotations

import warnings

import torch

from .._validate import Problem
from ..backends import REGISTRY
from .registration import OpFamily, call_forward, register_family

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


def _max_active_experts(device_type: str) -> int:
    # max_active_experts in csrc/omoe_ops.cpp: the CPU pass's bound on CPU, the CUDA one elsewhere.
    return REGISTRY["cpu" if device_type == "cpu" else "cuda"].max_active_experts


FAMILY = OpFamily(namespace="omoe", backends="'cpu'/'cuda'", hidden_width=lambda E, r: E * r,
                  max_active_experts=_max_active_experts)

if LOADED:
    register_family(FAMILY)


def omoe_lora_compiled(x, A, B, router_weight, router_input, base_out, p: Problem) -> torch.Tensor:
    """Runs the compiled ops on x: [T, d_in] (the device picks the CPU or CUDA kernels)."""
    return call_forward(FAMILY, x, A, B, router_weight, router_input, base_out, p)
