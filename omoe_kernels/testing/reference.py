"""The reference forward as a plain function of its tensors, for torch.compile.

`omoe_lora(..., backend="reference")` checks its arguments and picks a backend on every
call; traced by torch.compile, those checks would become guards and graph breaks of the
graph being measured. `reference_forward` runs `omoe_lora`'s checks once, on example
tensors, and returns the reference algebra alone (docs/contract.md §1 in PyTorch ops),
which the benchmark compiles as its `torch.compile(reference)` baseline.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._validate import check_inputs
from ..reference import omoe_lora_reference

ReferenceForward = Callable[..., torch.Tensor]


def reference_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                      router_weight: torch.Tensor, *, scaling: float = 1.0,
                      top_k: Optional[int] = None, orthogonalize: bool = True,
                      normalize: bool = True, eps: float = 1e-6,
                      base_out: Optional[torch.Tensor] = None,
                      router_input: Optional[torch.Tensor] = None) -> ReferenceForward:
    """Checks the arguments as `omoe_lora` does and returns
    `forward(x, A, B, router_weight, base_out=None, router_input=None)`, the reference
    forward for tensors of the same sizes with these options (raises what `omoe_lora`
    raises for invalid arguments)."""
    problem = check_inputs(x, A, B, router_weight, scaling=scaling, top_k=top_k,
                           orthogonalize=orthogonalize, normalize=normalize, eps=eps,
                           base_out=base_out, router_input=router_input)

    def forward(x, A, B, router_weight, base_out=None, router_input=None) -> torch.Tensor:
        return omoe_lora_reference(x, A, B, router_weight, router_input, base_out, problem)

    return forward
