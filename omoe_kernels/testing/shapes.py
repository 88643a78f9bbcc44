"""Shapes and tolerances of the contract (docs/contract.md §2 and §6), as data.

The test suite (python_tests/helpers.py) and the benchmarks (bench/) both import this
module, so an accuracy bound or a benchmark shape is written down once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


# ---- accuracy (docs/contract.md §2) ------------------------------------------------------

class AccuracyRow(NamedTuple):
    """One row of the accuracy table: relative Frobenius error against float64."""

    dtype: torch.dtype
    collapse: float            # experts built as (1-c)·random + c·expert_0 (0: random)
    forward: float             # bound on the output's error
    gradient: float | None     # bound on every gradient's error; None: finite only


ACCURACY_ROWS: dict[str, AccuracyRow] = {
    "fp32-random": AccuracyRow(torch.float32, 0.0, 1e-5, 1e-4),
    "fp32-collapse0.99": AccuracyRow(torch.float32, 0.99, 1e-4, 1e-3),
    "fp32-collapse0.999": AccuracyRow(torch.float32, 0.999, 1e-3, 1e-2),
    "bf16-random": AccuracyRow(torch.bfloat16, 0.0, 1e-2, 2e-2),
    "bf16-collapse0.99": AccuracyRow(torch.bfloat16, 0.99, 3e-2, None),
    "fp16-random": AccuracyRow(torch.float16, 0.0, 3e-3, 1e-2),
}

# (forward, every gradient) bounds of the well-conditioned ("random") rows, by dtype; the
# benchmark checks each provider with these. float64 is no row of the table: the float64
# paths agree with the oracle to rounding, so the bound is tight.
RANDOM_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    row.dtype: (row.forward, row.gradient) for name, row in ACCURACY_ROWS.items()
    if name.endswith("-random")
}
RANDOM_TOLERANCE[torch.float64] = (1e-10, 1e-9)

# T, d_in, d_out, E, r of the accuracy suite: the random case has κ < 10 at this shape,
# collapse 0.99 gives κ ≈ 3e2 and 0.999 gives κ ≈ 3e3 (python_tests/test_accuracy.py
# checks it). Small enough for the Triton interpreter.
ACCURACY_SHAPE = (48, 40, 36, 4, 4)


# ---- benchmark shapes (docs/contract.md §6) ----------------------------------------------

@dataclass(frozen=True)
class Shape:
    name: str
    num_tokens: int
    d_model: int  # d_in = d_out
    num_experts: int
    rank: int
    top_k: int | None  # None: dense routing
    dtype: str  # a key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def routing(self) -> str:
        return "dense" if self.top_k is None else f"top-{self.top_k}"

    def describe(self) -> str:
        return (f"T={self.num_tokens}, d_in=d_out={self.d_model}, E={self.num_experts}, "
                f"r={self.rank}, {self.routing}, {self.dtype}")


# The contract's shapes, plus `small` (a smoke-test size for --quick and the
# pytest-benchmark cases).
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("cpu", 4096, 1024, 4, 16, None, "fp32"),
        Shape("llama7b", 8192, 4096, 4, 16, None, "bf16"),
        Shape("llama7b-top2", 8192, 4096, 8, 16, 2, "bf16"),
        Shape("wide", 8192, 4096, 16, 8, 2, "bf16"),
        Shape("small", 512, 256, 4, 16, None, "fp32"),
    )
}

DEFAULT_SHAPES = {"cpu": ("cpu",), "cuda": ("llama7b", "llama7b-top2", "wide")}
QUICK_SHAPES = ("small",)
