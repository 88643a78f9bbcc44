"""The `cuda` backend's own cases (csrc/cuda: CUDA per-token passes around cuBLAS GEMMs)
on a GPU. What every backend must do (the accuracy table, special cases, strided and
empty inputs) is in the shared suites, which run for `cuda` with OMOE_TEST_DEVICE=cuda.

Every check here compares with the float64 evaluation of docs/contract.md §1 (helpers.oracle) or, where
noted, with the compiled CPU ops in float64 (the same algorithm, so differences are
kernel bugs). Shapes cover each compile-time bound on the active experts (k ≤ 4, 8, 16,
32), both scratch placements (shared memory for k ≤ 8, a global slot per warp above), G
in shared memory and in global memory (E·r > 140), and grids where each warp loops over
several tokens. The plan's GEMMs are checked on the CPU as well (test_cuda_plan.py);
here run the warps, cuBLAS's 16-bit GEMMs, the absence of host synchronisation and CUDA
graph capture. Skipped with a reason without a GPU; the real-size cases also carry the
`gpu` marker (OMOE_TEST_DEVICE=cuda runs them).
"""
from __future__ import annotations

import pytest
import torch

from helpers import (
    ACCURACY_ROWS,
    ACCURACY_SHAPE,
    assert_finite,
    assert_matches_oracle,
    assert_rel_close,
    make_problem,
    poison_allocator,
    random_grad,
    run_backend,
)
from omoe_kernels import omoe_lora
from omoe_kernels.ops import compiled

CUDA = torch.device("cuda")

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and compiled.has_kernels("cuda")),
    reason="needs a CUDA GPU and the extension built with its CUDA kernels "
           f"(cuda available: {torch.cuda.is_available()}, "
           f"extension: {compiled.LOAD_ERROR or 'loaded'})")

SHAPE = ACCURACY_SHAPE  # T, d_in, d_out, E, r


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """docs/contract.md §2's fp32 rows mean IEEE fp32 GEMMs."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


# (E, top_k): k = 1, 2, 4, 5, 8 (scratch in shared memory), 12, 16, 17, 32 (a global slot).
ACTIVE_SET_CASES = [(5, 1), (6, 2), (4, None), (12, 5), (8, None), (13, 12), (16, None),
                    (20, 17), (32, None)]


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("E,top_k", ACTIVE_SET_CASES)
def test_every_active_set_bound_float64(E, top_k, normalize):
    # d_out ≥ E keeps the experts' outputs independent, so float64 agrees to ~1e-12.
    problem = make_problem(37, 23, 41, E, 3, dtype=torch.float64, seed=E, device=CUDA,
                           with_router_input=True)
    assert_matches_oracle(problem, "cuda", 1e-10, 1e-9, top_k=top_k, normalize=normalize,
                          scaling=1.3)


@pytest.mark.parametrize("with_router_input", [False, True])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("row", list(ACCURACY_ROWS))
def test_accuracy_rows_with_16bit_gemms(row, top_k, with_router_input):
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    problem = make_problem(*SHAPE, dtype=dtype, collapse=collapse, seed=3, device=CUDA,
                           with_router_input=with_router_input)
    assert_matches_oracle(problem, "cuda", fwd_tol, grad_tol, top_k=top_k, scaling=1.7)


@pytest.mark.parametrize("E,r,top_k", [(3, 5, None), (7, 3, 2), (24, 8, 3), (6, 33, None)])
def test_odd_shapes_bf16(E, r, top_k):
    # Odd E·r (15, 21), G in global memory (E·r = 192 > 140), and a rank above a warp.
    problem = make_problem(33, 19, 27, E, r, dtype=torch.bfloat16, seed=E, device=CUDA)
    assert_matches_oracle(problem, "cuda", 1e-2, 2e-2, top_k=top_k)


def _training_step(problem, grad_y, top_k):
    leaves = {n: t.detach().requires_grad_(True) for n, t in problem.tensors().items()}
    y = omoe_lora(leaves["x"], leaves["A"], leaves["B"], leaves["router_weight"],
                  base_out=leaves.get("base_out"), top_k=top_k, backend="cuda")
    y.backward(grad_y)
    return y, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("top_k", [None, 2])
def test_step_never_synchronises_with_the_host(top_k):
    problem = make_problem(*SHAPE, dtype=torch.bfloat16, seed=9, device=CUDA)
    grad_y = random_grad((SHAPE[0], SHAPE[2]), torch.bfloat16, CUDA)
    _training_step(problem, grad_y, top_k)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        p = problem
        y, h, logits = torch.ops.omoe.forward(p.x, p.A, p.B, p.router_weight, None, p.base_out,
                                              1.0, top_k or SHAPE[3], True, True, 1e-6)
        torch.ops.omoe.backward(grad_y, p.x, p.A, p.B, p.router_weight, None, h, logits, 1.0,
                                top_k or SHAPE[3], True, True, 1e-6)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_cuda_graph_captures_forward_and_backward_ops():
    p = make_problem(*SHAPE, dtype=torch.bfloat16, seed=10, device=CUDA)
    grad_y = random_grad((SHAPE[0], SHAPE[2]), torch.bfloat16, CUDA)
    options = (1.0, 2, True, True, 1e-6)

    def step():
        y, h, logits = torch.ops.omoe.forward(p.x, p.A, p.B, p.router_weight, None, p.base_out,
                                              *options)
        grads = torch.ops.omoe.backward(grad_y, p.x, p.A, p.B, p.router_weight, None, h,
                                        logits, *options)
        return (y,) + tuple(grads[:4])

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize("E,top_k", [(4, None), (16, 9), (32, None)])
def test_grid_stride_over_many_tokens_matches_cpu_ops(E, top_k):
    # More tokens than resident warps, so each warp handles several tokens; compared with
    # the CPU ops on the same float64 inputs.
    problem = make_problem(20000, 16, 40, E, 2, dtype=torch.float64, seed=3, device=CUDA)
    grad_y = random_grad((20000, 40), torch.float64, CUDA)
    y, grads = run_backend(problem, "cuda", grad_y, top_k=top_k)
    y_cpu, grads_cpu = run_backend(problem.to(device="cpu"), "cpu", grad_y.cpu(), top_k=top_k)
    assert_rel_close(y.cpu(), y_cpu, 1e-12, "y")
    for name, g in grads.items():
        assert_rel_close(g.cpu(), grads_cpu[name], 1e-10, f"grad {name}")


def test_raw_ops_write_every_output_element():
    problem = make_problem(*SHAPE, seed=5, device=CUDA, with_router_input=True)
    p = problem
    args = (p.router_input, p.base_out, 0.5, 2, True, True, 1e-6)
    poison_allocator(CUDA, max_numel=1 << 18)
    y, h, logits = torch.ops.omoe.forward(p.x, p.A, p.B, p.router_weight, *args)
    for name, t in (("y", y), ("h", h), ("logits", logits)):
        assert_finite(t, name)
    grad_y = random_grad(y.shape, y.dtype, CUDA)
    poison_allocator(CUDA, max_numel=1 << 18)
    outs = torch.ops.omoe.backward(grad_y, p.x, p.A, p.B, p.router_weight, p.router_input, h,
                                   logits, 0.5, 2, True, True, 1e-6)
    for name, t in zip(("grad_x", "grad_A", "grad_B", "grad_router_weight",
                        "grad_router_input"), outs):
        assert_finite(t, name)
    torch.cuda.synchronize()


# Bad arguments of omoe::forward, each made from good ones (see _forward_args).
BAD_FORWARD_ARGS = {
    "x d_in": lambda a: {"x": a["x"][:, :-1].contiguous()},
    "B rank": lambda a: {"B": a["B"][..., :-1].contiguous()},
    "x on the CPU": lambda a: {"x": a["x"].cpu()},
    "x dtype": lambda a: {"x": a["x"].double()},
    "top_k > E": lambda a: {"top_k": SHAPE[3] + 1},
    "eps = 0": lambda a: {"eps": 0.0},
    "base_out shape": lambda a: {"base_out": torch.zeros(3, 3, device=CUDA)},
    "E > 32": lambda a: {"A": a["A"].repeat(9, 1, 1), "B": a["B"].repeat(9, 1, 1),
                         "router_weight": a["router_weight"].repeat(9, 1)},
}


def _forward_args(p, **changes):
    args = dict(x=p.x, A=p.A, B=p.B, router_weight=p.router_weight, router_input=None,
                base_out=None, scaling=1.0, top_k=2, orthogonalize=True, normalize=True,
                eps=1e-6)
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize("what", list(BAD_FORWARD_ARGS))
def test_forward_op_checks_inputs_before_launching(what):
    # docs/contract.md §4: torch.ops.* with bad inputs raise (TORCH_CHECK) and launch nothing on them.
    p = make_problem(*SHAPE, seed=6, device=CUDA)
    good = dict(zip(("x", "A", "B", "router_weight"), (p.x, p.A, p.B, p.router_weight)))
    with pytest.raises(RuntimeError, match="omoe"):
        torch.ops.omoe.forward(*_forward_args(p, **BAD_FORWARD_ARGS[what](good)))
    torch.cuda.synchronize()  # and the device is still healthy


def test_backward_op_checks_inputs_before_launching():
    p = make_problem(*SHAPE, seed=6, device=CUDA)
    y, h, logits = torch.ops.omoe.forward(*_forward_args(p))
    options = (1.0, 2, True, True, 1e-6)
    for bad in ((y[:-1].contiguous(), h, logits), (y, h.double(), logits),
                (y, h, logits[:, :-1].contiguous()), (y, h.cpu(), logits)):
        grad_y, h_bad, logits_bad = bad
        with pytest.raises(RuntimeError, match="omoe"):
            torch.ops.omoe.backward(grad_y, p.x, p.A, p.B, p.router_weight, None, h_bad,
                                    logits_bad, *options)
    torch.cuda.synchronize()


# docs/contract.md §6 shapes at full size (T, d, E, r, top_k, row).
REAL_SIZE = [
    (8192, 4096, 4, 16, None, "bf16-random"),   # llama7b
    (8192, 4096, 8, 16, 2, "bf16-random"),      # llama7b-top2
    (8192, 4096, 16, 8, 2, "bf16-random"),      # wide
    (4096, 1024, 4, 16, None, "fp32-random"),   # cpu (as a GPU shape)
    (4096, 1024, 4, 16, None, "fp32-collapse0.999"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", REAL_SIZE, ids=lambda c: f"T{c[0]}-d{c[1]}-E{c[2]}-r{c[3]}-top{c[4]}-{c[5]}")
def test_real_size_against_float64(case):
    T, d, E, r, top_k, row = case
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    problem = make_problem(T, d, d, E, r, dtype=dtype, collapse=collapse, seed=17, device=CUDA,
                           with_router_input=top_k is not None)
    assert_matches_oracle(problem, "cuda", fwd_tol, grad_tol, top_k=top_k, scaling=2.0)
