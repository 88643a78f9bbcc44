"""The benchmarks leave the tree clean and flag a busy machine in every result and summary."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import bench_omoe, decode, machine, sweep  # noqa: E402

BANNER = "the machine was busy: times are inflated and noisy"


def _git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs a git checkout")
def test_quick_benchmark_leaves_git_status_unchanged():
    """`python -m bench.run` at toy size: every step, no tracked file changed, no new
    untracked file outside the ignored output folder."""
    before = _git_status()
    from bench.run import has_hf_stack

    names = ["cpu-quick.json", "sweep-tiny.json"] + (["decode-tiny.json"] if has_hf_stack() else [])
    outputs = [ROOT / "bench" / "out" / name for name in names]
    for path in outputs:
        path.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "bench.run", "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert all(path.is_file() for path in outputs), "the run wrote its results elsewhere"
    assert "other processes kept" in done.stdout.strip().splitlines()[-1]  # the job's load
    assert _git_status() == before


class _BusyJiffies:
    """/proc/stat as if other processes kept every core busy (or none) between samples."""

    def __init__(self, busy: bool):
        self.calls, self.busy = 0, busy

    def __call__(self):
        self.calls += 1
        total = 1000 * self.calls
        return (total if self.busy else 0), total, 0


@pytest.mark.parametrize("busy", [True, False])
def test_sweep_flags_a_busy_machine(tmp_path, monkeypatch, capsys, busy):
    monkeypatch.setattr(machine, "_cpu_jiffies", _BusyJiffies(busy))
    monkeypatch.setattr(machine, "OUT_DIR", tmp_path)
    sweep.main(["--T", "1", "--E", "2", "--r", "2", "--routing", "dense", "--d", "16",
                "--levels", "adapter", "--modes", "infer", "--budget", "0.001", "--tag", "t"])
    md = (tmp_path / "sweep-t.md").read_text()
    meta = json.loads((tmp_path / "sweep-t.json").read_text())["meta"]
    console = capsys.readouterr().out
    assert meta["busy"] is busy
    assert (BANNER in md) is busy
    assert (BANNER in console) is busy


def test_decode_flags_a_busy_machine(tmp_path, monkeypatch, capsys, busy=True):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.setattr(machine, "_cpu_jiffies", _BusyJiffies(busy))
    monkeypatch.setattr(machine, "OUT_DIR", tmp_path)
    decode.main(["--hidden", "32", "--layers", "1", "--vocab", "64", "--prompt", "2",
                 "--new-tokens", "2", "--rounds", "1", "--tag", "t"])
    md = (tmp_path / "decode-t.md").read_text()
    meta = json.loads((tmp_path / "decode-t.json").read_text())["meta"]
    assert meta["busy"] is busy
    assert (BANNER in md) is busy
    assert (BANNER in capsys.readouterr().out) is busy


def test_bench_omoe_flags_a_busy_machine_in_files_and_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_omoe, "_cpu_jiffies", _BusyJiffies(True))
    bench_omoe.main(["--quick", "--providers", "cpu,lora", "--no-memory", "--no-check",
                     "--budget", "0.01", "--out", str(tmp_path / "r")])
    assert json.loads((tmp_path / "r.json").read_text())["meta"]["busy"] is True
    assert BANNER in (tmp_path / "r.md").read_text()
    tail = capsys.readouterr().out.strip().splitlines()[-1]
    assert BANNER in tail  # the last line a reader sees


def test_replot_redraws_the_published_charts_from_json(tmp_path):
    """The committed charts can be redrawn from the committed JSON, measuring nothing."""
    pytest.importorskip("matplotlib")
    for name in ("sweep-cpu-1thread.json", "cpu.json"):
        shutil.copy(ROOT / "bench" / "results" / name, tmp_path / name)
    sweep.main(["--replot", str(tmp_path / "sweep-cpu-1thread.json")])
    assert bench_omoe.main(["--replot", str(tmp_path / "cpu.json")]) == 0
    assert (tmp_path / "sweep-cpu-1thread.png").stat().st_size > 10_000
    assert (tmp_path / "cpu.png").stat().st_size > 10_000


def test_results_record_paths_inside_the_repository_from_its_root():
    """A run told to write under the repository's absolute path (as `bench.run` tells
    `bench_omoe`) records the command with the path from the root, not the machine's."""
    from bench.timing import TimerOptions

    meta = machine.run_metadata(torch.device("cpu"), TimerOptions(), [
        "--threads", "2", "--out", str(ROOT / "bench" / "results" / "cpu")], 1.0, ["cpu"])
    assert meta["command"] == "python -m bench.bench_omoe --threads 2 --out bench/results/cpu"
