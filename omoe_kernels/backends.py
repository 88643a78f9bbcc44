"""Which backends exist on this machine, and which one a call uses.

Backends, fastest first per device:
- CUDA tensors: "triton", "cuda", "reference"
- CPU tensors:  "cpu", "reference" (and "triton" under TRITON_INTERPRET=1, which is a
  correctness tool, never picked by "auto")

`backend="auto"` takes the first available one; the environment variable OMOE_BACKEND,
when set to a backend name, replaces "auto".
"""
from __future__ import annotations

import os
from typing import Callable

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

# The most active experts k = min(top_k, E) a compiled backend's per-token pass takes
# (csrc/omoe_cpu_pass.h: kMaxActive, csrc/omoe_token.h: kMaxExperts); any E otherwise.
# `auto` passes over a backend that cannot take a call's k.
MAX_ACTIVE_EXPERTS = {"cpu": 256, "cuda": 32}


def capacity_error(name: str, active_experts: int, source: str = "`backend`") -> str | None:
    """Why backend `name` cannot take `active_experts` = min(top_k, E), or None if it can."""
    limit = MAX_ACTIVE_EXPERTS.get(name)
    if limit is None or active_experts <= limit:
        return None
    return (f"{source}={name!r} takes at most {limit} active experts per token "
            f"(min(top_k, num_experts)), got {active_experts}: use backend='auto' or "
            f"'reference', or a top_k of at most {limit}")


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_usable(device_type: str) -> bool:
    from .ops import triton_omoe

    if not triton_omoe.AVAILABLE:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and _triton_interpreting()


def _compiled_usable(device_type: str) -> bool:
    from .ops import compiled

    return compiled.has_kernels(device_type)


def backend_usable(name: str, device: torch.device | str) -> bool:
    device_type = torch.device(device).type
    if name == "reference":
        return True
    if name == "triton":
        return _triton_usable(device_type)
    if name == "cuda":
        return device_type == "cuda" and _compiled_usable("cuda")
    if name == "cpu":
        return device_type == "cpu" and _compiled_usable("cpu")
    return False


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: CUDA when present, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    order = list(_AUTO_ORDER.get(device_type, ("reference",)))
    if device_type == "cpu" and _triton_interpreting():
        order.insert(1, "triton")
    return [name for name in order if backend_usable(name, device_type)]


def resolve_backend(backend: str, device: torch.device, active_experts: int = 1) -> str:
    """The backend name a call with `active_experts` = min(top_k, E) runs on; raises
    ValueError naming `backend` if it cannot run."""
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a str, got {type(backend).__name__}")
    source = "`backend`"
    if backend == "auto":
        env = os.environ.get("OMOE_BACKEND", "").strip()
        if env and env != "auto":
            backend, source = env, "OMOE_BACKEND"
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if backend_usable(name, device) and capacity_error(name, active_experts) is None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if not backend_usable(backend, device):
        raise ValueError(
            f"{source}={backend!r} cannot run on {device.type} tensors here; "
            f"available: {available_backends(device)}"
        )
    error = capacity_error(backend, active_experts, source)
    if error is not None:
        raise ValueError(error)
    return backend


def backend_function(name: str) -> Callable:
    """The function `(x, A, B, router_weight, router_input, base_out, problem) -> y` of a backend."""
    if name == "reference":
        from .reference import omoe_lora_reference

        return omoe_lora_reference
    if name == "triton":
        from .ops.triton_omoe import omoe_lora_triton

        return omoe_lora_triton
    from .ops.compiled import omoe_lora_compiled

    return omoe_lora_compiled
