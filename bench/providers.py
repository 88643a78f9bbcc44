"""What a benchmark compares: the inputs of one training step and the providers that
compute the layer from them (every backend, the eager reference, its torch.compile, and a
plain LoRA of rank E·r)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import omoe_kernels as ok
from omoe_kernels.testing.reference import reference_forward

from .shapes import Shape

SCALING = 2.0  # alpha / r with alpha = 2r, a common LoRA setting

BASELINES = ("reference", "ref-compile", "lora")
LABELS = {"reference": "reference (eager)", "ref-compile": "torch.compile(reference)",
          "lora": "plain LoRA, rank E·r"}


@dataclass
class Inputs:
    """One training step's tensors. Every tensor that has a gradient in a layer requires one."""

    x: torch.Tensor             # [T, d_in], requires grad (a mid-network layer)
    A: torch.Tensor             # [E, r, d_in]
    B: torch.Tensor             # [E, d_out, r]
    router_weight: torch.Tensor  # [E, d_in]
    base_out: torch.Tensor      # [T, d_out]
    grad_y: torch.Tensor        # [T, d_out], the incoming gradient
    A_cat: torch.Tensor         # [E·r, d_in], the plain LoRA's own leaves
    B_cat: torch.Tensor         # [d_out, E·r]

    def omoe_leaves(self) -> list[torch.Tensor]:
        return [self.x, self.A, self.B, self.router_weight, self.base_out]

    def lora_leaves(self) -> list[torch.Tensor]:
        return [self.x, self.A_cat, self.B_cat, self.base_out]


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs in the well-conditioned regime (docs/contract.md §2 "random", κ < 10)."""
    T, d, E, r = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    x = randn(T, d)
    A = randn(E, r, d, scale=d ** -0.5)
    B = randn(E, d, r, scale=r ** -0.5)
    router_weight = randn(E, d, scale=d ** -0.5)
    base_out = randn(T, d)
    grad_y = randn(T, d)
    A_cat = A.reshape(E * r, d).clone()
    B_cat = B.permute(1, 0, 2).reshape(d, E * r).contiguous()
    for t in (x, A, B, router_weight, base_out, A_cat, B_cat):
        t.requires_grad_(True)
    return Inputs(x, A, B, router_weight, base_out, grad_y, A_cat, B_cat)


@dataclass
class Provider:
    """A way to compute the layer. `build` returns the forward closure (called with no args)."""

    name: str
    label: str
    build: Callable[[Shape, Inputs], Callable[[], torch.Tensor]]
    leaves: Callable[[Inputs], list[torch.Tensor]]
    same_function: bool = True  # computes the operator (so it is checked against float64)


def _omoe_call(backend: str) -> Callable[[Shape, Inputs], Callable[[], torch.Tensor]]:
    def build(shape: Shape, inp: Inputs) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            return ok.omoe_lora(inp.x, inp.A, inp.B, inp.router_weight, scaling=SCALING,
                                top_k=shape.top_k, base_out=inp.base_out, backend=backend)
        return forward
    return build


def _compiled_reference(shape: Shape, inp: Inputs) -> Callable[[], torch.Tensor]:
    reference = reference_forward(inp.x, inp.A, inp.B, inp.router_weight, scaling=SCALING,
                                  top_k=shape.top_k, base_out=inp.base_out)
    torch._dynamo.reset()  # a fresh cache per shape: no recompile limits, no stale guards
    compiled = torch.compile(reference, dynamic=False)

    def forward() -> torch.Tensor:
        return compiled(inp.x, inp.A, inp.B, inp.router_weight, inp.base_out)
    return forward


def _plain_lora(shape: Shape, inp: Inputs) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        return inp.base_out + SCALING * (inp.x @ inp.A_cat.t()) @ inp.B_cat.t()
    return forward


def providers_for(device: torch.device, wanted: list[str] | None) -> list[Provider]:
    """Every backend of the device (the interpreted Triton on CPU only when asked for), then
    the baselines; `wanted` (provider names) filters and orders."""
    backends = [b for b in ok.available_backends(device) if b != "reference"]
    if device.type == "cpu" and "triton" in backends and not (wanted and "triton" in wanted):
        backends.remove("triton")  # TRITON_INTERPRET is a correctness tool, far too slow here
    every = [Provider(b, b, _omoe_call(b), Inputs.omoe_leaves) for b in backends]
    every += [
        Provider("reference", LABELS["reference"], _omoe_call("reference"), Inputs.omoe_leaves),
        Provider("ref-compile", LABELS["ref-compile"], _compiled_reference, Inputs.omoe_leaves),
        Provider("lora", LABELS["lora"], _plain_lora, Inputs.lora_leaves, same_function=False),
    ]
    if not wanted:
        return every
    by_name = {p.name: p for p in every}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"unknown or unavailable provider(s) {unknown} on {device.type}; "
                         f"available: {list(by_name)}")
    return [by_name[w] for w in wanted]
