"""The adapters injected on one base layer form a stack of `OMoELinear`s, each wrapping
the next (`layer.base`), the base layer innermost."""
from __future__ import annotations

from torch import nn

from ..layer import OMoELinear


def adapter_stack(module: nn.Module) -> list[OMoELinear]:
    """The adapters stacked on one base layer, outermost first."""
    stack = []
    while isinstance(module, OMoELinear):
        stack.append(module)
        module = module.base
    return stack


def stack_tops(root: nn.Module, remove_duplicate: bool = True) -> dict[str, OMoELinear]:
    """Module name -> outermost OMoELinear of each stack (the name the target had)."""
    modules = dict(root.named_modules(remove_duplicate=remove_duplicate))
    tops = {}
    for name, module in modules.items():
        parent_name = name.rpartition(".")[0]
        parent = root.get_submodule(parent_name) if name else None
        if name and isinstance(module, OMoELinear) and not isinstance(parent, OMoELinear):
            tops[name] = module
    return tops
