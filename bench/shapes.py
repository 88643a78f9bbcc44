"""The benchmark shapes (from omoe_kernels.testing.shapes), and the cost model behind the
floors in NOTES.md.

Every number here is for the low-rank algorithm of docs/algorithm.md, which is also the
least work any implementation of the operator can do: one LoRA of rank E·r, the router,
and small per-token algebra.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The shapes themselves are shared with the test suite.
from omoe_kernels.testing.shapes import DEFAULT_SHAPES, DTYPES, QUICK_SHAPES, SHAPES, Shape  # noqa: F401


@dataclass(frozen=True)
class Cost:
    """Minimum FLOPs and DRAM bytes of one pass (forward, or forward + backward)."""

    flops: float
    bytes: float

    def floor_ms(self, peak_flops: float, peak_bytes_per_s: float) -> float:
        """Roofline lower bound: the slower of compute at peak and traffic at peak bandwidth."""
        return 1e3 * max(self.flops / peak_flops, self.bytes / peak_bytes_per_s)


def cost(shape: Shape, with_backward: bool) -> Cost:
    """FLOPs and bytes of the low-rank algorithm at `shape`.

    Forward: shrink GEMM 2·T·d_in·(E·r+E) (router logits in the same pass), the Gram
    G = B_catᵀB_cat (2·d_out·(E·r)²), per token S = hᵀGh (about 2·(E·r)² FLOPs),
    expand 2·T·E·r·d_out. Traffic: read x and base_out, write y, read the weights,
    write H and the logits (fp32, kept for backward).
    Backward adds four GEMMs of the LoRA size (dZ = dY·B_cat, dB_cat = dYᵀZ,
    dA_cat = dHᵀX, dX = dH·A_cat), the router's two (dW, dR), dG per token and
    B_cat·(dG+dGᵀ). Traffic: read dY and x again, write dX, read H and the logits,
    write the weight gradients; d base_out is dY itself (no copy).
    The MGS itself is O(k³) per token in registers and is left out.
    """
    T, d, E, r = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank
    R = E * r
    el = torch.tensor([], dtype=shape.torch_dtype).element_size()
    weights = (R * d + d * R + E * d) * el
    saved = T * (R + E) * 4

    flops = 2 * T * d * (R + E) + 2 * d * R * R + 2 * T * R * R + 2 * T * R * d
    traffic = 3 * T * d * el + weights + saved
    if with_backward:
        flops += 4 * T * R * 2 * d + 4 * T * E * d + 2 * T * R * R + 2 * d * R * R
        traffic += 3 * T * d * el + saved + 2 * weights
    return Cost(float(flops), float(traffic))
