"""Swapping `OMoELinear` into existing models (docs/contract.md §3), peft-style.

    model = ok.inject(model, ["query", "value"], num_experts=4, rank=8)
    ok.save_adapter(model, "adapter.safetensors")
    ok.load_adapter(other_model_injected_the_same_way, "adapter.safetensors")
    ok.remove(model)                       # the original nn.Linear objects are back

`target_modules` follows peft: a list of module-name suffixes (a name matches when it
equals the suffix or ends with "." + suffix), or one string, a regex that must match the
whole module name.
"""
from __future__ import annotations

import json
import os
import re
import types
from typing import Iterable

import torch
from torch import nn

from .layer import OMoELinear, RouterStats

ADAPTER_FORMAT = "omoe_kernels.adapter"
ADAPTER_FORMAT_VERSION = 1
_STATE_ATTR = "_omoe_inject_state"  # on the root module: what `remove` needs to undo
_ADAPTER_TENSORS = ("lora_A", "lora_B", "router_weight")


def _matcher(target_modules):
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"`target_modules` is not a valid regex: {exc}") from None
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules:
        suffixes = list(target_modules)
        if not all(isinstance(s, str) and s for s in suffixes):
            raise TypeError(f"`target_modules` must hold non-empty strings, got {suffixes!r}")
        return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)
    raise TypeError("`target_modules` must be a non-empty list of module-name suffixes or one "
                    f"regex string, got {target_modules!r}")


def omoe_layers(model: nn.Module) -> dict[str, OMoELinear]:
    """The injected layers of `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, OMoELinear)}


def _inside_omoe(name: str, omoe_names: Iterable[str]) -> bool:
    return any(name == n or name.startswith(n + ".") for n in omoe_names)


def inject(model: nn.Module, target_modules, *, num_experts: int, rank: int, alpha=None,
           top_k=None, orthogonalize: bool = True, normalize: bool = True, eps: float = 1e-6,
           dropout: float = 0.0, backend: str = "auto") -> nn.Module:
    """Replaces the matching `nn.Linear` modules of `model` by `OMoELinear` wrappers.

    Every other parameter of the model is frozen (the wrappers' `lora_A`, `lora_B` and
    `router_weight` are the only trainable tensors). Modifies `model` in place and returns it.
    Raises ValueError when nothing matches or a match is not an `nn.Linear`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    matches = _matcher(target_modules)
    existing = omoe_layers(model)
    # remove_duplicate=False: a module registered under two names (tied) matches under both.
    names = [name for name, _ in model.named_modules(remove_duplicate=False)
             if name and matches(name) and not _inside_omoe(name, existing)]
    if not names:
        sample = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"`target_modules`={target_modules!r} matches no module of the model "
                         f"(some nn.Linear names: {sample})")
    wrong = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names
             if not isinstance(model.get_submodule(n), nn.Linear)]
    if wrong:
        raise ValueError("`target_modules` matches modules that are not nn.Linear (OMoE wraps "
                         f"nn.Linear only): {wrong}")

    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = {"requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
                 "had_extra_repr": "extra_repr" in vars(model)}
    options = dict(num_experts=num_experts, rank=rank, alpha=alpha, top_k=top_k,
                   orthogonalize=orthogonalize, normalize=normalize, eps=eps, dropout=dropout,
                   backend=backend)
    # Build every wrapper before swapping any, so a bad option leaves the model untouched.
    # A Linear shared by several names (tied weights) gets one wrapper, shared the same way.
    wrappers: dict[int, OMoELinear] = {}
    for name in names:
        linear = model.get_submodule(name)
        if id(linear) not in wrappers:  # freezes `linear`; `remove` restores the flags
            wrappers[id(linear)] = OMoELinear(linear, **options)

    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrappers[id(model.get_submodule(name))])
    for layer in omoe_layers(model).values():
        for tensor in _ADAPTER_TENSORS:
            getattr(layer, tensor).requires_grad_(True)

    setattr(model, _STATE_ATTR, state)
    if not state["had_extra_repr"]:
        # print(model) then ends its first line with the trainable-parameter summary.
        model.extra_repr = types.MethodType(_extra_repr_with_summary, model)
    return model


def _extra_repr_with_summary(model: nn.Module) -> str:
    own = type(model).extra_repr(model)
    summary = "omoe: " + trainable_parameters_summary(model)
    return f"{own}, {summary}" if own else summary


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_parameters_summary(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints the peft-style line `trainable params: … || all params: … || trainable%: …`."""
    print(trainable_parameters_summary(model))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors: `<layer name>.lora_A`, `.lora_B`, `.router_weight` (detached)."""
    layers = omoe_layers(model)
    if not layers:
        raise ValueError("`model` holds no OMoELinear layer: call omoe_kernels.inject first")
    return {f"{name}.{tensor}": getattr(layer, tensor).detach()
            for name, layer in layers.items() for tensor in _ADAPTER_TENSORS}


def _layer_record(layer: OMoELinear) -> dict:
    return {**layer.config(), "in_features": layer.in_features, "out_features": layer.out_features}


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes the adapter tensors to a safetensors file; each layer's config goes into the
    file's metadata as JSON (key "omoe_config"), so `load_adapter` can check it."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_FORMAT_VERSION,
              "layers": {name: _layer_record(layer) for name, layer in omoe_layers(model).items()}}
    save_file(tensors, os.fspath(path), metadata={"omoe_config": json.dumps(config)})


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The config stored by `save_adapter` in a file's metadata."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "omoe_config" not in metadata:
        raise ValueError(f"{os.fspath(path)!r} is not an omoe_kernels adapter (no 'omoe_config' "
                         "metadata); write it with omoe_kernels.save_adapter")
    config = json.loads(metadata["omoe_config"])
    if config.get("format") != ADAPTER_FORMAT or config.get("version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r}: unsupported adapter format "
                         f"{config.get('format')!r} version {config.get('version')!r}")
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a `save_adapter` file into a model injected with the same layers and config.

    Raises ValueError naming the layers that are missing or extra, or the options that
    differ, before any tensor is copied.
    """
    from safetensors.torch import load_file

    saved = read_adapter_config(path)["layers"]
    layers = omoe_layers(model)
    missing = sorted(set(saved) - set(layers))
    extra = sorted(set(layers) - set(saved))
    if missing or extra:
        raise ValueError(f"adapter {os.fspath(path)!r} does not fit the model: layers in the file "
                         f"but not injected in the model: {missing}; injected in the model but "
                         f"not in the file: {extra}")
    mismatches = []
    for name, layer in layers.items():
        ours = _layer_record(layer)
        diffs = {k: (saved[name].get(k), v) for k, v in ours.items() if saved[name].get(k) != v}
        if diffs:
            mismatches.append(f"{name}: " + ", ".join(f"{k} file={a!r} model={b!r}"
                                                      for k, (a, b) in diffs.items()))
    if mismatches:
        raise ValueError(f"adapter {os.fspath(path)!r} was saved with another config:\n  "
                         + "\n  ".join(mismatches))
    tensors = load_file(os.fspath(path))
    expected = adapter_state_dict(model)
    if set(tensors) != set(expected):
        raise ValueError(f"adapter {os.fspath(path)!r} holds tensors {sorted(set(tensors) ^ set(expected))} "
                         "that do not match the model's adapter tensors")
    for key, target in expected.items():
        if tensors[key].shape != target.shape:
            raise ValueError(f"adapter tensor {key!r} has shape {tuple(tensors[key].shape)}, "
                             f"the model's has {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(tensors[key])
    return model


def remove(model: nn.Module) -> nn.Module:
    """Puts the original `nn.Linear` objects back and restores every parameter's
    `requires_grad` flag as it was before the first `inject`. Returns `model`."""
    layers = {name: m for name, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, OMoELinear)}
    if not layers:
        raise ValueError("`model` holds no OMoELinear layer: nothing to remove")
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        flags = state["requires_grad"]
        for name, p in model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])
        if not state["had_extra_repr"]:
            vars(model).pop("extra_repr", None)
        delattr(model, _STATE_ATTR)
    return model


def track_router_stats(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns router statistics on (or off) in every `OMoELinear` of `model`."""
    for layer in omoe_layers(model).values():
        layer.track_router_stats = enabled
        if not enabled:
            layer._router_logits = None
    return model


def router_stats(model: nn.Module) -> dict[str, RouterStats]:
    """The `RouterStats` of every `OMoELinear` of `model` from its last forward pass."""
    return {name: layer.router_stats for name, layer in omoe_layers(model).items()}


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """Mean over the OMoE layers of E · Σ_i (load_i / k) · mean_prob_i (1 when balanced).

    Add `coef * (load_balancing_loss(model) - 1)` (or without the constant) to the
    training loss; needs `track_router_stats(model)` before the forward pass.
    """
    stats = list(router_stats(model).values())
    if not stats:
        raise ValueError("`model` holds no OMoELinear layer")
    return torch.stack([s.balance_loss() for s in stats]).mean()
