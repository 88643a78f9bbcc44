"""The compiled CPU op's three routes to the per-token Gram matrix (docs/algorithm.md,
"Routes"): each one against the float64 oracle on every accuracy row of
docs/contract.md §2, and the cost model's choice between them.

OMOE_ROUTE (read by the C++ op at every call) forces a route; unset, the op picks one.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

import omoe_kernels as ok
from helpers import (
    ACCURACY_ROWS,
    COMPILED_BACKENDS,
    VARIANTS,
    assert_finite,
    assert_matches_oracle,
    assert_rel_close,
    make_problem,
    oracle,
    random_grad,
    run_backend,
)

pytestmark = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS,
                                reason="the compiled CPU op is not built")

ROUTES = ("batched", "pairs", "pairs_gemm", "direct")
SHAPE = (48, 40, 36, 4, 4)  # as test_accuracy: κ < 10 random, ≈3e2 / 3e3 at collapse


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    monkeypatch.setenv("OMOE_ROUTE", request.param)
    return request.param


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("row", list(ACCURACY_ROWS))
def test_route_accuracy_row(route, row, variant):
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    options, with_router_input = VARIANTS[variant]
    problem = make_problem(*SHAPE, dtype=dtype, collapse=collapse, seed=11,
                           with_router_input=with_router_input)
    assert_matches_oracle(problem, "cpu", fwd_tol, grad_tol, scaling=0.75, **options)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_route_identical_experts_are_finite(route, dtype, top_k):
    problem = make_problem(*SHAPE, dtype=dtype, identical_experts=True, seed=12)
    router_weight = problem.router_weight.clone()
    router_weight[1] = router_weight[0]  # both copies active together for many tokens
    problem = problem.replace(router_weight=router_weight)
    y, grads = run_backend(problem, "cpu", random_grad((SHAPE[0], SHAPE[2]), dtype), top_k=top_k)
    assert_finite(y, "forward")
    for name, g in grads.items():
        assert_finite(g, f"grad {name}")


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_route_zero_B_adds_exactly_zero(route, top_k):
    problem = make_problem(*SHAPE, dtype=torch.float32, zero_B=True, seed=13)
    grad_y = random_grad((SHAPE[0], SHAPE[2]), torch.float32)
    y, grads = run_backend(problem, "cpu", grad_y, scaling=2.0, top_k=top_k)
    assert torch.equal(y, problem.base_out), "the adapter must add exactly 0 when B = 0"
    assert grads["B"].abs().sum().item() > 0, "grad B must be non-zero at B = 0"
    _, grads_ref = oracle(problem, grad_y, scaling=2.0, top_k=top_k)
    for name, g in grads.items():
        assert_rel_close(g, grads_ref[name], 1e-4, f"grad {name}")


@pytest.mark.parametrize("top_k", [None, 3], ids=["dense", "top3"])
@pytest.mark.parametrize("collapse", [0.0, 0.999], ids=["random", "collapse0.999"])
def test_route_vector_loops_and_their_tails(route, top_k, collapse):
    # rank 12: one 8-wide chunk of the vectorized pair products and a 4-entry tail;
    # 70 tokens: two blocks of the pass, the dense Gram of the second one 4 + 2 tokens.
    problem = make_problem(70, 40, 36, 5, 12, seed=16, collapse=collapse)
    fwd_tol, grad_tol = (1e-5, 1e-4) if collapse == 0.0 else (1e-3, 1e-2)
    assert_matches_oracle(problem, "cpu", fwd_tol, grad_tol, top_k=top_k)


def test_route_bad_name_is_refused(monkeypatch):
    monkeypatch.setenv("OMOE_ROUTE", "fastest")
    problem = make_problem(*SHAPE, seed=14)
    with pytest.raises(RuntimeError, match="OMOE_ROUTE must be"):
        run_backend(problem, "cpu")


# ---- the cost model's choice (unset OMOE_ROUTE) ---------------------------------------

def _ranges(T, E, r, d, top_k=None, train=True, calls=1):
    """The omoe:: profiler ranges of the last of `calls` calls with the same weights."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(T, d, generator=gen, requires_grad=train)
    A = torch.randn(E, r, d, generator=gen).div_(d ** 0.5).requires_grad_(train)
    B = torch.randn(E, d, r, generator=gen).div_(r ** 0.5).requires_grad_(train)
    W = torch.randn(E, d, generator=gen).requires_grad_(train)
    for n in range(calls):
        with profile() as prof, torch.set_grad_enabled(train):
            y = ok.omoe_lora(x, A, B, W, top_k=top_k, backend="cpu")
            if train:
                y.sum().backward()
    return {e.name for e in prof.events() if e.name.startswith("omoe::")}


@pytest.fixture
def auto_route(monkeypatch):
    monkeypatch.delenv("OMOE_ROUTE", raising=False)


def test_few_tokens_take_the_direct_route(auto_route):
    # T = 1 against E·r = 64: forming G (d·(E·r)²) would cost far more than e_i = B_i h_i.
    names = _ranges(T=1, E=4, r=16, d=256)
    assert {"omoe::direct", "omoe::direct_backward"} <= names
    assert "omoe::gram" not in names


def test_many_tokens_of_dense_routing_hand_dS_to_the_gemms(auto_route):
    # All E² pairs active over many tokens: dS goes back through W and two batched GEMMs,
    # not through per-token scalar updates of dG.
    names = _ranges(T=4096, E=4, r=4, d=64)
    assert {"omoe::gram", "omoe::pairs", "omoe::pairs_gemm_backward",
            "omoe::gram_backward"} <= names
    assert not names & {"omoe::direct", "omoe::batched", "omoe::pairs_backward"}


def test_top1_of_many_experts_takes_the_active_pairs(auto_route):
    # k² r² per token from G, not the (E·r)² of all pairs.
    names = _ranges(T=512, E=16, r=2, d=64, top_k=1)
    assert {"omoe::pairs", "omoe::pairs_backward"} <= names


def test_reused_weights_switch_decoding_to_the_cached_gram(auto_route):
    # First call with new weights: one token, direct. The same weights again: G is formed
    # once and kept, so later tokens cost T·(E·r)², not T·E·r·d.
    assert "omoe::direct" in _ranges(T=1, E=4, r=16, d=256, train=False, calls=1)
    assert "omoe::gram" in _ranges(T=1, E=4, r=16, d=256, train=False, calls=2)


def test_auto_route_matches_the_oracle_at_one_token(auto_route):
    problem = make_problem(1, 40, 36, 4, 4, seed=15)
    assert_matches_oracle(problem, "cpu", 1e-5, 1e-4)
