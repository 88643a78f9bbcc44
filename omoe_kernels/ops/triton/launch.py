"""The `triton` backend: launchers and the `torch.ops.omoe_triton` custom ops.

A training step is ten launches and nothing else (docs/algorithm.md, "The Triton step"):
- forward (3): shrink (`H`, logits in one pass over x; appended programs build
  `G = B_catᵀB_cat` in float64) → per-token kernel (routing, Gram, MGS → `Z = a ⊙ h`) →
  expand (`Y = base + s Z B_catᵀ`, base added in the epilogue);
- backward (7): dZ = s dY B_cat (split-K partials) → per-token reverse (Z, dH, dlogits, dS) →
  gram_grad (dG partials) → dB partials → [dA; dW] partials → finalize (sums the
  partials, adds `B_cat (dG + dGᵀ)`, writes grad_A, grad_B, grad_W) → dX.
The weights are read in place from `A [E, r, d_in]`, `B [E, d_out, r]` and the router
weight (no padded, concatenated or float64 copies), grad_y and x in their own dtype; the
router's E columns run in a narrow tile of their own, so the wide GEMMs span E·r. No
host synchronisation: every size is known from the shapes. Saved: `H`, the logits and G
(a backward op called without G builds it in dZ's grid). The ops
`torch.ops.omoe_triton.forward/backward` have the compiled ops' schema with G added
(registration.GRAM_*_SCHEMA) and the same checks, fake kernels and autograd.

Runs on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (a correctness tool:
the interpreter cannot do bf16 math, so bf16 dots run in fp32 on operands rounded to
bf16 exactly as on the GPU). Fixed launch configs under the interpreter or with
`OMOE_TRITON_FIXED_CONFIG=1`; otherwise the shrink and matmul kernels are autotuned over
a few configs, keyed on sizes rounded up to powers of 2.
"""
from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from typing import Optional

import torch

from ..limits import MAX_ACTIVE_EXPERTS
from ..problem import Problem
from ..registration import (
    OpFamily,
    accumulate_dtype,
    call_forward,
    check_autograd_mode,
    check_backward_args,
    check_forward_args,
    register_family,
    save_context,
    tensor_grads,
)
from . import configs as C
from .params import Epilogue, Operands, SlotGrads
from .replay import PlanCache, allocated, allocations, record, tensor_key
from .sizing import (  # noqa: F401  (re-exported: launch is where callers find them)
    Layout,
    Target,
    _gram_args,
    _num_sms,
    _pow2_bucket,
    _upcast,
    dot_kind,
    fixed_config,
    grouped_meta,
    interpreting,
    layout,
    padded_gram,
)
from .tuned import Launch, chosen

try:
    import triton

    from . import gemm_kernels as K
    from .scaled_kernels import scaled_matmul_kernel

    AVAILABLE = True
    IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing or broken: the backend is just unavailable
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


# Tests set this to fill every buffer a kernel writes with NaN before the launch, so that
# an element a kernel forgets to write shows up.
POISON_OUTPUTS = False


def _empty(shape, device, dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return allocated(torch.full(shape, poison, device=device, dtype=dtype))
    return allocated(torch.empty(shape, device=device, dtype=dtype))


# ----------------------------------------------------------------------------------------
# Launch plans: each launcher builds a `Launch` (kernel, arguments, constexprs, options,
# grid) for its tensors, then runs it. tools/kernel_report builds the same plans from
# meta tensors at the contract's shapes and compiles them: one source for both.

def _packed_b(b: torch.Tensor, packed: Optional[str], L: Layout, Kdim: int):
    """(N, K, stride_bk, stride_bn, stride_b_expert) of matmul's b operand."""
    if packed == "Bk":
        return b.shape[1], L.ERP, b.stride(2), b.stride(1), b.stride(0)
    if packed == "Bn":
        return L.ERP, Kdim, b.stride(1), b.stride(2), b.stride(0)
    if packed == "Ak":
        return b.shape[2], L.ERP, b.stride(1), b.stride(2), b.stride(0)
    return b.shape[1], Kdim, b.stride(0), b.stride(1), 0


def plan_matmul(a: torch.Tensor, b: torch.Tensor, L: Layout, ops: Operands, epi: Epilogue,
                target: Target, a_scale: Optional[torch.Tensor] = None
                ) -> tuple[Launch, torch.Tensor]:
    """The launch of matmul_kernel for `matmul` (scaled_matmul_kernel where a_scale is given and
    K fits one tile), and its output. a_scale: a's row scales (the per-token kernels' format)."""
    M, Kdim = a.shape
    N, Kdim, stride_bk, stride_bn, stride_be = _packed_b(b, ops.packed, L, Kdim)
    device, kind = a.device, ops.kind
    scaled = a_scale is not None
    if scaled and (kind not in C.SIXTEEN_BIT_KINDS or a.dtype != torch.float16 or epi.long_k or epi.gram):
        raise ValueError("a scaled operand is an fp16 a of a 16-bit GEMM without split-K or G")
    grouped = C.grouped_tile(M, N, Kdim, target.num_sms, target.interpret) if scaled else None
    cfg = grouped or C.GemmConfig.matmul(kind, N, ops.fp16_a, target.interpret, scaled_a=scaled)
    if epi.long_k:
        splits, k_per_split = C.split_k(M, N, Kdim, cfg, target.num_sms, target.interpret, epi.per_sm)
        out = _empty((splits, M, N), device, torch.float64 if kind == C.DOT_FP64 else torch.float32)
    else:
        splits, k_per_split = 1, max(Kdim, 1)
        out = _empty((1, M, N), device, epi.out_dtype)
    add_t = epi.add if epi.add is not None else out
    a2, b2, c2 = epi.router if epi.router is not None else (out, out, None)
    c2_t = c2 if c2 is not None else out
    if epi.gram is not None and epi.gram[0] is not b:
        raise ValueError("the gram programs read B as the b operand")
    _, gram_g, num_gram, d_out, gram_strides = _gram_args(*(epi.gram or (None, None)), L, out)
    if num_gram and splits != 1:
        raise ValueError("the gram programs need a launch without split-K")
    args = (a, b, out, add_t, a2, b2, c2_t, gram_g, a_scale if scaled else out, M, N, Kdim, k_per_split, L.num_experts,
            L.rank, d_out, num_gram, _pow2_bucket(M), _pow2_bucket(N), _pow2_bucket(Kdim),
            a.stride(0), a.stride(1), stride_bk, stride_bn, stride_be,
            out.stride(0), out.stride(1), out.stride(2), add_t.stride(-2), add_t.stride(-1),
            a2.stride(-2), a2.stride(-1), b2.stride(-2), b2.stride(-1), c2_t.stride(-2),
            c2_t.stride(-1), *gram_strides, float(epi.scale))
    router = 0 if epi.router is None else (1 if c2 is None else 2)
    meta = dict(HAS_ADD=epi.add is not None, SPLIT_A=ops.split_a, SPLIT_B=ops.split_b,
                FP16_A=ops.fp16_a, DOT_KIND=kind, UPCAST=ops.upcast,
                PACKED_BK=ops.packed in ("Bk", "Ak"), PACKED_BN=ops.packed == "Bn",
                ROUTER=router, BLOCK_E=L.EPL, RP=L.RP, ERP=L.ERP, WITH_GRAM=num_gram > 0,
                SCALED_A=scaled, **C.gram_rows(d_out, cfg.num_warps))
    tuned = target.autotunes(kind) and not scaled   # SCALED_TILE: sized for 2 CTAs per SM
    grid = lambda m: (num_gram + triton.cdiv(M, m["BLOCK_M"])  # noqa: E731
                      * triton.cdiv(triton.cdiv(N, m["BLOCK_N"]), m.get("N_GROUP", 1)), splits)
    if tuned:
        return Launch(K.matmul_kernel, args, meta, {}, grid, cfg, "matmul"), out
    kernel = scaled_matmul_kernel if grouped else K.matmul_kernel
    meta.update(grouped_meta(stride_bn, L) if grouped else {})
    return Launch(kernel, args, {**meta, **cfg.meta()}, cfg.options(), grid, cfg), out


def _run(planned):
    """Runs a plan's launch and returns its outputs."""
    launch, outputs = planned
    launch.run()
    return outputs


def matmul(a: torch.Tensor, b: torch.Tensor, L: Layout, ops: Operands,
           epi: Epilogue) -> torch.Tensor:
    """scale · a @ b (+ add, + router term) for a [M, K] of any strides, in one launch
    (`Operands` and `Epilogue` say how); [M, N], or the partials [splits, M, N] (long_k)."""
    out = _run(plan_matmul(a, b, L, ops, epi, Target.of(a.device)))
    return out if epi.long_k else out[0]


def plan_gram_only(B: torch.Tensor, L: Layout, target: Target):
    """The launch of `gram_only` (matmul_kernel with no GEMM tiles), and G."""
    G = _empty((L.ERP, L.ERP), B.device, torch.float64)
    launch, _ = plan_matmul(B.new_empty((0, B.shape[1])), B, L, Operands(C.DOT_FP32_IEEE, packed="Bn"),
                            Epilogue(torch.float32, gram=(B, G)), target)
    return launch, G


def gram_only(B: torch.Tensor, L: Layout) -> torch.Tensor:
    """G = B_catᵀB_cat ([ERP, ERP] float64) in a launch of its own (the fused-token shrink
    needs G complete before its epilogue)."""
    return _run(plan_gram_only(B, L, Target.of(B.device)))


def fuse_token_in_shrink() -> bool:
    """OMOE_TRITON_FUSE_TOKEN=1: the per-token algebra in the shrink's epilogue (bench/README.md)."""
    return os.environ.get("OMOE_TRITON_FUSE_TOKEN", "0") not in ("", "0")


def plan_shrink(x: torch.Tensor, router_input: Optional[torch.Tensor], A: torch.Tensor,
                W: torch.Tensor, L: Layout, kind: int, upcast: bool, target: Target,
                gram: Optional[tuple] = None, token: Optional[dict] = None):
    """The launch of shrink_kernel for `shrink`, and its outputs (h, logits, z or None)."""
    T, D = x.shape
    acc = accumulate_dtype(x.dtype)
    h = _empty((T, L.ERP), x.device, acc)
    logits = _empty((T, L.num_experts), x.device, acc)
    r = router_input if router_input is not None else x
    cfg = C.GemmConfig.shrink(kind, L.ERP, fuse_token=token is not None, interpret=target.interpret)
    z = None
    token_args, token_meta = (h, h, 0, 0.0, 0), {}
    if token is not None:
        z = _empty((T, L.ERP), x.device, acc)
        G = token["G"]
        token_args = (G if G is not None else h, z, token["top_k"], float(token["eps"]), z.stride(0))
        # A token per thread, blocks of the program's own rows (others' may be unwritten).
        lanes = min(32 * (cfg.num_warps or 4), cfg.block_m)
        tcfg = C.TokenConfig.of(L, token["top_k"], token["orthogonalize"], token["normalize"])
        tcfg = replace(tcfg, block_t=lanes, num_warps=lanes // 32)
        token_meta = dict(tcfg.meta(), FUSE_TOKEN=True)
    gram_b, gram_g, num_gram, d_out, gram_strides = _gram_args(*(gram or (None, None)), L, h)
    args = (x, r, A, W, h, logits, gram_b, gram_g, T, D, L.ERP, L.num_experts, L.rank, d_out,
            num_gram, _pow2_bucket(T),
            x.stride(0), x.stride(1), r.stride(0), r.stride(1),
            A.stride(0), A.stride(1), A.stride(2), W.stride(0), W.stride(1),
            h.stride(0), logits.stride(0), *gram_strides) + token_args
    meta = dict(SEPARATE_ROUTER=router_input is not None, DOT_KIND=kind, UPCAST=upcast,
                BLOCK_E=L.EPL, RP=L.RP, ERP=L.ERP, **C.gram_rows(d_out, cfg.num_warps))
    meta.update(token_meta)
    n_tiles = triton.cdiv(L.ERP, cfg.block_n)
    if token is not None and (n_tiles != 1 or num_gram != 0):
        raise ValueError("the fused per-token epilogue needs one n-tile and G built beforehand")
    grid = lambda m: (num_gram + triton.cdiv(T, m["BLOCK_M"]) * n_tiles,)  # noqa: E731
    outputs = (h, logits, z)
    if token is None and target.autotunes(kind):
        launch = Launch(K.shrink_kernel, args, dict(meta, BLOCK_N=cfg.block_n), {}, grid, cfg, "shrink")
        return launch, outputs
    return Launch(K.shrink_kernel, args, {**meta, **cfg.meta()}, cfg.options(), grid, cfg), outputs


def shrink(x: torch.Tensor, router_input: Optional[torch.Tensor], A: torch.Tensor,
           W: torch.Tensor, L: Layout, kind: int, upcast: bool,
           gram: Optional[tuple] = None, token: Optional[dict] = None):
    """H [T, ERP] and logits [T, E] (accumulator dtype), and Z when `token` is given.

    gram = (B, G): the same launch builds G = B_catᵀB_cat into G.
    token = dict(G=…, top_k=…, orthogonalize=…, normalize=…, eps=…): fuse the per-token
    kernel into the epilogue (fixed config, one n-tile; G complete beforehand).
    Returns (h, logits, z or None).
    """
    return _run(plan_shrink(x, router_input, A, W, L, kind, upcast, Target.of(x.device),
                            gram=gram, token=token))


def plan_weight_grad(x: torch.Tensor, router_input: Optional[torch.Tensor], dhl: torch.Tensor,
                     L: Layout, kind: int, upcast: bool, split: bool, target: Target):
    """The launch of weight_grad_kernel for `weight_grad`, and its partials buffer."""
    T, D = x.shape
    r = router_input if router_input is not None else x
    cfg = C.GemmConfig.weight_grad(kind, L.ERP, interpret=target.interpret)
    splits, k_per_split = C.split_k(D, L.ERP, T, cfg, target.num_sms, target.interpret)
    acc = torch.float64 if kind == C.DOT_FP64 else torch.float32
    out = _empty((splits, D, L.NW), x.device, acc)
    dl = dhl[:, L.ERP:]
    args = (x, r, dhl, dl, out, T, D, L.ERP, L.num_experts, k_per_split, _pow2_bucket(T),
            x.stride(0), x.stride(1), r.stride(0), r.stride(1), dhl.stride(0), dl.stride(0),
            out.stride(0), out.stride(1))
    meta = dict(SEPARATE_ROUTER=router_input is not None, SPLIT_B=split, DOT_KIND=kind,
                UPCAST=upcast, BLOCK_E=L.EPL, **cfg.meta())
    grid = (cfg.tiles(D, L.ERP), splits)
    return Launch(K.weight_grad_kernel, args, meta, cfg.options(), grid, cfg), out


def weight_grad(x: torch.Tensor, router_input: Optional[torch.Tensor], dhl: torch.Tensor,
                L: Layout, kind: int, upcast: bool, split: bool) -> torch.Tensor:
    """Split-K partials [splits, d_in, NW] of [dA_cat; dW]ᵀ = [Xᵀ dH | Rᵀ dL] (one launch)."""
    return _run(plan_weight_grad(x, router_input, dhl, L, kind, upcast, split, Target.of(x.device)))


def plan_finalize_grads(pb: torch.Tensor, pa: torch.Tensor, pg: Optional[torch.Tensor],
                        A: torch.Tensor, B: torch.Tensor, L: Layout, dtype: torch.dtype):
    """The launch of finalize_grads_kernel for `finalize_grads`, and (grad_A, grad_B, grad_W)."""
    E, r, d_in = A.shape
    d_out, device = B.shape[1], A.device
    grad_A, grad_B, grad_W = (_empty(s, device, dtype) for s in ((E, r, d_in), (E, d_out, r), (E, d_in)))
    cfg = C.finalize_config(B.element_size())
    b_programs = triton.cdiv(d_out, cfg.block_r) * triton.cdiv(L.ERP, cfg.block_c)
    a_programs = triton.cdiv(d_in, cfg.block_r) * triton.cdiv(L.NW, cfg.block_c)
    args = (pb, pa, pg if pg is not None else pb, B, grad_B, grad_A, grad_W,
            pb.shape[0], pa.shape[0], pg.shape[0] if pg is not None else 0, d_out, d_in, E, r,
            b_programs, *B.stride(), *grad_B.stride(), *grad_A.stride(), *grad_W.stride())
    meta = dict(ORTHOGONALIZE=pg is not None, RP=L.RP, ERP=L.ERP, NW=L.NW, **cfg.meta())
    # num_stages: Triton's CUDA default, explicit so that the report compiles the same.
    options = dict(cfg.options(), num_stages=C.TOKEN_STAGES)
    launch = Launch(K.finalize_grads_kernel, args, meta, options, (b_programs + a_programs,), cfg)
    return launch, (grad_A, grad_B, grad_W)


def finalize_grads(pb: torch.Tensor, pa: torch.Tensor, pg: Optional[torch.Tensor],
                   A: torch.Tensor, B: torch.Tensor, L: Layout, dtype: torch.dtype):
    """(grad_A, grad_B, grad_W) in their final layout and dtype from the partials of the
    dB GEMM (pb), the [dA; dW] GEMM (pa) and gram_grad (pg, or None), in one launch."""
    return _run(plan_finalize_grads(pb, pa, pg, A, B, L, dtype))


def _scaled_rows(T: int, L: Layout, device, scaled: bool):
    """(fp16 [T, ERP], fp32 row scales [T]) of the MMA operand format, or (None, None)."""
    if not scaled:
        return None, None
    return _empty((T, L.ERP), device, torch.float16), _empty((T,), device, torch.float32)


def plan_token_forward(h, logits, G, L: Layout, top_k, orthogonalize, normalize, eps,
                       target: "Target", scaled: bool = False):
    """The launch of token_forward_kernel for `token_forward`, and (z, z's row scales or
    None): z in h's dtype, or with `scaled` in the expand's operand format (fp16)."""
    T = h.shape[0]
    z16, zs = _scaled_rows(T, L, h.device, scaled)
    z = z16 if scaled else _empty(h.shape, h.device, h.dtype)
    cfg = C.TokenConfig.of(L, top_k, orthogonalize, normalize,
                           C.tokens_per_program(T, target.num_sms, interpret=target.interpret))
    args = (h, logits, G if G is not None else h, z, zs if scaled else z, T, cfg.block_t,
            L.num_experts, top_k, float(eps), h.stride(0), logits.stride(0), z.stride(0))
    grid = (triton.cdiv(T, cfg.block_t),)
    meta = dict(cfg.meta(), SCALED=scaled)
    return Launch(K.token_forward_kernel, args, meta, cfg.options(), grid, cfg), (z, zs)


def plan_token_backward(h, logits, G, dz, L: Layout, top_k, orthogonalize, normalize, eps,
                        target: "Target", scaled: bool = False):
    """The launch of token_backward_kernel on dz = dZ's split-K partials [splits, T, ERP], and
    (z, dhl, ds, (dH in dX's operand format, its row scales) or (None, None) unless `scaled`)."""
    T = h.shape[0]
    z = _empty(h.shape, h.device, h.dtype)
    dhl = _empty((T, L.NW), h.device, h.dtype)
    dh16, dhs = _scaled_rows(T, L, h.device, scaled)
    cfg = C.TokenConfig.of(L, top_k, orthogonalize, normalize,
                           C.tokens_per_program(T, target.num_sms, interpret=target.interpret))
    ds = None
    if orthogonalize:
        experts = _empty((T, cfg.KP), h.device, torch.int32) if cfg.top_k_routing else None
        ds = SlotGrads(_empty((T, cfg.KP * cfg.KP), h.device, torch.float64), experts, cfg.KP)
    args = (h, logits, G if G is not None else h, dz, z, dhl,
            ds.values if ds is not None else h,
            ds.experts if ds is not None and ds.experts is not None else h,
            dh16 if scaled else h, dhs if scaled else h, T, cfg.block_t, L.num_experts, top_k, float(eps),
            h.stride(0), logits.stride(0), dz.stride(1), z.stride(0), dhl.stride(0), dz.shape[0], dz.stride(0))
    grid = (triton.cdiv(T, cfg.block_t),)
    launch = Launch(K.token_backward_kernel, args, dict(cfg.meta(), EPL=L.EPL, SCALED=scaled),
                    cfg.options(), grid, cfg)
    return launch, (z, dhl, ds, (dh16, dhs))


def plan_gram_grad(h, ds: SlotGrads, L: Layout, target: Target):
    """The launch of gram_grad_kernel for `gram_grad`, and its partials buffer."""
    T = h.shape[0]
    top_k_routing = ds.experts is not None
    block_t = C.gram_grad_block(L)
    splits, per_split = C.gram_grad_splits(T, L.num_experts, block_t, target.num_sms,
                                           target.interpret)
    partial = _empty((splits, L.ERP, L.ERP), h.device, torch.float64)
    args = (h, ds.values, ds.experts if top_k_routing else ds.values, partial, T,
            L.num_experts, per_split, h.stride(0))
    meta = dict(TOP_K_ROUTING=top_k_routing, KP=ds.slots, RP=L.RP, ERP=L.ERP, BLOCK_T=block_t)
    options = dict(num_warps=C.GRAM_GRAD_WARPS, num_stages=C.TOKEN_STAGES)
    return Launch(K.gram_grad_kernel, args, meta, options, (L.EP * (L.EP + 1) // 2, splits)), partial


def gram_grad(h, ds: SlotGrads, L: Layout) -> torch.Tensor:
    """Partial sums of dG over token splits, [splits, ERP, ERP] float64, its upper triangle
    of expert blocks written (dG is symmetric; the caller sums over splits). Under top-k, a
    token block in which an expert pair is not active costs that pair's program nothing."""
    return _run(plan_gram_grad(h, ds, L, Target.of(h.device)))


# ----------------------------------------------------------------------------------------
# Forward and backward of the op.

def plan_forward(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                 orthogonalize, normalize, eps, target: Target, fuse_token: bool = False):
    """The launches of the forward op, by name in launch order (shrink + G, token_forward,
    expand; with fuse_token: gram, shrink with the per-token epilogue, expand), and
    (y, h, logits, G or an empty tensor). tools/kernel_report compiles these launches."""
    E, r, _ = A.shape
    L = layout(E, r)
    kind = dot_kind(x.dtype, x.device.type)
    upcast = _upcast(x.dtype)
    launches, G, z_scale = {}, None, None
    if fuse_token and L.ERP <= 256:   # (Z in fp32: the expand scales it per chunk)
        if orthogonalize:
            launches["gram"], G = plan_gram_only(B, L, target)
        token = dict(G=G, top_k=top_k, orthogonalize=orthogonalize, normalize=normalize, eps=eps)
        launches["shrink"], (h, logits, z) = plan_shrink(x, router_input, A, router_weight, L, kind,
                                                         upcast, target, token=token)
    else:
        G = _empty((L.ERP, L.ERP), x.device, torch.float64) if orthogonalize else None
        gram = (B, G) if G is not None else None
        launches["shrink"], (h, logits, _) = plan_shrink(x, router_input, A, router_weight, L, kind,
                                                         upcast, target, gram=gram)
        launches["token_forward"], (z, z_scale) = plan_token_forward(
            h, logits, G, L, top_k, orthogonalize, normalize, eps, target,
            scaled=C.scaled_operand(kind, C.EXPAND_Z))
    flags = C.a_operand_flags(kind, C.EXPAND_Z)
    launches["expand"], y = plan_matmul(
        z, B, L, Operands(kind, upcast, "Bk", **flags), Epilogue(x.dtype, scaling, add=base_out),
        target, a_scale=z_scale)
    G = G if G is not None else _empty((0,), x.device, torch.float64)
    return launches, (y[0], h, logits, G)


_FORWARD_PLANS, _BACKWARD_PLANS = PlanCache(), PlanCache()


def _switches(x: torch.Tensor) -> tuple:
    """What a plan reads besides its arguments: the Target, the fused-token switch, the
    dot kind (the TF32 flag for fp32 on CUDA) and the sizing rules tests replace."""
    return (Target.of(x.device), fuse_token_in_shrink(), dot_kind(x.dtype, x.device.type),
            C.tokens_per_program, C.split_k, C.gram_grad_splits)


def _replayed(cache: PlanCache, key, inputs: tuple, plan, scaling: float, keep: bool = True):
    """(outputs of `inputs`' call, its Replay or None): the replay kept under `key`, or
    `plan()` -> (launches, outputs) run and recorded under `key` (keep; not for scaling
    ±0, which compare equal but give zeros of different signs)."""
    replay = cache.get(key)
    if replay is not None:
        return replay.run(inputs, _empty if POISON_OUTPUTS else None), replay
    with allocations() as buffers:
        launches, outputs = plan()
    for launch in launches.values():
        launch.run()
    if keep and scaling != 0:
        replay = record(launches.values(), inputs, buffers, outputs, chosen)
        cache.put(key, replay)
    return outputs, replay


def _forward(x, A, B, router_weight, router_input, base_out, scaling, top_k,
             orthogonalize, normalize, eps):
    """forward_impl's outputs, the key its plan is kept under and the plan's Replay (or
    None)."""
    inputs = (x, A, B, router_weight, router_input, base_out)
    key = (*map(tensor_key, inputs), scaling, top_k, orthogonalize, normalize, eps,
           _switches(x))

    def plan():
        check_forward_args(FAMILY, x, A, B, router_weight, router_input, base_out, scaling,
                           top_k, eps)
        if x.shape[0] == 0:   # no tokens: nothing to launch (G, if wanted, by torch)
            L = layout(A.shape[0], A.shape[1])
            acc = accumulate_dtype(x.dtype)
            return {}, (x.new_empty((0, B.shape[1])), _empty((0, L.ERP), x.device, acc),
                        _empty((0, L.num_experts), x.device, acc), padded_gram(B, L, orthogonalize))
        return plan_forward(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                            orthogonalize, normalize, eps, Target.of(x.device),
                            fuse_token_in_shrink())

    outputs, replay = _replayed(_FORWARD_PLANS, key, inputs, plan, scaling)
    return outputs, key, replay


def forward_impl(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                 orthogonalize, normalize, eps):
    """(y, h, logits, G): the op `omoe_triton::forward`. Three launches: shrink (+ G), per-token,
    expand; the weights are read in place. A call with the key of a recorded one replays
    it (replay.py): its checks passed."""
    return _forward(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                    orthogonalize, normalize, eps)[0]


def plan_backward(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                  orthogonalize, normalize, eps, target: Target, gram=None):
    """The launches of the backward op, by name in launch order (dZ, token_backward, gram_grad,
    dB, weight_grad, finalize, dX), and (grad x, grad A, grad B, grad router_weight, grad
    router_input or an empty tensor). h, logits, gram (the forward's G or None): contiguous."""
    L = layout(A.shape[0], A.shape[1])
    dtype = x.dtype
    kind = dot_kind(dtype, x.device.type)
    upcast = _upcast(dtype)
    acc = accumulate_dtype(dtype)
    build = orthogonalize and gram is None   # no G from the forward: dZ's grid builds it
    G = _empty((L.ERP, L.ERP), x.device, torch.float64) if build else gram
    launches = {}
    # dZ = s dY B_cat (grad_y is read in its own dtype: the kernels convert per tile)
    launches["dZ"], dz = plan_matmul(grad_y, B, L, Operands(kind, upcast, "Bn"), Epilogue(
        acc, scaling, long_k=not build, gram=(B, G) if build else None, per_sm=1), target)
    launches["token_backward"], (z, dhl, ds, (dh16, dh_scale)) = plan_token_backward(
        h, logits, G, dz, L, top_k, orthogonalize, normalize, eps, target,
        scaled=C.scaled_operand(kind, C.DX_DH))
    dG_partials = None   # [splits, ERP, ERP]
    if orthogonalize:
        launches["gram_grad"], dG_partials = plan_gram_grad(h, ds, L, target)
    # dB_cat = s dYᵀ Z (+ B_cat (dG + dGᵀ), added by finalize_grads)
    launches["dB"], dB_partials = plan_matmul(
        grad_y.t(), z, L, Operands(kind, upcast, split_b=C.b_operand_split(kind, C.SPLIT_DB)),
        Epilogue(acc, scaling, long_k=True), target)
    launches["weight_grad"], dAW_partials = plan_weight_grad(
        x, router_input, dhl, L, kind, upcast, C.b_operand_split(kind, C.SPLIT_DAW), target)
    launches["finalize"], (grad_A, grad_B, grad_W) = plan_finalize_grads(
        dB_partials, dAW_partials, dG_partials, A, B, L, dtype)
    # dX = dH A_cat + dL W (+ a separate router input's own gradient dL W)
    grad_R = _empty(router_input.shape, x.device, dtype) if router_input is not None else None
    launches["dX"], grad_x = plan_matmul(
        dh16 if dh16 is not None else dhl[:, :L.ERP], A, L,
        Operands(kind, upcast, "Ak", **C.a_operand_flags(kind, C.DX_DH)),
        Epilogue(dtype, router=(dhl[:, L.ERP:], router_weight, grad_R)), target, a_scale=dh_scale)
    grad_R = grad_R if grad_R is not None else x.new_empty((0,))
    return launches, (grad_x[0], grad_A, grad_B, grad_W, grad_R)


def _backward(key, inputs: tuple, options: tuple, keep: bool = True):
    """backward_impl on inputs = (grad_y, x, A, B, router_weight, router_input, h, logits,
    gram), its plan kept under `key`."""
    grad_y, x, A, B, router_weight, router_input, h, logits, gram = inputs
    scaling, top_k, orthogonalize, normalize, eps = options

    def plan():
        check_backward_args(FAMILY, *inputs[:8], scaling, top_k, eps, gram, orthogonalize)
        if x.shape[0] == 0:   # no tokens: zero weight gradients, nothing to launch
            grad_R = router_input.new_empty(router_input.shape) if router_input is not None \
                else x.new_empty((0,))
            return {}, (x.new_empty(x.shape), torch.zeros_like(A), torch.zeros_like(B),
                        torch.zeros_like(router_weight), grad_R)
        # The per-token kernels read unit columns (a copy is not recorded: no replay).
        return plan_backward(grad_y, x, A, B, router_weight, router_input, h.contiguous(),
                             logits.contiguous(), *options, Target.of(x.device),
                             gram.contiguous() if gram is not None and orthogonalize else None)

    return _replayed(_BACKWARD_PLANS, key, inputs, plan, scaling, keep)[0]


def backward_impl(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                  orthogonalize, normalize, eps, gram=None):
    """(grad x, grad A, grad B, grad router_weight, grad router_input or an empty tensor):
    the op `omoe_triton::backward`. Seven launches: dZ (+ G without `gram`, the forward's G),
    per-token reverse, gram_grad, dB, [dA; dW], finalize, dX (docs/algorithm.md). Replayed."""
    inputs = (grad_y, x, A, B, router_weight, router_input, h, logits, gram)
    options = (scaling, top_k, orthogonalize, normalize, eps)
    return _backward((*map(tensor_key, inputs), *options, _switches(x)), inputs, options)


def _backward_after(forward_key, forward_replay, grad_y, *saved_and_options, gram=None):
    """backward_impl after a forward_impl call kept under `forward_key` as
    `forward_replay`, on the tensors it saved: its key is the Replay (hashed by
    identity) and grad_y's, the rest it reads being in forward_key. A plan made under
    other switches than the forward's is not kept."""
    inputs, options = (grad_y, *saved_and_options[:7], gram), saved_and_options[7:]
    if forward_replay is None:
        return backward_impl(*inputs[:8], *options, gram)
    key = (forward_replay, tensor_key(grad_y))
    keep = key in _BACKWARD_PLANS or _switches(inputs[1]) == forward_key[-1]
    return _backward(key, inputs, options, keep)


# ----------------------------------------------------------------------------------------
# The ops.

FAMILY = OpFamily(namespace="omoe_triton", backends="'triton'",
                  hidden_width=lambda E, r: layout(E, r).ERP,
                  max_active_experts=lambda device_type: MAX_ACTIVE_EXPERTS["triton"],
                  kernels="Triton", saves_gram=True)

if AVAILABLE:
    for _name, _schema, _impl in zip(("forward", "backward"), FAMILY.schemas,
                                     (forward_impl, backward_impl)):
        torch.library.define(f"omoe_triton::{_name}", _schema)
        torch.library.impl(f"omoe_triton::{_name}", ("cpu", "cuda"), _impl)
    register_family(FAMILY)


class _TritonOp(torch.autograd.Function):
    """The ops' registered autograd (registration.py) for plain eager calls, with the
    impls called directly: no dispatcher round trip, no custom-op wrapper. Same saved
    tensors, refusals and gradients (save_context, tensor_grads)."""

    @staticmethod
    def forward(ctx, x, A, B, router_weight, router_input, base_out, options):
        (y, h, logits, gram), *ctx.plan = _forward(x, A, B, router_weight, router_input,
                                                   base_out, *options)
        save_context(ctx, (x, A, B, router_weight, router_input, base_out), options, h, logits,
                     gram)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        backward = partial(_backward_after, *ctx.plan)
        return tensor_grads(FAMILY, ctx, grad_y, backward) + (None,)   # options


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def omoe_lora_triton(x2d, A, B, router_weight, router_input2d, base2d, problem: Problem):
    """The backend function of docs/contract.md §3 (see functional.omoe_lora)."""
    if not AVAILABLE:
        raise RuntimeError(f"the triton backend is unavailable: {IMPORT_ERROR}")
    tensors = (x2d, A, B, router_weight, router_input2d, base2d)
    if (torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or not all(t is None or type(t) in _PLAIN for t in tensors)):
        # Traced graphs, torch.func, modes and tensor subclasses see the registered op.
        return call_forward(FAMILY, *tensors, problem)
    if torch.autograd.forward_ad._current_level >= 0:   # a dual level open: check for tangents
        check_autograd_mode(FAMILY, tensors)
    options = (problem.scaling, problem.top_k, problem.orthogonalize, problem.normalize,
               problem.eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _TritonOp.apply(*tensors, options)
    return forward_impl(*tensors, *options)[0]   # nothing to differentiate: no graph
