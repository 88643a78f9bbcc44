"""The `triton` backend: launchers and the `torch.ops.omoe_triton` custom ops.

Forward (docs/algorithm.md): shrink (`H`, logits in one pass over x) → per-token kernel
(routing, Gram, MGS in float64 → `Z = a ⊙ h`) → expand (`Y = base + s Z B_catᵀ`, base
added in the GEMM epilogue). Backward: `dZ = s dY B_cat` → per-token reverse (Z, dH,
dlogits, dS) → `dG` (float64) → the weight and input GEMMs. Saved: `H` and the logits
(the backward recomputes `G = B_catᵀB_cat`: weight-sized, a small float64 GEMM).

The ops `torch.ops.omoe_triton.forward/backward` have the schema of the compiled ops;
registration.py gives them the same checks, fake kernels and autograd, so
`torch.compile` traces through them as opaque nodes.

Runs on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (a correctness tool:
bf16 operands are upcast to fp32 there because the interpreter cannot do bf16 math).
Fixed launch configs under the interpreter or with `OMOE_TRITON_FIXED_CONFIG=1`;
otherwise the GEMM kernels are autotuned over a few configs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .._validate import Problem
from ..backends import triton_interpreting
from . import triton_configs as C
from .registration import (
    BACKWARD_SCHEMA,
    FORWARD_SCHEMA,
    OpFamily,
    accumulate_dtype,
    call_forward,
    check_backward_args,
    check_forward_args,
    register_family,
)

try:
    import triton

    from . import triton_kernels as K

    AVAILABLE = True
    IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing or broken: the backend is just unavailable
    AVAILABLE = False
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


interpreting = triton_interpreting  # the one reading of TRITON_INTERPRET (backends.py)


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


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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
    EP = _next_pow2(num_experts)
    RP = max(_next_pow2(rank), 16 // EP if EP < 16 else 1)
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


def _pad_A(A: torch.Tensor, L: Layout) -> torch.Tensor:
    E, r, d_in = A.shape
    if (E, r) == (L.EP, L.RP):   # already the padded layout (every §6 shape): no copy
        return A.reshape(L.ERP, d_in)
    out = A.new_zeros((L.EP, L.RP, d_in))
    out[:E, :r] = A
    return out.view(L.ERP, d_in)


def _pad_B(B: torch.Tensor, L: Layout) -> torch.Tensor:
    E, d_out, r = B.shape
    if (E, r) == (L.EP, L.RP):   # one transposing copy, no zero fill
        return B.permute(1, 0, 2).reshape(d_out, L.ERP)
    out = B.new_zeros((d_out, L.EP, L.RP))
    out[:, :E, :r] = B.permute(1, 0, 2)
    return out.view(d_out, L.ERP)


def _pad_W(W: torch.Tensor, L: Layout) -> torch.Tensor:
    out = W.new_zeros((L.EPL, W.shape[1]))
    out[: W.shape[0]] = W
    return out


def _gram(B_pad: torch.Tensor) -> torch.Tensor:
    """G = B_catᵀ B_cat in float64 (ERP × ERP; tiny, so a torch GEMM)."""
    b = B_pad.double()
    return (b.t() @ b).contiguous()


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


# The configs themselves are in triton_configs.py (kernel_report compiles the same ones).

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


# ----------------------------------------------------------------------------------------
# Launchers.


def matmul(a: torch.Tensor, b: torch.Tensor, *, out_dtype: torch.dtype, kind: int, upcast: bool,
           scale: float = 1.0, add: Optional[torch.Tensor] = None, split_a: bool = False,
           split_b: bool = False, long_k: bool = False) -> torch.Tensor:
    """scale · a @ b (+ add) for a [M, K] and b [K, N] of any strides.

    long_k: K is the token dimension (weight gradients): split K over several programs
    into fp32 partials so that the few output tiles still fill the GPU.
    """
    M, Kdim = a.shape
    N = b.shape[1]
    device = a.device
    interp = interpreting()
    default = C.INTERPRET_MATMUL if interp else C.matmul_default_config(kind, N)
    splits = 1
    if long_k:
        tiles = triton.cdiv(M, default["BLOCK_M"]) * triton.cdiv(N, default["BLOCK_N"])
        if interp:
            splits = min(3, triton.cdiv(Kdim, 32))
        else:
            splits = max(1, min(2 * _num_sms(device) // tiles, triton.cdiv(Kdim, 512)))
    k_per_split = triton.cdiv(triton.cdiv(Kdim, splits), 64) * 64
    splits = triton.cdiv(Kdim, k_per_split)
    acc_dtype = torch.float64 if kind == K.DOT_FP64 else torch.float32
    if splits > 1:
        out = _empty((splits, M, N), device, acc_dtype)
        result_add, add = add, None
    else:
        out = _empty((1, M, N), device, out_dtype)
    add_t = add if add is not None else out
    args = (a, b, out, add_t, M, N, Kdim, k_per_split,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1), out.stride(2), add_t.stride(-2), add_t.stride(-1),
            float(scale))
    flags = dict(HAS_ADD=add is not None, SPLIT_A=split_a, SPLIT_B=split_b, DOT_KIND=kind,
                 UPCAST=upcast)
    if _use_autotune(kind, device):
        fn = _autotuned("matmul")
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)
        fn[grid](*args, **flags)
    else:
        grid = (triton.cdiv(M, default["BLOCK_M"]) * triton.cdiv(N, default["BLOCK_N"]), splits)
        K.matmul_kernel[grid](*args, **flags, **default)
    if splits == 1:
        return out[0]
    total = out.sum(0)
    if result_add is not None:
        total = total + result_add.to(acc_dtype)
    return total.to(out_dtype)


def fuse_token_in_shrink() -> bool:
    """OMOE_TRITON_FUSE_TOKEN=1: run the per-token algebra in the shrink's epilogue
    (bench/NOTES.md, Triton section, says why the separate kernel is the default)."""
    return os.environ.get("OMOE_TRITON_FUSE_TOKEN", "0") not in ("", "0")


def shrink(x: torch.Tensor, router_input: Optional[torch.Tensor], A_pad: torch.Tensor,
           W: torch.Tensor, L: Layout, kind: int, upcast: bool, token: Optional[dict] = None):
    """H [T, ERP] and logits [T, E] (accumulator dtype), and Z when `token` is given.

    token = dict(G=…, top_k=…, orthogonalize=…, normalize=…, eps=…): fuse the per-token
    kernel into the epilogue (fixed config, one n-tile). Returns (h, logits, z or None).
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
    args = (x, r, A_pad, W, h, logits, T, D, L.ERP, L.num_experts,
            x.stride(0), x.stride(1), r.stride(0), r.stride(1),
            A_pad.stride(0), A_pad.stride(1), W.stride(0), W.stride(1),
            h.stride(0), logits.stride(0)) + token_args
    flags = dict(SEPARATE_ROUTER=router_input is not None, DOT_KIND=kind, UPCAST=upcast,
                 BLOCK_E=L.EPL, **token_flags)
    if token is None and _use_autotune(kind, x.device):
        fn = _autotuned("shrink")
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), triton.cdiv(L.ERP, cfg["BLOCK_N"]))
        fn[grid](*args, **flags, BLOCK_N=cfg["BLOCK_N"])
    else:
        grid = (triton.cdiv(T, cfg["BLOCK_M"]), triton.cdiv(L.ERP, cfg["BLOCK_N"]))
        assert token is None or grid[1] == 1
        K.shrink_kernel[grid](*args, **flags, **cfg)
    return h, logits, z


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
    """(y, h, logits): the op `omoe_triton::forward`."""
    check_forward_args(FAMILY, x, A, B, router_weight, router_input, base_out, scaling, top_k, eps)
    E, r, _ = A.shape
    L = layout(E, r)
    kind = dot_kind(x.dtype, x.device.type)
    upcast = _upcast(x.dtype)
    A_pad = _pad_A(A, L)
    B_pad = _pad_B(B, L)
    G = _gram(B_pad) if orthogonalize else None
    if fuse_token_in_shrink() and L.ERP <= 256:
        token = dict(G=G, top_k=top_k, orthogonalize=orthogonalize, normalize=normalize, eps=eps)
        h, logits, z = shrink(x, router_input, A_pad, router_weight, L, kind, upcast, token)
    else:
        h, logits, _ = shrink(x, router_input, A_pad, router_weight, L, kind, upcast)
        z = token_forward(h, logits, G, L, top_k, orthogonalize, normalize, eps)
    sixteen = kind in (K.DOT_BF16, K.DOT_FP16)
    y = matmul(z, B_pad.t(), out_dtype=x.dtype, kind=kind, upcast=upcast, scale=scaling,
               add=base_out, split_a=sixteen)
    return y, h, logits


def _fresh(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy (custom-op outputs must not alias each other)."""
    return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def backward_impl(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                  orthogonalize, normalize, eps):
    """(grad x, grad A, grad B, grad router_weight, grad router_input or an empty tensor):
    the op `omoe_triton::backward`."""
    check_backward_args(FAMILY, grad_y, x, A, B, router_weight, router_input, h, logits,
                        scaling, top_k, eps)
    h, logits = h.contiguous(), logits.contiguous()   # the per-token kernels read unit columns
    E, r, d_in = A.shape
    d_out = B.shape[1]
    L = layout(E, r)
    dtype = x.dtype
    kind = dot_kind(dtype, x.device.type)
    upcast = _upcast(dtype)
    sixteen = kind in (K.DOT_BF16, K.DOT_FP16)
    acc = accumulate_dtype(dtype)
    grad_y = grad_y.to(dtype)
    A_pad = _pad_A(A, L)
    B_pad = _pad_B(B, L)
    W_pad = _pad_W(router_weight, L)
    G = _gram(B_pad) if orthogonalize else None
    dz = matmul(grad_y, B_pad, out_dtype=acc, kind=kind, upcast=upcast, scale=scaling)
    z, dhl, ds = token_backward(h, logits, G, dz, L, top_k, orthogonalize, normalize, eps)
    # dB_cat = s dYᵀ Z + B_cat (dG + dGᵀ)
    dB_pad = matmul(grad_y.t(), z, out_dtype=acc, kind=kind, upcast=upcast, scale=scaling,
                    split_b=sixteen, long_k=True)
    if orthogonalize:
        dG = gram_grad(h, ds, L).sum(0)
        dB_pad = (dB_pad.double() + B_pad.double() @ (dG + dG.t())).to(acc)
    grad_B = _fresh(dB_pad.view(d_out, L.EP, L.RP)[:, :E, :r].permute(1, 0, 2), dtype)
    ERP, NW = L.ERP, L.NW
    if router_input is None:
        # One GEMM each for [dA; dW] = dHLᵀ X and dX = dHL [A; W].
        stacked = torch.cat([A_pad, W_pad], dim=0)
        dAW = matmul(dhl.t(), x, out_dtype=acc, kind=kind, upcast=upcast, split_a=sixteen, long_k=True)
        grad_x = matmul(dhl, stacked, out_dtype=dtype, kind=kind, upcast=upcast, split_a=sixteen)
        dA_pad, grad_W = dAW[:ERP], dAW[ERP:ERP + E]
        grad_R = x.new_empty((0,))
    else:
        dh, dl = dhl[:, :ERP], dhl[:, ERP:NW]
        dA_pad = matmul(dh.t(), x, out_dtype=acc, kind=kind, upcast=upcast, split_a=sixteen, long_k=True)
        grad_x = matmul(dh, A_pad, out_dtype=dtype, kind=kind, upcast=upcast, split_a=sixteen)
        grad_W = matmul(dl.t(), router_input, out_dtype=acc, kind=kind, upcast=upcast,
                        split_a=sixteen, long_k=True)[:E]
        grad_R = matmul(dl, W_pad, out_dtype=dtype, kind=kind, upcast=upcast, split_a=sixteen)
    grad_A = _fresh(dA_pad.view(L.EP, L.RP, d_in)[:E, :r], dtype)
    return grad_x, grad_A, grad_B, _fresh(grad_W, dtype), grad_R


# ----------------------------------------------------------------------------------------
# The ops.

FAMILY = OpFamily(namespace="omoe_triton", backends="'triton'",
                  hidden_width=lambda E, r: layout(E, r).ERP)

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
