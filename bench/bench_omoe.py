"""SPEC §6 benchmark: every backend against the eager reference, its torch.compile, and a
plain LoRA of rank E·r, forward and forward+backward, time and peak memory.

    python -m bench.bench_omoe                       # the machine's default shapes (make bench)
    python -m bench.bench_omoe --quick               # small smoke run
    python -m bench.bench_omoe --shapes wide --providers triton,lora

CPU: the `cpu` shape; CUDA: `llama7b`, `llama7b-top2`, `wide`. Writes
bench/results/<device>.md, .json and .png (see bench/NOTES.md for the method and floors).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

# The profiler (CPU peak memory) otherwise logs a GPU probe failure on CUDA builds.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import torch  # noqa: E402

import omoe_kernels as ok  # noqa: E402
from omoe_kernels._validate import check_inputs  # noqa: E402
from omoe_kernels.reference import omoe_lora_reference  # noqa: E402

from .shapes import DEFAULT_SHAPES, DTYPES, QUICK_SHAPES, SHAPES, Shape, cost  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCALING = 2.0  # alpha / r with alpha = 2r, a common LoRA setting
# SPEC §2, "random" rows: (forward, every gradient) relative error against float64.
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, 2e-2),
             torch.float16: (3e-3, 1e-2), torch.float64: (1e-10, 1e-9)}
# Issue 2's exit criteria at the `cpu` shape, forward+backward.
MIN_SPEEDUP_VS_REFERENCE = 5.0
MAX_RATIO_VS_LORA = 1.5

BASELINES = ("reference", "ref-compile", "lora")
LABELS = {"reference": "reference (eager)", "ref-compile": "torch.compile(reference)",
          "lora": "plain LoRA, rank E·r"}


# ----------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """One training step's tensors. Every tensor that has a gradient in a layer requires one."""

    x: torch.Tensor             # [T, d_in], requires grad (a mid-network layer)
    A: torch.Tensor             # [E, r, d_in]
    B: torch.Tensor             # [E, d_out, r]
    router_weight: torch.Tensor  # [E, d_in]
    base_out: torch.Tensor      # [T, d_out]
    grad_y: torch.Tensor        # [T, d_out], the incoming gradient
    A_cat: torch.Tensor         # [E·r, d_in], the plain LoRA's own leaves
    B_cat: torch.Tensor         # [d_out, E·r]

    def omoe_leaves(self) -> list[torch.Tensor]:
        return [self.x, self.A, self.B, self.router_weight, self.base_out]

    def lora_leaves(self) -> list[torch.Tensor]:
        return [self.x, self.A_cat, self.B_cat, self.base_out]


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random inputs in the well-conditioned regime (SPEC §2 "random", κ < 10)."""
    T, d, E, r = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    x = randn(T, d)
    A = randn(E, r, d, scale=d ** -0.5)
    B = randn(E, d, r, scale=r ** -0.5)
    router_weight = randn(E, d, scale=d ** -0.5)
    base_out = randn(T, d)
    grad_y = randn(T, d)
    A_cat = A.reshape(E * r, d).clone()
    B_cat = B.permute(1, 0, 2).reshape(d, E * r).contiguous()
    for t in (x, A, B, router_weight, base_out, A_cat, B_cat):
        t.requires_grad_(True)
    return Inputs(x, A, B, router_weight, base_out, grad_y, A_cat, B_cat)


def _free_grads(tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


# -------------------------------------------------------------------------- providers

@dataclass
class Provider:
    """A way to compute the layer. `build` returns the forward closure (called with no args)."""

    name: str
    label: str
    build: Callable[[Shape, Inputs], Callable[[], torch.Tensor]]
    leaves: Callable[[Inputs], list[torch.Tensor]]
    same_function: bool = True  # computes SPEC §1 (so it is checked against float64)


def _omoe_call(backend: str) -> Callable[[Shape, Inputs], Callable[[], torch.Tensor]]:
    def build(shape: Shape, inp: Inputs) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            return ok.omoe_lora(inp.x, inp.A, inp.B, inp.router_weight, scaling=SCALING,
                                top_k=shape.top_k, base_out=inp.base_out, backend=backend)
        return forward
    return build


def _compiled_reference(shape: Shape, inp: Inputs) -> Callable[[], torch.Tensor]:
    problem = check_inputs(
        inp.x, inp.A, inp.B, inp.router_weight, scaling=SCALING, top_k=shape.top_k,
        orthogonalize=True, normalize=True, eps=1e-6, base_out=inp.base_out, router_input=None)

    def reference(x, A, B, router_weight, base_out):
        return omoe_lora_reference(x, A, B, router_weight, None, base_out, problem)

    torch._dynamo.reset()  # a fresh cache per shape: no recompile limits, no stale guards
    compiled = torch.compile(reference, dynamic=False)

    def forward() -> torch.Tensor:
        return compiled(inp.x, inp.A, inp.B, inp.router_weight, inp.base_out)
    return forward


def _plain_lora(shape: Shape, inp: Inputs) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        return inp.base_out + SCALING * (inp.x @ inp.A_cat.t()) @ inp.B_cat.t()
    return forward


def providers_for(device: torch.device, wanted: list[str] | None) -> list[Provider]:
    """Every backend of the device (the interpreted Triton on CPU only when asked for), then
    the baselines; `wanted` (provider names) filters and orders."""
    backends = [b for b in ok.available_backends(device) if b != "reference"]
    if device.type == "cpu" and "triton" in backends and not (wanted and "triton" in wanted):
        backends.remove("triton")  # TRITON_INTERPRET is a correctness tool, far too slow here
    every = [Provider(b, b, _omoe_call(b), Inputs.omoe_leaves) for b in backends]
    every += [
        Provider("reference", LABELS["reference"], _omoe_call("reference"), Inputs.omoe_leaves),
        Provider("ref-compile", LABELS["ref-compile"], _compiled_reference, Inputs.omoe_leaves),
        Provider("lora", LABELS["lora"], _plain_lora, Inputs.lora_leaves, same_function=False),
    ]
    if not wanted:
        return every
    by_name = {p.name: p for p in every}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise SystemExit(f"unknown or unavailable provider(s) {unknown} on {device.type}; "
                         f"available: {list(by_name)}")
    return [by_name[w] for w in wanted]


# ---------------------------------------------------------------------------- timing

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


# ---------------------------------------------------------------------------- memory

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


# ----------------------------------------------------------------------------- checks

def rel_err(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.detach().double(), expected.detach().double()
    return ((value - expected).norm() / expected.norm().clamp_min(1e-300)).item()


@dataclass
class Expected:
    """SPEC §1 evaluated in float64 on float64 copies of the inputs."""

    y: torch.Tensor
    grads: dict[str, torch.Tensor]


GRAD_NAMES = ("x", "A", "B", "router_weight", "base_out")


def float64_reference(shape: Shape, inp: Inputs, max_elements: int = 2**27) -> Expected:
    """The reference in float64, over chunks of tokens so that its T × E × d_out tensors
    (and the MGS intermediates autograd keeps) stay bounded at the GPU shapes. Tokens are
    independent; the weight gradients are sums over tokens, accumulated across chunks."""
    T = shape.num_tokens
    chunk = max(1, min(T, max_elements // (shape.num_experts * shape.d_model)))
    x, A, B, W, base = (t.detach().double() for t in inp.omoe_leaves())
    weights = [t.requires_grad_(True) for t in (A, B, W)]
    ys, grad_xs, grad_bases = [], [], []
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        x_part = x[rows].clone().requires_grad_(True)
        base_part = base[rows].clone().requires_grad_(True)
        y = ok.omoe_lora(x_part, *weights, scaling=SCALING, top_k=shape.top_k, base_out=base_part,
                         backend="reference")
        y.backward(inp.grad_y[rows].double())
        ys.append(y.detach())
        grad_xs.append(x_part.grad)
        grad_bases.append(base_part.grad)
        del y
    grads = {"x": torch.cat(grad_xs), "A": A.grad, "B": B.grad, "router_weight": W.grad,
             "base_out": torch.cat(grad_bases)}
    return Expected(torch.cat(ys), grads)


def check_against(forward: Callable[[], torch.Tensor], inp: Inputs, expected: Expected) -> tuple[float, float, str]:
    """(forward rel err, worst gradient rel err, name of that gradient) after one training step."""
    leaves = inp.omoe_leaves()
    _free_grads(leaves)
    y = forward()
    y.backward(inp.grad_y)
    err_y = rel_err(y, expected.y)
    grad_errs = {n: (rel_err(t.grad, expected.grads[n]) if t.grad is not None else math.inf)
                 for n, t in zip(GRAD_NAMES, leaves)}
    _free_grads(leaves)
    worst = max(grad_errs, key=grad_errs.get)
    return err_y, grad_errs[worst], worst


# ---------------------------------------------------------------------------- the run

@dataclass
class Record:
    shape: str
    provider: str
    label: str
    err_forward: float | None = None
    err_grad: float | None = None
    err_grad_name: str | None = None
    check_ok: bool | None = None
    forward_ms: float | None = None
    train_ms: float | None = None        # forward + backward
    forward_reps: int | None = None
    train_reps: int | None = None
    forward_min_ms: float | None = None  # CPU: the fastest timed call (least disturbed)
    train_min_ms: float | None = None
    forward_peak_mib: float | None = None
    train_peak_mib: float | None = None
    error: str | None = None             # what failed, if anything


@dataclass
class Ceilings:
    matmul_flops: float          # FLOP/s of a large matmul in the benchmark dtype
    copy_bytes_per_s: float      # read + write bytes per second of a large copy
    how: str


@dataclass
class Run:
    device: torch.device
    device_name: str
    slug: str
    meta: dict
    ceilings: dict[str, Ceilings] = field(default_factory=dict)  # by dtype name
    shapes: dict[str, dict] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def measure_ceilings(device: torch.device, dtype: torch.dtype, opt: TimerOptions) -> Ceilings:
    """This machine's matmul FLOP/s and copy bandwidth, for the roofline floors."""
    if device.type == "cuda":
        n, copy_elems = 8192, 2**29 // torch.tensor([], dtype=dtype).element_size()
    else:
        n, copy_elems = 2048, 2**25
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    src = torch.randn(copy_elems, device=device).to(dtype)
    dst = torch.empty_like(src)
    timer = median_ms_cuda if device.type == "cuda" else median_ms_cpu
    quick = TimerOptions(cpu_warmup_calls=1, cpu_warmup_s=0.0, cpu_min_reps=3, cpu_max_reps=5,
                         cpu_budget_s=0.5, gpu_warmup_ms=opt.gpu_warmup_ms, gpu_rep_ms=opt.gpu_rep_ms)
    mm_ms, _ = timer(lambda: torch.mm(a, b), [], quick)
    copy_ms, _ = timer(lambda: dst.copy_(src), [], quick)
    copy_bytes = 2 * src.numel() * src.element_size()
    how = (f"median of torch.mm {n}x{n}x{n} and a {copy_bytes / 2 / 2**20:.0f} MiB copy, "
           f"{dtype}".replace("torch.", ""))
    return Ceilings(2 * n**3 / (mm_ms / 1e3), copy_bytes / (copy_ms / 1e3), how)


def run_shape(run: Run, shape: Shape, dtype: torch.dtype, providers: list[Provider],
              check: bool, memory: bool, opt: TimerOptions, progress) -> None:
    device = run.device
    dtype_name = str(dtype).replace("torch.", "")
    progress.stage(f"{shape.name}: ceilings")
    if dtype_name not in run.ceilings:
        run.ceilings[dtype_name] = measure_ceilings(device, dtype, opt)
    ceil = run.ceilings[dtype_name]
    costs = {"forward": cost(shape, False), "train": cost(shape, True)}
    run.shapes[shape.name] = {
        "shape": asdict(shape) | {"dtype": dtype_name}, "describe": shape.describe().replace(shape.dtype, dtype_name),
        "cost": {k: asdict(c) for k, c in costs.items()},
        "floor_ms": {k: c.floor_ms(ceil.matmul_flops, ceil.copy_bytes_per_s) for k, c in costs.items()},
    }

    inp = make_inputs(shape, device, dtype)
    records = {p.name: Record(shape.name, p.name, p.label) for p in providers}
    forwards: dict[str, Callable[[], torch.Tensor]] = {}
    for p in providers:
        try:
            forwards[p.name] = p.build(shape, inp)
        except Exception as exc:  # noqa: BLE001  (recorded in the table)
            records[p.name].error = "build: " + _short_error(exc)

    if check:
        progress.stage(f"{shape.name}: float64 reference")
        try:
            expected = float64_reference(shape, inp)
        except Exception as exc:  # noqa: BLE001  (e.g. out of memory: time without the check)
            expected = None
            progress.note(f"  {shape.name}: no correctness check, the float64 reference failed: "
                          + _short_error(exc))
            _release(device)
        tol_y, tol_g = TOLERANCE[dtype]
        for p in providers:
            progress.stage(f"{shape.name}: check {p.name}")
            rec = records[p.name]
            if expected is None or not p.same_function or p.name not in forwards or rec.error:
                continue
            try:
                rec.err_forward, rec.err_grad, rec.err_grad_name = check_against(forwards[p.name], inp, expected)
                rec.check_ok = rec.err_forward <= tol_y and rec.err_grad <= tol_g
            except Exception as exc:  # noqa: BLE001
                rec.error = "check: " + _short_error(exc)
            progress.note(f"  {shape.name:13s} {p.name:12s} " + (
                f"rel err forward {rec.err_forward:.2e}, worst grad {rec.err_grad:.2e} "
                f"({rec.err_grad_name}) {'ok' if rec.check_ok else 'FAIL: beyond SPEC §2'}"
                if rec.error is None else rec.error))
        del expected
        _release(device)

    steps: dict[str, dict[str, tuple[Callable[[], object], list[torch.Tensor]]]] = {"forward": {}, "train": {}}
    kept: dict[str, dict[str, Callable[[], object]]] = {"forward": {}, "train": {}}
    for p in providers:
        if records[p.name].error is not None:
            continue
        forward, leaves = forwards[p.name], p.leaves(inp)

        def train_step(forward=forward):
            y = forward()
            y.backward(inp.grad_y)
            return y  # the memory measurement keeps it alive to the end

        steps["forward"][p.name] = (forward, leaves)
        steps["train"][p.name] = (train_step, leaves)
        kept["forward"][p.name] = forward
        kept["train"][p.name] = train_step

    for pass_name, label in (("forward", "forward"), ("train", "fwd+bwd")):
        if device.type == "cuda":
            results = {}
            for p in providers:
                progress.stage(f"{shape.name}: {p.name} {label} time")
                if p.name not in steps[pass_name] or records[p.name].error is not None:
                    continue
                step, leaves = steps[pass_name][p.name]
                try:
                    results[p.name] = median_ms_cuda(step, leaves, opt)
                except Exception as exc:  # noqa: BLE001
                    results[p.name] = exc
                    _free_grads(leaves)
                    _release(device)
        else:
            progress.stage(f"{shape.name}: {label} time, providers interleaved")
            live = {n: v for n, v in steps[pass_name].items() if records[n].error is None}
            results = median_ms_cpu_interleaved(live, opt)
        for name, result in results.items():
            rec = records[name]
            if isinstance(result, BaseException):
                rec.error = f"{label} time: " + _short_error(result)
            elif pass_name == "forward":
                rec.forward_ms, rec.forward_reps = result[:2]
                rec.forward_min_ms = result[2] if len(result) > 2 else None
            else:
                rec.train_ms, rec.train_reps = result[:2]
                rec.train_min_ms = result[2] if len(result) > 2 else None

    if memory:
        for p in providers:
            rec = records[p.name]
            for pass_name, label in (("forward", "forward"), ("train", "fwd+bwd")):
                progress.stage(f"{shape.name}: {p.name} {label} memory")
                if p.name not in kept[pass_name] or rec.error is not None:
                    continue
                try:
                    peak = peak_extra_mib(kept[pass_name][p.name], p.leaves(inp), device)
                except Exception as exc:  # noqa: BLE001
                    rec.error = f"{label} memory: " + _short_error(exc)
                    _free_grads(p.leaves(inp))
                    _release(device)
                    continue
                if pass_name == "forward":
                    rec.forward_peak_mib = peak
                else:
                    rec.train_peak_mib = peak
    del steps, kept
    run.records.extend(records.values())
    del inp, forwards
    _release(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- reporting

def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def shape_table(run: Run, shape_name: str) -> str:
    recs = [r for r in run.records if r.shape == shape_name]
    by = {r.provider: r for r in recs}
    ref, lora = by.get("reference"), by.get("lora")
    floor = run.shapes[shape_name]["floor_ms"]
    with_min = any(r.train_min_ms is not None for r in recs)
    head = ("| provider | rel err fwd / grad | fwd ms | fwd+bwd ms | vs reference fwd / fwd+bwd "
            "| ÷ plain LoRA fwd / fwd+bwd | × floor fwd+bwd | peak MiB fwd / fwd+bwd |"
            + (" min ms fwd / fwd+bwd |" if with_min else ""))
    lines = [head, "|" + "---|" * (9 if with_min else 8)]
    for r in recs:
        if r.error is not None and r.train_ms is None:
            lines.append(f"| {r.label} | error: {r.error.replace('|', '/')} | | | | | | |" + (" |" if with_min else ""))
            continue
        if r.err_forward is not None:
            check = f"{r.err_forward:.1e} / {r.err_grad:.1e}" + ("" if r.check_ok else " **FAIL**")
        else:
            check = "n/a" if r.provider == "lora" else "not checked"
        speed_f = _ratio(ref.forward_ms, r.forward_ms) if ref else None
        speed_t = _ratio(ref.train_ms, r.train_ms) if ref else None
        lora_f = _ratio(r.forward_ms, lora.forward_ms) if lora else None
        lora_t = _ratio(r.train_ms, lora.train_ms) if lora else None
        lines.append(
            f"| {r.label} | {check} | {_fmt(r.forward_ms, '.3f')} | {_fmt(r.train_ms, '.3f')} "
            f"| {_fmt(speed_f, '.2f', '×')} / {_fmt(speed_t, '.2f', '×')} "
            f"| {_fmt(lora_f, '.2f', '×')} / {_fmt(lora_t, '.2f', '×')} "
            f"| {_fmt(_ratio(r.train_ms, floor['train']), '.1f', '×')} "
            f"| {_fmt(r.forward_peak_mib, '.1f')} / {_fmt(r.train_peak_mib, '.1f')} |"
            + (f" {_fmt(r.forward_min_ms, '.3f')} / {_fmt(r.train_min_ms, '.3f')} |" if with_min else "")
            + (f" error: {r.error}" if r.error else ""))
    return "\n".join(lines)


def criteria(run: Run) -> list[tuple[str, float | None, bool | None]]:
    """Issue 2's exit criteria (the `cpu` shape, forward+backward, this run's medians; on
    CPU also the same ratios of the minimums, which a busy machine disturbs less)."""
    by = {r.provider: r for r in run.records if r.shape == "cpu"}
    fused = by.get("cpu")
    if fused is None or "cpu" not in run.shapes:
        return []
    out = []
    ref, lora = by.get("reference"), by.get("lora")
    for attr, what in (("train_ms", "medians"), ("train_min_ms", "minimums")):
        if getattr(fused, attr) is None and attr == "train_min_ms":
            continue
        speedup = _ratio(getattr(ref, attr), getattr(fused, attr)) if ref else None
        ratio = _ratio(getattr(fused, attr), getattr(lora, attr)) if lora else None
        out.append((f"cpu backend speedup over the reference, fwd+bwd {what} (target ≥ "
                    f"{MIN_SPEEDUP_VS_REFERENCE:g}×)",
                    speedup, None if speedup is None else speedup >= MIN_SPEEDUP_VS_REFERENCE))
        out.append((f"cpu backend time ÷ plain LoRA time, fwd+bwd {what} (target ≤ {MAX_RATIO_VS_LORA:g}×)",
                    ratio, None if ratio is None else ratio <= MAX_RATIO_VS_LORA))
    return out


def criteria_lines(run: Run) -> list[str]:
    lines = []
    for text, value, passed in criteria(run):
        verdict = "—" if passed is None else ("PASS" if passed else "MISS")
        lines.append(f"- {verdict}: {text}: {_fmt(value, '.2f', '×')}")
    return lines


def markdown(run: Run) -> str:
    m = run.meta
    out = [f"# omoe_kernels benchmark: {run.device_name}", ""]
    out += [f"- device: {run.device_name} ({m['device_type']}"
            + (f", {m['threads']} thread{'s' if m['threads'] != 1 else ''}" if m["device_type"] == "cpu" else "") + ")",
            f"- date: {m['date']}; torch {m['torch']}; triton {m['triton']}; python {m['python']}; "
            f"git {m['git']}",
            f"- command: `{m['command']}`",
            f"- other processes kept {m['other_processes_cores']} of {m['cores']} cores busy on "
            f"average during the run (/proc/stat minus this process); load average (1 min) "
            f"{m['load_average_start']} at the start, {m['load_average_end']} at the end"
            + (" — **the machine was busy: times are inflated and noisy**"
               if m["device_type"] == "cpu" and (m["other_processes_cores"] or 0)
               > max(0.25, (m["cores"] or 1) - m["threads"]) else ""),
            f"- timing: {m['timing']}",
            f"- peak memory: {m['memory']}",
            "- rel err: relative Frobenius error of this provider's output / worst gradient "
            "(x, A, B, router_weight, base_out) against SPEC §1 in float64, one step, same inputs",
            "- × floor: fwd+bwd median over the roofline floor from this run's measured ceilings "
            "(bench/shapes.py cost model)"]
    for dtype_name, c in run.ceilings.items():
        out.append(f"- ceilings ({dtype_name}): matmul {c.matmul_flops / 1e9:,.0f} GFLOP/s, "
                   f"copy {c.copy_bytes_per_s / 1e9:,.1f} GB/s ({c.how})")
    for name, info in run.shapes.items():
        c, f = info["cost"], info["floor_ms"]
        out += ["", f"## {name}: {info['describe']}", "",
                f"Model cost: forward {c['forward']['flops'] / 1e9:.2f} GFLOP, "
                f"{c['forward']['bytes'] / 1e6:.1f} MB → floor {f['forward']:.3f} ms; "
                f"fwd+bwd {c['train']['flops'] / 1e9:.2f} GFLOP, {c['train']['bytes'] / 1e6:.1f} MB "
                f"→ floor {f['train']:.3f} ms.", "", shape_table(run, name)]
    lines = criteria_lines(run)
    if lines:
        out += ["", "## Exit criteria of issue 2 (cpu shape, fp32, fwd+bwd, this run)", ""] + lines
    return "\n".join(out) + "\n"


def chart(run: Run, path: Path) -> str | None:
    """Grouped bars per shape (forward, forward+backward), log scale. None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: {exc}"
    names = list(run.shapes)
    fig, axes = plt.subplots(1, len(names), figsize=(max(6.0, 5.5 * len(names)), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        recs = [r for r in run.records if r.shape == name]
        xs = range(len(recs))
        width = 0.38
        for offset, attr, label in ((-width / 2, "forward_ms", "forward"), (width / 2, "train_ms", "fwd+bwd")):
            vals = [getattr(r, attr) or float("nan") for r in recs]
            bars = ax.bar([x + offset for x in xs], vals, width, label=label)
            for bar, v in zip(bars, vals):
                if math.isfinite(v):
                    ax.annotate(f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                                va="bottom", fontsize=7)
        floor = run.shapes[name]["floor_ms"]["train"]
        ax.axhline(floor, color="gray", linestyle=":", linewidth=1, label="fwd+bwd floor")
        ax.set_yscale("log")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.provider for r in recs], rotation=20)
        ax.set_ylabel("median ms (log)")
        ax.set_title(f"{name}: {run.shapes[name]['describe']}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(f"omoe_kernels on {run.device_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------ helpers

class Progress:
    """tqdm when installed (the GPU machine may lack it), plain lines otherwise."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.started = False

    def stage(self, text: str) -> None:
        if self.started and self.bar is not None:
            self.bar.update(1)
        self.started = True
        if self.bar is not None:
            self.bar.set_description_str(text)
        else:
            print(f"[bench] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_identity(device: torch.device) -> tuple[str, str]:
    """(human name, file slug): ("NVIDIA H200", "h200"), or (CPU model, "cpu")."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"^nvidia\s+", "", name.lower())).strip("-")
        return name, slug or "cuda"
    return cpu_model(), "cpu"


def _cpu_jiffies() -> tuple[int, int, int] | None:
    """(busy jiffies of all CPUs, total jiffies of all CPUs, this process's jiffies incl. waited-for children)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields), sum(int(v) for v in own[11:15])


def _others_cores(start: tuple[int, int, int] | None, end: tuple[int, int, int] | None) -> float | None:
    """Average number of cores other processes kept busy between two _cpu_jiffies() samples."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    others = (end[0] - start[0]) - (end[2] - start[2])
    return round(max(0.0, others / (end[1] - start[1]) * (os.cpu_count() or 1)), 2)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + (" (uncommitted changes)" if dirty else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_omoe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", help=f"comma-separated, from {list(SHAPES)} (default: the device's §6 shapes)")
    ap.add_argument("--providers", help="comma-separated: backends (cpu, triton, cuda), reference, "
                                        "ref-compile, lora (default: all available)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="override the shapes' dtype")
    ap.add_argument("--quick", action="store_true", help="small smoke run (the `small` shape, short timing)")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 correctness check")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--budget", type=float, help="CPU: seconds of timed calls per (provider, pass)")
    ap.add_argument("--rep-ms", type=int, help="GPU: do_bench rep (ms) per (provider, pass)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", help="output path without suffix (default: bench/results/<device>[-quick])")
    ap.add_argument("--ceilings", action="store_true",
                    help="only measure and print this machine's matmul FLOP/s and copy GB/s")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a check fails, a provider errors, or an exit criterion misses")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ceilings:
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        c = measure_ceilings(device, dtype, TimerOptions())
        print(f"{device_identity(device)[0]} ({torch.get_num_threads()} thread(s)): matmul "
              f"{c.matmul_flops / 1e9:,.1f} GFLOP/s, copy {c.copy_bytes_per_s / 1e9:,.2f} GB/s ({c.how})")
        return 0
    if args.shapes:
        shape_names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    else:
        shape_names = list(QUICK_SHAPES if args.quick else DEFAULT_SHAPES[device.type])
    unknown = [s for s in shape_names if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {list(SHAPES)}")
    wanted = [p.strip() for p in args.providers.split(",")] if args.providers else None
    providers = providers_for(device, wanted)

    opt = TimerOptions()
    if args.quick:
        opt = TimerOptions(cpu_warmup_calls=2, cpu_warmup_s=0.1, cpu_min_reps=5, cpu_max_reps=20,
                           cpu_budget_s=1.0, gpu_warmup_ms=10, gpu_rep_ms=30)
    if args.budget is not None:
        opt.cpu_budget_s = args.budget
    if args.rep_ms is not None:
        opt.gpu_rep_ms = args.rep_ms

    name, slug = device_identity(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    timing = (f"median of {opt.cpu_min_reps}–{opt.cpu_max_reps} calls per provider (time.perf_counter), "
              f"timed in rounds of one call per provider (order rotating) for ≥ {opt.cpu_budget_s:g} s per "
              f"pass, after ≥ {opt.cpu_warmup_calls} warm-up calls and ≥ {opt.cpu_warmup_s:g} s each; "
              "gradients set to None before each call, outside the timed region"
              if device.type == "cpu" else
              f"triton.testing.do_bench(warmup={opt.gpu_warmup_ms}, rep={opt.gpu_rep_ms}, "
              "grad_to_none=leaves, return_mode='median')")
    memory = ("PyTorch CPU allocator bytes live at the peak of one call minus before it, from "
              "torch.profiler(profile_memory=True) events"
              if device.type == "cpu" else
              "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it")
    timing += ("; forward = a training forward (inputs require grad, the graph is built and freed); "
               "fwd+bwd = forward then backward(grad_y) into x, A, B, router_weight, base_out "
               "(plain LoRA: x, A_cat, B_cat, base_out)")
    meta = {"device_type": device.type, "device_name": name,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "git": git_revision(),
            "command": "python -m bench.bench_omoe" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
            "timing": timing, "memory": memory, "scaling": SCALING,
            "providers": [p.name for p in providers], "cores": os.cpu_count(),
            "load_average_start": _load_average()}
    run = Run(device, name, slug, meta)

    timing_stages = 2 * len(providers) if device.type == "cuda" else 2
    per_shape = (1 + timing_stages + (0 if args.no_memory else 2 * len(providers))
                 + (0 if args.no_check else 1 + len(providers)))
    total = len(shape_names) * per_shape
    print(f"omoe_kernels benchmark on {name} ({device.type}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)); shapes {shape_names}; providers {[p.name for p in providers]}",
          flush=True)
    progress = Progress(total)
    started = time.perf_counter()
    jiffies_start = _cpu_jiffies()
    try:
        for shape_name in shape_names:
            shape = SHAPES[shape_name]
            dtype = DTYPES[args.dtype] if args.dtype else shape.torch_dtype
            run_shape(run, shape, dtype, providers, not args.no_check, not args.no_memory, opt, progress)
    finally:
        progress.close()
    meta["seconds"] = round(time.perf_counter() - started, 1)
    meta["load_average_end"] = _load_average()
    meta["other_processes_cores"] = _others_cores(jiffies_start, _cpu_jiffies())

    text = markdown(run)
    print()
    print(text)
    out = Path(args.out) if args.out else RESULTS_DIR / (slug + ("-quick" if args.quick else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text + f"\nWhole run: {meta['seconds']} s.\n")
    payload = {"meta": meta, "ceilings": {k: asdict(v) for k, v in run.ceilings.items()},
               "shapes": run.shapes, "results": [asdict(r) for r in run.records],
               "criteria": [{"criterion": t, "value": v, "pass": p} for t, v, p in criteria(run)]}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    chart_note = chart(run, out.with_suffix(".png"))
    written = [out.with_suffix(s) for s in (".md", ".json")] + ([] if chart_note else [out.with_suffix(".png")])
    print(f"wrote {', '.join(str(p) for p in written)}" + (f"; {chart_note}" if chart_note else "")
          + f" ({meta['seconds']} s)")

    lines = criteria_lines(run)
    if lines:
        print("\nExit criteria of issue 2 (cpu shape, fp32, fwd+bwd, this run):")
        print("\n".join(lines))
    bad = [r for r in run.records if r.error or r.check_ok is False]
    for r in bad:
        print(f"problem: {r.shape}/{r.provider}: " + (r.error or "beyond SPEC §2 tolerance"))
    missed = any(p is False for t, _, p in criteria(run) if "medians" in t)
    return 1 if args.strict and (bad or missed) else 0


if __name__ == "__main__":
    sys.exit(main())
