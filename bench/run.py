"""The benchmark jobs of `make bench`, `make bench-full` and `make bench-publish`:
`python -m bench.run [--full] [--publish]`.

- quick (the default, `make bench`): the §6 shape of this machine (`bench.bench_omoe`),
  the quick cost-growth grid (`bench.sweep --quick`), one greedy-decoding run
  (`bench.decode`) and several adapters in one batch on a small grid
  (`bench.mixed_adapters`), at the machine's default thread count;
- `--full` (`make bench-full`): the §6 shape at 2 threads and 1 thread, the whole
  cost-growth grid at 1 and 2 threads, decoding at 1 and 2 threads, the fixed cost of a
  call, and several adapters in one batch on the whole grid.

Every file goes to bench/out/ (git-ignored) unless `--publish` (`make bench-publish`)
asks for bench/results/, the files the READMEs quote. Each step says what it runs and
about how long it takes on an idle machine before it starts, and how long it took after.
"""
from __future__ import annotations

import importlib.util
import time

import torch

from omoe_kernels.tools.cli import ArgumentParser

from . import bench_omoe, call_cost, decode, mixed_adapters, sweep
from .machine import RESULTS_DIR, LoadWatch, load_line, output_dir

# Idle figures: each step as `make bench` and `make bench-publish` timed it on an idle
# Intel Xeon with 2 vCPUs (2026-12-06), rounded up.
QUICK = [
    ("the cpu shape, every provider (bench.bench_omoe)", 45, bench_omoe.main, []),
    ("cost growth, quick grid (bench.sweep --quick)", 15, sweep.main, ["--quick"]),
    ("greedy decoding of a tiny LLaMA (bench.decode)", 15, decode.main, []),
    ("several adapters in one batch, quick grid (bench.mixed_adapters)", 15,
     mixed_adapters.main, ["--rounds", "3"]),
]


def full_steps(out: str) -> list:
    return [
        ("the cpu shape, 2 threads (bench.bench_omoe)", 45, bench_omoe.main,
         ["--threads", "2", "--out", f"{out}/cpu"]),
        ("the cpu shape, 1 thread", 45, bench_omoe.main,
         ["--threads", "1", "--out", f"{out}/cpu-1thread"]),
        ("cost growth, whole grid, 1 thread (bench.sweep)", 340, sweep.main, ["--threads", "1"]),
        ("cost growth, whole grid, 2 threads", 260, sweep.main, ["--threads", "2"]),
        ("greedy decoding, 1 thread (bench.decode)", 10, decode.main, ["--threads", "1"]),
        ("greedy decoding, 2 threads", 10, decode.main, ["--threads", "2"]),
        ("greedy decoding at hidden 1024, 1 thread", 20, decode.main,
         ["--threads", "1", "--hidden", "1024", "--tag", "cpu-1thread-h1024"]),
        ("greedy decoding at hidden 1024, 2 threads", 20, decode.main,
         ["--threads", "2", "--hidden", "1024", "--tag", "cpu-2thread-h1024"]),
        ("the fixed cost of a call at T = 1, 1 thread (bench.call_cost)", 25, call_cost.main,
         ["--threads", "1"]),
        ("the fixed cost of a call, 2 threads", 25, call_cost.main, ["--threads", "2"]),
        ("several adapters in one batch, N in 1,2,4,8 and T in 64,512,4096, 2 threads "
         "(bench.mixed_adapters)", 30, mixed_adapters.main, ["--full", "--threads", "2"]),
    ]


# Small enough for a test: every step and every file, none of the numbers.
TINY = [
    ("the small shape, no torch.compile (bench.bench_omoe --quick)", 10, bench_omoe.main,
     ["--quick", "--providers", "cpu,reference,lora", "--no-memory", "--budget", "0.05"]),
    ("cost growth, two points (bench.sweep)", 5, sweep.main,
     ["--T", "1,8", "--E", "2", "--r", "4", "--routing", "dense", "--d", "64",
      "--budget", "0.01", "--tag", "tiny"]),
    ("greedy decoding, one layer (bench.decode)", 10, decode.main,
     ["--hidden", "64", "--layers", "1", "--vocab", "128", "--prompt", "4", "--new-tokens", "3",
      "--rounds", "1", "--tag", "tiny"]),
    ("the fixed cost of a call (bench.call_cost)", 5, call_cost.main,
     ["--d", "64", "--budget", "0.02", "--tag", "tiny"]),
    ("several adapters in one batch, two points (bench.mixed_adapters)", 10,
     mixed_adapters.main, ["--N", "1,2", "--T", "8", "--d", "64", "--budget", "0.01",
                           "--hidden", "64", "--layers", "1", "--vocab", "128",
                           "--new-tokens", "2", "--rounds", "1", "--tag", "tiny"]),
]


def has_hf_stack() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("transformers", "peft"))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--full", action="store_true",
                        help="the whole sweep at 1 and 2 threads, both thread counts everywhere")
    parser.add_argument("--publish", action="store_true",
                        help="write to bench/results/ (the published files) instead of bench/out/")
    parser.add_argument("--tiny", action="store_true",
                        help="every step at a toy size, for tests (numbers mean nothing)")
    args = parser.parse_args(argv)
    if args.tiny and (args.full or args.publish):
        parser.error("--tiny results are never published or combined with --full")
    out = output_dir(args.publish)
    steps = TINY if args.tiny else full_steps(str(out)) if args.full else QUICK
    publish = ["--publish"] if args.publish else []
    total = sum(s[1] for s in steps)
    print(f"bench: {len(steps)} steps, about {_duration(total)} on an idle 2-core machine "
          f"(several times longer when other processes use the CPU); results in "
          f"{out}{'' if out == RESULTS_DIR else ' (git-ignored; --publish: bench/results/)'}",
          flush=True)
    started = time.perf_counter()
    watch = LoadWatch()
    failed = []
    for n, (what, seconds, step, step_args) in enumerate(steps, 1):
        print(f"\n== [{n}/{len(steps)}] {what}: about {_duration(seconds)} idle", flush=True)
        if step in (decode.main, mixed_adapters.main) and not has_hf_stack():
            print("== skipped: this step needs transformers and peft (pip install omoe_kernels[hf])")
            continue
        t0 = time.perf_counter()
        if step is bench_omoe.main and "--out" in step_args:
            status = step(step_args)
        else:
            status = step(step_args + publish)
        if isinstance(status, int) and status:
            failed.append(what)
        print(f"== [{n}/{len(steps)}] done in {_duration(time.perf_counter() - t0)}", flush=True)
    load = watch.finish(torch.get_num_threads())
    print(f"\nbench: {len(steps)} steps in {_duration(time.perf_counter() - started)}; "
          f"results in {out}\n{load_line(load)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
