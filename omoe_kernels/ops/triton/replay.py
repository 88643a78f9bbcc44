"""Launch plans recorded once per call signature and replayed without planning.

A forward or backward plan (launch.plan_forward / plan_backward) is a function of the
tensors' shapes, strides, dtypes and devices, the options, the `Target` and a few
switches: never of the tensors' data or addresses. So the op impls key a `PlanCache` on
all of those; a miss plans and runs the launches as usual, then `record` turns them into
a `Replay`:

- every buffer the plan allocated (`allocations`, fed by launch._empty) becomes a slot
  allocated again at each replay (by `_empty` while the tests' NaN poison is on);
- every tensor a launch takes or the op returns is an input, a buffer, a view of either
  (rebuilt with `as_strided` from its recorded sizes, strides and offset), or an empty
  tensor; anything else leaves the call unrecorded (it still ran correctly);
- every other argument, the grid (resolved from the constexprs) and the keyword
  arguments, with an autotuned launch's chosen config, are kept as they were.

A hit then allocates, rebuilds the views and launches: no plan, no config choice, no
grid arithmetic, no argument checks (the key passed them when it was recorded).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

_LOCAL = threading.local()   # .log: the list `allocations` fills, while one is open


class allocations:
    """Collects, in this thread, every buffer launch._empty allocates inside the block."""

    def __enter__(self) -> list:
        self.outer = getattr(_LOCAL, "log", None)
        _LOCAL.log = []
        return _LOCAL.log

    def __exit__(self, *exc) -> None:
        _LOCAL.log = self.outer


def allocated(t: torch.Tensor) -> torch.Tensor:
    """launch._empty's hook: logs `t` when an `allocations` block is open."""
    log = getattr(_LOCAL, "log", None)
    if log is not None:
        log.append(t)
    return t


# How a replay makes a tensor slot (after the input slots).
_BUFFER, _VIEW, _EMPTY = 0, 1, 2


@dataclass(frozen=True, eq=False)   # compared and hashed by identity: a key of its own
class Replay:
    """A recorded call: `make` builds the tensor slots after the inputs, `launches` holds
    (kernel, grid, argument list with None at tensor positions, [(position, slot)],
    keyword arguments), `outputs` the slots returned."""

    make: tuple
    launches: tuple
    outputs: tuple

    def run(self, inputs: tuple, alloc: Optional[Callable] = None) -> tuple:
        """The outputs of the recorded call on `inputs`; buffers from alloc(shape,
        device, dtype), or torch.empty when None."""
        slots = list(inputs)
        empty = torch.empty
        for kind, a, b, c, d in self.make:
            if kind == _BUFFER:                            # shape, device, dtype
                slots.append(empty(a, device=b, dtype=c) if alloc is None else alloc(a, b, c))
            elif kind == _VIEW:
                t = slots[a]
                slots.append(t.as_strided(b, c, t.storage_offset() + d))
            else:
                slots.append(torch.empty(a, device=b, dtype=c))
        for kernel, grid, template, tensors, kwargs in self.launches:
            args = template.copy()
            for position, slot in tensors:
                args[position] = slots[slot]
            kernel.run(*args, grid=grid, warmup=False, **kwargs)   # what kernel[grid] calls
        return tuple(slots[i] for i in self.outputs)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def record(launches, inputs: tuple, buffers: list, outputs: tuple,
           chosen: Callable) -> Optional[Replay]:
    """The Replay of `launches` (launch.Launch records that have just run) on `inputs`,
    which allocated `buffers` and returned `outputs`; None if a tensor is none of an
    input, a buffer, a view of one or an empty tensor, or an autotuned launch has no
    chosen config. chosen(launch): the config an autotuned launch ran with."""
    slots: list = list(inputs)
    make: list = []
    for t in buffers:
        make.append((_BUFFER, tuple(t.shape), t.device, t.dtype, None))
        slots.append(t)
    owners = {}          # storage -> slot of the input or buffer it belongs to (None: several)
    for i, t in enumerate(slots):
        if t is not None and t.numel() > 0:
            ptr = _storage(t)
            owners[ptr] = None if ptr in owners and owners[ptr] != i else i

    def slot_of(t: torch.Tensor) -> Optional[int]:
        for i, s in enumerate(slots):
            if s is t:
                return i
        if t.numel() == 0:
            make.append((_EMPTY, tuple(t.shape), t.device, t.dtype, None))
        else:
            owner = owners.get(_storage(t))
            if owner is None or slots[owner].dtype != t.dtype:
                return None
            offset = t.storage_offset() - slots[owner].storage_offset()
            make.append((_VIEW, owner, tuple(t.shape), t.stride(), offset))
        slots.append(t)
        return len(slots) - 1

    recorded = []
    for launch in launches:
        template, tensors = list(launch.args), []
        for position, a in enumerate(launch.args):
            if isinstance(a, torch.Tensor):
                slot = slot_of(a)
                if slot is None:
                    return None
                template[position] = None
                tensors.append((position, slot))
        if launch.tuned:
            config = chosen(launch)
            if config is None:
                return None
            kwargs = {**launch.meta, **config.all_kwargs()}
        else:
            kwargs = {**launch.meta, **launch.options}
        grid = launch.grid(kwargs) if callable(launch.grid) else launch.grid
        recorded.append((launch.kernel, tuple(grid), template, tuple(tensors), kwargs))
    out = []
    for t in outputs:
        slot = slot_of(t)
        if slot is None:
            return None
        out.append(slot)
    return Replay(tuple(make), tuple(recorded), tuple(out))


_CACHES: list = []


class PlanCache:
    """Replays by key, at most `size` (cleared when full: a model calls with a few keys)."""

    def __init__(self, size: int = 256):
        self.size = size
        self.replays: dict = {}
        _CACHES.append(self)

    def __contains__(self, key) -> bool:
        return key in self.replays

    def get(self, key) -> Optional[Replay]:
        return self.replays.get(key)

    def put(self, key, replay: Optional[Replay]) -> None:
        if replay is None:
            return
        if len(self.replays) >= self.size:
            self.replays.clear()
        self.replays[key] = replay

    def clear(self) -> None:
        self.replays.clear()


def clear_all() -> None:
    """Forget every replay (tuned.clear: they hold the autotuner's choices)."""
    for cache in _CACHES:
        cache.clear()


def tensor_key(t: Optional[torch.Tensor]):
    """What a plan reads of a tensor: sizes, strides, dtype and device."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)
