"""`OMoELinear`: a frozen `nn.Linear` plus an orthogonal mixture of LoRA experts.

Its options and their rules are `OMoEOptions`'s (options.py); the base layers it wraps and
how each runs, bases.py's. This module holds the layer and its state-dict keys.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from .bases import base_forward, check_base, dispatch
from .functional import omoe_lora
from .mixed import omoe_lora_mixed
from .options import FUNCTION_OPTIONS, check_adapter_name, option_parameters, options_from_keywords
from .router_stats import RouterStats, record_router_logits, recorded_router_stats

ADAPTER_TENSORS = ("lora_A", "lora_B", "router_weight")


def innermost_base(module: nn.Module) -> nn.Module:
    """The base layer under every OMoE adapter stacked on `module` (itself if none is)."""
    while isinstance(module, OMoELinear):
        module = module.base
    return module


def adapter_weights(layer: OMoELinear) -> tuple:
    """`layer`'s (lora_A, lora_B, router_weight), read from its `_parameters`: an attribute
    read falls back to nn.Module's __getattr__, which first builds and drops an
    AttributeError (microseconds of a one-token call). A parametrized weight, which a
    property serves, is read as an attribute."""
    params = layer._parameters
    try:
        return params["lora_A"], params["lora_B"], params["router_weight"]
    except KeyError:
        return layer.lora_A, layer.lora_B, layer.router_weight


def without_autocast(autocasting: bool, device_type: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), with autocast off if it is on: every backend gets one consistent
    dtype (the compiled ops have no autocast rule, the reference would otherwise mix
    dtypes)."""
    if not autocasting:
        return fn(*args, **kwargs)
    with torch.autocast(device_type, enabled=False):
        return fn(*args, **kwargs)


def base_factory(base: nn.Module) -> dict:
    """Device and dtype for adapter parameters on `base` (on its innermost base layer, for
    a layer that already holds another adapter); TypeError for a module OMoE cannot wrap."""
    base = innermost_base(base)
    check_base(base)
    return dispatch(base).factory(base)


def compute_dtype(parameter_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the adapter runs in: its parameters' dtype, or under autocast the autocast
    dtype when the parameters are fp32 (autocast's rule for nn.Linear's fp32 weights)."""
    if parameter_dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return parameter_dtype


class OMoELinear(nn.Module):
    """Drop-in replacement for an `nn.Linear` that adds OMoE-LoRA experts.

    y = base(x) + (alpha / rank) · Σ_i g_i q_i(dropout(x)), with the router reading the
    undropped x (docs/contract.md §1, §3). `base` is frozen; the trainable parameters are
    `lora_A` [E, r, d_in], `lora_B` [E, d_out, r] (zero at init, so the layer starts as
    `base`) and `router_weight` [E, d_in]. The keyword options, their defaults and rules
    are `OMoEOptions`'s; `base` is an `nn.Linear` or a linear-like module (bases.py).
    """

    def __init__(self, base: nn.Module, num_experts: int, rank: int, *,
                 adapter_name: str = "default", **options):
        super().__init__()
        opts = options_from_keywords("OMoELinear", num_experts, rank, options)
        factory = base_factory(base)  # checks `base`
        factory["dtype"] = opts.parameter_dtype(factory["dtype"])
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.rank, self.top_k = opts.num_experts, opts.rank, opts.top_k
        self.alpha, self.scaling = opts.effective_alpha, opts.scaling
        self.orthogonalize, self.normalize, self.eps = opts.orthogonalize, opts.normalize, opts.eps
        self.backend, self.dropout_p = opts.backend, opts.dropout
        self.dropout = nn.Dropout(opts.dropout) if opts.dropout > 0 else nn.Identity()
        # Router statistics (load balancing): off by default, they cost one extra
        # [T, d_in] x [d_in, E] matmul per forward and keep the [T, E] logits alive.
        self.track_router_stats = False
        self._router_logits: torch.Tensor | None = None
        # Named adapters (docs/integration.md): a second adapter on the same layer wraps
        # this one; `adapter_enabled` False makes the layer compute exactly `base(x)`.
        self.adapter_name, self.adapter_enabled = check_adapter_name(adapter_name), True
        E, r = num_experts, rank
        self.lora_A = nn.Parameter(torch.empty(E, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(E, self.out_features, r, **factory))
        self.router_weight = nn.Parameter(torch.empty(E, self.in_features, **factory))
        self.reset_parameters()
        # Last: a constructor that raises leaves `base` as it was. Under a stacked adapter
        # only the innermost base layer is frozen; the adapters' flags are set_adapter's.
        innermost_base(base).requires_grad_(False)
        register_base_keys(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA's init: A as nn.Linear's weight (per expert), B = 0; the router as nn.Linear."""
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A[expert], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))

    def config(self) -> dict:
        """The options that define this layer's function (stored with saved adapters)."""
        return {name: getattr(self, name) for name in FUNCTION_OPTIONS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample_adapters is not None:
            return mixed_forward(self, x)
        base_out = base_forward(self._modules["base"], x)
        if not self.adapter_enabled:
            return base_out
        A, B, router_weight = adapter_weights(self)
        param_dtype, device_type = A.dtype, x.device.type
        autocasting = torch.is_autocast_enabled(device_type)
        dtype = compute_dtype(param_dtype, device_type) if autocasting else param_dtype
        if dtype != param_dtype:  # differentiable casts: gradients reach the fp32 masters
            A, B, router_weight = A.to(dtype), B.to(dtype), router_weight.to(dtype)
        x_c = x if x.dtype == dtype else x.to(dtype)
        out_dtype = base_out.dtype
        dropping = self.dropout_p > 0 and self.training
        if self.track_router_stats:
            record_router_logits(self, x_c, router_weight)
        y = without_autocast(autocasting, device_type, omoe_lora,
                             self.dropout(x_c) if dropping else x_c, A, B, router_weight,
                             scaling=self.scaling, top_k=self.top_k,
                             orthogonalize=self.orthogonalize, normalize=self.normalize,
                             eps=self.eps,
                             base_out=base_out if out_dtype == dtype else base_out.to(dtype),
                             router_input=x_c if dropping else None, backend=self.backend)
        return y if dtype != param_dtype or y.dtype == out_dtype else y.to(out_dtype)

    def __getstate__(self):
        # The recorded logits belong to one forward pass (and carry its graph, which
        # deepcopy and pickle refuse): copies start without them.
        state = super().__getstate__()
        state["_router_logits"] = state["sample_adapters"] = None
        return state

    @property
    def router_stats(self) -> RouterStats:
        """Per-expert load and mean gate of the recorded forward passes (needs
        `track_router_stats`; router_stats.py)."""
        return recorded_router_stats(self)

    def extra_repr(self) -> str:
        routing = "dense" if self.top_k is None else f"top-{self.top_k}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, rank={self.rank}, alpha={self.alpha:g}, "
                f"routing={routing}, orthogonalize={self.orthogonalize}, "
                f"normalize={self.normalize}, backend={self.backend!r}, "
                f"trainable={sum(p.numel() for p in self.parameters() if p.requires_grad):,}")


# A batch of several adapters, set on a stack's outermost layer by adapters/mixed.py: (the
# stack's adapters in the batch, the `Grouping` of each sample's index into them), or None.
OMoELinear.sample_adapters = None


def mixed_forward(layer: OMoELinear, x: torch.Tensor) -> torch.Tensor:
    """The stack under `layer` with each sample of x ([batch, ..., d_in]) running its own
    adapter (`layer.sample_adapters`, set by adapters/mixed.py's `adapter_batch`)."""
    layers, grouping = layer.sample_adapters
    base_out = base_forward(innermost_base(layer), x)
    if not layers:
        return base_out
    samples = grouping.index.numel()
    if x.dim() < 2 or x.shape[0] != samples:
        raise ValueError(f"a batch of {samples} adapter names reached a layer "
                         f"whose input has shape {tuple(x.shape)}: give one adapter name per "
                         "sample (dim 0 of the input), with num_beams and "
                         "num_return_sequences 1 under generate")
    first = layers[0]
    A, B, W = (list(ts) for ts in zip(*map(adapter_weights, layers)))
    param_dtype = A[0].dtype
    autocasting = torch.is_autocast_enabled(x.device.type)
    dtype = compute_dtype(param_dtype, x.device.type) if autocasting else param_dtype
    if dtype != param_dtype:  # differentiable casts: gradients reach the fp32 masters
        A, B, W = ([t.to(dtype) for t in ts] for ts in (A, B, W))
    x_c = x if x.dtype == dtype else x.to(dtype)
    out_dtype = base_out.dtype
    y = without_autocast(autocasting, x.device.type, omoe_lora_mixed, x_c, A, B, W, grouping,
                         scaling=[m.scaling for m in layers], top_k=first.top_k,
                         orthogonalize=first.orthogonalize, normalize=first.normalize,
                         eps=first.eps,
                         base_out=base_out if out_dtype == dtype else base_out.to(dtype),
                         backend=first.backend)
    return y if dtype != param_dtype or y.dtype == out_dtype else y.to(out_dtype)


# `OMoELinear(base, num_experts, rank, *, alpha=None, ...)`: the options with their
# defaults, as `help()` and `inspect.signature` show them.
OMoELinear.__init__.__signature__ = inspect.Signature([
    *list(inspect.signature(OMoELinear.__init__).parameters.values())[:4],
    *option_parameters(),
    inspect.Parameter("adapter_name", inspect.Parameter.KEYWORD_ONLY, default="default",
                      annotation="str"),
])


def _state_dict_with_base_keys(module: "OMoELinear", state_dict, prefix: str, local_metadata) -> None:
    """`<prefix>base.<key>` -> `<prefix><key>`; own tensors -> `<prefix>omoe.<adapter>.<tensor>`."""
    own = {prefix + t: f"{prefix}omoe.{module.adapter_name}.{t}" for t in ADAPTER_TENSORS}
    base_prefix = prefix + "base."
    keys = [k for k in state_dict if k.startswith(prefix)]
    for key in keys:  # pop and re-insert all, so the keys keep their order
        value = state_dict.pop(key)
        if key in own:
            key = own[key]
        elif key.startswith(base_prefix):
            key = prefix + key[len(base_prefix):]
        state_dict[key] = value


def _load_state_dict_with_base_keys(module: "OMoELinear", state_dict, prefix: str, *args) -> None:
    """The inverse of `_state_dict_with_base_keys`; the old layout (`base.weight`,
    `lora_A`) loads as it is."""
    own_prefix = f"{prefix}omoe.{module.adapter_name}."
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if key.startswith(own_prefix) and key[len(own_prefix):] in ADAPTER_TENSORS:
            state_dict[prefix + key[len(own_prefix):]] = state_dict.pop(key)
        elif rest not in ADAPTER_TENSORS and not rest.startswith("base."):
            state_dict[prefix + "base." + rest] = state_dict.pop(key)


def register_base_keys(layer: OMoELinear) -> None:
    """The base layer's tensors keep their own state-dict keys (`q_proj.weight`, not
    `q_proj.base.weight`), so a base-model loader restores them from a checkpoint of the
    injected model; module-level hooks, so the model still pickles."""
    layer.register_state_dict_post_hook(_state_dict_with_base_keys)
    layer.register_load_state_dict_pre_hook(_load_state_dict_with_base_keys)
