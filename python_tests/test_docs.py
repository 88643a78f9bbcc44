"""Every Python block of the README and docs/integration.md runs as written.

The blocks of one file run top to bottom in one namespace, in a temporary directory, the
way a reader pastes them into one session."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", os.path.join("docs", "integration.md")]


def python_blocks(path: str) -> list[str]:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


@pytest.mark.parametrize("path", DOCS)
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    blocks = python_blocks(path)
    assert blocks, f"{path} has no python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs__"}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"{path} python block {number}", "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"{path}, python block {number} fails:\n{block}") from exc
