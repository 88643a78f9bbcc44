"""`OMoELinear`: a frozen `nn.Linear` plus an orthogonal mixture of LoRA experts."""
from __future__ import annotations

import math

import torch
from torch import nn

from ._validate import check_options
from .functional import omoe_lora


class OMoELinear(nn.Module):
    """Drop-in replacement for an `nn.Linear` that adds OMoE-LoRA experts.

    y = base(x) + (alpha / rank) · Σ_i g_i q_i(dropout(x)), with the router reading the
    undropped x (SPEC §1, §3). `base` is frozen; the trainable parameters are
    `lora_A` [E, r, d_in], `lora_B` [E, d_out, r] (zero at init, so the layer starts as
    `base`) and `router_weight` [E, d_in].
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, *, alpha=None, top_k=None,
                 orthogonalize: bool = True, normalize: bool = True, eps: float = 1e-6,
                 dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"`base` must be an nn.Linear, got {type(base).__name__}")
        for name, value in (("num_experts", num_experts), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        check_options(num_experts, top_k, eps)
        if alpha is None:
            alpha = rank
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"`alpha` must be a number or None, got {type(alpha).__name__}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}")
        for name, flag in (("orthogonalize", orthogonalize), ("normalize", normalize)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"`backend` must be a str, got {type(backend).__name__}")

        self.base = base
        base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.rank = num_experts, rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.top_k = top_k
        self.orthogonalize, self.normalize, self.eps = orthogonalize, normalize, float(eps)
        self.backend = backend
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.router_weight = nn.Parameter(torch.empty(num_experts, self.in_features, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA's init: A as nn.Linear's weight (per expert), B = 0; the router as nn.Linear."""
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A[expert], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))

    def config(self) -> dict:
        """The options that define this layer's function (stored with saved adapters)."""
        return {"num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha,
                "top_k": self.top_k, "orthogonalize": self.orthogonalize,
                "normalize": self.normalize, "eps": self.eps}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base_out = self.base(x)
        adapter_in = self.dropout(x)
        router_input = None if adapter_in is x else x
        dtype = self.lora_A.dtype
        return omoe_lora(
            adapter_in.to(dtype), self.lora_A, self.lora_B, self.router_weight,
            scaling=self.scaling, top_k=self.top_k, orthogonalize=self.orthogonalize,
            normalize=self.normalize, eps=self.eps, base_out=base_out.to(dtype),
            router_input=None if router_input is None else router_input.to(dtype),
            backend=self.backend,
        ).to(base_out.dtype)

    def extra_repr(self) -> str:
        routing = "dense" if self.top_k is None else f"top-{self.top_k}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, rank={self.rank}, alpha={self.alpha:g}, "
                f"routing={routing}, orthogonalize={self.orthogonalize}, "
                f"normalize={self.normalize}, backend={self.backend!r}")
