"""The benchmark driver (docs/contract.md §6): every backend against the eager reference,
its torch.compile, and a plain LoRA of rank E·r, forward and forward+backward, time and
peak memory.

    python -m bench.bench_omoe                       # the machine's default shapes (make bench)
    python -m bench.bench_omoe --quick               # small smoke run
    python -m bench.bench_omoe --shapes wide --providers triton,lora

CPU: the `cpu` shape; CUDA: `llama7b`, `llama7b-top2`, `wide`. Writes
bench/out/<device>.md, .json and .png (`--publish`: bench/results/, the published files;
bench/README.md has the method and floors);
`python -m bench.criteria` judges a result file against the targets.

The work is in modules beside this one: providers.py (inputs and what is compared),
checks.py (the float64 check), timing.py, memory.py, machine.py (identity, load,
ceilings) and report.py (tables, chart, files).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from omoe_kernels.tools.cli import ArgumentParser, positive_float, positive_int

from . import criteria
from .checks import check_providers
from .machine import (
    BUSY_BANNER,
    _cpu_jiffies,
    _load_average,
    _others_cores,
    device_identity,
    machine_was_busy,
    measure_ceilings,
    output_dir,
    run_metadata,
)
from .memory import _release, peak_extra_mib

# Inputs (unused here) and _free_grads stay importable from this module for scripts
# written against the single-file benchmark.
from .providers import SCALING, Inputs, Provider, make_inputs, providers_for  # noqa: F401
from .report import (
    Progress,
    Record,
    Run,
    _short_error,
    chart,
    markdown,
    payload,
    run_from_payload,
    write_results,
)
from .shapes import DEFAULT_SHAPES, DTYPES, QUICK_SHAPES, SHAPES, Shape, cost
from .timing import TimerOptions, _free_grads, median_ms_cpu_interleaved, median_ms_cuda


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
        check_providers(shape, inp, providers, forwards, records, progress)
        _release(device)

    steps: dict[str, dict[str, tuple[Callable[[], object], list[torch.Tensor]]]] = {"forward": {}, "train": {}}
    kept: dict[str, dict[str, Callable[[], object]]] = {"forward": {}, "train": {}}
    for p in providers:
        if records[p.name].error is not None:
            continue
        forward, leaves = forwards[p.name], p.leaves(inp)

        def train_step(forward=forward, grad_y=inp.grad_y):
            y = forward()
            y.backward(grad_y)
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ArgumentParser(prog="python -m bench.bench_omoe", description=__doc__)
    ap.add_argument("--shapes", help=f"comma-separated, from {list(SHAPES)} (default: the device's shapes)")
    ap.add_argument("--providers", help="comma-separated: backends (cpu, triton, cuda), reference, "
                                        "ref-compile, lora (default: all available)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="override the shapes' dtype")
    ap.add_argument("--quick", action="store_true", help="small smoke run (the `small` shape, short timing)")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 correctness check")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--budget", type=positive_float, help="CPU: seconds of timed calls per (provider, pass)")
    ap.add_argument("--rep-ms", type=positive_int, help="GPU: do_bench rep (ms) per (provider, pass)")
    ap.add_argument("--threads", type=positive_int, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", help="output path without suffix (default: bench/out/<device>[-quick])")
    ap.add_argument("--publish", action="store_true",
                    help="write to bench/results/ (the published files) instead of bench/out/")
    ap.add_argument("--replot", metavar="FILE.json",
                    help="only redraw the chart beside a result file's JSON, measuring nothing")
    ap.add_argument("--ceilings", action="store_true",
                    help="only measure and print this machine's matmul FLOP/s and copy GB/s")
    ap.add_argument("--strict", action="store_true",
                    help="exit 1 when a check fails, a provider errors, or a target of "
                         "bench/criteria.py is missed")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    if args.replot and not Path(args.replot).is_file():
        ap.error(f"--replot {args.replot}: no such file")
    if args.shapes:
        unknown = [s for s in args.shapes.split(",") if s.strip() and s.strip() not in SHAPES]
        if unknown:
            ap.error(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    if args.out and args.publish:
        ap.error("--out and --publish name two places; give one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        png = Path(args.replot).with_suffix(".png")
        chart(run_from_payload(json.loads(Path(args.replot).read_text())), png)
        print(f"wrote {png}")
        return 0
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
    meta = run_metadata(device, opt, argv, SCALING, [p.name for p in providers])
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
    meta["busy"] = device.type == "cpu" and machine_was_busy(
        meta["other_processes_cores"], meta["cores"], meta["threads"])

    print()
    print(markdown(run))
    out = Path(args.out) if args.out else output_dir(args.publish) / (slug + ("-quick" if args.quick else ""))
    written = write_results(run, out)
    print(f"wrote {', '.join(written)} ({meta['seconds']} s)")

    verdicts = criteria.evaluate(payload(run))
    if verdicts:
        print("\nTargets (bench/criteria.py; cpu shape, fp32, fwd+bwd, this run):")
        print("\n".join(criteria.lines(verdicts)))
    bad = [r for r in run.records if r.error or r.check_ok is False]
    for r in bad:
        print(f"problem: {r.shape}/{r.provider}: " + (r.error or "beyond the §2 tolerance"))
    if meta["busy"]:
        print(f"\nother processes kept {meta['other_processes_cores']} of {meta['cores']} cores busy: "
              + BUSY_BANNER)
    return 1 if args.strict and (bad or criteria.missed_on_medians(verdicts)) else 0


if __name__ == "__main__":
    sys.exit(main())
