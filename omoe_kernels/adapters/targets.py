"""Which modules `inject` wraps: target names ("all-linear", suffixes, a regex),
`modules_to_save`, and the checks that run before the model changes."""
from __future__ import annotations

import re
import warnings

from torch import nn

from ..backends import available_backends, backend_usable
from ..layer import OMoELinear, base_factory
from .config import OMoEConfig


def _innermost(module: nn.Module) -> nn.Module:
    """The base layer under a stack of adapters."""
    while isinstance(module, OMoELinear):
        module = module.base
    return module


def is_peft_module(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "peft"


ALL_LINEAR = "all-linear"

# The targets of `target_modules=None`, by Hugging Face model type: the attention's query
# and value projections, the modules peft's LoRA targets by default for the same types.
_QUERY_VALUE = ["q_proj", "v_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "llama4", "mistral", "mixtral", "qwen2", "qwen3", "gemma",
                     "gemma2", "gemma3_text", "opt", "gptj"], _QUERY_VALUE),
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    **dict.fromkeys(["bert", "roberta"], ["query", "value"]),
    **dict.fromkeys(["bloom", "gpt_neox", "falcon"], ["query_key_value"]),
    "gpt2": ["c_attn"],
    "t5": ["q", "v"],
}


def default_targets(root: nn.Module) -> list[str]:
    """The targets of `target_modules=None` for `root`'s model type; ValueError naming
    the type when the table has none."""
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    what = (f"model type {model_type!r}" if model_type else
            f"a {type(root).__name__} with no Hugging Face `config.model_type`")
    raise ValueError(f"`target_modules` is None, and {what} has no default targets (those "
                     f"of {sorted(DEFAULT_TARGETS)} do): pass `target_modules`, e.g. "
                     "['q_proj', 'v_proj'] or 'all-linear'")


def _output_head(root: nn.Module) -> nn.Module | None:
    """A Hugging Face model's output layer (lm_head), which "all-linear" leaves out as peft does."""
    get = getattr(root, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return head if isinstance(head, nn.Module) else None


def target_names(root: nn.Module, target_modules, tops: dict[str, OMoELinear],
                 saved: list[str]) -> list[str]:
    """The module names `target_modules` selects (every name of a module registered under
    several), leaving out the parts of earlier adapters' stacks (`tops`; a stack itself
    may get another adapter) and the modules of `saved` (modules_to_save). ValueError
    when nothing matches; a warning naming each list entry that matches nothing."""
    def free(name: str) -> bool:
        return not (any(name.startswith(t + ".") for t in tops)
                    or any(name == t or name.startswith(t + ".") for t in saved))

    # remove_duplicate=False: a module registered under two names (tied) matches under both.
    modules = [(n, m) for n, m in root.named_modules(remove_duplicate=False) if n]
    linear = [n for n, m in modules if isinstance(m, nn.Linear) and free(n)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head(root)
        # As peft: not the layers of another library's adapters (OMoE refuses to wrap them).
        peft = [n for n, m in modules if is_peft_module(m) and hasattr(m, "get_base_layer")]
        names = [n for n, m in modules if free(n) and m is not head and not any(
            n == p or n.startswith(p + ".") for p in peft) and (
            isinstance(m, nn.Linear) or (n in tops and isinstance(_innermost(m), nn.Linear)))]
        if not names:
            raise ValueError(f"`target_modules`={ALL_LINEAR!r} matches no module: the model "
                             "has no nn.Linear layer besides its output head")
        return names
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n, _ in modules if free(n) and pattern.fullmatch(n)]
        if not names:
            raise ValueError(
                f"`target_modules`={target_modules!r} matches no module of the model: a string "
                "is read as a regex that must match a whole module name (re.fullmatch), e.g. "
                r"'.*\.(q_proj|v_proj)'; pass a list such as ['q_proj', 'v_proj'] to match "
                f"names by suffix (some nn.Linear names: {linear[:8]})")
        return names
    hits = {s: [n for n, _ in modules if free(n) and (n == s or n.endswith("." + s))]
            for s in target_modules}
    matched = {n for found in hits.values() for n in found}
    names = [n for n, _ in modules if n in matched]  # in module order
    unmatched = [s for s, found in hits.items() if not found]
    if not names:
        raise ValueError(f"`target_modules`={list(target_modules)!r} matches no module of the "
                         f"model (an entry matches a name equal to it or ending in '.' + it; "
                         f"some nn.Linear names: {linear[:8]})")
    if unmatched:
        warnings.warn(f"`target_modules` entries {unmatched} match no module of the model; "
                      f"the others wrap {len(names)} modules (some nn.Linear names: "
                      f"{linear[:8]})", stacklevel=3)
    return names


def cannot_wrap(root: nn.Module, name: str, module: nn.Module, peft_layers: list[str]) -> str | None:
    """Why `module` (at `name`) cannot get an adapter, or None."""
    owner = next((p for p in peft_layers if name == p or name.startswith(p + ".")), None)
    if owner is not None:
        kind = type(root.get_submodule(owner))
        what = "is" if owner == name else f"is inside {owner!r}, which is"
        return (f"{type(module).__name__} {what} a peft adapter layer "
                f"({kind.__module__}.{kind.__qualname__}); OMoE does not wrap "
                "another library's adapter layers: target other modules, or merge/unload "
                "the peft adapter first")
    parent = root.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.MultiheadAttention):
        return ("nn.MultiheadAttention reads `out_proj.weight` directly and never calls its "
                "forward, so an adapter there would be skipped; target the modules around it")
    try:
        base_factory(module)
    except TypeError as exc:
        return f"{type(module).__name__}: {exc}"
    return None


def saved_module_names(root: nn.Module, config: OMoEConfig) -> list[str]:
    """The modules `config.modules_to_save` names (suffix match, as targets), trained in
    full and saved with the adapter; ValueError for an entry that matches nothing."""
    names = []
    for entry in config.modules_to_save or ():
        found = [n for n, _ in root.named_modules() if n and (n == entry or n.endswith("." + entry))
                 and not isinstance(root.get_submodule(n.rpartition(".")[0]), OMoELinear)]
        if not found:
            raise ValueError(f"`modules_to_save` entry {entry!r} matches no module of the model")
        names += [n for n in found if n not in names]
    return names


def check_backend_device(root: nn.Module, config: OMoEConfig, names: list[str]) -> None:
    """ValueError, before anything changes, when the config's backend cannot run on the
    device of a target's weights (the layer would fail only at its first forward)."""
    if config.backend == "auto":
        return
    for name in names:
        weight = next(root.get_submodule(name).parameters(), None)
        if weight is None or weight.device.type == "meta":
            continue
        if not backend_usable(config.backend, weight.device):
            raise ValueError(
                f"backend={config.backend!r} cannot run on this machine on the "
                f"{weight.device.type} weights of {name!r}; the backends that can: "
                f"{available_backends(weight.device)} (or backend='auto'). Move the model "
                "first, or pick another backend")
