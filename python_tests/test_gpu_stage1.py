"""Stage 1 of the GPU check runs end to end: `bash bench/gpu_check.sh --dry-run` (the
Triton interpreter on the CPU, tiny shapes) runs every part of bench/gpu_stage1.py and
the host timing, and writes the result files a GPU run writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("environment", "accuracy", "step wide", "profile wide", "dz wide", "token wide")


def test_gpu_check_stage1_dry_run(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env.update(OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log
    assert "stage1: rc 0" in log, log
    assert "host µs per step" in log, log
    results = tmp_path / "bench" / "results"
    assert sorted(p.name for p in results.iterdir()) == ["cpu-dry-run.json", "cpu-dry-run.md"]
    data = json.loads((results / "cpu-dry-run.json").read_text())
    assert data["errors"] == {} and data["skipped"] == [], data
    assert list(data["parts"]) == list(PARTS)
    accuracy = data["parts"]["accuracy"]["value"]
    assert set(accuracy) == {"fp32", "bf16", "fp16"} and all(a["ok"] for a in accuracy.values())
    steps = data["parts"]["step wide"]["value"]
    assert set(steps) == {"triton", "lora", "peft-lora"}
    assert all(s["do_bench_us"] > 0 for s in steps.values())
    dz = data["parts"]["dz wide"]["value"]
    assert dz["with_g_us"] > 0 and dz["without_g_us"] > 0
    token = data["parts"]["token wide"]["value"]
    assert len(token) == 4                       # forward, backward × two program sizes
    md = (results / "cpu-dry-run.md").read_text()
    assert "Dry run on a CPU" in md and "not GPU timings" in md
    # Six files at most besides these: the device tool returns 8.
    assert len(list(tmp_path.rglob("*.*"))) <= 8
