"""The per-token algebra of the fused backends, vectorised in float64 PyTorch.

The fused backends never form the d_out-long expert outputs `e_i = B_i h_i`: they run
modified Gram–Schmidt on coefficient vectors, from the Gram matrix `S_ij = <e_i, e_j>`
(docs/algorithm.md). This module states that algebra in plain tensor code, over all tokens
at once, so that the per-token passes (csrc/omoe_token.h, the Triton per-token kernels)
can be tested against it stage by stage, and so that autograd gives its derivatives.

Stages, for h ([T, E·r]) and logits ([T, E]) as the shrink produces them:
`route` (gates, active set) → `gram_matrix` (S) → `mgs_coefficients` (C: row i holds
q_i's coefficients over e_1 … e_E) → `mixture_coefficients` (a = Σ_i g_i C_i) →
`z = a ⊙ h` (`token_outputs`), and `y = base + scaling · z B_catᵀ`.
"""
from __future__ import annotations

import torch

from ..reference import route


def concat_experts(B: torch.Tensor) -> torch.Tensor:
    """B [E, d_out, r] as B_cat [d_out, E·r]: column i·r + a is B[i, :, a]."""
    E, d_out, r = B.shape
    return B.permute(1, 0, 2).reshape(d_out, E * r)


def gram_matrix(h: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """S [T, E, E] float64 with S_ij = h_iᵀ G_ij h_j = <B_i h_i, B_j h_j>, G = B_catᵀ B_cat."""
    E, _, r = B.shape
    T = h.shape[0]
    B_cat = concat_experts(B).to(torch.float64)
    G = (B_cat.t() @ B_cat).reshape(E, r, E, r)
    h3 = h.to(torch.float64).reshape(T, E, r)
    Gh = torch.einsum("irjs,tjs->tirj", G, h3)                        # G_ij h_j
    return torch.einsum("tir,tirj->tij", h3, Gh)


def mgs_coefficients(S: torch.Tensor, active: torch.Tensor, normalize: bool,
                     eps: float) -> torch.Tensor:
    """docs/contract.md §1's modified Gram–Schmidt on coefficient vectors, vectorised over
    tokens: C [T, E (i), E (k)], row i the coefficients of q_i over e_1 … e_E (zero for an
    inactive i). <v, v> is clamped at 0 against rounding; clamp_min keeps a NaN."""
    T, E, _ = S.shape
    eye = torch.eye(E, dtype=S.dtype, device=S.device)
    Cs, SCs = [], []
    for i in range(E):
        c = eye[i].expand(T, E)
        for C_j, SC_j in zip(Cs, SCs):
            p = (c * SC_j).sum(-1, keepdim=True)                       # <v, q_j>
            n = 1.0 if normalize else (C_j * SC_j).sum(-1, keepdim=True) + eps
            c = c - (p / n) * C_j
        Sc = torch.einsum("tij,tj->ti", S, c)
        if normalize:
            scale = torch.rsqrt((c * Sc).sum(-1, keepdim=True).clamp_min(0) + eps)
            c, Sc = c * scale, Sc * scale
        keep = active[:, i:i + 1]                                      # inactive q_i = 0
        Cs.append(torch.where(keep, c, torch.zeros_like(c)))
        SCs.append(torch.where(keep, Sc, torch.zeros_like(Sc)))
    return torch.stack(Cs, dim=1)


def mixture_coefficients(gates: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """a [T, E] = Σ_i g_i C_i: Σ_i g_i q_i = Σ_k a_k e_k."""
    return torch.einsum("ti,tik->tk", gates.to(C.dtype), C)


def token_outputs(h: torch.Tensor, logits: torch.Tensor, B: torch.Tensor, *, top_k: int,
                  orthogonalize: bool, normalize: bool, eps: float) -> torch.Tensor:
    """z = a ⊙ h [T, E·r] float64: what the per-token forward pass writes."""
    E, _, r = B.shape
    T = h.shape[0]
    gates, active = route(logits.to(torch.float64), top_k)
    if orthogonalize:
        C = mgs_coefficients(gram_matrix(h, B), active, normalize, eps)
    else:
        C = torch.diag_embed(active.to(torch.float64))
    a = mixture_coefficients(gates, C)
    return (a[:, :, None] * h.to(torch.float64).reshape(T, E, r)).reshape(T, E * r)


def omoe_lora_oracle(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     router_weight: torch.Tensor, *, scaling: float = 1.0, top_k: int | None = None,
                     orthogonalize: bool = True, normalize: bool = True, eps: float = 1e-6,
                     base_out: torch.Tensor | None = None,
                     router_input: torch.Tensor | None = None) -> torch.Tensor:
    """The whole low-rank algorithm in float64 on x: [T, d_in] (differentiable)."""
    E, r, d_in = A.shape
    x64 = x.to(torch.float64)
    router = x64 if router_input is None else router_input.to(torch.float64)
    h = x64 @ A.to(torch.float64).reshape(E * r, d_in).t()
    logits = router @ router_weight.to(torch.float64).t()
    z = token_outputs(h, logits, B.to(torch.float64), top_k=E if top_k is None else top_k,
                      orthogonalize=orthogonalize, normalize=normalize, eps=eps)
    y = scaling * (z @ concat_experts(B.to(torch.float64)).t())
    return y if base_out is None else y + base_out.to(torch.float64)
