"""The machine a benchmark runs on: its identity, its load, and its measured ceilings
(matmul FLOP/s and copy bandwidth, for the roofline floors)."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .timing import TimerOptions, median_ms_cpu, median_ms_cuda


@dataclass
class Ceilings:
    matmul_flops: float          # FLOP/s of a large matmul in the benchmark dtype
    copy_bytes_per_s: float      # read + write bytes per second of a large copy
    how: str


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


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "absent"
    return triton.__version__


def run_metadata(device: torch.device, opt: TimerOptions, argv: list[str] | None,
                 scaling: float, provider_names: list[str]) -> dict:
    """Where and how a run measures: device, versions, threads, revision, command, method."""
    name, _ = device_identity(device)
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
    # Paths inside the repository as they read from its root: a results file never names
    # the machine's own directories.
    root = str(BENCH_DIR.parent) + os.sep
    args = [a.replace(root, "") for a in (argv if argv is not None else sys.argv[1:])]
    return {"device_type": device.type, "device_name": name,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "triton": triton_version(), "python": platform.python_version(),
            "threads": torch.get_num_threads(), "git": git_revision(),
            "command": ("python -m bench.bench_omoe " + " ".join(args)).rstrip(),
            "timing": timing, "memory": memory, "scaling": scaling,
            "providers": provider_names, "cores": os.cpu_count(),
            "load_average_start": _load_average()}


BUSY_BANNER = "**the machine was busy: times are inflated and noisy**"


def machine_was_busy(others_cores: float | None, cores: int | None, threads: int) -> bool:
    """Whether other processes took CPU this run's threads could have used."""
    return (others_cores or 0) > max(0.25, (cores or 1) - threads)


class LoadWatch:
    """The load during a run: load averages at start and end and the cores other processes
    kept busy (/proc/stat minus this process), as the meta fields of every results file."""

    def __init__(self):
        self.load_start = _load_average()
        self._jiffies = _cpu_jiffies()

    def finish(self, threads: int) -> dict:
        others = _others_cores(self._jiffies, _cpu_jiffies())
        cores = os.cpu_count()
        return dict(load_start=self.load_start, load_end=_load_average(),
                    other_processes_cores=others, cores=cores,
                    busy=machine_was_busy(others, cores, threads))


def load_line(meta: dict) -> str:
    """One sentence on the load, ending with the busy banner when the machine was busy."""
    text = (f"other processes kept {meta.get('other_processes_cores')} of {meta.get('cores')} "
            f"cores busy on average; load average {meta['load_start']} at the start, "
            f"{meta['load_end']} at the end")
    return text + (f" — {BUSY_BANNER}" if meta.get("busy") else "")


BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"  # published: the files the READMEs quote (tracked)
OUT_DIR = BENCH_DIR / "out"          # every other run (git-ignored)


def output_dir(publish: bool) -> Path:
    """bench/results/ with --publish, else bench/out/ (git-ignored), created."""
    path = RESULTS_DIR if publish else OUT_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path
