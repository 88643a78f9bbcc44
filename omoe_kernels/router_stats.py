"""Router statistics of an `OMoELinear` forward pass, for the load-balancing loss."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import route


@dataclass
class RouterStats:
    """Router statistics of one `OMoELinear` forward pass, all [E] tensors.

    - `load`: fraction of the tokens whose active set holds expert i (top-k: sums to k;
      dense: all ones). A count, so it carries no gradient.
    - `mean_prob`: mean over tokens of softmax(logits) over all E experts; differentiable.
      This is the router probability of the Switch/Mixtral load-balancing loss.
    - `mean_gate`: mean over tokens of the gate g_i the layer applied (0 outside the
      active set, softmax over the active set inside); differentiable.
    """

    load: torch.Tensor
    mean_prob: torch.Tensor
    mean_gate: torch.Tensor
    top_k: int
    num_tokens: int

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top_k: int) -> "RouterStats":
        logits = logits.float()
        num_tokens, num_experts = logits.shape
        if num_tokens == 0:
            zeros = logits.new_zeros(num_experts)
            return cls(zeros, zeros, zeros, top_k, 0)
        gates, active = route(logits, top_k)
        return cls(load=active.float().mean(0).detach(),
                   mean_prob=torch.softmax(logits, dim=-1).mean(0),
                   mean_gate=gates.mean(0), top_k=top_k, num_tokens=num_tokens)

    def balance_loss(self) -> torch.Tensor:
        """Switch-style auxiliary loss E · Σ_i (load_i / k) · mean_prob_i; 1 when balanced."""
        num_experts = self.load.numel()
        return num_experts * torch.sum(self.load / self.top_k * self.mean_prob)


def record_router_logits(layer, router_input: torch.Tensor, router_weight: torch.Tensor) -> None:
    """Called by `OMoELinear.forward` when `layer.track_router_stats` is on: one
    [T, d_in] x [d_in, E] matmul on the undropped input, kept (with its graph) so that
    `recorded_router_stats` can give a differentiable load-balancing term."""
    layer._router_logits = router_input.reshape(-1, layer.in_features) @ router_weight.t()


def recorded_router_stats(layer) -> RouterStats:
    """The `RouterStats` of what `record_router_logits` kept for `layer`."""
    if not layer.track_router_stats:
        raise RuntimeError(
            "router statistics are off for this layer: set `layer.track_router_stats = True` "
            "(or call `omoe_kernels.track_router_stats(model)`) before the forward pass")
    if layer._router_logits is None:
        raise RuntimeError("no router statistics yet: run a forward pass first")
    top_k = layer.num_experts if layer.top_k is None else layer.top_k
    return RouterStats.from_logits(layer._router_logits, top_k)
