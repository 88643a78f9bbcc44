"""The functional entry point, `omoe_lora` (docs/contract.md §3)."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ._validate import check_inputs
from .backends import REGISTRY, backend_function, resolve_backend

# (backend_key, device type, k) -> (name, function): the registry answers the same for the
# same key.
_RESOLVED: dict[tuple, tuple] = {}

# omoe_lora's (Problem, backend function) by a call's signature: every tensor's type, shape,
# dtype and device, the options with their types (so that 1 and True or 2 and 2.0 stay
# apart) and backend_key. A call like a kept one runs neither the checks nor the backend
# lookup; any other runs both, which raise the error that names the argument.
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 4096


# The variables resolve_backend reads, as keys of os.environ's own store: every write
# through os.environ updates it, and a lookup there skips the Mapping methods (three Python
# frames and a caught KeyError per unset name, microseconds on a one-token call).
_ENV_KEYS = tuple(map(os.environ.encodekey, ("OMOE_BACKEND", "TRITON_INTERPRET")))


def backend_key(backend: str) -> tuple:
    """What resolve_backend reads besides the device and the active experts: the name asked
    for, the variables OMOE_BACKEND and TRITON_INTERPRET, the registry's version and the
    loader."""
    store = os.environ._data
    return (backend, store.get(_ENV_KEYS[0]), store.get(_ENV_KEYS[1]), REGISTRY.version,
            backend_function)


def resolved_backend(backend: str, device: torch.device, active_experts: int):
    """(name, function) of the backend a call runs on (resolve_backend's answer, kept)."""
    if torch.compiler.is_compiling():  # dynamo traces the lookup; nothing to keep
        name = resolve_backend(backend, device, active_experts)
        return name, backend_function(name)
    key = (backend_key(backend), device.type, active_experts)
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
    signature = plan = None
    if not torch.compiler.is_compiling():  # traced once per graph; symbolic sizes do not hash
        try:
            signature = (
                type(x), x.shape, x.dtype, x.device, type(A), A.shape, A.dtype, A.device,
                type(B), B.shape, B.dtype, B.device, type(router_weight), router_weight.shape,
                router_weight.dtype, router_weight.device,
                None if base_out is None else (type(base_out), base_out.shape, base_out.dtype,
                                               base_out.device),
                None if router_input is None else (type(router_input), router_input.shape,
                                                   router_input.dtype, router_input.device),
                type(scaling), scaling, type(top_k), top_k, type(orthogonalize), orthogonalize,
                type(normalize), normalize, type(eps), eps, backend_key(backend))
            plan = _PLANS.get(signature)
        except (AttributeError, TypeError):  # not tensors, or an option that does not hash
            signature = None
    if plan is None:
        problem = check_inputs(x, A, B, router_weight, scaling=scaling, top_k=top_k,
                               orthogonalize=orthogonalize, normalize=normalize, eps=eps,
                               base_out=base_out, router_input=router_input)
        if problem.num_tokens == 0:
            # No kernel launch for an empty batch, but keep the graph (zero gradients), as
            # nn.Linear does; the backend asked for must still be one that can run.
            resolve_backend(backend, x.device, problem.top_k)
            plan = (problem, backend_function("reference"))
        else:
            plan = (problem, resolved_backend(backend, x.device, problem.top_k)[1])
        # scaling ±0 compare equal but differ in the sign of a zero output: not kept.
        if signature is not None and problem.scaling != 0:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.clear()
            _PLANS[signature] = plan
    problem, function = plan
    T, d_in = problem.num_tokens, problem.d_in
    x2d = x if x.dim() == 2 else x.reshape(T, d_in)
    router2d = None if router_input is None else router_input.reshape(T, d_in)
    base2d = None if base_out is None else base_out.reshape(T, problem.d_out)
    y = function(x2d, A, B, router_weight, router2d, base2d, problem)
    return y.reshape(tuple(x.shape[:-1]) + (problem.d_out,))
