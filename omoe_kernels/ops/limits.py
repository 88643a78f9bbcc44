"""Facts about the kernels that the registry and the ops both need; imports nothing of ours.

`MAX_ACTIVE_EXPERTS`: the most active experts k = min(top_k, E) per token each fused
backend's kernels take. The C++ side has its own constants (csrc/omoe_token.h
`kMaxExperts`, csrc/omoe_cpu_pass.h `kMaxActive`); python_tests/test_layering.py checks
that the two agree.
"""
from __future__ import annotations

import os

MAX_ACTIVE_EXPERTS: dict[str, int] = {
    # The per-token kernels unroll modified Gram–Schmidt over k slots
    # (ops/triton/token_kernels.py): k <= 4 stays in registers, 5–8 spill.
    "triton": 8,
    "cuda": 32,  # csrc/omoe_token.h kMaxExperts
    "cpu": 256,  # csrc/omoe_cpu_pass.h kMaxActive
}


def triton_interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the Triton interpreter (read before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())
