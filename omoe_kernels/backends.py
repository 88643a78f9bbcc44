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


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend name a call runs on; raises ValueError naming `backend` if it cannot run."""
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a str, got {type(backend).__name__}")
    source = "`backend`"
    if backend == "auto":
        env = os.environ.get("OMOE_BACKEND", "").strip()
        if env and env != "auto":
            backend, source = env, "OMOE_BACKEND"
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if backend_usable(name, device):
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if not backend_usable(backend, device):
        raise ValueError(
            f"{source}={backend!r} cannot run on {device.type} tensors here; "
            f"available: {available_backends(device)}"
        )
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
