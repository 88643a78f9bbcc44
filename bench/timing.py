"""Timing: medians of CPU wall time (providers interleaved) and of CUDA events (do_bench)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _free_grads(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


@dataclass
class TimerOptions:
    cpu_warmup_calls: int = 3
    cpu_warmup_s: float = 0.5     # per provider, and at least cpu_warmup_calls
    cpu_min_reps: int = 7         # rounds (one call of every provider each)
    cpu_max_reps: int = 60
    cpu_budget_s: float = 10.0    # per pass (forward, fwd+bwd): bounds the whole run
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100


def _warm_up(step: Callable[[], object], leaves: list[torch.Tensor], opt: TimerOptions) -> None:
    start, calls = time.perf_counter(), 0
    while calls < opt.cpu_warmup_calls or (time.perf_counter() - start < opt.cpu_warmup_s and calls < 20):
        _free_grads(leaves)
        step()
        calls += 1
    _free_grads(leaves)


def median_ms_cpu(step: Callable[[], object], leaves: list[torch.Tensor], opt: TimerOptions) -> tuple[float, int]:
    """Median wall time of `step` (ms) and the number of timed calls; grads freed before each."""
    result = median_ms_cpu_interleaved({"step": (step, leaves)}, opt)["step"]
    if isinstance(result, BaseException):
        raise result
    return result[0], result[1]


def median_ms_cpu_interleaved(steps: dict[str, tuple[Callable[[], object], list[torch.Tensor]]],
                              opt: TimerOptions) -> dict[str, tuple[float, int, float] | BaseException]:
    """(median ms, calls, minimum ms) per step. Times several steps in rounds (one call of each per round, the order rotating), so a
    busy machine slows every provider alike and the ratios of one run stay comparable.

    Each step is warmed up first; rounds continue until `cpu_min_reps` are done and the
    pass has used `cpu_budget_s`, or `cpu_max_reps` rounds. Gradients are set to None
    before every call (outside the timed region). A step that raises is dropped and its
    exception returned in its place.
    """
    results: dict[str, tuple[float, int, float] | BaseException] = {}
    live = {}
    for name, (step, leaves) in steps.items():
        try:
            _warm_up(step, leaves, opt)
            live[name] = (step, leaves)
        except Exception as exc:  # noqa: BLE001  (reported by the caller)
            _free_grads(leaves)
            results[name] = exc
    times: dict[str, list[float]] = {name: [] for name in live}
    start, rounds = time.perf_counter(), 0
    while live and rounds < opt.cpu_max_reps and (
            rounds < opt.cpu_min_reps or time.perf_counter() - start < opt.cpu_budget_s):
        names = list(live)
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            step, leaves = live[name]
            _free_grads(leaves)
            try:
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001
                results[name] = exc
                del live[name]
            _free_grads(leaves)
        rounds += 1
    for name in live:
        results[name] = (1e3 * statistics.median(times[name]), len(times[name]), 1e3 * min(times[name]))
    return results


def median_ms_cuda(step: Callable[[], object], leaves: list[torch.Tensor], opt: TimerOptions) -> tuple[float, int | None]:
    """triton.testing.do_bench: warm-up, L2 flush, CUDA events, median, grad_to_none."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        ms = do_bench(step, warmup=opt.gpu_warmup_ms, rep=opt.gpu_rep_ms, grad_to_none=leaves,
                      return_mode="median")
        _free_grads(leaves)
        return float(ms), None  # do_bench picks the count itself
    # Without Triton: the same idea with CUDA events (no L2 flush).
    for _ in range(3):
        _free_grads(leaves)
        step()
    torch.cuda.synchronize()
    times = []
    deadline = time.perf_counter() + opt.gpu_rep_ms / 1e3
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
        _free_grads(leaves)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        step()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    _free_grads(leaves)
    return statistics.median(times), len(times)
