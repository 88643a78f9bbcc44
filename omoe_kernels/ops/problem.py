"""`Problem`: what a backend receives about one call, after the API's checks
(`omoe_kernels._validate.check_inputs`). A leaf: the ops read it without importing the API."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """The sizes and kernel options of one call, checked by `check_inputs` with the
    validators of `OMoEOptions` (options.py)."""

    num_tokens: int
    d_in: int
    d_out: int
    num_experts: int
    rank: int
    top_k: int  # == num_experts for dense routing
    scaling: float
    orthogonalize: bool
    normalize: bool
    eps: float
