"""Peak extra memory of one call (CUDA allocator statistics, or the CPU profiler's events)."""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from typing import Callable

import torch

from .timing import _free_grads


@contextlib.contextmanager
def _quiet_native_stderr():
    """Hides what native code (the profiler) writes to fd 2; replays it if the body raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_extra_mib(step: Callable[[], object], leaves: list[torch.Tensor], device: torch.device) -> float:
    """Peak memory allocated by one call of `step` beyond what was allocated before it (MiB).

    The step's result (a forward's output and autograd graph) stays alive until the end, and
    parameter gradients start as None, so a backward counts the gradients it writes.
    CUDA: the caching allocator's max_memory_allocated minus the baseline. CPU: the running
    sum of the allocations and frees that the profiler records from PyTorch's CPU allocator
    (every tensor; not malloc calls that bypass it, e.g. std::vector inside a kernel).
    """
    _free_grads(leaves)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
        del result
    else:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = step()
        del result
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for e in events:
            live += e.nbytes()  # negative for a free
            peak = max(peak, live)
    _free_grads(leaves)
    return peak / 2**20


def _release(device: torch.device) -> None:
    """Frees what the last measurement left (Python garbage, the CUDA allocator's cache)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
