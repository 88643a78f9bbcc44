"""The `reference` backend: docs/contract.md §1 written literally in eager PyTorch.

It materializes every expert output `e_i` (`T × E × d_out`) and runs modified
Gram–Schmidt on the full vectors. Gradients come from autograd. It is the readable
statement of the math and the eager baseline of every benchmark. Half-precision inputs
are upcast to float32 for the whole computation (and the output cast back): with bf16
matmuls, the rounding of the expert outputs `e` reaches the input gradient through the
cancellation in `B_iᵀ de_i` and misses docs/contract.md §2 (measured: grad x 3.1e-2 and 5.6e-2 against
the 2e-2 bf16 bound at d = 4096 with top-2 of 8 and of 16 experts).
"""
from __future__ import annotations

import torch

from .ops.problem import Problem


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates and active mask (both [T, E]) from router logits.

    Top-k keeps the k largest logits, ties going to the lower expert index, and takes a
    softmax over them; gates outside the active set are exactly 0.
    """
    num_experts = logits.shape[-1]
    if top_k >= num_experts:
        return torch.softmax(logits, dim=-1), torch.ones_like(logits, dtype=torch.bool)
    # A stable descending sort keeps the lower index first among equal logits.
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :top_k]
    active = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, order, True)
    gates = torch.softmax(logits.masked_fill(~active, float("-inf")), dim=-1)
    return gates, active


def orthogonalize(e: torch.Tensor, active: torch.Tensor, normalize: bool, eps: float,
                  dense: bool = False) -> torch.Tensor:
    """Modified Gram–Schmidt over the active experts of each token, in ascending index.

    e: [T, E, d_out] expert outputs; active: [T, E] (dense: all True, which skips the
    masking). Returns q with q_i = 0 for inactive i.
    """
    qs: list[torch.Tensor] = []
    for i in range(e.shape[1]):
        v = e[:, i]
        for j, q_j in enumerate(qs):
            dot = (v * q_j).sum(-1, keepdim=True)
            if not dense:
                # §1 projects active experts onto active q_j only. The other projections
                # change nothing that is kept (an inactive q_j is 0, an inactive q_i is
                # masked), but a NaN in v or q_j would reach the rest through NaN·0, in
                # the forward or in the backward: zero those dot products.
                both = active[:, i, None] & active[:, j, None]
                dot = torch.where(both, dot, torch.zeros_like(dot))
            n_j = 1.0 if normalize else (q_j * q_j).sum(-1, keepdim=True) + eps
            v = v - (dot / n_j) * q_j
        q_i = v * torch.rsqrt((v * v).sum(-1, keepdim=True) + eps) if normalize else v
        qs.append(torch.where(active[:, i, None], q_i, torch.zeros_like(q_i)))
    return torch.stack(qs, dim=1)


def omoe_lora_reference(x, A, B, router_weight, router_input, base_out, p: Problem) -> torch.Tensor:
    """x: [T, d_in]; router_input: [T, d_in] or None; base_out: [T, d_out] or None."""
    out_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16):
        x, A, B, router_weight, router_input, base_out = (
            None if t is None else t.float()
            for t in (x, A, B, router_weight, router_input, base_out))
    router_in = x if router_input is None else router_input
    logits = router_in @ router_weight.t()
    gates, active = route(logits, p.top_k)

    h = torch.einsum("td,erd->ter", x, A)              # [T, E, r]
    e = torch.einsum("ter,eor->teo", h, B)             # [T, E, d_out]
    dense = p.top_k >= p.num_experts
    q = orthogonalize(e, active, p.normalize, p.eps, dense) if p.orthogonalize else e
    q = torch.where(active[..., None], q, torch.zeros_like(q))
    adapter = p.scaling * torch.einsum("te,teo->to", gates, q)
    if base_out is not None:
        adapter = adapter + base_out
    return adapter.to(out_dtype)
