"""Adapter files: one safetensors file (`save_adapter`), an adapter directory
(`save_pretrained`), and loading either, or a Trainer checkpoint, back (`from_pretrained`).

Loading reads safetensors and JSON only, so it never executes code from a file. Every
check runs before the first tensor is copied: a bad file leaves the model unchanged.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..layer import ADAPTER_TENSORS, OMoELinear
from .config import OMoEConfig, parse_json, read_text
from .model import (
    HF_CONFIG_ATTR,
    STATE_ATTR,
    _check_model,
    _Rollback,
    _set_enabled,
    adapter_layers,
    adapter_names,
    inject,
    remove,
    resolve_adapter_name,
    set_adapter,
)
from .targets import saved_module_names

ADAPTER_FORMAT = "omoe_kernels.adapter"
ADAPTER_FORMAT_VERSION = 1
CONFIG_NAME = "omoe_config.json"
WEIGHTS_NAME = "omoe_adapter.safetensors"
# What each layer record of an adapter file holds, and the JSON types it must have.
_RECORD_TYPES = {"num_experts": (int,), "rank": (int,), "alpha": (int, float),
                 "top_k": (int, type(None)), "orthogonalize": (bool,), "normalize": (bool,),
                 "eps": (int, float), "in_features": (int,), "out_features": (int,)}


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Only the adapter tensors, `<target>.lora_A`, `.lora_B`, `.router_weight` (detached),
    of one adapter (None: the active one, or the only one)."""
    return {f"{target}.{tensor}": getattr(layer, tensor).detach()
            for target, layer in adapter_layers(model, adapter_name).items()
            for tensor in ADAPTER_TENSORS}


SAVED_PREFIX = "modules_to_save."  # key prefix of a modules_to_save tensor in an adapter file


def _saved_modules(root: nn.Module, name: str) -> list[str]:
    """The modules_to_save of adapter `name` (none for layers built by hand)."""
    state = getattr(root, STATE_ATTR, None)
    if state is None:
        return []
    return saved_module_names(root, OMoEConfig.from_dict(state["adapters"][name]))


def _saved_tensors(root: nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    """Module name + "." + tensor name -> the parameters and buffers of `modules`."""
    out = {}
    for module in modules:
        m = root.get_submodule(module)
        for key, tensor in [*m.named_parameters(), *m.named_buffers()]:
            out[f"{module}.{key}"] = tensor
    return out


def _layer_record(layer: OMoELinear) -> dict:
    return {**layer.config(), "in_features": layer.in_features, "out_features": layer.out_features}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Writes one adapter's tensors to a safetensors file; the layers' options (and the
    adapter's `OMoEConfig`, and whether the model's adapters are enabled) go into its
    metadata as JSON (key "omoe_config")."""
    from safetensors.torch import save_file

    root = _check_model(model)
    name = resolve_adapter_name(root, adapter_name)
    layers = adapter_layers(root, name)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(root, name).items()}
    tensors.update({SAVED_PREFIX + k: v.detach().contiguous().cpu()
                    for k, v in _saved_tensors(root, _saved_modules(root, name)).items()})
    config = {"format": ADAPTER_FORMAT, "version": ADAPTER_FORMAT_VERSION, "adapter_name": name,
              "layers": {target: _layer_record(layer) for target, layer in layers.items()}}
    state = getattr(root, STATE_ATTR, None)
    if state is not None:
        config["config"] = state["adapters"][name]
        config["enabled"] = state.get("enabled", True)
    save_file(tensors, os.fspath(path), metadata={"omoe_config": json.dumps(config)})


def _check_file(path, what: str = "adapter file") -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not an {what}; for an adapter directory "
                         "use omoe_kernels.from_pretrained")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such {what}")
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The metadata `save_adapter` stored in a file, checked: ValueError naming the file
    and what is wrong with it."""
    from safetensors import safe_open

    path = _check_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from None
    if "omoe_config" not in metadata:
        raise ValueError(f"{path!r} is not an omoe_kernels adapter (no 'omoe_config' "
                         "metadata); write it with omoe_kernels.save_adapter")
    config = parse_json(metadata["omoe_config"], f"{path!r} metadata 'omoe_config'")
    if not isinstance(config, dict):
        raise ValueError(f"{path!r}: metadata 'omoe_config' must be a JSON object, "
                         f"got {type(config).__name__}")
    if config.get("format") != ADAPTER_FORMAT or config.get("version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(f"{path!r}: unsupported adapter format {config.get('format')!r} "
                         f"version {config.get('version')!r}")
    layers = config.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{path!r}: metadata 'omoe_config' needs 'layers', a non-empty JSON "
                         f"object of layer records, got {type(layers).__name__}")
    for name, record in layers.items():
        if not isinstance(record, dict):
            raise ValueError(f"{path!r}: the record of layer {name!r} must be a JSON object, "
                             f"got {type(record).__name__}")
        for key, types in _RECORD_TYPES.items():
            value = record.get(key)
            if key not in record or not isinstance(value, types) or (
                    isinstance(value, bool) and bool not in types):
                raise ValueError(f"{path!r}: layer {name!r} has {key}={value!r}; expected "
                                 f"{' or '.join(t.__name__ for t in types)}")
    if not isinstance(config.get("adapter_name", "default"), str):
        raise ValueError(f"{path!r}: 'adapter_name' must be a string")
    if not isinstance(config.get("enabled", True), bool):
        raise ValueError(f"{path!r}: 'enabled' must be true or false")
    if "config" in config:
        OMoEConfig.from_dict(config["config"], f"{path!r} metadata 'omoe_config.config'")
    return config


def load_adapter(model: nn.Module, path: str | os.PathLike,
                 adapter_name: str | None = None) -> nn.Module:
    """Loads a `save_adapter` file into an adapter injected with the same layers and
    options. Raises ValueError naming the file and the layers, options or tensors that
    do not fit, before any tensor is copied."""
    from safetensors import safe_open

    root = _check_model(model)
    saved = read_adapter_config(path)["layers"]
    path = os.fspath(path)
    adapter = resolve_adapter_name(root, adapter_name)
    layers = adapter_layers(root, adapter)
    missing = sorted(set(saved) - set(layers))
    extra = sorted(set(layers) - set(saved))
    if missing or extra:
        parts = ([f"layers in the file but not injected in the model: {missing}"] if missing else []) + (
            [f"injected in the model but not in the file: {extra}"] if extra else [])
        raise ValueError(f"adapter {path!r} does not fit adapter {adapter!r} of the model "
                         f"(adapters: {adapter_names(root)}): " + "; ".join(parts)
                         + f". The file's layers: {_short(sorted(saved))}; the model's: "
                         f"{_short(sorted(layers))}")
    mismatches = []
    for name, layer in layers.items():
        ours = _layer_record(layer)
        diffs = {k: (saved[name].get(k), v) for k, v in ours.items() if saved[name].get(k) != v}
        if diffs:
            mismatches.append(f"{name}: " + ", ".join(f"{k} file={a!r} model={b!r}"
                                                      for k, (a, b) in diffs.items()))
    if mismatches:
        raise ValueError(f"adapter {path!r} was saved with another config:\n  "
                         + "\n  ".join(mismatches))
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    extras = {k.removeprefix(SAVED_PREFIX): v for k, v in tensors.items()
              if k.startswith(SAVED_PREFIX)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(SAVED_PREFIX)}
    plan = _saved_plan(_saved_tensors(root, _saved_modules(root, adapter)), extras, repr(path))
    _copy_adapter_tensors(layers, tensors, {f"{t}.{n}": f"{t}.{n}" for t in layers
                                            for n in ADAPTER_TENSORS}, repr(path), plan=plan)
    return model


def _short(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{' ...' if len(names) > n else ''}"


def _saved_plan(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                source: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model tensor, file tensor) pairs for the modules_to_save, checked: ValueError for
    a missing or misshapen one."""
    lacking = sorted(set(ours) - set(theirs))
    if lacking:
        raise ValueError(f"{source} lacks the modules_to_save tensors {_short(lacking, 6)}")
    plan = []
    for key, tensor in ours.items():
        if theirs[key].shape != tensor.shape:
            raise ValueError(f"{source}: modules_to_save tensor {key!r} has shape "
                             f"{tuple(theirs[key].shape)}; the model's is {tuple(tensor.shape)}")
        plan.append((tensor, theirs[key]))
    return plan


def _copy_adapter_tensors(layers: dict[str, OMoELinear], tensors: dict[str, torch.Tensor],
                          keys: dict[str, str], source: str, exact: bool = True,
                          plan: list | None = None) -> None:
    """Copies tensors[keys[f"{target}.{name}"]] into each layer, and each (ours, theirs)
    pair of `plan`; checks everything first. `exact`: the file must hold no other tensors."""
    wanted = set(keys.values())
    lacking = sorted(wanted - set(tensors))
    if lacking:
        raise ValueError(f"{source} lacks the adapter tensors {lacking[:6]}"
                         f"{' ...' if len(lacking) > 6 else ''}")
    surplus = sorted(set(tensors) - wanted) if exact else []
    if surplus:
        raise ValueError(f"{source} holds tensors that are no adapter tensor of the model: "
                         f"{surplus[:6]}{' ...' if len(surplus) > 6 else ''}")
    plan = list(plan or [])
    for target, layer in layers.items():
        for name in ADAPTER_TENSORS:
            key = keys[f"{target}.{name}"]
            ours, theirs = getattr(layer, name), tensors[key]
            if theirs.shape != ours.shape or not theirs.is_floating_point():
                raise ValueError(f"{source}: tensor {key!r} is {theirs.dtype} of shape "
                                 f"{tuple(theirs.shape)}; the model's is {ours.dtype} of shape "
                                 f"{tuple(ours.shape)}")
            plan.append((ours, theirs))
    with torch.no_grad():
        for ours, theirs in plan:
            ours.copy_(theirs)


def save_pretrained(model: nn.Module, directory: str | os.PathLike,
                    adapter_name: str | None = None) -> None:
    """Writes an adapter directory: `omoe_config.json` (the adapter's `OMoEConfig`) and
    `omoe_adapter.safetensors` (its tensors only). Works through a `torch.compile`
    wrapper: the layer names are the plain model's."""
    root = _check_model(model)
    name = resolve_adapter_name(root, adapter_name)
    state = getattr(root, STATE_ATTR, None)
    if state is None:
        raise ValueError("`model` has no adapter made by omoe_kernels.inject, so there is no "
                         "config to save; inject with ok.inject, or use ok.save_adapter")
    directory = os.fspath(directory)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{directory!r} exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    OMoEConfig.from_dict(state["adapters"][name]).save(os.path.join(directory, CONFIG_NAME))
    save_adapter(root, os.path.join(directory, WEIGHTS_NAME), name)


def from_pretrained(model: nn.Module, directory: str | os.PathLike,
                    adapter_name: str | None = None, *, is_trainable: bool = False) -> nn.Module:
    """Injects the adapter(s) a directory describes into `model` (the base model) and loads
    their tensors, in one call; returns `model`. `directory` is one written by
    `save_pretrained`, or a Hugging Face Trainer checkpoint of an injected model (its
    config.json holds the adapters' configs, model.safetensors their tensors; every
    adapter in it is restored, or only `adapter_name`). Base weights come from `model`.

    Into a model without adapters it restores the saved state too: the adapter that was
    active (a `save_pretrained` directory holds one adapter, active on load; from a
    checkpoint, `adapter_name` or else the one active when it was saved) and whether
    adapters were enabled. A directory saved before that state was recorded loads with
    its (first) adapter active and enabled. Into a model that already holds adapters the
    loaded ones join inactive, as `inject` makes them, and the model's state stays.

    `is_trainable` (peft's keyword and default): False loads for inference: the loaded
    adapters' parameters (and modules_to_save) are frozen and the model is put in eval
    mode; `ok.mark_trainable(model)` or `set_adapter` makes the active one trainable
    again. True: trainable, as `inject` makes them. A missing `directory` raises
    FileNotFoundError."""
    root = _check_model(model)
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"`directory` must be a str or os.PathLike, got {type(directory).__name__}")
    if not isinstance(is_trainable, bool):
        raise TypeError(f"`is_trainable` must be a bool, got {type(is_trainable).__name__}")
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"{directory!r}: no such adapter directory or checkpoint")
    if not os.path.isdir(directory):
        raise ValueError(f"{directory!r} is not a directory")
    rollback = _Rollback(root)
    injected: list[str] = []
    fresh = getattr(root, STATE_ATTR, None) is None
    try:
        if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
            weights = os.path.join(directory, WEIGHTS_NAME)
            config = OMoEConfig.load(os.path.join(directory, CONFIG_NAME))
            saved = read_adapter_config(weights)
            name = adapter_name or saved.get("adapter_name", "default")
            inject(root, config, adapter_name=name)
            injected.append(name)
            load_adapter(root, weights, name)
            if fresh:
                _set_enabled(root, getattr(root, STATE_ATTR), saved.get("enabled", True))
        else:
            _load_trainer_checkpoint(root, directory, adapter_name, injected, fresh)
        if not is_trainable:
            for name in injected:
                for layer in adapter_layers(root, name).values():
                    for tensor in ADAPTER_TENSORS:
                        getattr(layer, tensor).requires_grad_(False)
                for module in _saved_modules(root, name):
                    root.get_submodule(module).requires_grad_(False)
            root.eval()
    except BaseException:
        for name in reversed(injected):
            remove(root, name)
        rollback.undo()
        raise
    return model


def _load_trainer_checkpoint(root: nn.Module, directory: str, adapter_name: str | None,
                             injected: list[str], fresh: bool) -> None:
    source = repr(os.path.join(directory, "config.json"))
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ValueError(f"{directory!r} holds neither {CONFIG_NAME} (omoe_kernels."
                         "save_pretrained) nor config.json (a Trainer checkpoint)")
    hf_config = parse_json(read_text(os.path.join(directory, "config.json")), source)
    entry = hf_config.get(HF_CONFIG_ATTR) if isinstance(hf_config, dict) else None
    adapters = entry.get("adapters") if isinstance(entry, dict) else None
    if not isinstance(adapters, dict) or not adapters:
        raise ValueError(f"{source} has no '{HF_CONFIG_ATTR}' entry with adapters: this is not "
                         "a checkpoint of a model injected with omoe_kernels")
    names = list(entry["adapters"]) if adapter_name is None else [adapter_name]
    if adapter_name is not None and adapter_name not in entry["adapters"]:
        raise ValueError(f"{source}: no adapter {adapter_name!r} (it has {list(entry['adapters'])})")
    configs = {n: OMoEConfig.from_dict(entry["adapters"][n], f"{source} adapter {n!r}")
               for n in names}
    active, enabled = entry.get("active"), entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"{source}: '{HF_CONFIG_ATTR}.enabled' must be true or false, "
                         f"got {enabled!r}")
    for name, config in configs.items():
        inject(root, config, adapter_name=name)
        injected.append(name)
    saved = {n: _saved_tensors(root, _saved_modules(root, n)) for n in names}
    wanted = {k for ours in saved.values() for k in ours}
    tensors = _read_checkpoint_tensors(directory, {f".{HF_CONFIG_ATTR}.{n}." for n in names}, wanted)
    if not any(f".{HF_CONFIG_ATTR}." in k for k in tensors):
        raise ValueError(f"{source} records OMoE adapters {names}, but the checkpoint holds none "
                         "of their tensors: it was saved from a model without them (a model "
                         "loaded with the plain Hugging Face from_pretrained keeps config.omoe); "
                         "load a checkpoint saved from the injected model")
    for name in names:
        layers = adapter_layers(root, name)
        keys = {f"{t}.{n}": f"{t}.{HF_CONFIG_ATTR}.{name}.{n}" for t in layers for n in ADAPTER_TENSORS}
        plan = _saved_plan(saved[name], tensors, repr(directory))
        _copy_adapter_tensors(layers, tensors, keys, repr(directory), exact=False, plan=plan)
    if fresh:
        set_adapter(root, active if active in names else names[0])
        _set_enabled(root, getattr(root, STATE_ATTR), enabled)


def _read_checkpoint_tensors(directory: str, markers: set[str],
                             keys: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The tensors whose key holds one of `markers` or is in `keys`, from model.safetensors
    or its shards."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = parse_json(read_text(index), repr(index)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index!r} has no 'weight_map' object")
        files = sorted({v for v in weight_map.values() if isinstance(v, str)})
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ValueError(f"{directory!r} holds no model.safetensors (only safetensors "
                         "checkpoints load: they cannot execute code)")
    tensors = {}
    for file in files:
        path = os.path.join(directory, os.path.basename(file))
        _check_file(path, "checkpoint shard")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in keys or any(m in key for m in markers):
                    tensors[key] = f.get_tensor(key)
    return tensors
