"""The triton backend on CPU tensors under the Triton interpreter.

Not collected on its own (no `test_` prefix): `test_triton.py` runs this file in a
subprocess with TRITON_INTERPRET=1, which must be set before triton is imported.
Compares forward and every gradient with the float64 evaluation of SPEC §1 at SPEC §2's
tolerances, on small odd shapes. bf16 runs with its operands upcast to fp32 inside the
kernels (the interpreter cannot do bf16 arithmetic); fp16 runs the real 16-bit path,
including the hi/lo split of fp32 intermediates.
"""
from __future__ import annotations

import os

import pytest
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through test_triton.py (TRITON_INTERPRET=1)"

from conftest import (ACCURACY_ROWS, VARIANTS, assert_finite, assert_matches_oracle,  # noqa: E402
                      assert_rel_close, make_problem, non_contiguous, oracle, random_grad,
                      run_backend)

import omoe_kernels  # noqa: E402
from omoe_kernels.ops import triton_configs, triton_omoe  # noqa: E402

BACKEND = "triton"
SHAPE = (48, 40, 36, 4, 4)   # conftest's §2 shape (κ < 10 random, ≈3e2 / 3e3 collapsed)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every buffer a kernel writes starts as NaN: an unwritten element fails the test."""
    triton_omoe.POISON_OUTPUTS = True
    yield
    triton_omoe.POISON_OUTPUTS = False


def test_triton_is_available_under_the_interpreter():
    assert triton_omoe.AVAILABLE, triton_omoe.IMPORT_ERROR
    assert "triton" in omoe_kernels.available_backends("cpu")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("row", list(ACCURACY_ROWS))
def test_spec2_row(row, variant):
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    options, with_router_input = VARIANTS[variant]
    problem = make_problem(*SHAPE, dtype=dtype, collapse=collapse, seed=21,
                           with_router_input=with_router_input)
    assert_matches_oracle(problem, BACKEND, fwd_tol, grad_tol, scaling=0.75, **options)


# (T, d_in, d_out, E, r, top_k): T = 1, 7, 33; d = 6, 42; r = 4 and 1; E = 1, 3, 8.
ODD_SHAPES = [
    (1, 6, 6, 1, 1, None),
    (7, 6, 42, 3, 4, None),
    (33, 42, 6, 3, 4, 2),
    (33, 42, 42, 8, 1, 3),
    (7, 42, 42, 8, 4, None),
    (1, 42, 42, 3, 1, 1),
    (33, 6, 6, 1, 4, 1),
]


@pytest.mark.parametrize("with_base_out, with_router_input", [(True, False), (False, True)],
                         ids=["base_router_x", "no_base_router_input"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "T{}_din{}_dout{}_E{}_r{}_k{}".format(*s))
def test_odd_shapes_fp32(shape, with_base_out, with_router_input):
    # d_out >= E everywhere: with fewer output dimensions than experts the expert outputs
    # are linearly dependent (κ = ∞) and only finiteness could be checked.
    T, d_in, d_out, E, r, top_k = shape
    problem = make_problem(T, d_in, d_out, E, r, dtype=torch.float32, seed=22,
                           with_base_out=with_base_out, with_router_input=with_router_input)
    assert_matches_oracle(problem, BACKEND, 1e-5, 1e-4, scaling=1.3, top_k=top_k)


@pytest.mark.parametrize("options", [dict(normalize=False, top_k=2), dict(orthogonalize=False, top_k=1),
                                     dict(orthogonalize=False, normalize=False)],
                         ids=["topk_no_normalize", "top1_no_orthogonalize", "plain_mixture"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_odd_shape(dtype, options):
    problem = make_problem(33, 42, 38, 3, 4, dtype=dtype, seed=23, with_router_input=True)
    fwd_tol, grad_tol = (3e-3, 1e-2) if dtype == torch.float16 else (1e-2, 2e-2)
    assert_matches_oracle(problem, BACKEND, fwd_tol, grad_tol, **options)


@pytest.mark.parametrize("case", [
    ("fp32-collapse0.999", (48, 40, 36, 4, 4), dict(top_k=None), False),
    ("bf16-random", (33, 42, 38, 3, 4), dict(top_k=2), True),
    ("fp32-random", (33, 42, 38, 8, 1), dict(top_k=3, normalize=False), False),
    ("fp16-random", (7, 6, 42, 3, 4), dict(orthogonalize=False), True),
], ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_token_algebra_fused_into_the_shrink(case, monkeypatch):
    """OMOE_TRITON_FUSE_TOKEN=1: routing and MGS in the shrink's epilogue."""
    monkeypatch.setenv("OMOE_TRITON_FUSE_TOKEN", "1")
    row, shape, options, with_router_input = case
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    problem = make_problem(*shape, dtype=dtype, collapse=collapse, seed=32,
                           with_router_input=with_router_input)
    assert_matches_oracle(problem, BACKEND, fwd_tol, grad_tol, scaling=0.75, **options)


@pytest.mark.parametrize("top_k", [None, 2])
def test_fp16_coefficients_beyond_the_fp16_range(top_k):
    """Tiny B and large h: z = a ⊙ h exceeds 65504, so its fp16 hi/lo parts need a scale."""
    p = make_problem(33, 42, 38, 3, 4, dtype=torch.float64, seed=33)
    p = p.replace(x=p.x * 300, B=p.B * 1e-6).to(torch.float16)
    grad_y = random_grad((33, 38), torch.float16)
    y, grads = run_backend(p, BACKEND, grad_y, top_k=top_k)
    y_ref, grads_ref = oracle(p, grad_y, top_k=top_k)
    assert_rel_close(y, y_ref, 3e-3, "forward")
    for name in ("x", "A", "router_weight", "base_out"):
        assert_rel_close(grads[name], grads_ref[name], 1e-2, f"grad {name}")
    # grad B itself is ~1e6 here (1/‖B‖): compare where it fits in fp16.
    fits = grads_ref["B"].abs() < 6e4
    assert fits.float().mean() > 0.1
    assert_rel_close(grads["B"][fits], grads_ref["B"][fits], 1e-2, "grad B (fp16-representable part)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_identical_experts_are_finite(dtype):
    problem = make_problem(*SHAPE, dtype=dtype, identical_experts=True, seed=24)
    router_weight = problem.router_weight.clone()
    router_weight[1] = router_weight[0]         # both copies active, equal gates
    problem = problem.replace(router_weight=router_weight)
    y, grads = run_backend(problem, BACKEND, random_grad((SHAPE[0], SHAPE[2]), dtype))
    assert_finite(y, "forward")
    for name, g in grads.items():
        assert_finite(g, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_zero_B_adds_exactly_zero(dtype):
    problem = make_problem(*SHAPE, dtype=dtype, zero_B=True, seed=25)
    y, grads = run_backend(problem, BACKEND, random_grad((SHAPE[0], SHAPE[2]), dtype), scaling=2.0)
    assert torch.equal(y, problem.base_out)
    for name, g in grads.items():
        assert_finite(g, f"grad {name}")
    assert grads["B"].abs().sum() > 0, "grad B must be non-zero at B = 0"


def test_top_k_ties_go_to_the_lower_index():
    problem = make_problem(33, 42, 38, 4, 4, dtype=torch.float32, seed=26)
    router_weight = problem.router_weight.clone()
    router_weight[2] = router_weight[1]         # equal logits for experts 1 and 2
    router_weight[3] = router_weight[1]
    problem = problem.replace(router_weight=router_weight)
    assert_matches_oracle(problem, BACKEND, 1e-5, 1e-4, top_k=2)


def test_non_contiguous_inputs_and_3d_x():
    problem = make_problem(lead_shape=(3, 11), d_in=42, d_out=38, num_experts=3, rank=4,
                           dtype=torch.float32, seed=27, with_router_input=True)
    problem = problem.replace(x=non_contiguous(problem.x, "strided"),
                              A=non_contiguous(problem.A, "transposed"),
                              B=non_contiguous(problem.B, "transposed"),
                              router_weight=non_contiguous(problem.router_weight, "transposed"),
                              base_out=non_contiguous(problem.base_out, "strided"),
                              router_input=non_contiguous(problem.router_input, "transposed"))
    assert_matches_oracle(problem, BACKEND, 1e-5, 1e-4, top_k=2)


def test_float64_inputs():
    problem = make_problem(33, 42, 38, 3, 4, dtype=torch.float64, seed=28)
    assert_matches_oracle(problem, BACKEND, 1e-12, 1e-10, top_k=2)


def test_nan_in_x_propagates_to_its_token_only():
    problem = make_problem(7, 6, 6, 3, 4, dtype=torch.float32, seed=29)
    x = problem.x.clone()
    x[3, 2] = float("nan")
    y, _ = run_backend(problem.replace(x=x), BACKEND)
    assert torch.isnan(y[3]).all()
    assert torch.isfinite(torch.cat([y[:3], y[4:]])).all()


def test_opcheck_forward_op():
    problem = make_problem(7, 6, 42, 3, 4, dtype=torch.float32, seed=30)
    p = problem
    args = (p.x, p.A.requires_grad_(), p.B, p.router_weight, None, p.base_out, 0.5, 2, True, True, 1e-6)
    torch.library.opcheck(triton_omoe.forward_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_backward_op():
    p = make_problem(7, 6, 42, 3, 4, dtype=torch.float32, seed=31, with_router_input=True)
    y, h, logits, G = triton_omoe.forward_op(p.x, p.A, p.B, p.router_weight, p.router_input, None,
                                             0.5, 2, True, False, 1e-6)
    grad_y = random_grad(y.shape, y.dtype)
    args = (grad_y, p.x, p.A, p.B, p.router_weight, p.router_input, h, logits, G, 0.5, 2, True,
            False, 1e-6)
    torch.library.opcheck(triton_omoe.backward_op, args, test_utils=("test_schema", "test_faketensor"))


def test_layout_pads_for_tl_dot():
    for E in range(1, 17):
        for r in (1, 2, 3, 4, 8, 16):
            L = triton_omoe.layout(E, r)
            assert L.EP >= E and L.RP >= r and L.ERP == L.EP * L.RP and L.ERP >= 16
            assert L.EPL >= 16 and L.EPL >= E
            assert triton_configs.token_block(L) >= 1
