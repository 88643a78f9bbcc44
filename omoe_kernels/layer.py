"""`OMoELinear`: a frozen `nn.Linear` plus an orthogonal mixture of LoRA experts."""
from __future__ import annotations

import math

import torch
from torch import nn

from ._validate import check_options
from .backends import REGISTRY, capacity_error
from .functional import omoe_lora
from .router_stats import RouterStats, record_router_logits, recorded_router_stats

ADAPTER_TENSORS = ("lora_A", "lora_B", "router_weight")
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16,
                "bf16": torch.bfloat16}


def base_factory(base: nn.Module) -> dict:
    """Device and dtype of a base layer's weight (or of its innermost base, for a layer that
    already holds another adapter); raises TypeError for a module OMoE cannot wrap."""
    while isinstance(base, OMoELinear):
        base = base.base
    if not isinstance(base, nn.Module):
        raise TypeError(f"`base` must be an nn.Module, got {type(base).__name__}")
    sizes = [getattr(base, n, None) for n in ("in_features", "out_features")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        raise TypeError(f"`base` must be an nn.Linear or a linear-like module with int "
                        f"`in_features`/`out_features`, got {type(base).__name__}")
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor):
        if weight.is_floating_point():
            return {"device": weight.device, "dtype": weight.dtype}
        if type(base).forward is nn.Linear.forward:  # F.linear cannot run an integer weight
            raise TypeError(f"`base` is a {type(base).__name__} with a {weight.dtype} weight, "
                            "which its forward cannot compute with; wrap a quantized module "
                            "(e.g. torch.ao.nn.quantized.dynamic.Linear) or a float layer")
        return {"device": weight.device, "dtype": torch.float32}
    tensors = [t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()]
    if tensors:
        return {"device": tensors[0].device, "dtype": tensors[0].dtype}
    return {"device": torch.device("cpu"), "dtype": torch.float32}  # e.g. packed int8 weights


def resolve_adapter_dtype(adapter_dtype, base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the adapter parameters (see `OMoELinear`)."""
    if adapter_dtype is None:
        return torch.float32 if base_dtype in _HALF_DTYPES else base_dtype
    if adapter_dtype == "base":
        return base_dtype
    if isinstance(adapter_dtype, str) and adapter_dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[adapter_dtype]
    if isinstance(adapter_dtype, torch.dtype) and adapter_dtype in _DTYPE_NAMES.values():
        return adapter_dtype
    raise ValueError("`adapter_dtype` must be None, 'base', or one of float32, float64, "
                     f"float16, bfloat16 (a torch.dtype or its name), got {adapter_dtype!r}")


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



def _is_ao_quantized_linear(module: nn.Module) -> bool:
    """A torch.ao (dynamic) quantized Linear: its op has no autograd formula."""
    return (type(module).__module__.startswith("torch.ao.nn.quantized")
            and callable(getattr(module, "weight", None)))


class _QuantizedBaseLinear(torch.autograd.Function):
    """`base(x)` for a torch.ao quantized Linear. Its op has no autograd kernel, so autograd
    would pass no gradient to `x` (silently); this gives x the gradient of the linear map
    the layer computes, with the dequantized weight. The base is frozen: no weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        return base(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight = ctx.base.weight().dequantize().to(grad.dtype)
        return grad @ weight, None


class OMoELinear(nn.Module):
    """Drop-in replacement for an `nn.Linear` that adds OMoE-LoRA experts.

    y = base(x) + (alpha / rank) · Σ_i g_i q_i(dropout(x)), with the router reading the
    undropped x (docs/contract.md §1, §3). `base` is frozen; the trainable parameters are
    `lora_A` [E, r, d_in], `lora_B` [E, d_out, r] (zero at init, so the layer starts as
    `base`) and `router_weight` [E, d_in].

    `base` is an `nn.Linear`, or any module that maps [..., in_features] to
    [..., out_features] and says so in int attributes `in_features`/`out_features` (a
    quantized linear such as `torch.ao.nn.quantized.dynamic.Linear`). `adapter_dtype`:
    None gives float32 adapters on a float16/bfloat16 base (as peft does) and the base's
    dtype otherwise; "base" keeps the base's dtype; a dtype (or its name) is used as is.
    """

    def __init__(self, base: nn.Module, num_experts: int, rank: int, *,
                 alpha: float | None = None, top_k: int | None = None, orthogonalize: bool = True, normalize: bool = True, eps: float = 1e-6,
                 dropout: float = 0.0, backend: str = "auto",
                 adapter_dtype: torch.dtype | str | None = None, adapter_name: str = "default"):
        super().__init__()
        factory = base_factory(base)  # checks `base`
        factory["dtype"] = resolve_adapter_dtype(adapter_dtype, factory["dtype"])
        if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
            raise ValueError("`adapter_name` must be a non-empty identifier (letters, digits, _), "
                             f"got {adapter_name!r}")
        for name, value in (("num_experts", num_experts), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        check_options(num_experts, top_k, eps)
        if alpha is None:
            alpha = rank
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"`alpha` must be a number or None, got {type(alpha).__name__}")
        if not math.isfinite(alpha):  # NaN or inf would make every output non-finite
            raise ValueError(f"`alpha` must be a finite number, got {alpha}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be a float in [0, 1), got {dropout!r}")
        for name, flag in (("orthogonalize", orthogonalize), ("normalize", normalize)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(flag).__name__}")
        if not isinstance(backend, str):
            raise TypeError(f"`backend` must be a str, got {type(backend).__name__}")
        if backend != "auto" and backend not in REGISTRY:
            raise ValueError(f"`backend` must be one of {('auto', *REGISTRY)}, got {backend!r}")
        if backend != "auto":  # an explicit backend that cannot take k fails here, not later
            too_many = capacity_error(backend, num_experts if top_k is None else top_k)
            if too_many is not None:
                raise ValueError(too_many)

        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.num_experts, self.rank = num_experts, rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.top_k = top_k
        self.orthogonalize, self.normalize, self.eps = orthogonalize, normalize, float(eps)
        self.backend = backend
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Router statistics (load balancing): off by default, they cost one extra
        # [T, d_in] x [d_in, E] matmul per forward and keep the [T, E] logits alive.
        self.track_router_stats = False
        self._router_logits: torch.Tensor | None = None
        # Named adapters (docs/integration.md): a second adapter on the same layer wraps
        # this one; `adapter_enabled` False makes the layer compute exactly `base(x)`.
        self.adapter_name = adapter_name
        self.adapter_enabled = True

        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
        self.router_weight = nn.Parameter(torch.empty(num_experts, self.in_features, **factory))
        self.reset_parameters()
        # Last: a constructor that raises leaves `base` as it was. Under a stacked adapter
        # only the innermost base layer is frozen; the adapters' flags are set_adapter's.
        innermost = base
        while isinstance(innermost, OMoELinear):
            innermost = innermost.base
        innermost.requires_grad_(False)
        # The base layer's tensors keep their own state-dict keys (`q_proj.weight`, not
        # `q_proj.base.weight`), so a base-model loader restores them from a checkpoint of
        # the injected model; module-level functions, so the model still pickles.
        self.register_state_dict_post_hook(_state_dict_with_base_keys)
        self.register_load_state_dict_pre_hook(_load_state_dict_with_base_keys)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA's init: A as nn.Linear's weight (per expert), B = 0; the router as nn.Linear."""
        for expert in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A[expert], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.router_weight, a=math.sqrt(5))

    def config(self) -> dict:
        """The options that define this layer's function (stored with saved adapters)."""
        return {"num_experts": self.num_experts, "rank": self.rank, "alpha": self.alpha,
                "top_k": self.top_k, "orthogonalize": self.orthogonalize,
                "normalize": self.normalize, "eps": self.eps}

    def _compute_dtype(self, device_type: str) -> torch.dtype:
        """The dtype the adapter runs in: the parameters' dtype, or under autocast the
        autocast dtype when the parameters are fp32 (the same rule autocast applies to
        nn.Linear, whose fp32 weights it casts for the matmul)."""
        dtype = self.lora_A.dtype
        if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_ao_quantized_linear(self.base):
            base_out = _QuantizedBaseLinear.apply(x, self.base)
        else:
            base_out = self.base(x)  # under autocast this runs in the autocast dtype, as usual
        if not self.adapter_enabled:
            return base_out
        device_type = x.device.type
        autocasting = torch.is_autocast_enabled(device_type)
        dtype = self._compute_dtype(device_type)
        # Casting the parameters is differentiable: gradients reach the fp32 masters.
        # (Skipped when nothing changes: a decoding step is a few hundred microseconds.)
        A, B, router_weight = self.lora_A, self.lora_B, self.router_weight
        if A.dtype != dtype:
            A, B, router_weight = (p.to(dtype) for p in (A, B, router_weight))
        x_c = x if x.dtype == dtype else x.to(dtype)
        out_dtype = base_out.dtype
        if out_dtype != dtype:
            base_out = base_out.to(dtype)
        dropping = self.dropout_p > 0 and self.training
        adapter_in = self.dropout(x_c) if dropping else x_c
        if self.track_router_stats:
            record_router_logits(self, x_c, router_weight)
        options = dict(scaling=self.scaling, top_k=self.top_k, orthogonalize=self.orthogonalize,
                       normalize=self.normalize, eps=self.eps, base_out=base_out,
                       router_input=x_c if dropping else None, backend=self.backend)
        if not autocasting:
            y = omoe_lora(adapter_in, A, B, router_weight, **options)
        else:
            # Autocast off inside: every backend gets one consistent dtype (the compiled ops
            # have no autocast rule, the reference would otherwise mix dtypes).
            with torch.autocast(device_type, enabled=False):
                y = omoe_lora(adapter_in, A, B, router_weight, **options)
        return y if dtype != self.lora_A.dtype or y.dtype == out_dtype else y.to(out_dtype)

    def __getstate__(self):
        # The recorded logits belong to one forward pass (and carry its graph, which
        # deepcopy and pickle refuse): copies start without them.
        state = super().__getstate__()
        state["_router_logits"] = None
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
