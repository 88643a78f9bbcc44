"""Putting OMoE adapters into a user's model, switching them, and taking them out.

Every call that changes the model either completes or leaves it exactly as it was
(modules, tied modules, `requires_grad` flags, attributes): docs/contract.md §4.

The adapter state follows peft's rule: while a model holds adapters exactly one of them
is active (`state["active"]`, never None), and `state["enabled"]` says whether it computes.
A layer computes when it belongs to the active adapter and adapters are enabled; the
active adapter's parameters are the trainable ones, enabled or not.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Iterator

import torch
from torch import nn

from ..layer import ADAPTER_TENSORS, OMoELinear
from ..options import resolve_aliases
from ..router_stats import RouterStats, clear_router_stats
from .config import OMoEConfig
from .mixed import STATE_ATTR, batch_context, install_batch_hooks, remove_batch_hooks
from .stacks import adapter_stack, stack_tops
from .targets import (
    cannot_wrap,
    check_backend_device,
    default_targets,
    is_peft_module,
    saved_module_names,
    target_names,
)

HF_CONFIG_ATTR = "omoe"  # on a Hugging Face model's config: saved into config.json


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the adapters, through a `torch.compile` wrapper (`_orig_mod`)
    and a peft `PeftModel` (`get_base_model()`)."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
                getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif is_peft_module(model) and hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    return unwrap(model)


def omoe_layers(model: nn.Module) -> dict[str, OMoELinear]:
    """Every `OMoELinear` of `model`, by module name (a second adapter on a layer wraps the
    first, which then shows as `<name>.base`)."""
    return {name: m for name, m in _check_model(model).named_modules()
            if isinstance(m, OMoELinear)}


def adapter_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, OMoELinear]:
    """Target module name -> the `OMoELinear` of one adapter (None: the active adapter,
    or the only one)."""
    root = _check_model(model)
    name = resolve_adapter_name(root, adapter_name)
    return {target: layer for target, top in stack_tops(root).items()
            for layer in adapter_stack(top) if layer.adapter_name == name}


def adapter_names(model: nn.Module) -> list[str]:
    """The adapters of `model`, in the order they were injected."""
    state = getattr(_check_model(model), STATE_ATTR, None)
    return list(state["adapters"]) if state else []


def active_adapter(model: nn.Module) -> str | None:
    """The active adapter's name (also while adapters are disabled); None without adapters."""
    state = getattr(_check_model(model), STATE_ATTR, None)
    return state["active"] if state else None


def adapters_enabled(model: nn.Module) -> bool:
    """False while adapters are disabled (`disable_adapters`, `enable_adapters(model, False)`)
    or when `model` holds no adapter made by `inject`."""
    state = getattr(_check_model(model), STATE_ATTR, None)
    return bool(state) and state.get("enabled", True)


def _apply_state(root: nn.Module, state: dict, flags: bool) -> None:
    """Makes every layer follow `state`: the active adapter's layers compute when adapters
    are enabled; with `flags`, its parameters are trainable and the others' frozen."""
    enabled = state.get("enabled", True)
    for layer in root.modules():
        if isinstance(layer, OMoELinear):
            active = layer.adapter_name == state["active"]
            layer.adapter_enabled = active and enabled
            if flags:
                for tensor in ADAPTER_TENSORS:
                    getattr(layer, tensor).requires_grad_(active)
    if flags and "adapters" in state:  # modules_to_save: the active adapter's are trainable
        saved = {n: saved_module_names(root, OMoEConfig.from_dict(c))
                 for n, c in state["adapters"].items()}
        for name in {m for n, names in saved.items() if n != state["active"] for m in names}:
            root.get_submodule(name).requires_grad_(False)
        for name in saved.get(state["active"], ()):
            root.get_submodule(name).requires_grad_(True)


def _set_enabled(root: nn.Module, state: dict, enabled: bool) -> None:
    state["enabled"] = enabled
    _apply_state(root, state, flags=False)
    _sync_hf_config(root, state)


def resolve_adapter_name(root: nn.Module, adapter_name: str | None) -> str:
    state = getattr(root, STATE_ATTR, None)
    names = list(state["adapters"]) if state else sorted(
        {m.adapter_name for m in root.modules() if isinstance(m, OMoELinear)})
    if not names:
        raise ValueError("`model` holds no OMoELinear layer: call omoe_kernels.inject first")
    if adapter_name is None:
        if state and state["active"] is not None:
            return state["active"]
        if len(names) == 1:
            return names[0]
        raise ValueError(f"`model` holds several adapters {names} and none is active: pass "
                         "`adapter_name`")
    if adapter_name not in names:
        raise ValueError(f"`adapter_name`={adapter_name!r} is not an adapter of the model "
                         f"(it has {names})")
    return adapter_name


# --------------------------------------------------------------------------- inject

def _as_config(target_modules_or_config, options: dict) -> OMoEConfig:
    if isinstance(target_modules_or_config, OMoEConfig):
        if options:
            raise TypeError(f"pass the options in the OMoEConfig, not as keywords too: "
                            f"{sorted(options)}")
        return target_modules_or_config
    options = resolve_aliases("inject()", options)
    missing = [n for n in ("num_experts", "rank") if n not in options]
    if missing:
        raise TypeError(f"inject() needs {missing} (or an OMoEConfig as its second argument)")
    try:
        return OMoEConfig(target_modules_or_config, **options)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"inject() got an unknown option: {exc}") from None
        raise


class _Rollback:
    """Records what inject/remove change, and puts it back if they fail part way."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.flags = [(p, p.requires_grad) for p in root.parameters()]
        self.enabled = [(m, m.adapter_enabled) for m in root.modules() if isinstance(m, OMoELinear)]
        self.swaps: list[tuple[nn.Module, str, nn.Module]] = []
        self.attrs = {k: vars(root).get(k, _MISSING) for k in (STATE_ATTR,)}
        config = getattr(root, "config", None)
        self.hf_config = config if _is_hf_config(config) else None
        self.hf_value = getattr(self.hf_config, HF_CONFIG_ATTR, _MISSING) if self.hf_config else None
        self.config_refs = [(m, vars(m)["config"]) for m in root.modules() if "config" in vars(m)]

    def setattr(self, parent: nn.Module, child: str, module: nn.Module) -> None:
        self.swaps.append((parent, child, getattr(parent, child)))
        setattr(parent, child, module)

    def undo(self) -> None:
        for parent, child, old in reversed(self.swaps):
            setattr(parent, child, old)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, enabled in self.enabled:
            m.adapter_enabled = enabled
        for key, value in self.attrs.items():
            vars(self.root).pop(key, None)
            if value is not _MISSING:
                vars(self.root)[key] = value
        for module, config in self.config_refs:
            vars(module)["config"] = config
        if self.hf_config is not None:
            _set_hf_config(self.hf_config, self.hf_value)


_MISSING = object()


def _is_hf_config(config) -> bool:
    return config is not None and hasattr(config, "to_dict") and hasattr(config, "save_pretrained")


def _set_hf_config(config, value) -> None:
    if value is _MISSING:
        if HF_CONFIG_ATTR in vars(config):
            delattr(config, HF_CONFIG_ATTR)
    else:
        setattr(config, HF_CONFIG_ATTR, value)


def _own_hf_config(root: nn.Module, state: dict):
    """`root.config`, replaced by a copy the first time inject records into it, so that a
    config object shared with other models (two models built from one config) never
    changes. The modules of `root` that held the shared object get the copy."""
    config = getattr(root, "config", None)
    if not _is_hf_config(config) or state.get("hf_config") is config:
        return config
    own = copy.deepcopy(config)
    for module in root.modules():
        if vars(module).get("config") is config:
            vars(module)["config"] = own
    state["hf_config"] = own
    return own


def _sync_hf_config(root: nn.Module, state: dict | None) -> None:
    """Mirrors the adapters' configs into `model.config.omoe`, so a Trainer checkpoint's
    config.json says how to rebuild the adapters (`ok.from_pretrained` reads it). Writes
    only into the model's own copy of its config (`_own_hf_config`)."""
    config = getattr(root, "config", None)
    if state is None:
        if _is_hf_config(config):
            _set_hf_config(config, _MISSING)
        return
    config = _own_hf_config(root, state)
    if _is_hf_config(config):
        _set_hf_config(config, {"adapters": dict(state["adapters"]), "active": state["active"],
                                "enabled": state.get("enabled", True)})


def inject(model: nn.Module, target_modules: OMoEConfig | list[str] | str, *,
           adapter_name: str = "default", **options) -> nn.Module:
    """Wraps the matching linear layers of `model` in `OMoELinear` adapters, in place.

    `ok.inject(model, config, adapter_name="default")` with an `OMoEConfig`, or
    `ok.inject(model, target_modules, num_experts=..., rank=..., ...)` with its fields as
    keywords. The first adapter is active and trainable, and every other parameter of the
    model is frozen, except those of another library's adapter layers (peft), whose flags
    are kept. A later adapter (another `adapter_name`) stacks on its targets inactive and
    frozen until `set_adapter`. Raises before changing anything when a target cannot be
    wrapped, and undoes everything if a later step fails.
    """
    root = _check_model(model)
    config = _as_config(target_modules, options)
    if not isinstance(adapter_name, str) or not adapter_name.isidentifier():
        raise ValueError("`adapter_name` must be a non-empty identifier (letters, digits, _), "
                         f"got {adapter_name!r}")
    state = getattr(root, STATE_ATTR, None)
    if state is not None and adapter_name in state["adapters"]:
        existing = sorted(t for t, layer in stack_tops(root).items()
                          if any(m.adapter_name == adapter_name for m in adapter_stack(layer)))
        raise ValueError(f"adapter {adapter_name!r} is already injected (on {existing[:8]}"
                         f"{' ...' if len(existing) > 8 else ''}): pass another `adapter_name`"
                         f", or call omoe_kernels.remove(model, {adapter_name!r}) first")

    if config.target_modules is None:  # recorded as chosen, so a reload needs no model type
        config = dataclasses.replace(config, target_modules=default_targets(root))
    tops = stack_tops(root, remove_duplicate=False)
    saved = saved_module_names(root, config)
    names = target_names(root, config.target_modules, tops, saved)
    peft_layers = [n for n, m in root.named_modules() if is_peft_module(m)
                   and hasattr(m, "get_base_layer")]
    problems = [f"{n} ({reason})" for n in names if not isinstance(root.get_submodule(n), OMoELinear)
                and (reason := cannot_wrap(root, n, root.get_submodule(n), peft_layers))]
    if problems:
        raise ValueError("`target_modules` matches modules that OMoE cannot wrap (it wraps "
                         "nn.Linear and linear-like modules): " + "; ".join(problems))
    check_backend_device(root, config, names)

    first = state is None
    active = first or state["active"] is None
    rollback = _Rollback(root)
    try:
        if first:
            state = {"requires_grad": {n: p.requires_grad for n, p in root.named_parameters()},
                     "adapters": {}, "active": None, "enabled": True}
        else:  # a new dict: the rollback keeps the old one as it was
            state = {**state, "adapters": dict(state["adapters"])}
        targets = [(n, root.get_submodule(n)) for n in names]
        # Build every wrapper before swapping any; a module shared by several names (tied
        # weights) gets one wrapper, shared the same way.
        wrappers: dict[int, OMoELinear] = {}
        for _, module in targets:
            if id(module) not in wrappers:
                wrappers[id(module)] = OMoELinear(module, **config.layer_options(),
                                                  adapter_name=adapter_name)
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            rollback.setattr(root.get_submodule(parent_name), child, wrappers[id(module)])
        if first:
            keep = {id(p) for n in peft_layers for p in root.get_submodule(n).parameters()}
            keep |= {id(getattr(m, t)) for m in root.modules() if isinstance(m, OMoELinear)
                     for t in ADAPTER_TENSORS}
            for p in root.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)
        for layer in wrappers.values():
            layer.adapter_enabled = active and state.get("enabled", True)
            for tensor in ADAPTER_TENSORS:
                getattr(layer, tensor).requires_grad_(active)
        state["adapters"][adapter_name] = config.to_dict()
        if active:
            state["active"] = adapter_name
            for name in saved:
                root.get_submodule(name).requires_grad_(True)
        vars(root)[STATE_ATTR] = state
        _sync_hf_config(root, state)
        install_batch_hooks(root)
    except BaseException:
        rollback.undo()
        if first:
            remove_batch_hooks(root)
        raise
    return model


# --------------------------------------------------------------------------- switching

def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Makes `adapter_name` the active (and trainable) adapter; the others compute nothing
    and are frozen. While adapters are disabled it computes nothing either, until they are
    enabled again (the end of the `disable_adapters` block, or `enable_adapters`)."""
    root = _check_model(model)
    name = resolve_adapter_name(root, adapter_name)
    state = getattr(root, STATE_ATTR, None)
    if state is None:  # layers built by hand, not by inject: no model-wide state
        _apply_state(root, {"active": name, "enabled": True}, flags=True)
        return model
    state["active"] = name
    _apply_state(root, state, flags=True)
    _sync_hf_config(root, state)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """peft's name (`PeftModel.disable_adapter()`) for `disable_adapters`."""
    with disable_adapters(model) as inner:
        yield inner


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with ok.disable_adapters(model): ...` computes exactly the base model inside (e.g.
    the reference logits of DPO). On exit, also when the block raises, adapters are enabled
    or disabled as they were on entry, and the adapter active then computes: one that
    `set_adapter` chose inside the block, or the one active on entry. Blocks nest. The
    `requires_grad` flags do not change."""
    root = _check_model(model)
    state = getattr(root, STATE_ATTR, None)
    if state is None:
        layers = [m for m in root.modules() if isinstance(m, OMoELinear)]
        if not layers:
            raise ValueError("`model` holds no OMoELinear layer: call omoe_kernels.inject first")
        enabled = [layer.adapter_enabled for layer in layers]
        for layer in layers:
            layer.adapter_enabled = False
        try:
            yield model
        finally:
            for layer, flag in zip(layers, enabled):
                layer.adapter_enabled = flag
        return
    was_enabled = state.get("enabled", True)
    _set_enabled(root, state, False)
    try:
        yield model
    finally:
        # Re-read: the block may have removed or injected adapters.
        state = getattr(root, STATE_ATTR, None)
        if state is not None:
            _set_enabled(root, state, was_enabled)


def enable_adapters(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Enables (or, with False, disables) the adapters of `model` outside a
    `disable_adapters` block, e.g. after loading a model saved with adapters disabled.
    The active adapter and the `requires_grad` flags do not change."""
    root = _check_model(model)
    if not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be a bool, got {type(enabled).__name__}")
    state = getattr(root, STATE_ATTR, None)
    if state is None:
        raise ValueError("`model` holds no adapter made by omoe_kernels.inject: call "
                         "omoe_kernels.inject (or from_pretrained) first")
    _set_enabled(root, state, enabled)
    return model


def _disabled_error(what: str) -> ValueError:
    return ValueError(f"the adapters of `model` are disabled (inside ok.disable_adapters, or "
                      f"after ok.enable_adapters(model, False)), so {what}; call it where "
                      "adapters are enabled, or enable them with ok.enable_adapters(model)")


def mark_trainable(model: nn.Module) -> nn.Module:
    """Makes the parameters of the active OMoE adapter trainable again, e.g. after a
    library (peft's get_peft_model) froze everything it does not own. Works while
    adapters are disabled too."""
    root = _check_model(model)
    state = getattr(root, STATE_ATTR, None)
    if state is not None:
        layers = [m for m in root.modules()
                  if isinstance(m, OMoELinear) and m.adapter_name == state["active"]]
    else:
        layers = [m for m in root.modules() if isinstance(m, OMoELinear) and m.adapter_enabled]
    if not layers:
        raise ValueError("`model` holds no active OMoELinear layer: call omoe_kernels.inject "
                         "(or set_adapter) first")
    for layer in layers:
        for tensor in ADAPTER_TENSORS:
            getattr(layer, tensor).requires_grad_(True)
    return model


def remove(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Takes one adapter (or, with None, every adapter) out of `model`. Removing the
    active adapter makes the first remaining one (in injection order) active and
    trainable, with a warning; whether adapters are enabled does not change. When the
    last one goes, the original modules are back with the `requires_grad` flags they had
    before the first `inject`. Returns `model`."""
    root = _check_model(model)
    tops = stack_tops(root, remove_duplicate=False)
    if not tops:
        raise ValueError("`model` holds no OMoELinear layer: nothing to remove")
    state = getattr(root, STATE_ATTR, None)
    name = None if adapter_name is None else resolve_adapter_name(root, adapter_name)
    rollback = _Rollback(root)
    try:
        for target in tops:
            # Re-read: a tied stack seen under an earlier name is already changed.
            parent_name, _, child = target.rpartition(".")
            parent = root.get_submodule(parent_name)
            layer = getattr(parent, child)
            while isinstance(layer, OMoELinear):
                if name is None or layer.adapter_name == name:
                    rollback.setattr(parent, child, layer.base)
                else:
                    parent, child = layer, "base"
                layer = getattr(parent, child)
        remaining = [] if state is None or name is None else [
            n for n in state["adapters"] if n != name]
        if state is not None and remaining:
            # peft's rule: removing the active adapter activates the first remaining one.
            fallback = state["active"] == name
            state = {**state, "adapters": {n: state["adapters"][n] for n in remaining},
                     "active": remaining[0] if fallback else state["active"]}
            vars(root)[STATE_ATTR] = state
            _apply_state(root, state, flags=fallback)
            _sync_hf_config(root, state)
            if fallback:
                warnings.warn(f"adapter {name!r} was active; {remaining[0]!r} is active now "
                              f"(call omoe_kernels.set_adapter(model, name) to pick another "
                              f"of {remaining})", stacklevel=2)
        elif state is not None:
            flags = state["requires_grad"]
            for pname, p in root.named_parameters():
                if pname in flags:
                    p.requires_grad_(flags[pname])
            vars(root).pop(STATE_ATTR)
            _sync_hf_config(root, None)
            remove_batch_hooks(root)
    except BaseException:
        rollback.undo()
        raise
    return model


@contextlib.contextmanager
def adapter_batch(model: nn.Module, adapter_names) -> Iterator[nn.Module]:
    """`with ok.adapter_batch(model, ["a", "b", "__base__"]): model(input_ids)` runs sample
    i with adapter `adapter_names[i]` ("__base__": no adapter), all in one batch, as
    `model(input_ids, adapter_names=...)` does. Inference only (eval mode); the adapters
    on a layer must share num_experts, rank and routing. Runs on the `cpu` and
    `reference` backends (omoe_kernels/mixed.py)."""
    with batch_context(_check_model(model), adapter_names):
        yield model


# --------------------------------------------------------------------------- counting, stats

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


def track_router_stats(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turns router statistics on (or off) in every `OMoELinear` of `model`, and drops
    what they recorded so far (router_stats.py says what a layer records)."""
    for layer in omoe_layers(model).values():
        layer.track_router_stats = enabled
        clear_router_stats(layer)
    return model


def router_stats(model: nn.Module) -> dict[str, RouterStats]:
    """The `RouterStats` of every layer of the active adapter, over the forward passes
    recorded since the step began (router_stats.py): every application of a layer that
    runs several times. Reading ends the step: the next forward starts afresh."""
    root = _check_model(model)
    layers = omoe_layers(root)
    if not layers:
        raise ValueError("`model` holds no OMoELinear layer: call omoe_kernels.inject first")
    enabled = {name: layer for name, layer in layers.items() if layer.adapter_enabled}
    if not enabled:
        raise _disabled_error("no layer routes and there are no router statistics")
    return {name: layer.router_stats for name, layer in enabled.items()}


def load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """Mean over the OMoE layers of E · Σ_i (load_i / k) · mean_prob_i (1 when balanced),
    over the forward passes recorded since the step began (see `router_stats`).

    Add `coef * (load_balancing_loss(model) - 1)` (or without the constant) to the
    training loss, and back-propagate both in one backward call; needs
    `track_router_stats(model)` before the forward pass. Under reentrant gradient
    checkpointing the router's gradient arrives when backward reruns the layers; a
    backward that cannot give it raises an error naming the fix.
    """
    stats = list(router_stats(model).values())
    return torch.stack([s.balance_loss() for s in stats]).mean()
