"""Router statistics of `OMoELinear` forward passes, for the load-balancing loss.

What a layer records, and when (docs/integration.md, "Router statistics"):

- Each forward of a layer with `track_router_stats` on records its router logits. The
  records accumulate, so a layer applied several times in one step (shared or looped
  blocks) counts every application, until a new step starts a fresh record: the first
  forward after the statistics were read (`layer.router_stats`, `ok.router_stats`,
  `ok.load_balancing_loss`), or after a backward pass reached the layer's router weight.
  Reading twice in one step gives the same statistics.
- A forward without gradients (`torch.no_grad`, an eval batch) never joins or replaces
  the records of a forward with gradients of the same step: the loss keeps its gradient.
  A forward with gradients drops unread records of forwards without.
- A forward that gradient checkpointing reruns during backward is not recorded again.
- Statistics of forwards without gradients, read where gradients are on with a trainable
  router, give a loss whose gradient reaches the router during backward, when reentrant
  checkpointing (`use_reentrant=True`, whose first forward runs without gradients) reruns
  the layer; a backward in which no rerun comes raises an error that names the fix.

`layer._router_logits` holds the records (a `_Records`, or None); `OMoELinear.__getstate__`
sets it to None, so copies start without them.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass

import torch

from .reference import route

# Records kept without a read or a backward in between; more means statistics are never
# read, and the oldest go (with a warning) so that memory stays bounded.
MAX_RECORDS = 64
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class RouterStats:
    """Router statistics of the recorded forward passes of one `OMoELinear`, all [E]
    tensors over every recorded token.

    - `load`: fraction of the tokens whose active set holds expert i (top-k: sums to k;
      dense: all ones). A count, so it carries no gradient.
    - `mean_prob`: mean over tokens of softmax(logits) over all E experts; differentiable.
      This is the router probability of the Switch/Mixtral load-balancing loss.
    - `mean_gate`: mean over tokens of the gate g_i the layer applied (0 outside the
      active set, softmax over the active set inside); differentiable.

    The tensors have the logits' dtype (float32 for float16/bfloat16 logits).
    """

    load: torch.Tensor
    mean_prob: torch.Tensor
    mean_gate: torch.Tensor
    top_k: int
    num_tokens: int

    @classmethod
    def from_logits(cls, logits: torch.Tensor, top_k: int) -> "RouterStats":
        logits = _stats_dtype(logits)
        num_tokens, num_experts = logits.shape
        if num_tokens == 0:
            zeros = logits.new_zeros(num_experts)
            return cls(zeros, zeros, zeros, top_k, 0)
        gates, active = route(logits, top_k)
        return cls(load=active.to(logits.dtype).mean(0).detach(),
                   mean_prob=torch.softmax(logits, dim=-1).mean(0),
                   mean_gate=gates.mean(0), top_k=top_k, num_tokens=num_tokens)

    def balance_loss(self) -> torch.Tensor:
        """Switch-style auxiliary loss E · Σ_i (load_i / k) · mean_prob_i; 1 when balanced."""
        num_experts = self.load.numel()
        return num_experts * torch.sum(self.load / self.top_k * self.mean_prob)


def _stats_dtype(logits: torch.Tensor) -> torch.Tensor:
    # Half-precision softmax means lose the small probabilities; float64 stays float64.
    return logits.float() if logits.dtype in _HALF_DTYPES else logits


def _router_grad(layer):
    weight = layer.router_weight
    # Only a leaf has a .grad (torch.func.functional_call may put a non-leaf here).
    return weight.grad if weight.is_leaf else None


def _grad_marker(layer):
    """What changes when a backward pass reaches `layer.router_weight`: its grad tensor
    (a new one, or a new in-place version)."""
    grad = _router_grad(layer)
    return None if grad is None else (weakref.ref(grad), grad._version)


def _grad_changed(layer, marker) -> bool:
    grad = _router_grad(layer)
    if grad is None or marker is None:
        return (grad is None) != (marker is None)
    return marker[0]() is not grad or marker[1] != grad._version


class _Records:
    """The router logits one layer recorded since its statistics last started afresh."""

    def __init__(self):
        self.logits: list[torch.Tensor] = []
        self.differentiable = False
        self.read = False
        self.marker = None
        self.warned = False
        self.top_k = 0
        self.num_tokens = 0
        self._clear_deferred()

    def _clear_deferred(self) -> None:
        self.grad_prob = self.grad_gate = None
        self.reruns_left = 0
        self.rerun_started = False
        self.late = False

    def defer(self, grad_prob: torch.Tensor, grad_gate: torch.Tensor) -> None:
        """Called in backward with the gradient of (mean_prob, mean_gate); the layer's rerun
        during the same backward applies it (`apply_deferred`)."""
        if self.rerun_started:  # a rerun already passed: its gradient would be partial
            self.late = True
        if self.grad_prob is None:
            self.grad_prob, self.grad_gate = torch.zeros_like(grad_prob), torch.zeros_like(grad_gate)
            self.reruns_left = len(self.logits)
            torch.autograd.Variable._execution_engine.queue_callback(self.check_deferred)
        self.grad_prob = self.grad_prob + grad_prob
        self.grad_gate = self.grad_gate + grad_gate

    def apply_deferred(self, logits: torch.Tensor) -> None:
        """In a rerun during backward: back-propagates the deferred gradient through the
        rerun's logits, into the router weight and the layer's input (whose gradient a
        reentrant checkpoint hands on to the layers before it)."""
        if self.grad_prob is None or self.reruns_left <= 0 or not logits.requires_grad:
            return
        self.rerun_started = True
        self.reruns_left -= 1
        logits = _stats_dtype(logits)
        gates, _ = route(logits, self.top_k)
        # d(mean over all recorded tokens)/d(this rerun's logits) = this rerun's sum / N.
        surrogate = ((torch.softmax(logits, dim=-1).sum(0) * self.grad_prob).sum()
                     + (gates.sum(0) * self.grad_gate).sum()) / self.num_tokens
        torch.autograd.backward(surrogate, retain_graph=True)

    def check_deferred(self) -> None:
        """At the end of the backward: every recorded forward got its deferred gradient."""
        missing, late = self.reruns_left, self.late
        self._clear_deferred()
        if missing or late:
            raise RuntimeError(
                "the router statistics in the load-balancing loss were recorded by forward "
                "passes without gradients (torch.no_grad, inference mode, an eval batch, or "
                "the first pass of reentrant gradient checkpointing), and "
                f"{'their gradient came after the rerun' if late else f'{missing} of them were not rerun'}"
                " in this backward, so the router would get no balancing gradient. Run the "
                "training forward with gradients and read the loss before any eval forward; "
                "with gradient checkpointing use use_reentrant=False "
                "(model.activation_checkpointing_enable(activation_checkpointing_kwargs="
                "{'use_reentrant': False}), gradient_checkpointing_enable(gradient_"
                "checkpointing_kwargs=...) in older transformers, or torch.utils.checkpoint."
                "checkpoint(..., use_reentrant=False)), and back-propagate the task loss and "
                "the balancing loss in one backward call")


class _RerunGradient(torch.autograd.Function):
    """Identity on (mean_prob, mean_gate) of statistics recorded without gradients; its
    backward hands their gradient to the records, for the layer's rerun to apply."""

    @staticmethod
    def forward(ctx, anchor, records, mean_prob, mean_gate):
        ctx.records = records
        return mean_prob.clone(), mean_gate.clone()

    @staticmethod
    def backward(ctx, grad_prob, grad_gate):
        ctx.records.defer(grad_prob, grad_gate)
        return None, None, None, None


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def record_router_logits(layer, router_input: torch.Tensor, router_weight: torch.Tensor) -> None:
    """Called by `OMoELinear.forward` when `layer.track_router_stats` is on: one
    [T, d_in] x [d_in, E] matmul on the undropped input, kept (with its graph) so that
    `recorded_router_stats` can give a differentiable load-balancing term. The module
    docstring says which forwards are kept."""
    logits = router_input.reshape(-1, layer.in_features) @ router_weight.t()
    records = layer._router_logits
    compiling = torch.compiler.is_compiling()
    if not compiling and _in_backward():  # a checkpoint's rerun
        if isinstance(records, _Records):
            records.apply_deferred(logits)
        return
    differentiable = logits.requires_grad
    if isinstance(records, _Records) and records.logits and not records.read:
        stepped = not compiling and records.differentiable and _grad_changed(layer, records.marker)
        if records.differentiable and not differentiable and not stepped:
            return  # keep the training forward's differentiable statistics
        fresh = stepped or (differentiable and not records.differentiable)
    else:
        fresh = True
    if fresh:
        records = layer._router_logits = _Records()
    records.differentiable = differentiable
    records.logits.append(logits)
    if differentiable and not compiling:
        records.marker = _grad_marker(layer)
    if len(records.logits) > MAX_RECORDS:
        del records.logits[0]
        if not records.warned:
            records.warned = True
            warnings.warn(
                f"router statistics: {MAX_RECORDS} forward passes were recorded without a "
                "read or a backward pass in between; the oldest are dropped. Read them every "
                "step (ok.load_balancing_loss / ok.router_stats) or turn tracking off "
                "(ok.track_router_stats(model, False))", stacklevel=3)


def recorded_router_stats(layer) -> RouterStats:
    """The `RouterStats` of the forwards recorded for `layer` (see the module docstring).
    Reading ends the step: the next forward starts a fresh record."""
    if not layer.track_router_stats:
        raise RuntimeError(
            "router statistics are off for this layer: set `layer.track_router_stats = True` "
            "(or call `omoe_kernels.track_router_stats(model)`) before the forward pass")
    records = layer._router_logits
    if not isinstance(records, _Records) or not records.logits:
        raise RuntimeError("no router statistics yet: run a forward pass with this layer's "
                           "adapter enabled first")
    records.read = True
    logits = records.logits
    top_k = layer.num_experts if layer.top_k is None else layer.top_k
    stats = RouterStats.from_logits(logits[0] if len(logits) == 1 else torch.cat(logits), top_k)
    anchor = layer.router_weight
    if (not records.differentiable and stats.num_tokens and torch.is_grad_enabled()
            and anchor.requires_grad):
        records.top_k, records.num_tokens = top_k, stats.num_tokens
        mean_prob, mean_gate = _RerunGradient.apply(anchor, records, stats.mean_prob,
                                                    stats.mean_gate)
        stats = dataclasses.replace(stats, mean_prob=mean_prob, mean_gate=mean_gate)
    return stats


def clear_router_stats(layer) -> None:
    """Drops what `layer` recorded."""
    layer._router_logits = None
