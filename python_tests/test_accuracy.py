"""docs/contract.md §2: every backend against the float64 evaluation of §1, forward and every gradient.

Rows: fp32 random / collapse 0.99 / collapse 0.999, bf16 random / collapse 0.99, fp16
random, two identical experts, B = 0; in the variants dense, top-k, normalize off and
orthogonalize off (helpers.VARIANTS).
"""
from __future__ import annotations

import pytest
import torch

from helpers import (
    ACCURACY_ROWS,
    ACCURACY_SHAPE,
    BACKENDS,
    ON_GPU,
    VARIANTS,
    assert_finite,
    assert_matches_oracle,
    assert_rel_close,
    condition_numbers,
    make_problem,
    oracle,
    random_grad,
    run_backend,
    skip_if_interpreted,
)

# T, d_in, d_out, E, r: κ of the random case is below 10 at this shape, collapse 0.99 gives
# κ ≈ 3e2 and 0.999 gives κ ≈ 3e3 (checked below).
SHAPE = ACCURACY_SHAPE
KAPPA_RANGE = {0.0: (1.0, 10.0), 0.99: (1e2, 1e3), 0.999: (1e3, 1e4)}


@pytest.mark.parametrize("collapse", sorted(KAPPA_RANGE))
def test_problem_builder_gives_the_stated_condition_number(collapse):
    kappa = condition_numbers(make_problem(*SHAPE, collapse=collapse, dtype=torch.float64))
    low, high = KAPPA_RANGE[collapse]
    median = kappa.median().item()
    assert low <= median <= high, f"median κ {median:.3g} outside [{low:g}, {high:g}]"
    if collapse == 0.0:
        assert kappa.max().item() < 10


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("row", list(ACCURACY_ROWS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_row(backend, row, variant):
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    options, with_router_input = VARIANTS[variant]
    problem = make_problem(*SHAPE, dtype=dtype, collapse=collapse, seed=11,
                           with_router_input=with_router_input)
    assert_matches_oracle(problem, backend, fwd_tol, grad_tol, scaling=0.75, **options)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_experts_are_finite(backend, dtype, variant):
    options, with_router_input = VARIANTS[variant]
    problem = make_problem(*SHAPE, dtype=dtype, identical_experts=True, seed=12,
                           with_router_input=with_router_input)
    # Route so that both copies are active for many tokens (equal logits, the highest).
    router_weight = problem.router_weight.clone()
    router_weight[1] = router_weight[0]
    problem = problem.replace(router_weight=router_weight)
    if options.get("top_k"):
        router_in = problem.router_input if with_router_input else problem.x
        logits = (router_in.double() @ router_weight.double().t())
        both = (logits.argmax(-1) == 0).sum().item()  # ties go to 0, and 1 is next
        assert both > 0, "no token has both copies active: the case would be empty"
    grad_y = random_grad((SHAPE[0], SHAPE[2]), dtype)
    y, grads = run_backend(problem, backend, grad_y, **options)
    assert_finite(y, "forward")
    for name, g in grads.items():
        assert_finite(g, f"grad {name}")
    if dtype == torch.float32 and not (options.get("normalize", True)
                                       and options.get("orthogonalize", True)):
        # Without normalization the duplicate's residual is ~eps-small and the output is
        # well defined; with it, q_1 is normalized rounding noise (docs/contract.md §2: finite only).
        y_ref, _ = oracle(problem, **options)
        assert_rel_close(y, y_ref, 1e-5, "forward")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("with_base_out", [True, False], ids=["base", "no_base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_B_adds_exactly_zero(backend, dtype, with_base_out, variant):
    if not with_base_out and variant != "dense":
        skip_if_interpreted(backend, "base_out=None is one epilogue, checked in the dense variant")
    options, with_router_input = VARIANTS[variant]
    problem = make_problem(*SHAPE, dtype=dtype, zero_B=True, seed=13,
                           with_base_out=with_base_out, with_router_input=with_router_input)
    grad_y = random_grad((SHAPE[0], SHAPE[2]), dtype)
    y, grads = run_backend(problem, backend, grad_y, scaling=2.0, **options)
    expected = problem.base_out if with_base_out else torch.zeros_like(y)
    assert torch.equal(y, expected), "the adapter must add exactly 0 when B = 0"
    for name, g in grads.items():
        assert_finite(g, f"grad {name}")
    assert grads["B"].abs().sum().item() > 0, "grad B must be non-zero at B = 0"
    if dtype == torch.float32:
        # Nothing is ill-conditioned at B = 0, so the gradients are the float64 ones too.
        _, grads_ref = oracle(problem, grad_y, scaling=2.0, **options)
        for name, g in grads.items():
            assert_rel_close(g, grads_ref[name], 1e-4, f"grad {name}")


# ---- real sizes (GPU only) --------------------------------------------------------------

# (row, T, d_in = d_out, E, r, top_k): docs/contract.md §6 layer sizes with fewer tokens (the float64
# oracle materializes every expert output and MGS tape).
REAL_SIZE_CASES = [
    ("fp32-random", 1024, 1024, 4, 16, None),
    ("fp32-collapse0.999", 1024, 1024, 4, 16, None),
    ("fp32-collapse0.999", 1024, 1024, 8, 16, 2),
    ("bf16-random", 2048, 4096, 4, 16, None),
    ("bf16-random", 2048, 4096, 8, 16, 2),
    ("bf16-random", 1024, 4096, 16, 8, 2),
    ("bf16-collapse0.99", 2048, 4096, 4, 16, None),
    ("fp16-random", 2048, 4096, 4, 16, None),
]


# One real layer width on every device: bf16 rounding inside an eager reference cancels in
# B_iᵀ de_i and showed in the input gradient only at real widths (6.7e-2 against 2e-2 here).
WIDE_LAYER_CASE = ("bf16-random", 256, 4096, 16, 8, 2)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton" or ON_GPU])
def test_accuracy_wide_layer(backend):
    row, T, d, E, r, top_k = WIDE_LAYER_CASE
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    problem = make_problem(T, d, d, E, r, dtype=dtype, collapse=collapse, seed=23,
                           with_router_input=True)
    assert_matches_oracle(problem, backend, fwd_tol, grad_tol, top_k=top_k, scaling=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", REAL_SIZE_CASES,
                         ids=lambda c: f"{c[0]}-T{c[1]}-d{c[2]}-E{c[3]}-r{c[4]}-top{c[5]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_accuracy_real_size(backend, case):
    row, T, d, E, r, top_k = case
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    assert not torch.backends.cuda.matmul.allow_tf32, "docs/contract.md §2 fp32 rows mean IEEE fp32"
    problem = make_problem(T, d, d, E, r, dtype=dtype, collapse=collapse, seed=17,
                           with_router_input=top_k is not None)
    assert_matches_oracle(problem, backend, fwd_tol, grad_tol, top_k=top_k, scaling=2.0)
