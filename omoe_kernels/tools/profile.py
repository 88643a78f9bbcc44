"""Profile one OMoELinear layer, stage by stage: `python -m omoe_kernels.tools.profile`.

Two executions of the same layer run under `torch.profiler`, each with named ranges
(`torch.profiler.record_function`); the time per range is printed, and with `--trace PATH`
both land in one Chrome trace.

1. `fused` — the layer as users run it (the backend `--backend` resolves to):
   - `omoe.fused.forward.base`      the frozen nn.Linear
   - `omoe.fused.forward.adapter`   one `omoe_lora` call. For the compiled backends this is
     the op `omoe::forward`, whose C++ orchestration marks its stages with RECORD_FUNCTION
     ranges: `omoe::shrink` (x → h and logits), `omoe::gram` (G = B_catᵀB_cat, float64,
     or the cached one), then the route's per-token pass (routing, S, MGS, coefficients)
     with its GEMMs: `omoe::pairs`, `omoe::direct` or `omoe::batched` (docs/algorithm.md,
     "Routes"; `omoe::orthogonalize` without orthogonalization), and `omoe::expand`.
   - `omoe.fused.backward`          the whole backward (`omoe::backward` and the base's grad);
     inside `omoe::backward`: `omoe::expand_backward_input` (dZ), `omoe::gram_recompute`
     (G), the route's reverse pass with its GEMMs (`omoe::pairs_backward`,
     `omoe::pairs_gemm_backward`, `omoe::direct_backward` or `omoe::batched_backward`;
     `omoe::orthogonalize_backward` without orthogonalization), `omoe::expand_backward_weight`
     (dB), `omoe::gram_backward` (B_cat (dG + dGᵀ)), `omoe::shrink_backward` (dA, dW, dx).
2. `staged` — the same low-rank algorithm (docs/algorithm.md), written step by step in
   PyTorch ops, each stage a separate autograd node whose backward runs in its own range:
   - `shrink`                  h = x · A_catᵀ                            (GEMM, T × E·r)
   - `route`                   logits = x · Wᵀ, softmax / top-k gates     (GEMM, T × E)
   - `orthogonalize.gram`      G = B_catᵀ B_cat and S_ij = h_iᵀ G_ij h_j  (float64)
   - `orthogonalize.mgs`       Gram–Schmidt in coefficient space → coefficients a (float64)
   - `expand`                  y = base + s · (a ⊙ h) · B_catᵀ            (GEMM, T × d_out)
   Each appears as `omoe.staged.forward.<stage>` and `omoe.staged.backward.<stage>`.
   The staged path is checked against the reference backend before profiling. Its
   per-token stages are vectorized PyTorch (not the fused kernels), so its split says
   where the work is, not how fast a fused backend does each part.
"""
from __future__ import annotations

import argparse
import math
import os
from collections import defaultdict

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from ..backends import resolve_backend
from ..functional import omoe_lora
from ..layer import OMoELinear
from ..reference import route
from ..testing.oracle import gram_matrix, mgs_coefficients, mixture_coefficients
from .cli import ArgumentParser, positive_int

STAGES = ("shrink", "route", "orthogonalize.gram", "orthogonalize.mgs", "expand")
# RECORD_FUNCTION ranges inside the compiled ops (csrc/omoe_ops.cpp), in execution order.
# The route ranges (docs/algorithm.md, "Routes") hold that route's per-token pass and GEMMs;
# one route runs per pass.
COMPILED_FORWARD_STAGES = ("omoe::shrink", "omoe::gram", "omoe::pairs", "omoe::direct",
                           "omoe::batched", "omoe::orthogonalize", "omoe::expand")
COMPILED_BACKWARD_STAGES = ("omoe::expand_backward_input", "omoe::gram_recompute",
                            "omoe::pairs_backward", "omoe::pairs_gemm_backward",
                            "omoe::direct_backward", "omoe::batched_backward",
                            "omoe::orthogonalize_backward", "omoe::expand_backward_weight",
                            "omoe::gram_backward", "omoe::shrink_backward")


class _Stage(torch.autograd.Function):
    """Runs `fn(*inputs)` as one autograd node whose backward is a named profiler range."""

    @staticmethod
    def forward(ctx, name, fn, *inputs):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor)
                      else t for t in inputs]
            outputs = fn(*leaves)
        ctx.name, ctx.leaves, ctx.outputs = name, leaves, outputs
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        with record_function(f"omoe.staged.backward.{ctx.name}"):
            pairs = [(o, g) for o, g in zip(ctx.outputs, grads) if o.requires_grad and g is not None]
            wanted = [t for t in ctx.leaves if isinstance(t, torch.Tensor) and t.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                        allow_unused=True) if pairs and wanted else [None] * len(wanted)
            found = iter(found)
            input_grads = [next(found) if isinstance(t, torch.Tensor) and t.requires_grad else None
                           for t in ctx.leaves]
        ctx.leaves = ctx.outputs = None
        return (None, None, *input_grads)


def _stage(name: str, fn, *inputs):
    with record_function(f"omoe.staged.forward.{name}"):
        return _Stage.apply(name, fn, *inputs)


def staged_forward(layer: OMoELinear, x: torch.Tensor) -> torch.Tensor:
    """OMoELinear's forward (dropout off) as the five stages of docs/algorithm.md."""
    E, r = layer.num_experts, layer.rank
    top_k = E if layer.top_k is None else layer.top_k
    x2d = x.reshape(-1, layer.in_features)
    T = x2d.shape[0]
    with record_function("omoe.staged.forward.base"):
        base_out = layer.base(x2d)

    (h,) = _stage("shrink", lambda x_, A: (x_ @ A.reshape(E * r, -1).t(),), x2d, layer.lora_A)

    def route_stage(x_, W):
        logits = (x_ @ W.t()).to(torch.float64)
        gates, active = route(logits, top_k)
        return gates, active

    gates, active = _stage("route", route_stage, x2d, layer.router_weight)

    def gram_stage(h_, B):
        return (gram_matrix(h_, B),)                                 # S_ij = h_iᵀ G_ij h_j

    def mgs_stage(S, gates_, active_):
        if layer.orthogonalize:
            C = mgs_coefficients(S, active_, layer.normalize, layer.eps)
        else:
            C = torch.diag_embed(active_.to(S.dtype))
        return (mixture_coefficients(gates_, C),)                    # a = Σ_i g_i C_i

    if layer.orthogonalize:
        (S,) = _stage("orthogonalize.gram", gram_stage, h, layer.lora_B)
    else:  # the plain mixture needs no Gram matrix
        S = torch.zeros(T, E, E, dtype=torch.float64, device=x.device)
    (a,) = _stage("orthogonalize.mgs", mgs_stage, S, gates, active)

    def expand_stage(h_, a_, B, base):
        z = (a_.to(h_.dtype)[:, :, None] * h_.reshape(T, E, r)).reshape(T, E * r)
        B_cat = B.permute(1, 0, 2).reshape(B.shape[1], E * r)
        return (base + layer.scaling * (z @ B_cat.t()),)

    (y,) = _stage("expand", expand_stage, h, a, layer.lora_B, base_out)
    return y.reshape(*x.shape[:-1], layer.out_features)


def fused_forward(layer: OMoELinear, x: torch.Tensor) -> torch.Tensor:
    """OMoELinear's forward (dropout off), with the base and the adapter call as ranges."""
    with record_function("omoe.fused.forward.base"):
        base_out = layer.base(x)
    with record_function("omoe.fused.forward.adapter"):
        return omoe_lora(x, layer.lora_A, layer.lora_B, layer.router_weight,
                         scaling=layer.scaling, top_k=layer.top_k,
                         orthogonalize=layer.orthogonalize, normalize=layer.normalize,
                         eps=layer.eps, base_out=base_out, backend=layer.backend)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double())).item()


def check_staged(layer: OMoELinear, x: torch.Tensor) -> tuple[float, float]:
    """Relative error of the staged path against the reference backend (forward, grad x)."""
    x1 = x.detach().requires_grad_(True)
    x2 = x.detach().requires_grad_(True)
    grad = torch.randn(x.shape[:-1] + (layer.out_features,), dtype=x.dtype, device=x.device)
    y_staged = staged_forward(layer, x1)
    y_staged.backward(grad)
    y_ref = omoe_lora(x2, layer.lora_A, layer.lora_B, layer.router_weight, scaling=layer.scaling,
                      top_k=layer.top_k, orthogonalize=layer.orthogonalize,
                      normalize=layer.normalize, eps=layer.eps, base_out=layer.base(x2),
                      backend="reference")
    y_ref.backward(grad)
    return _rel_err(y_staged, y_ref), _rel_err(x1.grad, x2.grad)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # as bench's


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m omoe_kernels.tools.profile",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 1)[1],
        epilog="Example: python -m omoe_kernels.tools.profile --tokens 8192 --d-in 4096 --d-out 4096 "
               "--experts 8 --rank 16 --top-k 2 --dtype bf16 --trace trace.json")
    parser.add_argument("--tokens", type=positive_int, default=4096, help="T, tokens per call")
    parser.add_argument("--d-in", type=positive_int, default=1024, help="input features of the base linear")
    parser.add_argument("--d-out", type=positive_int, default=1024, help="output features of the base linear")
    parser.add_argument("--experts", type=positive_int, default=4, help="E, number of experts")
    parser.add_argument("--rank", type=positive_int, default=16, help="r, rank of each expert")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="experts per token; None: dense routing (all E)")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                        help="dtype of the base layer, the adapter and the input (bench's names)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"), help="where to run (cuda when available)")
    parser.add_argument("--backend", default="auto", help="omoe_lora backend of the fused path")
    parser.add_argument("--iters", type=positive_int, default=5, help="profiled iterations (mean reported)")
    parser.add_argument("--trace", default=None, metavar="PATH",
                        help="also write a Chrome trace (chrome://tracing, ui.perfetto.dev) to PATH")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is more than --experts {args.experts}")
    if args.trace and not os.path.isdir(os.path.dirname(os.path.abspath(args.trace))):
        parser.error(f"--trace {args.trace}: its folder does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    try:
        resolve_backend(args.backend, torch.device(args.device))
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--backend {args.backend}: {str(exc).splitlines()[0]}")
    return args


def main(argv=None) -> dict:
    """Returns the time per range (ms per iteration) and the staged path's error."""
    args = parse_args(argv)
    if args.device == "cpu":
        # Kineto logs an ERROR line when it finds no GPU; a CPU profile needs none.
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    base = nn.Linear(args.d_in, args.d_out, device=device, dtype=dtype)
    layer = OMoELinear(base, args.experts, args.rank, top_k=args.top_k, backend=args.backend,
                       adapter_dtype="base")  # profile the kernels in --dtype
    with torch.no_grad():  # trained-looking B, so the orthogonalization does real work
        layer.lora_B.normal_(0, 1 / math.sqrt(args.rank))
    x = torch.randn(args.tokens, args.d_in, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.tokens, args.d_out, device=device, dtype=dtype)
    backend = resolve_backend(args.backend, device)
    err_y, err_dx = check_staged(layer, x)
    print(f"shape: T={args.tokens} d_in={args.d_in} d_out={args.d_out} E={args.experts} "
          f"r={args.rank} routing={'dense' if args.top_k is None else f'top-{args.top_k}'} "
          f"{args.dtype} on {device}; fused backend: {backend}")
    print(f"staged path vs reference backend: forward rel err {err_y:.1e}, grad x rel err {err_dx:.1e}")

    def step(forward, tag):
        with record_function(f"omoe.{tag}.step"):
            y = forward(layer, x)
            if tag == "fused":
                with record_function("omoe.fused.backward"):
                    y.backward(grad_y)
            else:
                y.backward(grad_y)

    for forward, tag in ((fused_forward, "fused"), (staged_forward, "staged")):
        step(forward, tag)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.iters):
            for forward, tag in ((fused_forward, "fused"), (staged_forward, "staged")):
                step(forward, tag)
                if device.type == "cuda":
                    torch.cuda.synchronize()
    if args.trace:
        prof.export_chrome_trace(args.trace)

    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("omoe.") or event.key.startswith("omoe::"):
            time_us = event.device_time_total if device.type == "cuda" and event.device_time_total else event.cpu_time_total
            totals[event.key] += time_us / args.iters / 1e3
    rows = [("fused", "forward", "base", "omoe.fused.forward.base"),
            ("fused", "forward", "adapter (shrink+route+orthogonalize+expand in one op)",
             "omoe.fused.forward.adapter"),
            ("fused", "backward", "all (omoe::backward + base)", "omoe.fused.backward"),
            ("fused", "", "step total", "omoe.fused.step"),
            ("staged", "forward", "base", "omoe.staged.forward.base")]
    rows += [("staged", "forward", s, f"omoe.staged.forward.{s}") for s in STAGES]
    rows += [("staged", "backward", s, f"omoe.staged.backward.{s}") for s in reversed(STAGES)]
    rows += [("staged", "", "step total", "omoe.staged.step")]
    unit = "device" if device.type == "cuda" else "CPU"
    print(f"\n{'path':<7} {'pass':<9} {'stage':<56} {'ms/iter':>9}   ({unit} time, mean of {args.iters})")
    for path, direction, stage, key in rows:
        if key in totals:
            print(f"{path:<7} {direction:<9} {stage:<56} {totals[key]:9.2f}")
    for op in ("omoe::forward", "omoe::backward"):
        if op in totals:
            print(f"{'fused':<7} {'op':<9} {op + ' (inside the ranges above)':<56} {totals[op]:9.2f}")
    for direction, stages in (("forward", COMPILED_FORWARD_STAGES), ("backward", COMPILED_BACKWARD_STAGES)):
        for stage in stages:
            if stage in totals:
                print(f"{'fused':<7} {direction:<9} {stage + ' (inside the op)':<56} {totals[stage]:9.2f}")
    if args.trace:
        print(f"\nChrome trace: {args.trace} (open in chrome://tracing or https://ui.perfetto.dev)")
    return {"ms_per_iter": dict(totals), "staged_rel_err": {"forward": err_y, "grad_x": err_dx}}


if __name__ == "__main__":
    main()
