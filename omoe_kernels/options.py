"""`OMoEOptions`: the options of an OMoE layer, defined once, with their rules.

`OMoELinear`'s keyword arguments, `OMoEConfig`'s option fields, `OMoELinear.config()`'s
keys and the functional API's checks (`_validate.check_options`) all come from here. Each
validator names the field and says what it accepts (docs/contract.md §4).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field

import torch

from .backends import capacity_error, check_backend_name

# Adapter parameter dtypes by name; an alias maps to its canonical (first) name.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16"}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_count(name: str, value) -> int:
    """An int >= 1 (`num_experts`, `rank`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value}")
    return value


def check_finite(name: str, value) -> float:
    """A finite number (`scaling`, `alpha`): NaN or inf would make every output non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a finite number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}")
    return float(value)


def check_top_k(top_k, num_experts: int) -> int:
    """None (dense routing) or an int in [1, num_experts]; returns k = min(top_k, E)."""
    if top_k is None:
        return num_experts
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"`top_k` must be None or an int in [1, {num_experts}], "
                        f"got {type(top_k).__name__} {top_k!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be None or an int in [1, {num_experts}] (the number of "
                         f"experts), got {top_k}")
    return top_k


def check_eps(eps) -> float:
    """A finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"`eps` must be a finite number > 0, got {type(eps).__name__} {eps!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"`eps` must be a finite number > 0, got {eps}")
    return float(eps)


def check_dropout(dropout) -> float:
    """A probability in [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"`dropout` must be a number in [0, 1), got {type(dropout).__name__} "
                        f"{dropout!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout}")
    return float(dropout)


def check_flag(name: str, value) -> bool:
    """A bool (`orthogonalize`, `normalize`)."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_adapter_dtype(adapter_dtype) -> str | None:
    """None, "base", or a dtype of DTYPES (a torch.dtype, its name or an alias); returns
    the canonical name, which is what JSON stores."""
    if adapter_dtype is None or adapter_dtype == "base":
        return adapter_dtype
    if isinstance(adapter_dtype, torch.dtype):
        adapter_dtype = str(adapter_dtype).removeprefix("torch.")
    if isinstance(adapter_dtype, str):
        adapter_dtype = DTYPE_ALIASES.get(adapter_dtype, adapter_dtype)
        if adapter_dtype in DTYPES:
            return adapter_dtype
    raise ValueError(f"`adapter_dtype` must be None, 'base', or one of {list(DTYPES)} (a "
                     f"torch.dtype, its name, or {list(DTYPE_ALIASES)}), got {adapter_dtype!r}")


def check_backend(backend, active_experts: int) -> str:
    """"auto" or a registered backend that takes k = `active_experts` active experts (the
    registry's checks); an explicit backend that cannot fails when the layer is built."""
    error = None if check_backend_name(backend) == "auto" else capacity_error(backend, active_experts)
    if error is not None:
        raise ValueError(error)
    return backend


def check_adapter_name(adapter_name) -> str:
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ValueError("`adapter_name` must be a non-empty identifier (letters, digits, _), "
                         f"got {adapter_name!r}")
    return adapter_name


def defines_function(default=dataclasses.MISSING):
    """A field that changes the layer's function: `OMoELinear.config()` holds it, and an
    adapter file records it per layer."""
    return field(default=default, metadata={"defines_function": True})


@dataclass(frozen=True)
class OMoEOptions:
    """The options of an OMoE layer, validated at construction (docs/contract.md §1, §3).

    - `num_experts`, `rank`: E and r, ints >= 1.
    - `alpha`: None (alpha = rank) or a finite number; the adapter is scaled by alpha / rank.
    - `top_k`: None (dense routing) or an int in [1, num_experts].
    - `dropout`: on the adapter's input only (the router reads the undropped input).
    - `orthogonalize`, `normalize`, `eps`: the Gram–Schmidt step (§1 step 4).
    - `adapter_dtype`: None = float32 adapters on a float16/bfloat16 base, the base's
      dtype otherwise; "base" = the base's dtype; or a dtype, stored by its canonical name
      ("bfloat16"; "bf16" and torch.bfloat16 are accepted).
    - `backend`: "auto" or a name of the backend registry (backends.py).
    """

    num_experts: int = defines_function()
    rank: int = defines_function()
    alpha: float | None = defines_function(None)
    top_k: int | None = defines_function(None)
    dropout: float = 0.0
    orthogonalize: bool = defines_function(True)
    normalize: bool = defines_function(True)
    eps: float = defines_function(1e-6)
    adapter_dtype: str | torch.dtype | None = None  # stored as a name of DTYPES
    backend: str = "auto"

    def __post_init__(self) -> None:
        def store(name: str, value) -> None:  # the checked, canonical value (frozen class)
            object.__setattr__(self, name, value)

        store("num_experts", check_count("num_experts", self.num_experts))
        store("rank", check_count("rank", self.rank))
        store("alpha", None if self.alpha is None else check_finite("alpha", self.alpha))
        active_experts = check_top_k(self.top_k, self.num_experts)
        store("dropout", check_dropout(self.dropout))
        store("orthogonalize", check_flag("orthogonalize", self.orthogonalize))
        store("normalize", check_flag("normalize", self.normalize))
        store("eps", check_eps(self.eps))
        store("adapter_dtype", check_adapter_dtype(self.adapter_dtype))
        store("backend", check_backend(self.backend, active_experts))

    @property
    def effective_alpha(self) -> float:
        """alpha, or rank when alpha is None (LoRA's default)."""
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scaling(self) -> float:
        return self.effective_alpha / self.rank

    def parameter_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the adapter parameters on a base computing in `base_dtype`."""
        if self.adapter_dtype is None:  # fp32 adapters on a half base, as peft's
            return torch.float32 if base_dtype in HALF_DTYPES else base_dtype
        return base_dtype if self.adapter_dtype == "base" else DTYPES[self.adapter_dtype]

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in OPTION_NAMES}


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(OMoEOptions))
FUNCTION_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(OMoEOptions) if f.metadata.get("defines_function"))


def options_from_keywords(caller: str, num_experts, rank, keywords: dict) -> OMoEOptions:
    """`OMoEOptions(num_experts, rank, **keywords)`, with an unknown keyword named for `caller`."""
    unknown = sorted(set(keywords) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"{caller} got unknown options {unknown}; its options are "
                        f"{list(OPTION_NAMES)}")
    return OMoEOptions(num_experts, rank, **keywords)


# peft's LoraConfig names, accepted by `OMoEConfig` (docs/integration.md has the full map).
PEFT_ALIASES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}


def resolve_aliases(caller: str, keywords: dict) -> dict:
    """`keywords` with each alias of PEFT_ALIASES renamed to its field; TypeError when a
    call gives both an alias and its field."""
    out = dict(keywords)
    for alias, name in PEFT_ALIASES.items():
        if alias in out:
            if name in out:
                raise TypeError(f"{caller} got both `{name}` and its alias `{alias}`: give one")
            out[name] = out.pop(alias)
    return out


def option_parameters() -> list[inspect.Parameter]:
    """The options after num_experts and rank as keyword-only parameters, with their
    defaults (for the signature of a callable that takes them as **keywords)."""
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                              annotation=f.type)
            for f in dataclasses.fields(OMoEOptions) if f.default is not dataclasses.MISSING]
