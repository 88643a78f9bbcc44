"""The grouped forward of a mixed batch on the `triton` backend (omoe_kernels/mixed.py):
three launches, as the single-adapter forward, whatever the number of adapters
(triton/mixed_kernels.py says what each does).

`segment_rows` sorts the tokens into segments once per adapter index (mixed.py keeps
it with the batch's Grouping); the launches then take the stacked weights
A [N, E, r, d_in], B [N, E, d_out, r], router [N, E, d_in] and a float32 scale per
adapter. The launch configs are the fixed ones (no autotuning): the segment length SEG
is the shrink's BLOCK_M, and the expand's BLOCK_M is cut to it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from ..registration import accumulate_dtype
from . import configs as C
from .launch import Launch, Target, _empty, _upcast, dot_kind, layout

try:
    import triton

    from . import mixed_kernels as MK
except Exception:  # triton missing: launch.AVAILABLE says so, and nothing here runs
    MK = None


@dataclass(frozen=True)
class SegmentRows:
    """Tokens in segment order: rows [P] int64 (the token of each padded row, -1 for
    padding), tiles [P / seg] int32 (the adapter of each stretch of `seg` rows, -1 for
    the tokens with no adapter)."""

    rows: torch.Tensor
    tiles: torch.Tensor
    seg: int

    @property
    def padded(self) -> int:
        return self.rows.numel()


def segment_length(kind: int, ERP: int, target: Target) -> int:
    """SEG for a launch of this dtype and width: the shrink's BLOCK_M."""
    return C.GemmConfig.shrink(kind, ERP, interpret=target.interpret).block_m


def segment_rows(sizes: Sequence[int], order: Optional[torch.Tensor], span: int, seg: int,
                 device: torch.device) -> SegmentRows:
    """The SegmentRows of a sorted index: sizes = entries of [no adapter, adapter 0, ...],
    order = the stable sort of the entries by adapter (None: one group), each entry
    covering `span` consecutive tokens."""
    T = sum(sizes) * span
    tokens = [size * span for size in sizes]
    padded = [-(-t // seg) * seg for t in tokens]
    if order is None:
        sorted_tokens = torch.arange(T, device=device)
    else:
        sorted_tokens = (order.to(device)[:, None] * span
                         + torch.arange(span, device=device)).reshape(-1)
    shift, acc, shifts = 0, 0, []
    for t, p in zip(tokens, padded):
        shifts.append(acc - shift)   # padded start minus unpadded start
        shift += t
        acc += p
    pos = torch.arange(T, device=device) + torch.repeat_interleave(
        torch.tensor(shifts, device=device), torch.tensor(tokens, device=device), output_size=T)
    rows = torch.full((acc,), -1, dtype=torch.int64, device=device)
    rows[pos] = sorted_tokens
    ids = torch.arange(-1, len(sizes) - 1, dtype=torch.int32, device=device)
    counts = torch.tensor([p // seg for p in padded], device=device)
    tiles = torch.repeat_interleave(ids, counts, output_size=acc // seg)
    return SegmentRows(rows, tiles, seg)


def plan_mixed_forward(x, A, B, W, router_input, base_out, scales: torch.Tensor,
                       seg: SegmentRows, top_k: int, orthogonalize: bool, normalize: bool,
                       eps: float, target: Target):
    """The three launches (shrink + every adapter's G, token_forward, expand) by name, and
    y [T, d_out]. x, router_input, base_out: [T, ·] in token order; A, B, W stacked."""
    N, E, r, D = A.shape
    d_out = B.shape[2]
    L = layout(E, r)
    kind = dot_kind(x.dtype, x.device.type)
    upcast = _upcast(x.dtype)
    acc = accumulate_dtype(x.dtype)
    P, device = seg.padded, x.device
    scfg = C.GemmConfig.shrink(kind, L.ERP, interpret=target.interpret)
    flags = C.a_operand_flags(kind, C.EXPAND_Z)
    mcfg = C.GemmConfig.matmul(kind, d_out, flags["fp16_a"], target.interpret)
    mcfg = replace(mcfg, block_m=min(mcfg.block_m, scfg.block_m), group_m=None)
    if seg.seg % scfg.block_m or seg.seg % mcfg.block_m:
        raise ValueError(f"segments of {seg.seg} rows do not split into the GEMMs' "
                         f"{scfg.block_m}- and {mcfg.block_m}-row tiles")
    h = _empty((P, L.ERP), device, acc)
    logits = _empty((P, E), device, acc)
    G = _empty((N, L.ERP, L.ERP), device, torch.float64) if orthogonalize else None
    r_in = router_input if router_input is not None else x
    num_gram = C.gram_programs(L.ERP) if orthogonalize else 0
    launches = {}
    args = (x, r_in, A, W, h, logits, B, G if G is not None else h, seg.rows, seg.tiles,
            D, L.ERP, E, r, d_out, num_gram, N, seg.seg,
            x.stride(0), x.stride(1), r_in.stride(0), r_in.stride(1), *A.stride(),
            *W.stride(), h.stride(0), logits.stride(0),
            B.stride(0), B.stride(1), B.stride(2), B.stride(3))
    meta = dict(SEPARATE_ROUTER=router_input is not None, DOT_KIND=kind, UPCAST=upcast,
                WITH_GRAM=num_gram > 0, BLOCK_E=L.EPL, RP=L.RP, ERP=L.ERP,
                **C.gram_rows(d_out, scfg.num_warps), **scfg.meta())
    grid = (num_gram * N + (P // scfg.block_m) * triton.cdiv(L.ERP, scfg.block_n),)
    launches["shrink"] = Launch(MK.mixed_shrink_kernel, args, meta, scfg.options(), grid, scfg)

    z = _empty((P, L.ERP), device, acc)
    tcfg = C.TokenConfig.of(L, top_k, orthogonalize, normalize,
                            C.tokens_per_program(P, target.num_sms, interpret=target.interpret))
    args = (h, logits, G if G is not None else h, z, seg.tiles, P, tcfg.block_t, E, top_k,
            float(eps), seg.seg, h.stride(0), logits.stride(0), z.stride(0))
    launches["token_forward"] = Launch(MK.mixed_token_forward_kernel, args, tcfg.meta(),
                                       tcfg.options(), (triton.cdiv(P, tcfg.block_t),), tcfg)

    y = _empty((x.shape[0], d_out), device, x.dtype)
    add = base_out if base_out is not None else y
    args = (z, B, y, add, scales, seg.rows, seg.tiles, d_out, L.ERP, E, r, seg.seg,
            z.stride(0), z.stride(1), B.stride(0), B.stride(3), B.stride(2), B.stride(1),
            y.stride(0), y.stride(1), add.stride(0), add.stride(1))
    meta = dict(HAS_ADD=base_out is not None, SPLIT_A=flags["split_a"],
                SPLIT_B=False, FP16_A=flags["fp16_a"], DOT_KIND=kind, UPCAST=upcast, RP=L.RP,
                BLOCK_M=mcfg.block_m, BLOCK_N=mcfg.block_n, BLOCK_K=mcfg.block_k)
    grid = ((P // mcfg.block_m) * triton.cdiv(d_out, mcfg.block_n),)
    launches["expand"] = Launch(MK.mixed_expand_kernel, args, meta, mcfg.options(), grid, mcfg)
    return launches, y


def mixed_forward(x, A, B, W, router_input, base_out, scales, seg: SegmentRows, top_k,
                  orthogonalize, normalize, eps) -> torch.Tensor:
    """y [T, d_out] of a mixed batch: three launches (plan_mixed_forward)."""
    launches, y = plan_mixed_forward(x, A, B, W, router_input, base_out, scales, seg, top_k,
                                     orthogonalize, normalize, eps, Target.of(x.device))
    for launch in launches.values():
        launch.run()
    return y
