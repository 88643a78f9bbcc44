"""Several adapters in one batch, peft-style: `model(input_ids, adapter_names=[...])`,
`model.generate(..., adapter_names=[...])` and `adapter_batch` (docs/integration.md,
"Serving several adapters").

`adapter_batch` checks the names, then gives the outermost `OMoELinear` of every stack
the stack's adapters that the batch uses and each sample's index into them
(`sample_adapters`); that layer then runs `omoe_lora_mixed` (omoe_kernels/mixed.py). A
forward pre-hook and an instance-level `generate` on the model, put there by `inject`
and taken away with the last adapter, open it around one call.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator, Sequence

import torch
from torch import nn

from ..layer import OMoELinear
from ..mixed import group
from .stacks import adapter_stack, stack_tops

STATE_ATTR = "_omoe_inject_state"  # on the root module: adapters, active one, flags to restore
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in `adapter_names`
_OPEN = "_omoe_adapter_batches"  # on the root: the batches the pre-hook opened, innermost last
# The options a batch's adapters on one layer must share (scaling and dropout may differ).
_SHARED = ("num_experts", "rank", "top_k", "orthogonalize", "normalize", "eps")


def check_adapter_names(root: nn.Module, adapter_names) -> list[str]:
    """The names as a list; ValueError/TypeError for a bad one, naming what to pass."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError("`adapter_names` must be a list of adapter names, one per sample, "
                        f"got {type(adapter_names).__name__}")
    if not adapter_names:
        raise ValueError("`adapter_names` must name one adapter per sample, got an empty list")
    state = getattr(root, STATE_ATTR, None)
    known = list(state["adapters"]) if state else sorted(
        {m.adapter_name for m in root.modules() if isinstance(m, OMoELinear)})
    if not known:
        raise ValueError("`model` holds no OMoELinear layer: call omoe_kernels.inject first")
    unknown = sorted({str(n) for n in adapter_names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise ValueError(f"`adapter_names` holds {unknown}, which the model does not have: its "
                         f"adapters are {known}, and {BASE_ADAPTER!r} means no adapter")
    if root.training:
        raise ValueError("`adapter_names` (a batch of several adapters) is for inference: "
                         "call model.eval() first")
    if state is not None and not state.get("enabled", True):
        raise ValueError("the adapters of `model` are disabled (inside ok.disable_adapters, "
                         "or after ok.enable_adapters(model, False)): enable them, or pass "
                         f"{BASE_ADAPTER!r} for the samples that take no adapter")
    return list(adapter_names)


def _plan(top: OMoELinear, used: list[str], names: list[str]) -> tuple:
    """(the stack's layers the batch uses, the Grouping of each sample's index into them
    or -1), made once per batch for every call of the layer."""
    by_name = {m.adapter_name: m for m in adapter_stack(top)}
    layers = [by_name[n] for n in used if n in by_name]
    if top.track_router_stats or any(m.track_router_stats for m in layers):
        raise ValueError("router statistics are not recorded for a batch of several adapters: "
                         "turn them off (ok.track_router_stats(model, False))")
    for m in layers[1:]:
        for option in _SHARED:
            if getattr(m, option) != getattr(layers[0], option):
                raise ValueError(
                    f"adapters {layers[0].adapter_name!r} and {m.adapter_name!r} have "
                    f"different {option} ({getattr(layers[0], option)!r} and "
                    f"{getattr(m, option)!r}) on the same layer: a batch of several adapters "
                    "needs the same num_experts, rank and routing")
        if m.lora_A.dtype != layers[0].lora_A.dtype:
            raise ValueError(f"adapters {layers[0].adapter_name!r} and {m.adapter_name!r} have "
                             "parameters of different dtypes: a batch of several adapters "
                             "needs one dtype")
    position = {m.adapter_name: i for i, m in enumerate(layers)}
    device = layers[0].lora_A.device if layers else torch.device("cpu")
    index = torch.tensor([position.get(n, -1) for n in names], dtype=torch.int64, device=device)
    return tuple(layers), group(index, len(layers))


def open_batch(root: nn.Module, adapter_names) -> list[tuple[OMoELinear, tuple | None]]:
    """Sets the batch's plan on every stack; returns what to restore (`close_batch`)."""
    names = check_adapter_names(root, adapter_names)
    used = list(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
    tops = list(stack_tops(root).values())
    plans = [(top, _plan(top, used, names)) for top in tops]  # every check before any change
    saved = [(top, top.sample_adapters) for top in tops]
    for top, plan in plans:
        top.sample_adapters = plan
    return saved


def close_batch(saved) -> None:
    for top, plan in saved:
        top.sample_adapters = plan


@contextlib.contextmanager
def batch_context(root: nn.Module, adapter_names) -> Iterator[None]:
    saved = open_batch(root, adapter_names)
    try:
        yield
    finally:
        close_batch(saved)


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 1:
        return args[0].shape[0]
    return None


def _opened(module: nn.Module) -> list:
    """The root's stack of opened batches, an attribute (made by install_batch_hooks) that
    torch.compile traces as a list; a dict method on vars(module) it cannot trace."""
    opened = getattr(module, _OPEN, None)
    if opened is None:
        opened = []
        setattr(module, _OPEN, opened)
    return opened


def _adapter_names_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    names = kwargs.pop("adapter_names", None)
    opened = _opened(module)
    opened.append(None)  # first: the post-hook (always called, also after a raise) pops one
    if names is None:
        return args, kwargs
    batch = _batch_size(args, kwargs)
    if batch is not None and isinstance(names, (list, tuple)) and len(names) != batch:
        raise ValueError(f"`adapter_names` has {len(names)} names for a batch of {batch} "
                         "samples: give one name per sample")
    opened[-1] = open_batch(module, names)
    return args, kwargs


def _adapter_names_post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    opened = getattr(module, _OPEN, None)
    if opened:
        saved = opened.pop()
        if saved is not None:
            close_batch(saved)
    return output


def _generate(model: nn.Module, *args, adapter_names: Sequence[str] | None = None, **kwargs):
    """`model.generate` with `adapter_names` (one per sample) served in one batch."""
    generate = type(model).generate.__get__(model)
    if adapter_names is None:
        return generate(*args, **kwargs)
    batch = _batch_size(args, kwargs)
    if batch is not None and isinstance(adapter_names, (list, tuple)) \
            and len(adapter_names) != batch:
        raise ValueError(f"`adapter_names` has {len(adapter_names)} names for a batch of "
                         f"{batch} samples: give one name per sample")
    with batch_context(model, adapter_names):
        return generate(*args, **kwargs)


def install_batch_hooks(root: nn.Module) -> None:
    """Lets `root(..., adapter_names=...)` and `root.generate(..., adapter_names=...)` serve
    a batch of several adapters (idempotent)."""
    if _adapter_names_pre_hook not in root._forward_pre_hooks.values():
        root.register_forward_pre_hook(_adapter_names_pre_hook, with_kwargs=True)
        root.register_forward_hook(_adapter_names_post_hook, with_kwargs=True, always_call=True)
    _opened(root)
    if callable(getattr(type(root), "generate", None)) and "generate" not in vars(root):
        vars(root)["generate"] = functools.partial(_generate, root)


def remove_batch_hooks(root: nn.Module) -> None:
    """Undoes `install_batch_hooks`."""
    for hooks in (root._forward_pre_hooks, root._forward_hooks):
        for key in [k for k, h in hooks.items()
                    if h in (_adapter_names_pre_hook, _adapter_names_post_hook)]:
            del hooks[key]
            root._forward_hooks_with_kwargs.pop(key, None)
            root._forward_pre_hooks_with_kwargs.pop(key, None)
            root._forward_hooks_always_called.pop(key, None)
    generate = vars(root).get("generate")
    if isinstance(generate, functools.partial) and generate.func is _generate:
        del vars(root)["generate"]
    vars(root).pop(_OPEN, None)
