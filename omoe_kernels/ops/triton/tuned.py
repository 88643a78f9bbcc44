"""Launch records, and autotuned launches without autotuner work on the hot path.

`triton.autotune` rebuilds its key from every argument on every call (a dict of about 50
arguments, a pass over them for dtypes) before it launches. Here the config it picked is
kept per launch signature (the wrapper, every integer argument, the constexprs and the
tensors' dtypes: finer than the autotuner's own key, so a hit is always right), and later
launches with that signature go straight to the kernel with it. The first launch of a
signature goes through the autotuner, which benchmarks only when its own key is new.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import configs as C
from . import replay

_CHOSEN: dict = {}   # signature -> the triton.Config the autotuner picked
_AUTOTUNED: dict = {}


def _autotuned(name: str):
    """Autotuned wrappers of the GEMM kernels (GPU only), built on first use."""
    if name not in _AUTOTUNED:
        import triton

        from . import gemm_kernels as K

        kernel = {"matmul": K.matmul_kernel, "shrink": K.shrink_kernel}[name]
        key = C.MATMUL_AUTOTUNE_KEY if name == "matmul" else C.SHRINK_AUTOTUNE_KEY
        _AUTOTUNED[name] = triton.autotune(C.autotuned_configs(name), key=key)(kernel)
    return _AUTOTUNED[name]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `kernel[grid](*args, **meta, **options)`. args are the runtime
    arguments in the kernel's order, meta its constexprs; grid a tuple, or a function of
    the constexprs (needed where the autotuner picks BLOCK_M). tuned: the name of the
    autotuned wrapper to launch instead, which picks the tile constexprs and options
    itself (meta then holds only the flags). config: the configs.py record the launch
    was sized from."""

    kernel: object
    args: tuple
    meta: dict
    options: dict
    grid: object
    config: object = None
    tuned: Optional[str] = None

    def run(self) -> None:
        run_launch(self, _autotuned)   # autotuned: the config chosen once per signature

    def arg(self, name: str):
        """The value of the kernel's runtime argument `name`."""
        names = [p.name for p in self.kernel.params if not p.is_constexpr]
        return self.args[names.index(name)]


def _signature(launch) -> tuple:
    ints = tuple(a for a in launch.args if type(a) is int)
    dtypes = tuple(a.dtype for a in launch.args if isinstance(a, torch.Tensor))
    return (launch.tuned, ints, dtypes, tuple(launch.meta.items()))


def chosen(launch):
    """The config chosen for an autotuned launch's signature, or None before its first run."""
    return _CHOSEN.get(_signature(launch))


def run_launch(launch, autotuned) -> None:
    """Runs `launch`: with its own config, or (a launch with a `tuned` wrapper name) with
    the config chosen for its signature, through `autotuned(name)` the first time."""
    if not launch.tuned:
        launch.kernel[launch.grid](*launch.args, **launch.meta, **launch.options)
        return
    key = _signature(launch)
    config = _CHOSEN.get(key)
    if config is None:
        wrapper = autotuned(launch.tuned)
        wrapper[launch.grid](*launch.args, **launch.meta)
        _CHOSEN[key] = wrapper.best_config
        return
    launch.kernel[launch.grid](*launch.args, **launch.meta, **config.all_kwargs())


def clear() -> None:
    """Forget every choice (tests; a new device), and so every replay recorded with one."""
    _CHOSEN.clear()
    replay.clear_all()
