"""pytest's hooks and fixtures for the omoe_kernels test suite.

The shared functions and constants live in ``helpers.py`` (test files import them from
there); this file only configures pytest: the markers, the GPU skip, the ``interpreter``
marker on Triton cases under TRITON_INTERPRET=1, the longest files collected first, a
private torch.compile cache per session, and the autouse fixtures (NaN-poisoned Triton outputs, a fixed RNG seed).
"""
from __future__ import annotations

import os
import shutil
import tempfile

# A private torch.compile cache for each test session (set before torch is imported; child
# processes inherit it): inductor's shared cache under the temp directory can return a
# graph compiled against another checkout's custom ops, whose schema may differ from this
# one's. The process that made it removes it at the end (pytest_sessionfinish below).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="omoe-tests-inductor-")
    os.environ["OMOE_TESTS_INDUCTOR_CACHE_OWNER"] = str(os.getpid())

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import BACKENDS, DEVICE, INTERPRETED_BACKENDS, ON_GPU  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (OMOE_TEST_DEVICE=cuda)")
    config.addinivalue_line("markers", "interpreter: the triton backend under TRITON_INTERPRET=1")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("OMOE_TESTS_INDUCTOR_CACHE_OWNER") == str(os.getpid()):
        shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


def pytest_report_header(config):
    return f"omoe_kernels tests: device={DEVICE}, backends={list(BACKENDS)}"


# Files that run for minutes, collected first: with `-n 2 --dist loadfile` a file starts
# when a worker takes it, and the interpreted suite (test_triton.py, two child sessions)
# taken last would run on alone after everything else.
LONG_FILES = ("test_triton.py", "test_cuda_build.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(item.nodeid.split("::")[0])
        return LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: the order within and between the other files is kept
    skip = pytest.mark.skip(reason=f"needs a CUDA device; OMOE_TEST_DEVICE={DEVICE.type}")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(skip)
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("backend") in INTERPRETED_BACKENDS:
            item.add_marker(pytest.mark.interpreter)


@pytest.fixture(autouse=True)
def _poisoned_triton_outputs():
    """Every buffer a Triton kernel writes starts as NaN, so an element a kernel forgets
    to write fails the test instead of reading as a lucky zero."""
    if "triton" not in BACKENDS:
        yield
        return
    from omoe_kernels.ops.triton import launch as triton_ops

    triton_ops.POISON_OUTPUTS = True
    yield
    triton_ops.POISON_OUTPUTS = False


@pytest.fixture
def empty_weight_cache(monkeypatch):
    """The compiled CPU op's weight cache empty before and after the test, and the route
    chosen by cost (no OMOE_ROUTE), for tests that count what the cache holds."""
    monkeypatch.delenv("OMOE_ROUTE", raising=False)
    torch.ops.omoe_cache.clear()
    yield
    torch.ops.omoe_cache.clear()


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from the same global RNG state (helpers use their own seeds)."""
    torch.manual_seed(0)
    yield
