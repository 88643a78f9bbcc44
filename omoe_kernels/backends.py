"""The backend registry: which backends exist, where they run, and which one a call uses.

A backend is one `Backend` entry in `REGISTRY` below: its name, the device types it serves
with its place in each device's order (fastest first), the devices on which `"auto"` may
pick it, a check that it can run here, and a loader that imports its function on first
use. `available_backends`, `resolve_backend`, `OMoEOptions`'s backend check and the test
suite all read this table; adding a backend means adding one entry (docs/extending.md).

Today's order, fastest first per device:
- CUDA tensors: "triton", "cuda", "reference"
- CPU tensors:  "cpu", "reference" (and "triton" under TRITON_INTERPRET=1, a correctness
  tool that `auto` never picks)

`backend="auto"` takes the first available backend that `auto` may pick; the environment
variable OMOE_BACKEND, when set to a backend name, replaces "auto".
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Callable

import torch

from .ops.limits import MAX_ACTIVE_EXPERTS, triton_interpreting

# The signature every backend function has:
# (x2d, A, B, router_weight, router_input2d, base_out2d, problem) -> y2d.
BackendFunction = Callable[..., torch.Tensor]

ANY_DEVICE = "*"  # in `Backend.places`: every device type


@dataclass(frozen=True)
class Backend:
    """One backend, as data."""

    name: str
    # Device type -> place in that device's order (lower = faster, tried first by "auto").
    # ANY_DEVICE serves every device type not named.
    places: dict[str, int]
    # Device types on which "auto" may pick it (a correctness tool is listed, never picked).
    auto_devices: tuple[str, ...]
    # Whether it can run on tensors of this device type on this machine (build, driver...).
    available: Callable[[str], bool]
    # Imports and returns the backend function (import statements, not importlib, so that
    # torch.compile traces the lookup without a graph break).
    load: Callable[[], BackendFunction]
    # The most active experts k = min(top_k, E) per token its kernels take (None: any);
    # `auto` passes over a backend that cannot take a call's k.
    max_active_experts: int | None = None

    def place(self, device_type: str) -> int | None:
        """Its place in `device_type`'s order, or None when it does not serve that device."""
        return self.places.get(device_type, self.places.get(ANY_DEVICE))

    def serves(self, device_type: str) -> bool:
        return self.place(device_type) is not None

    def auto_may_pick(self, device_type: str) -> bool:
        return ANY_DEVICE in self.auto_devices or device_type in self.auto_devices


# ---------------------------------------------------------------------------------------
# The entries' checks and loaders.

def _triton_available(device_type: str) -> bool:
    from .ops.triton import launch

    if not launch.AVAILABLE:
        return False
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and triton_interpreting()


def _compiled_available(device_type: str) -> bool:
    from .ops import compiled

    return compiled.has_kernels(device_type)


def _load_triton() -> BackendFunction:
    from .ops.triton.launch import omoe_lora_triton

    return omoe_lora_triton


def _load_compiled() -> BackendFunction:
    from .ops.compiled import omoe_lora_compiled

    return omoe_lora_compiled


def _load_reference() -> BackendFunction:
    from .reference import omoe_lora_reference

    return omoe_lora_reference


# ---------------------------------------------------------------------------------------
# The registry. Its order is the order of BACKENDS (names in error messages).


class Registry(MutableMapping):
    """The backends by name. `version` counts the changes to it, so that what was resolved
    from it (functional.py keeps each call's backend) is kept only while it stands."""

    def __init__(self, backends):
        self._backends = {b.name: b for b in backends}
        self.version = 0

    def __getitem__(self, name: str) -> Backend:
        return self._backends[name]

    def __setitem__(self, name: str, backend: Backend) -> None:
        self._backends[name] = backend
        self.version += 1

    def __delitem__(self, name: str) -> None:
        del self._backends[name]
        self.version += 1

    def __iter__(self):
        return iter(self._backends)

    def __len__(self) -> int:
        return len(self._backends)


REGISTRY = Registry(
    (
        # Triton kernels (docs/algorithm.md); on CPU tensors only under the interpreter.
        Backend("triton", places={"cuda": 0, "cpu": 1}, auto_devices=("cuda",),
                available=_triton_available, load=_load_triton, max_active_experts=MAX_ACTIVE_EXPERTS["triton"]),
        # The compiled extension (csrc/): its CUDA kernels, and its C++ CPU kernels.
        Backend("cuda", places={"cuda": 1}, auto_devices=("cuda",),
                available=_compiled_available, load=_load_compiled, max_active_experts=MAX_ACTIVE_EXPERTS["cuda"]),
        Backend("cpu", places={"cpu": 0}, auto_devices=("cpu",),
                available=_compiled_available, load=_load_compiled, max_active_experts=MAX_ACTIVE_EXPERTS["cpu"]),
        # Eager PyTorch, docs/contract.md §1 literally: runs anywhere, the last resort.
        Backend("reference", places={ANY_DEVICE: 100}, auto_devices=(ANY_DEVICE,),
                available=lambda device_type: True, load=_load_reference),
    )
)

# The names at import time (the public `omoe_kernels.BACKENDS`); checks read REGISTRY itself.
BACKENDS: tuple[str, ...] = tuple(REGISTRY)


def _ordered(device_type: str) -> list[Backend]:
    """The backends that serve `device_type`, fastest first (whether or not built here)."""
    serving = [b for b in REGISTRY.values() if b.serves(device_type)]
    return sorted(serving, key=lambda b: b.place(device_type))


def check_backend_name(backend, source: str = "`backend`") -> str:
    """`backend` when it is "auto" or a name in REGISTRY; TypeError/ValueError naming `source`."""
    if not isinstance(backend, str):
        raise TypeError(f"{source} must be a str, one of {('auto', *REGISTRY)}, "
                        f"got {type(backend).__name__}")
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(f"{source} must be one of {('auto', *REGISTRY)}, got {backend!r}")
    return backend


def capacity_error(name: str, active_experts: int, source: str = "`backend`") -> str | None:
    """Why backend `name` cannot take `active_experts` = min(top_k, E), or None if it can."""
    limit = REGISTRY[name].max_active_experts
    if limit is None or active_experts <= limit:
        return None
    return (f"{source}={name!r} takes at most {limit} active experts per token "
            f"(min(top_k, num_experts)), got {active_experts}: use backend='auto' or "
            f"'reference', or a top_k of at most {limit}")


def backend_usable(name: str, device: torch.device | str) -> bool:
    """Whether backend `name` can run on tensors of `device` on this machine."""
    device_type = torch.device(device).type
    backend = REGISTRY.get(name)
    return backend is not None and backend.serves(device_type) and backend.available(device_type)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on `device` (default: CUDA when present, else CPU), fastest first."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return [b.name for b in _ordered(device_type) if b.available(device_type)]


def resolve_backend(backend: str, device: torch.device, active_experts: int = 1) -> str:
    """The backend name a call with `active_experts` = min(top_k, E) runs on; raises
    ValueError naming `backend` if it cannot run."""
    source = "`backend`"
    check_backend_name(backend, source)
    if backend == "auto":
        env = os.environ.get("OMOE_BACKEND", "").strip()
        if env and env != "auto":
            backend, source = check_backend_name(env, "OMOE_BACKEND"), "OMOE_BACKEND"
    if backend == "auto":
        for candidate in _ordered(device.type):
            if (candidate.auto_may_pick(device.type) and candidate.available(device.type)
                    and capacity_error(candidate.name, active_experts) is None):
                return candidate.name
        return "reference"
    if not backend_usable(backend, device):
        raise ValueError(
            f"{source}={backend!r} cannot run on {device.type} tensors here; "
            f"available: {available_backends(device)}"
        )
    error = capacity_error(backend, active_experts, source)
    if error is not None:
        raise ValueError(error)
    return backend


def backend_function(name: str) -> BackendFunction:
    """The function `(x, A, B, router_weight, router_input, base_out, problem) -> y` of a backend."""
    return REGISTRY[name].load()
