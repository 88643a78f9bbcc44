"""The functional entry point, `omoe_lora` (docs/contract.md §3)."""
from __future__ import annotations

from typing import Optional

import torch

from ._validate import check_inputs
from .backends import backend_function, resolve_backend


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
    name = resolve_backend(backend, x.device, problem.top_k)
    lead = tuple(x.shape[:-1])
    out_shape = lead + (problem.d_out,)
    if problem.num_tokens == 0:
        # No kernel launch for an empty batch, but keep the graph (zero gradients), as nn.Linear does.
        name = "reference"
    x2d = x.reshape(problem.num_tokens, problem.d_in)
    router2d = None if router_input is None else router_input.reshape(problem.num_tokens, problem.d_in)
    base2d = None if base_out is None else base_out.reshape(problem.num_tokens, problem.d_out)
    y = backend_function(name)(x2d, A, B, router_weight, router2d, base2d, problem)
    return y.reshape(out_shape)
