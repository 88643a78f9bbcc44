"""`omoe::mixed_forward` (csrc/omoe_mixed.cpp): several adapters in one compiled call.

The op runs each adapter's segment of rows through `omoe::forward`'s CPU kernel inside
C++ (no Python between segments). It is forward only: omoe_kernels/mixed.py calls it
when nothing needs a gradient, and its registered autograd refuses a backward. The fake
kernel makes the op's shape checks, message for message (the row indices themselves are
data and are checked by the real kernel only).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import compiled
from .registration import _require, check_forward_args

_NS = "omoe"


def check_mixed_args(x: Tensor, A: Sequence[Tensor], B: Sequence[Tensor],
                     router_weight: Sequence[Tensor], router_input: Optional[Tensor],
                     base_out: Optional[Tensor], rows: Tensor, offsets: Sequence[int],
                     scaling: Sequence[float], top_k: int, eps: float) -> int:
    """check_mixed in csrc/omoe_mixed.cpp, in the same order (but the row values);
    returns d_out."""
    N = len(A)
    _require(N >= 1, _NS, "mixed_forward needs at least one adapter, got none")
    _require(len(B) == N and len(router_weight) == N and len(scaling) == N, _NS,
             "A, B, router_weight and scaling must hold one entry per adapter, got ", N,
             ", ", len(B), ", ", len(router_weight), " and ", len(scaling))
    T, _, d_out, _, _ = check_forward_args(compiled.FAMILY, x, A[0], B[0], router_weight[0],
                                           router_input, base_out, scaling[0], top_k, eps)
    for n in range(1, N):
        _require(A[n].shape == A[0].shape and B[n].shape == B[0].shape
                 and router_weight[n].shape == router_weight[0].shape, _NS,
                 "adapter ", n, " has A ", A[n], ", B ", B[n], ", router_weight ",
                 router_weight[n], " but adapter 0 has A ", A[0], ", B ", B[0],
                 ", router_weight ", router_weight[0],
                 ": a mixed batch needs adapters of the same E, r, d_in and d_out")
        for t in (A[n], B[n], router_weight[n]):
            _require(t.dtype == x.dtype and t.device == x.device, _NS, "adapter ", n,
                     "'s weights must match x's dtype (", x.dtype, ") and device (",
                     x.device, "), got ", t.dtype, " on ", t.device)
        _require(math.isfinite(scaling[n]), _NS, "scaling of adapter ",
                 n, " must be finite, got ", float(scaling[n]))
    _require(rows.dim() == 1 and rows.dtype == torch.int64 and rows.device == x.device, _NS,
             "rows must be a 1-D int64 tensor on x's device, got ", rows, " ", rows.dtype,
             " on ", rows.device)
    M = rows.shape[0]
    _require(len(offsets) == N + 1, _NS, "offsets must hold N + 1 = ", N + 1,
             " entries (where each adapter's rows start, then the end), got ", len(offsets))
    _require(offsets[0] == 0 and offsets[N] == M, _NS, "offsets must start at 0 and end at ",
             "rows' length ", M, ", got ", list(offsets))
    _require(all(offsets[n] <= offsets[n + 1] for n in range(N)), _NS,
             "offsets must not decrease, got ", list(offsets))
    _require(M <= T, _NS, "rows lists ", M, " rows but x has ", T)
    return d_out


def _register() -> None:
    op = compiled.FAMILY.op("mixed_forward")

    def fake(x, A, B, router_weight, router_input, base_out, rows, offsets, scaling, top_k,
             orthogonalize, normalize, eps):
        d_out = check_mixed_args(x, A, B, router_weight, router_input, base_out, rows, offsets,
                                 scaling, top_k, eps)
        return x.new_empty((x.shape[0], d_out))

    def backward(ctx, grad_y):
        raise RuntimeError("omoe::mixed_forward is forward only (inference); for gradients of "
                           "a mixed batch call ok.omoe_lora_mixed with backend='cpu' or "
                           "'reference' while autograd records")

    def setup_context(ctx, inputs, output):
        pass

    torch.library.register_fake(op)(fake)
    torch.library.register_autograd(op, backward, setup_context=setup_context)


LOADED = compiled.LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
    "omoe::mixed_forward", "CPU")
if LOADED:
    _register()
    MIXED_FORWARD = compiled.FAMILY.op("mixed_forward")
