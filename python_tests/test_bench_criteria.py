"""bench/criteria.py judges result files; the result files themselves carry no verdicts."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import criteria  # noqa: E402


def _result(cpu_ms, reference_ms, lora_ms, shape="cpu"):
    rows = [("cpu", cpu_ms), ("reference", reference_ms), ("lora", lora_ms)]
    return {"shapes": {shape: {}},
            "results": [{"shape": shape, "provider": p, "train_ms": ms, "train_min_ms": None}
                        for p, ms in rows]}


def test_targets_pass_and_miss():
    passing = criteria.evaluate(_result(cpu_ms=10.0, reference_ms=60.0, lora_ms=8.0))
    assert [p for _, _, p in passing] == [True, True]
    assert passing[0][1] == pytest.approx(6.0) and passing[1][1] == pytest.approx(1.25)
    assert not criteria.missed_on_medians(passing)
    slow = criteria.evaluate(_result(cpu_ms=20.0, reference_ms=60.0, lora_ms=8.0))
    assert [p for _, _, p in slow] == [False, False]
    assert criteria.missed_on_medians(slow)
    assert criteria.evaluate(_result(1.0, 2.0, 3.0, shape="llama7b")) == []


@pytest.mark.parametrize("name", ["cpu", "cpu-1thread"])
def test_stored_results_are_measurements_that_criteria_reads(name):
    base = os.path.join(ROOT, "bench", "results", name)
    result = json.loads(open(base + ".json").read())
    assert "criteria" not in result
    assert "criteria" not in open(base + ".md").read().lower()
    verdicts = criteria.evaluate(result)
    assert len(verdicts) == 4 and all(value is not None for _, value, _ in verdicts)
