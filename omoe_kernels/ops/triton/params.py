"""The parameter records of the Triton launchers (triton/launch.py): how matmul's
operands enter the product and what its epilogue does, and what the per-token reverse
hands to gram_grad. Plain frozen records, checked when built."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import configs as C


@dataclass(frozen=True)
class Operands:
    """How matmul's a and b enter the product. b is a [K, N] tensor of any strides, or
    (packed) a weight read in place in the padded expert layout: "Bk" (B [E, d_out, r] as
    B_catᵀ, K = ERP), "Bn" (B as B_cat, N = ERP), "Ak" (A [E, r, d_in] as A_cat, K = ERP).
    split_a / split_b: an fp32 operand enters a bf16 MMA as hi + lo parts; fp16_a: the
    fp32 a and the bf16 b enter as scaled fp16 (configs.a_operand_flags)."""

    kind: int
    upcast: bool = False
    packed: Optional[str] = None
    split_a: bool = False
    split_b: bool = False
    fp16_a: bool = False

    def __post_init__(self):
        if self.packed not in (None, "Bk", "Bn", "Ak"):
            raise ValueError(f"packed must be None, 'Bk', 'Bn' or 'Ak', got {self.packed!r}")
        if self.fp16_a and self.kind != C.DOT_BF16:
            raise ValueError("fp16_a takes an fp32 a and a bf16 b (kind DOT_BF16)")


@dataclass(frozen=True)
class Epilogue:
    """What matmul does with scale · a @ b. long_k: the result is split-K partials [splits,
    M, N] in the accumulator dtype, `per_sm` programs per SM (configs.split_k), for
    finalize_grads (weight gradients) or token_backward (dZ). add: a tensor added to the result. router = (a2 [M, ≥E], W [E, N],
    out or None): adds a2[:, :E] · W to the result, or writes it to `out` (the gradient of
    a separate router input). gram = (B, G): the launch also builds G = B_catᵀB_cat
    ([ERP, ERP] float64) into G, B being the packed b operand."""

    out_dtype: torch.dtype
    scale: float = 1.0
    add: Optional[torch.Tensor] = None
    long_k: bool = False
    router: Optional[tuple] = None
    gram: Optional[tuple] = None
    per_sm: int = 2


@dataclass(frozen=True)
class SlotGrads:
    """What the per-token reverse hands to gram_grad: (dS + dSᵀ)/2 of each token over its
    active slots (`values`, [T, KP·KP] float64, zeros in padding slots) and, under top-k,
    the expert of each slot (`experts`, [T, KP] int32, -1 in padding slots; None when
    dense, where slot s is expert s)."""

    values: torch.Tensor
    experts: Optional[torch.Tensor]
    slots: int   # KP
