"""What a Triton launch is sized from: the padded expert layout, the dot kind of a dtype,
the switches read from the environment and the `Target` (SM count, interpreter,
autotuning). Plain functions of their arguments and the environment."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..limits import next_pow2, triton_interpreting
from . import configs as C

interpreting = triton_interpreting  # the one reading of TRITON_INTERPRET (ops/limits.py)


def fixed_config() -> bool:
    return interpreting() or os.environ.get("OMOE_TRITON_FIXED_CONFIG", "0") not in ("", "0")


@dataclass(frozen=True)
class Layout:
    """Padded expert layout: expert i's block is columns i·RP … i·RP + r − 1 of ERP."""

    num_experts: int
    rank: int
    EP: int    # experts, padded to a power of 2
    RP: int    # rank, padded to a power of 2 (and so that ERP >= 16)
    ERP: int   # EP · RP
    EPL: int   # router rows padded for tl.dot (power of 2, >= 16)

    @property
    def NW(self) -> int:  # columns of the [dH | dlogits] buffer
        return self.ERP + self.EPL


def layout(num_experts: int, rank: int) -> Layout:
    EP = next_pow2(num_experts)
    RP = max(next_pow2(rank), 16 // EP if EP < 16 else 1)
    return Layout(num_experts, rank, EP, RP, EP * RP, max(16, EP))


def grouped_meta(stride_bn: int, L: Layout) -> dict:
    """scaled_matmul_kernel's constexprs of what the compiler cannot see, so that the weight
    loads in vectors: a power of 2 dividing the column stride (it sees none below 16; B
    [E, d_out, r] has stride r) and whether the rank has no padding to mask (rank = RP)."""
    return dict(BN_ALIGN=math.gcd(stride_bn, 16), FULL_RANK=L.rank == L.RP)


def dot_kind(dtype: torch.dtype, device_type: str) -> int:
    if dtype == torch.float64:
        return C.DOT_FP64
    if dtype == torch.float16:
        return C.DOT_FP16
    if dtype == torch.bfloat16:
        return C.DOT_BF16
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return C.DOT_FP32_TF32
    return C.DOT_FP32_IEEE


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _pow2_bucket(n: int) -> int:
    """n rounded up to a power of 2: the autotune key of a dimension that follows T, so a
    new token count re-tunes only when it crosses a power of 2."""
    return next_pow2(max(1, n))


def _gram_args(B: Optional[torch.Tensor], G: Optional[torch.Tensor], L: Layout, dummy):
    """(B, G, num_gram, d_out, B's strides) for the gram programs of a launch (none
    when G is None)."""
    if G is None:
        return dummy, dummy, 0, 0, (0, 0, 0)
    return B, G, C.gram_programs(L.ERP), B.shape[1], tuple(B.stride())


_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


@dataclass(frozen=True)
class Target:
    """What a launch is sized for: the GPU's SM count (split-K and token splits), the
    interpreter (small fixed tiles) and whether the GEMMs may autotune."""

    num_sms: int
    interpret: bool = False
    tune: bool = False

    @classmethod
    def of(cls, device: torch.device) -> "Target":
        return cls(_num_sms(device), interpreting(),
                   device.type == "cuda" and not fixed_config())

    def autotunes(self, kind: int) -> bool:
        return self.tune and kind in C.SIXTEEN_BIT_KINDS + (C.DOT_FP32_TF32,)


def padded_gram(B: torch.Tensor, L: Layout, orthogonalize: bool) -> torch.Tensor:
    """G = B_catᵀB_cat in the padded layout ([ERP, ERP] float64, zero padding) by torch
    ops, or an empty float64 tensor without orthogonalization: the G of a forward with no
    tokens, which launches no kernel."""
    if not orthogonalize:
        return B.new_empty((0,), dtype=torch.float64)
    E, d_out, r = B.shape
    padded = B.new_zeros((d_out, L.EP, L.RP), dtype=torch.float64)
    padded[:, :E, :r] = B.transpose(0, 1)
    columns = padded.reshape(d_out, L.ERP)
    return columns.t() @ columns
