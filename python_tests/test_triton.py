"""The triton backend.

CPU (CI): the triton backend runs under the Triton interpreter, and TRITON_INTERPRET=1
must be set before triton is imported, which this session (conftest) already did without
it. So pytest sessions started with it, one per file, run the `interpreter` cases: the shared
suites' (every test parametrised over the backend registry, with backend="triton") and
`test_triton_interpreted.py` (the triton-only cases; skipped in a session without it).
GPU (`gpu` marker, OMOE_TEST_DEVICE=cuda): the backend at real sizes against float64,
the autotuned path against the fixed-config path, and torch.compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import (
    DEVICE,
    ON_GPU,
    assert_matches_oracle,
    assert_rel_close,
    make_problem,
    random_grad,
    run_backend,
)

HERE = os.path.dirname(os.path.abspath(__file__))

# The files with interpreter cases, longest first: a child session per file, two at a
# time (one per core), each next file starting as soon as a child ends.
INTERPRETED_FILES = ["test_ops.py", "test_triton_interpreted.py", "test_accuracy.py",
                     "test_layer.py", "test_properties.py", "test_triton_mixed.py",
                     "test_training.py"]
INTERPRETED_CHILDREN = 2


@pytest.mark.skipif(ON_GPU, reason="the interpreter suite runs on CPU tensors (CI)")
@pytest.mark.timeout(1500)
def test_interpreted_suite():
    """Every `interpreter` case passes under TRITON_INTERPRET=1, and there are such cases
    in every file (a registry or marker change that drops triton would show here)."""
    pytest.importorskip("triton")
    import omoe_kernels

    # The children run in python_tests/: put this session's omoe_kernels first on their
    # path, or they would test whichever copy is installed.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(omoe_kernels.__file__)))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", OMOE_TEST_DEVICE="cpu", PYTHONPATH=path)

    def run(file):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", HERE,
               "-o", "addopts=", "-m", "interpreter", "-rA", file]
        return subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True,
                              timeout=1400)

    with ThreadPoolExecutor(INTERPRETED_CHILDREN) as pool:
        done = dict(zip(INTERPRETED_FILES, pool.map(run, INTERPRETED_FILES)))
    for file, child in done.items():
        out = child.stdout + child.stderr
        tail = out[-6000:]
        assert child.returncode == 0, f"interpreted triton cases of {file} failed:\n{tail}"
        assert " passed" in out and "FAILED" not in out, tail
        assert f"PASSED {file}::" in out, f"no interpreter case of {file} ran:\n{tail}"


# ---------------------------------------------------------------------------- GPU


def _triton_on_gpu():
    if not ON_GPU:
        pytest.skip("needs OMOE_TEST_DEVICE=cuda")
    import omoe_kernels

    if "triton" not in omoe_kernels.available_backends(DEVICE):
        pytest.fail("the triton backend is not available on this GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("name, E, r, top_k", [("llama7b", 4, 16, None), ("llama7b-top2", 8, 16, 2),
                                               ("wide", 16, 8, 2)])
def test_real_size_bf16_matches_float64(name, E, r, top_k):
    """docs/contract.md §6 shapes (T reduced to 2048 to bound the float64 reference's memory)."""
    _triton_on_gpu()
    problem = make_problem(2048, 4096, 4096, E, r, dtype=torch.bfloat16, seed=41)
    assert_matches_oracle(problem, "triton", 1e-2, 2e-2, scaling=2.0, top_k=top_k)


@pytest.mark.gpu
@pytest.mark.parametrize("collapse, fwd_tol, grad_tol", [(0.0, 1e-5, 1e-4), (0.99, 1e-4, 1e-3),
                                                         (0.999, 1e-3, 1e-2)])
def test_fp32_ieee_at_size(collapse, fwd_tol, grad_tol):
    _triton_on_gpu()
    problem = make_problem(1024, 1024, 1024, 4, 16, dtype=torch.float32, collapse=collapse,
                           seed=42, with_router_input=True)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert_matches_oracle(problem, "triton", fwd_tol, grad_tol, top_k=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_bf16_collapse_at_size():
    _triton_on_gpu()
    problem = make_problem(1024, 2048, 2048, 4, 16, dtype=torch.bfloat16, collapse=0.99, seed=43)
    assert_matches_oracle(problem, "triton", 3e-2, None)


@pytest.mark.gpu
def test_autotuned_equals_fixed_config(monkeypatch):
    _triton_on_gpu()
    problem = make_problem(4096, 1024, 1536, 8, 16, dtype=torch.bfloat16, seed=44)
    grad_y = random_grad((4096, 1536), torch.bfloat16)
    monkeypatch.delenv("OMOE_TRITON_FIXED_CONFIG", raising=False)
    y_tuned, g_tuned = run_backend(problem, "triton", grad_y, top_k=2)
    monkeypatch.setenv("OMOE_TRITON_FIXED_CONFIG", "1")
    y_fixed, g_fixed = run_backend(problem, "triton", grad_y, top_k=2)
    assert_rel_close(y_tuned, y_fixed, 1e-2, "forward")
    for name in g_fixed:
        assert_rel_close(g_tuned[name], g_fixed[name], 2e-2, f"grad {name}")


@pytest.mark.gpu
def test_torch_compile_traces_the_custom_ops():
    _triton_on_gpu()
    import omoe_kernels as ok

    problem = make_problem(512, 256, 384, 4, 8, dtype=torch.bfloat16, seed=45)
    fn = torch.compile(lambda x, A, B, W, b: ok.omoe_lora(x, A, B, W, base_out=b, backend="triton"),
                       fullgraph=True)
    leaves = [t.detach().requires_grad_() for t in (problem.x, problem.A, problem.B,
                                                   problem.router_weight, problem.base_out)]
    y = fn(*leaves)
    y_eager, _ = run_backend(problem, "triton")
    assert_rel_close(y, y_eager, 1e-3, "compiled forward")
    y.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.gpu
def test_saved_activations_are_O_T_E_r():
    """Memory kept for the backward does not grow with d_out (no T × E × d_out tensor)."""
    _triton_on_gpu()
    import omoe_kernels as ok

    T, d, E, r = 4096, 4096, 4, 16
    problem = make_problem(T, d, d, E, r, dtype=torch.bfloat16, seed=46)
    leaves = [t.detach().requires_grad_() for t in (problem.x, problem.A, problem.B,
                                                   problem.router_weight)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = ok.omoe_lora(*leaves, base_out=problem.base_out, backend="triton")
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before - y.numel() * y.element_size()
    # h (T × 64 fp32) + logits (T × 4 fp32) ≈ 1.1 MB; allow 4x for allocator rounding.
    assert kept <= 4 * T * (64 + 4) * 4, f"{kept} bytes kept for backward"
    y.sum().backward()
