"""The functional entry point, `omoe_lora` (docs/contract.md §3)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._validate import check_inputs
from .backends import REGISTRY, backend_function, resolve_backend

# (backend_key, k) -> (name, function): the registry answers the same for the same key.
_RESOLVED: dict[tuple, tuple] = {}


def backend_key(backend: str, device: torch.device) -> tuple:
    """What resolve_backend reads besides the active experts: the name asked for, the
    device type, the variables OMOE_BACKEND and TRITON_INTERPRET, the registry's entries
    and the loader."""
    environ = os.environ
    return (backend, device.type, environ.get("OMOE_BACKEND"), environ.get("TRITON_INTERPRET"),
            tuple(map(id, REGISTRY.values())), backend_function)


def resolved_backend(backend: str, device: torch.device, active_experts: int):
    """(name, function) of the backend a call runs on (resolve_backend's answer, kept)."""
    if torch.compiler.is_compiling():  # dynamo traces the lookup; nothing to keep
        name = resolve_backend(backend, device, active_experts)
        return name, backend_function(name)
    key = (backend_key(backend, device), active_experts)
    found = _RESOLVED.get(key)
    if found is None:
        name = resolve_backend(backend, device, active_experts)
        found = _RESOLVED[key] = (name, backend_function(name))
        if len(_RESOLVED) > 256:
            _RESOLVED.clear()
    return found


def omoe_lora(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, router_weight: torch.Tensor, *,
              scaling: float = 1.0, top_k: Optional[int] = None, orthogonalize: bool = True,
              normalize: bool = True, eps: float = 1e-6, base_out: Optional[torch.Tensor] = None,
              router_input: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Orthogonal mixture of LoRA experts (docs/contract.md §1).

    x: [..., d_in]; A: [E, r, d_in]; B: [E, d_out, r]; router_weight: [E, d_in];
    base_out: [..., d_out] or None; router_input: [..., d_in] or None (defaults to x).
    Returns base_out + scaling * Σ_i g_i q_i, shaped [..., d_out].
    """
    problem = check_inputs(x, A, B, router_weight, scaling=scaling, top_k=top_k,
                           orthogonalize=orthogonalize, normalize=normalize, eps=eps,
                           base_out=base_out, router_input=router_input)
    T, d_in = problem.num_tokens, problem.d_in
    if T == 0:
        # No kernel launch for an empty batch, but keep the graph (zero gradients), as nn.Linear does.
        resolve_backend(backend, x.device, problem.top_k)  # still refuses a backend that cannot run
        function = backend_function("reference")
    else:
        function = resolved_backend(backend, x.device, problem.top_k)[1]
    # Reshaped even when already 2-D: the view gives autograd's gradient accumulation a
    # tensor of its own to take, where the op's output alone would be copied into x.grad.
    x2d = x.reshape(T, d_in)
    router2d = None if router_input is None else router_input.reshape(T, d_in)
    base2d = None if base_out is None else base_out.reshape(T, problem.d_out)
    y = function(x2d, A, B, router_weight, router2d, base2d, problem)
    return y.reshape(tuple(x.shape[:-1]) + (problem.d_out,))
