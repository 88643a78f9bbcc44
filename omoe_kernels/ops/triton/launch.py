"""The `triton` backend: launchers and the `torch.ops.omoe_triton` custom ops.

A training step is ten launches and nothing else (docs/algorithm.md, "The Triton step"):
- forward (3): shrink (`H`, logits in one pass over x; appended programs build
  `G = B_catᵀB_cat` in float64) → per-token kernel (routing, Gram, MGS → `Z = a ⊙ h`) →
  expand (`Y = base + s Z B_catᵀ`, base added in the epilogue);
- backward (7): dZ = s dY B_cat (+ G again) → per-token reverse (Z, dH, dlogits, dS) →
  gram_grad (dG partials) → dB partials → [dA; dW] partials → finalize (sums the
  partials, adds `B_cat (dG + dGᵀ)`, writes grad_A, grad_B, grad_W) → dX.
The weights are read in place from `A [E, r, d_in]`, `B [E, d_out, r]` and the router
weight (no padded, concatenated or float64 copies), grad_y and x in their own dtype; the
router's E columns run in a narrow tile of their own, so the wide GEMMs span E·r. No
host synchronisation: every size is known from the shapes. Saved: `H` and the logits.

The ops `torch.ops.omoe_triton.forward/backward` have the schema of the compiled ops;
registration.py gives them the same checks, fake kernels and autograd, so
`torch.compile` traces through them as opaque nodes.

Runs on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (a correctness tool:
the interpreter cannot do bf16 math, so bf16 dots run in fp32 on operands rounded to
bf16 exactly as on the GPU). Fixed launch configs under the interpreter or with
`OMOE_TRITON_FIXED_CONFIG=1`; otherwise the shrink and matmul kernels are autotuned over
a few configs, keyed on sizes rounded up to powers of 2.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..limits import MAX_ACTIVE_EXPERTS, next_pow2, triton_interpreting
from ..problem import Problem
from ..registration import (
    BACKWARD_SCHEMA,
    FORWARD_SCHEMA,
    OpFamily,
    accumulate_dtype,
    call_forward,
    check_backward_args,
    check_forward_args,
    register_family,
)
from . import configs as C

try:
    import triton

    from . import gemm_kernels as K

    AVAILABLE = True
    IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing or broken: the backend is just unavailable
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


interpreting = triton_interpreting  # the one reading of TRITON_INTERPRET (ops/limits.py)


def fixed_config() -> bool:
    return interpreting() or os.environ.get("OMOE_TRITON_FIXED_CONFIG", "0") not in ("", "0")


# Tests set this to fill every buffer a kernel writes with NaN before the launch, so that
# an element a kernel forgets to write shows up.
POISON_OUTPUTS = False


def _empty(shape, device, dtype) -> torch.Tensor:
    if POISON_OUTPUTS:
        poison = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, poison, device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


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


def dot_kind(dtype: torch.dtype, device_type: str) -> int:
    if dtype == torch.float64:
        return K.DOT_FP64
    if dtype == torch.float16:
        return K.DOT_FP16
    if dtype == torch.bfloat16:
        return K.DOT_BF16
    if device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return K.DOT_FP32_TF32
    return K.DOT_FP32_IEEE


def _upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _pow2_bucket(n: int) -> int:
    """n rounded up to a power of 2: the autotune key of a dimension that follows T, so a
    new token count re-tunes only when it crosses a power of 2."""
    return next_pow2(max(1, n))


def _gram_programs(L: Layout) -> int:
    """Programs that build G = B_catᵀB_cat when appended to a GEMM launch (_gram_tile)."""
    tiles = L.ERP // C.GRAM_TILE
    return tiles * tiles


def _gram_args(B: Optional[torch.Tensor], G: Optional[torch.Tensor], L: Layout, dummy):
    """(B, G, num_gram, d_out, B's strides) for the gram programs of a launch (none
    when G is None)."""
    if G is None:
        return dummy, dummy, 0, 0, (0, 0, 0)
    return B, G, _gram_programs(L), B.shape[1], tuple(B.stride())


# ----------------------------------------------------------------------------------------
# Launch configurations.

_SMS = None


def _num_sms(device: torch.device) -> int:
    global _SMS
    if device.type != "cuda":
        return 4
    if _SMS is None:
        _SMS = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS


# The configs themselves are in triton/configs.py (kernel_report compiles the same ones).

_AUTOTUNED = {}


def _autotuned(name: str):
    """Autotuned wrappers of the GEMM kernels (GPU only), built on first use."""
    if name in _AUTOTUNED:
        return _AUTOTUNED[name]
    if name == "matmul":
        fn = triton.autotune(C.autotuned_configs("matmul"), key=C.MATMUL_AUTOTUNE_KEY)(K.matmul_kernel)
    else:
        fn = triton.autotune(C.autotuned_configs("shrink"), key=C.SHRINK_AUTOTUNE_KEY)(K.shrink_kernel)
    _AUTOTUNED[name] = fn
    return fn


def _use_autotune(kind: int, device: torch.device) -> bool:
    return device.type == "cuda" and not fixed_config() and kind in C.SIXTEEN_BIT_KINDS + (C.DOT_FP32_TF32,)


def _splits(M: int, N: int, Kdim: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(splits, k_per_split) of a long-K (token-summed) GEMM: K split over several programs
    into partials so that the few output tiles still fill the GPU."""
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    if interpreting():
        splits = min(3, triton.cdiv(Kdim, 32))
    else:
        splits = min(2 * _num_sms(device) // tiles, triton.cdiv(Kdim, 512))
    splits = max(1, splits)
    k_per_split = max(64, triton.cdiv(triton.cdiv(Kdim, splits), 64) * 64)
    return triton.cdiv(max(Kdim, 1), k_per_split), k_per_split


# ----------------------------------------------------------------------------------------
# Launchers.


def matmul(a: torch.Tensor, b: torch.Tensor, L: Layout, *, out_dtype: torch.dtype, kind: int,
           upcast: bool, scale: float = 1.0, add: Optional[torch.Tensor] = None,
           packed: Optional[str] = None, split_a: bool = False, split_b: bool = False,
           fp16_a: bool = False, long_k: bool = False, router: Optional[tuple] = None,
           gram: Optional[tuple] = None) -> torch.Tensor:
    """scale · a @ b (+ add) for a [M, K] of any strides, in one launch.

    b: a [K, N] tensor of any strides, or (packed) a weight read in place in the padded
    expert layout: packed="Bk" (B [E, d_out, r] as B_catᵀ, K = ERP), "Bn" (B as B_cat,
    N = ERP), "Ak" (A [E, r, d_in] as A_cat, K = ERP).
    long_k: K is the token dimension (weight gradients): returns the partials
    [splits, M, N] in the accumulator dtype, for finalize_grads.
    router = (a2 [M, ≥E], W [E, N], out or None): adds a2[:, :E] · W to the result, or
    writes it to `out` (the gradient of a separate router input).
    gram = (B, G): the launch also builds G = B_catᵀB_cat ([ERP, ERP] float64) into G.
    """
    M, Kdim = a.shape
    if packed == "Bk":
        N, Kdim = b.shape[1], L.ERP
        stride_bk, stride_bn, stride_be = b.stride(2), b.stride(1), b.stride(0)
    elif packed == "Bn":
        N = L.ERP
        stride_bk, stride_bn, stride_be = b.stride(1), b.stride(2), b.stride(0)
    elif packed == "Ak":
        N, Kdim = b.shape[2], L.ERP
        stride_bk, stride_bn, stride_be = b.stride(1), b.stride(2), b.stride(0)
    else:
        N = b.shape[1]
        stride_bk, stride_bn, stride_be = b.stride(0), b.stride(1), 0
    device = a.device
    default = C.INTERPRET_MATMUL if interpreting() else C.matmul_default_config(kind, N, fp16_a)
    acc_dtype = torch.float64 if kind == K.DOT_FP64 else torch.float32
    if long_k:
        splits, k_per_split = _splits(M, N, Kdim, default, device)
        out = _empty((splits, M, N), device, acc_dtype)
    else:
        splits, k_per_split = 1, max(Kdim, 1)
        out = _empty((1, M, N), device, out_dtype)
    add_t = add if add is not None else out
    a2, b2, c2 = router if router is not None else (out, out, None)
    c2_t = c2 if c2 is not None else out
    gram_b, gram_g, num_gram, d_out, gram_strides = _gram_args(*(gram or (None, None)), L, out)
    assert num_gram == 0 or splits == 1
    args = (a, b, out, add_t, a2, b2, c2_t, gram_g, M, N, Kdim, k_per_split, L.num_experts,
            L.rank, d_out, num_gram, _pow2_bucket(M), _pow2_bucket(N), _pow2_bucket(Kdim),
            a.stride(0), a.stride(1), stride_bk, stride_bn, stride_be,
            out.stride(0), out.stride(1), out.stride(2), add_t.stride(-2), add_t.stride(-1),
            a2.stride(-2), a2.stride(-1), b2.stride(-2), b2.stride(-1), c2_t.stride(-2),
            c2_t.stride(-1), *gram_strides, float(scale))
    assert not fp16_a or kind == K.DOT_BF16, "fp16_a takes an fp32 a and a bf16 b"
    flags = dict(HAS_ADD=add is not None, SPLIT_A=split_a, SPLIT_B=split_b, FP16_A=fp16_a,
                 DOT_KIND=kind, UPCAST=upcast, PACKED_BK=packed in ("Bk", "Ak"),
                 PACKED_BN=packed == "Bn", ROUTER=0 if router is None else (1 if c2 is None else 2),
                 BLOCK_E=L.EPL, RP=L.RP, ERP=L.ERP, WITH_GRAM=num_gram > 0, GB=C.GRAM_TILE)
    assert gram is None or gram[0] is b, "the gram programs read B as the b operand"
    if _use_autotune(kind, device):
        fn = _autotuned("matmul")
        grid = lambda meta: (num_gram + triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),
                             splits)
        fn[grid](*args, **flags)
    else:
        grid = (num_gram + triton.cdiv(M, default["BLOCK_M"]) * triton.cdiv(N, default["BLOCK_N"]), splits)
        K.matmul_kernel[grid](*args, **flags, **default)
    return out if long_k else out[0]


def gram_only(B: torch.Tensor, L: Layout) -> torch.Tensor:
    """G = B_catᵀB_cat ([ERP, ERP] float64) in a launch of its own (the fused-token shrink
    needs G complete before its epilogue): matmul_kernel with no GEMM tiles."""
    G = _empty((L.ERP, L.ERP), B.device, torch.float64)
    empty = B.new_empty((0, B.shape[1]))
    matmul(empty, B, L, out_dtype=torch.float32, kind=K.DOT_FP32_IEEE, upcast=False,
           packed="Bn", gram=(B, G))
    return G


def fuse_token_in_shrink() -> bool:
    """OMOE_TRITON_FUSE_TOKEN=1: run the per-token algebra in the shrink's epilogue
    (bench/NOTES.md, Triton section, says why the separate kernel is the default)."""
    return os.environ.get("OMOE_TRITON_FUSE_TOKEN", "0") not in ("", "0")


def shrink(x: torch.Tensor, router_input: Optional[torch.Tensor], A: torch.Tensor,
           W: torch.Tensor, L: Layout, kind: int, upcast: bool,
           gram: Optional[tuple] = None, token: Optional[dict] = None):
    """H [T, ERP] and logits [T, E] (accumulator dtype), and Z when `token` is given.

    gram = (B, G): the same launch builds G = B_catᵀB_cat into G.
    token = dict(G=…, top_k=…, orthogonalize=…, normalize=…, eps=…): fuse the per-token
    kernel into the epilogue (fixed config, one n-tile; G complete beforehand).
    Returns (h, logits, z or None).
    """
    T, D = x.shape
    acc = accumulate_dtype(x.dtype)
    h = _empty((T, L.ERP), x.device, acc)
    logits = _empty((T, L.num_experts), x.device, acc)
    r = router_input if router_input is not None else x
    if interpreting():
        cfg = C.interpret_shrink_config(L.ERP, fuse_token=token is not None)
    else:
        cfg = C.shrink_default_config(kind, L.ERP, fuse_token=token is not None)
    z = None
    token_args, token_flags = (h, h, 0, 0.0, 0), {}
    if token is not None:
        z = _empty((T, L.ERP), x.device, acc)
        G = token["G"]
        token_args = (G if G is not None else h, z, token["top_k"], float(token["eps"]), z.stride(0))
        token_flags = C.token_flags(L, token["top_k"], token["orthogonalize"], token["normalize"])
        token_flags.pop("num_warps")
        # The epilogue must stay inside the program's own rows (another program's H rows
        # may not be written yet).
        token_flags["BT"] = min(token_flags["BT"], cfg["BLOCK_M"])
        token_flags["FUSE_TOKEN"] = True
    gram_b, gram_g, num_gram, d_out, gram_strides = _gram_args(*(gram or (None, None)), L, h)
    args = (x, r, A, W, h, logits, gram_b, gram_g, T, D, L.ERP, L.num_experts, L.rank, d_out,
            num_gram, _pow2_bucket(T),
            x.stride(0), x.stride(1), r.stride(0), r.stride(1),
            A.stride(0), A.stride(1), A.stride(2), W.stride(0), W.stride(1),
            h.stride(0), logits.stride(0), *gram_strides) + token_args
    flags = dict(SEPARATE_ROUTER=router_input is not None, DOT_KIND=kind, UPCAST=upcast,
                 BLOCK_E=L.EPL, GB=C.GRAM_TILE, RP=L.RP, ERP=L.ERP)
    flags.update(token_flags)
    if token is None and _use_autotune(kind, x.device):
        fn = _autotuned("shrink")
        grid = lambda meta: (num_gram + triton.cdiv(T, meta["BLOCK_M"]) * triton.cdiv(L.ERP, cfg["BLOCK_N"]),)
        fn[grid](*args, **flags, BLOCK_N=cfg["BLOCK_N"])
    else:
        n_tiles = triton.cdiv(L.ERP, cfg["BLOCK_N"])
        assert token is None or (n_tiles == 1 and num_gram == 0)
        grid = (num_gram + triton.cdiv(T, cfg["BLOCK_M"]) * n_tiles,)
        K.shrink_kernel[grid](*args, **flags, **cfg)
    return h, logits, z


def weight_grad(x: torch.Tensor, router_input: Optional[torch.Tensor], dhl: torch.Tensor,
                L: Layout, kind: int, upcast: bool, split: bool) -> torch.Tensor:
    """Split-K partials [splits, d_in, NW] of [dA_cat; dW]ᵀ = [Xᵀ dH | Rᵀ dL] (one launch)."""
    T, D = x.shape
    r = router_input if router_input is not None else x
    cfg = C.INTERPRET_MATMUL if interpreting() else C.weight_grad_config(kind, L.ERP)
    splits, k_per_split = _splits(D, L.ERP, T, cfg, x.device)
    acc = torch.float64 if kind == K.DOT_FP64 else torch.float32
    out = _empty((splits, D, L.NW), x.device, acc)
    dl = dhl[:, L.ERP:]
    grid = (triton.cdiv(D, cfg["BLOCK_M"]) * triton.cdiv(L.ERP, cfg["BLOCK_N"]), splits)
    K.weight_grad_kernel[grid](x, r, dhl, dl, out, T, D, L.ERP, L.num_experts, k_per_split,
                               _pow2_bucket(T), x.stride(0), x.stride(1), r.stride(0), r.stride(1),
                               dhl.stride(0), dl.stride(0), out.stride(0), out.stride(1),
                               SEPARATE_ROUTER=router_input is not None, SPLIT_B=split,
                               DOT_KIND=kind, UPCAST=upcast, BLOCK_E=L.EPL,
                               **{k: v for k, v in cfg.items() if k != "GROUP_M"})
    return out


def finalize_grads(pb: torch.Tensor, pa: torch.Tensor, pg: Optional[torch.Tensor],
                   A: torch.Tensor, B: torch.Tensor, L: Layout, dtype: torch.dtype):
    """(grad_A, grad_B, grad_W) in their final layout and dtype from the partials of the
    dB GEMM (pb), the [dA; dW] GEMM (pa) and gram_grad (pg, or None), in one launch."""
    E, r, d_in = A.shape
    d_out = B.shape[1]
    device = A.device
    grad_A = _empty((E, r, d_in), device, dtype)
    grad_B = _empty((E, d_out, r), device, dtype)
    grad_W = _empty((E, d_in), device, dtype)
    cfg = C.FINALIZE
    b_programs = triton.cdiv(d_out, cfg["BLOCK_R"]) * triton.cdiv(L.ERP, cfg["BLOCK_C"])
    a_programs = triton.cdiv(d_in, cfg["BLOCK_R"]) * triton.cdiv(L.NW, cfg["BLOCK_C"])
    K.finalize_grads_kernel[(b_programs + a_programs,)](
        pb, pa, pg if pg is not None else pb, B, grad_B, grad_A, grad_W,
        pb.shape[0], pa.shape[0], pg.shape[0] if pg is not None else 0, d_out, d_in, E, r,
        b_programs, *B.stride(), *grad_B.stride(), *grad_A.stride(), *grad_W.stride(),
        ORTHOGONALIZE=pg is not None, RP=L.RP, ERP=L.ERP, NW=L.NW, **cfg)
    return grad_A, grad_B, grad_W


def token_forward(h, logits, G, L: Layout, top_k, orthogonalize, normalize, eps):
    T = h.shape[0]
    z = _empty(h.shape, h.device, h.dtype)
    flags = C.token_flags(L, top_k, orthogonalize, normalize)
    grid = (triton.cdiv(T, flags["BT"]),)
    K.token_forward_kernel[grid](h, logits, G if G is not None else h, z, T, L.num_experts, top_k, float(eps),
                                 h.stride(0), logits.stride(0), z.stride(0),
                                 num_stages=C.TOKEN_STAGES, **flags)
    return z


@dataclass(frozen=True)
class SlotGrads:
    """What the per-token reverse hands to gram_grad: (dS + dSᵀ)/2 of each token over its
    active slots (`values`, [T, KP·KP] float64, zeros in padding slots) and, under top-k,
    the expert of each slot (`experts`, [T, KP] int32, -1 in padding slots; None when
    dense, where slot s is expert s)."""

    values: torch.Tensor
    experts: Optional[torch.Tensor]
    slots: int   # KP


def token_backward(h, logits, G, dz, L: Layout, top_k, orthogonalize, normalize, eps):
    """Z, dHL = [dH | dlogits | 0] ([T, NW]) and the SlotGrads of dS (or None):
    gram_grad turns them into (dG + dGᵀ)/2, and dG only enters as dG + dGᵀ."""
    T = h.shape[0]
    z = _empty(h.shape, h.device, h.dtype)
    dhl = _empty((T, L.NW), h.device, h.dtype)
    flags = C.token_flags(L, top_k, orthogonalize, normalize, backward=True)
    KP = flags["KP"]
    ds = None
    if orthogonalize:
        experts = _empty((T, KP), h.device, torch.int32) if flags["TOP_K_ROUTING"] else None
        ds = SlotGrads(_empty((T, KP * KP), h.device, torch.float64), experts, KP)
    grid = (triton.cdiv(T, flags["BT"]),)
    K.token_backward_kernel[grid](h, logits, G if G is not None else h, dz, z, dhl,
                                  ds.values if ds is not None else h,
                                  ds.experts if ds is not None and ds.experts is not None else h,
                                  T, L.num_experts, top_k, float(eps),
                                  h.stride(0), logits.stride(0), dz.stride(0), z.stride(0),
                                  dhl.stride(0), EPL=L.EPL, num_stages=C.TOKEN_STAGES, **flags)
    return z, dhl, ds


def gram_grad(h, ds: SlotGrads, L: Layout) -> torch.Tensor:
    """Partial sums of dG over token splits, [splits, ERP, ERP] float64: every element is
    written by the one launch (the caller sums over splits). Under top-k, a token block
    in which an expert pair is not active costs that pair's program nothing."""
    T = h.shape[0]
    E = L.num_experts
    top_k_routing = ds.experts is not None
    block_t = C.gram_grad_block(L, top_k_routing)
    if interpreting():
        wanted = min(2, triton.cdiv(T, block_t))
    else:
        wanted = min(triton.cdiv(T, 256), 2 * _num_sms(h.device) // (E * E) + 1)
    per_split = max(1, triton.cdiv(triton.cdiv(T, max(1, wanted)), block_t)) * block_t
    splits = max(1, triton.cdiv(T, per_split))
    partial = _empty((splits, L.ERP, L.ERP), h.device, torch.float64)
    K.gram_grad_kernel[(L.EP, L.EP, splits)](
        h, ds.values, ds.experts if top_k_routing else ds.values, partial, T, E, per_split,
        h.stride(0), TOP_K_ROUTING=top_k_routing, KP=ds.slots, RP=L.RP, ERP=L.ERP,
        BLOCK_T=block_t, num_warps=C.GRAM_GRAD_WARPS, num_stages=C.TOKEN_STAGES)
    return partial


# ----------------------------------------------------------------------------------------
# Forward and backward of the op.


def forward_impl(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                 orthogonalize, normalize, eps):
    """(y, h, logits): the op `omoe_triton::forward`. Three launches: shrink (+ G),
    per-token, expand; the weights are read in place (no padded or float64 copies)."""
    check_forward_args(FAMILY, x, A, B, router_weight, router_input, base_out, scaling, top_k, eps)
    E, r, _ = A.shape
    L = layout(E, r)
    if x.shape[0] == 0:   # no tokens: nothing to launch
        acc = accumulate_dtype(x.dtype)
        return (x.new_empty((0, B.shape[1])), _empty((0, L.ERP), x.device, acc),
                _empty((0, E), x.device, acc))
    kind = dot_kind(x.dtype, x.device.type)
    upcast = _upcast(x.dtype)
    G = _empty((L.ERP, L.ERP), x.device, torch.float64) if orthogonalize else None
    if fuse_token_in_shrink() and L.ERP <= 256:
        if G is not None:
            G = gram_only(B, L)
        token = dict(G=G, top_k=top_k, orthogonalize=orthogonalize, normalize=normalize, eps=eps)
        h, logits, z = shrink(x, router_input, A, router_weight, L, kind, upcast, token=token)
    else:
        gram = (B, G) if G is not None else None
        h, logits, _ = shrink(x, router_input, A, router_weight, L, kind, upcast, gram=gram)
        z = token_forward(h, logits, G, L, top_k, orthogonalize, normalize, eps)
    y = matmul(z, B, L, out_dtype=x.dtype, kind=kind, upcast=upcast, scale=scaling,
               add=base_out, packed="Bk", **C.a_operand_flags(kind, C.EXPAND_Z))
    return y, h, logits


def backward_impl(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                  orthogonalize, normalize, eps):
    """(grad x, grad A, grad B, grad router_weight, grad router_input or an empty tensor):
    the op `omoe_triton::backward`. Seven launches: dZ (+ G), per-token reverse,
    gram_grad, dB, [dA; dW], finalize, dX (docs/algorithm.md, Backward)."""
    check_backward_args(FAMILY, grad_y, x, A, B, router_weight, router_input, h, logits,
                        scaling, top_k, eps)
    if x.shape[0] == 0:   # no tokens: zero weight gradients, nothing to launch
        grad_R = router_input.new_empty(router_input.shape) if router_input is not None \
            else x.new_empty((0,))
        return (x.new_empty(x.shape), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(router_weight), grad_R)
    h, logits = h.contiguous(), logits.contiguous()   # the per-token kernels read unit columns
    L = layout(A.shape[0], A.shape[1])
    dtype = x.dtype
    kind = dot_kind(dtype, x.device.type)
    upcast = _upcast(dtype)
    acc = accumulate_dtype(dtype)
    G = _empty((L.ERP, L.ERP), x.device, torch.float64) if orthogonalize else None
    # dZ = s dY B_cat (grad_y is read in its own dtype: the kernels convert per tile)
    dz = matmul(grad_y, B, L, out_dtype=acc, kind=kind, upcast=upcast, scale=scaling,
                packed="Bn", gram=(B, G) if G is not None else None)
    z, dhl, ds = token_backward(h, logits, G, dz, L, top_k, orthogonalize, normalize, eps)
    dG_partials = gram_grad(h, ds, L) if orthogonalize else None   # [splits, ERP, ERP]
    # dB_cat = s dYᵀ Z (+ B_cat (dG + dGᵀ), added by finalize_grads)
    dB_partials = matmul(grad_y.t(), z, L, out_dtype=acc, kind=kind, upcast=upcast,
                         scale=scaling, split_b=C.b_operand_split(kind, C.SPLIT_DB), long_k=True)
    dAW_partials = weight_grad(x, router_input, dhl, L, kind, upcast,
                               split=C.b_operand_split(kind, C.SPLIT_DAW))
    grad_A, grad_B, grad_W = finalize_grads(dB_partials, dAW_partials, dG_partials, A, B, L, dtype)
    # dX = dH A_cat + dL W (+ a separate router input's own gradient dL W)
    grad_R = _empty(router_input.shape, x.device, dtype) if router_input is not None else None
    grad_x = matmul(dhl[:, :L.ERP], A, L, out_dtype=dtype, kind=kind, upcast=upcast,
                    packed="Ak", **C.a_operand_flags(kind, C.DX_DH),
                    router=(dhl[:, L.ERP:], router_weight, grad_R))
    return grad_x, grad_A, grad_B, grad_W, grad_R if grad_R is not None else x.new_empty((0,))


# ----------------------------------------------------------------------------------------
# The ops.

FAMILY = OpFamily(namespace="omoe_triton", backends="'triton'",
                  hidden_width=lambda E, r: layout(E, r).ERP,
                  max_active_experts=lambda device_type: MAX_ACTIVE_EXPERTS["triton"],
                  kernels="Triton")

if AVAILABLE:
    for _name, _schema, _impl in (("forward", FORWARD_SCHEMA, forward_impl),
                                  ("backward", BACKWARD_SCHEMA, backward_impl)):
        torch.library.define(f"omoe_triton::{_name}", _schema)
        torch.library.impl(f"omoe_triton::{_name}", ("cpu", "cuda"), _impl)
    register_family(FAMILY)


def omoe_lora_triton(x2d, A, B, router_weight, router_input2d, base2d, problem: Problem):
    """The backend function of docs/contract.md §3 (see functional.omoe_lora)."""
    if not AVAILABLE:
        raise RuntimeError(f"the triton backend is unavailable: {IMPORT_ERROR}")
    return call_forward(FAMILY, x2d, A, B, router_weight, router_input2d, base2d, problem)
