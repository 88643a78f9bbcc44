"""The compiled CPU op's routes to the per-token Gram matrix (docs/algorithm.md,
"Routes"): each one against the float64 oracle on every accuracy row of
docs/contract.md §2 (dense and top-k: under top-k the direct route forms e_i only for each
token's active experts), and the cost model's choice between them.

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
from omoe_kernels.testing.shapes import RANDOM_TOLERANCE

pytestmark = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS,
                                reason="the compiled CPU op is not built")

# direct: under top-k, e_i of each token's active experts only; direct_all: of all E.
ROUTES = ("batched", "pairs", "pairs_gemm", "direct", "direct_all")
SHAPE = (48, 40, 36, 4, 4)  # as test_accuracy: κ < 10 random, ≈3e2 / 3e3 at collapse


def _row(row: str) -> tuple:
    """(dtype, collapse, (forward, gradient) tolerance) of an accuracy row, or of "fp64"
    (float64 random inputs)."""
    if row == "fp64":
        return torch.float64, 0.0, RANDOM_TOLERANCE[torch.float64]
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    return dtype, collapse, (fwd_tol, grad_tol)


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


@pytest.mark.parametrize("row", [*ACCURACY_ROWS, "fp64"])
@pytest.mark.parametrize("experts, rank, top_k", [
    (3, 8, None), (16, 20, None), (17, 20, None), (16, 4, None), (17, 4, None), (20, 3, 5),
    (20, 3, 16), (20, 3, 17)])
def test_direct_route_gram_and_de_over_row_tiles(monkeypatch, experts, rank, top_k, row):
    # The direct route's S and de loops take the k rows two (S) or four (de) at a time in
    # chunks of 128 values, up to 16 rows: an odd k pads a zero row, 300 values are two
    # chunks and a 44-value chunk ending in a 4-value tail. 17 rows take the per-pair
    # loops. Dense routing runs the loops up to 16 experts; 17 experts of rank 4 (E >= r)
    # take batched GEMMs instead.
    # Every accuracy row: 16-bit inputs run these loops on float32 expert outputs.
    dtype, collapse, tolerance = _row(row)
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    problem = make_problem(9, 16, 300, experts, rank, seed=41, dtype=dtype, collapse=collapse)
    assert_matches_oracle(problem, "cpu", *tolerance, top_k=top_k)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("tokens, d_out", [(7, 9), (1, 5461)])
def test_route_rank4_gradients_two_rows_per_vector(route, top_k, tokens, d_out):
    # fp32 at rank 4: dB's rows of 4 go two to a vector. An odd d_out leaves each expert's
    # last row alone; at 5461 rows per expert two threads split dB inside an expert.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        problem = make_problem(tokens, 12, d_out, 3, 4, seed=18)
        assert_matches_oracle(problem, "cpu", 1e-5, 1e-4, top_k=top_k)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rank", [3, 16, 64])
@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_pairs_backward_on_two_threads(monkeypatch, rank, top_k):
    # The pairs backward forms a token's Gram part of dh and its dG terms in one sweep over
    # G's active blocks, in a scratch of its thread: 96 tokens keep both threads busy.
    monkeypatch.setenv("OMOE_ROUTE", "pairs")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        problem = make_problem(96, 24, 20, 4, rank, seed=29)
        assert_matches_oracle(problem, "cpu", 1e-5, 1e-4, top_k=top_k)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("row", [*ACCURACY_ROWS, "fp64"])
@pytest.mark.parametrize("route_name", ["pairs", "pairs_gemm"])
@pytest.mark.parametrize("threads, experts, rank, d_out", [(1, 6, 17, 40), (2, 8, 24, 512)])
def test_route_through_g_formed_by_panels(monkeypatch, row, route_name, threads, experts,
                                          rank, d_out):
    # From E·r = 96 columns (192 and d_out >= 512 on several threads) G is formed as the
    # GEMMs of its upper block triangle, then mirrored: 102 columns split unevenly into
    # panels; the pairs route reads G's lower blocks, pairs_gemm its whole block rows.
    dtype, collapse, tolerance = _row(row)
    monkeypatch.setenv("OMOE_ROUTE", route_name)
    problem = make_problem(20, 16, d_out, experts, rank, seed=53, dtype=dtype,
                           collapse=collapse)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        assert_matches_oracle(problem, "cpu", *tolerance, scaling=0.75)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("rank", [3, 4, 8, 32, 64])
@pytest.mark.parametrize("tokens", [1, 3])
def test_direct_route_expert_outputs_of_a_few_tokens(monkeypatch, rank, tokens):
    # A few tokens form e_i by a loop over B's rows: eight rows per step at float ranks 4
    # and multiples of 8, one at a time at other ranks and for an expert's last rows
    # (d_out = 37); at d_out = 2053 two threads split an expert's rows.
    monkeypatch.setenv("OMOE_ROUTE", "direct_all")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for d_out in (37, 2053):
            problem = make_problem(tokens, 12, d_out, 3, rank, seed=23)
            assert_matches_oracle(problem, "cpu", 1e-5, 1e-4)
            assert_matches_oracle(problem, "cpu", 1e-5, 1e-4, top_k=2)
    finally:
        torch.set_num_threads(threads)


# ---- top-k: the direct route forms e_i only for each token's active experts ------------

@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_route_topk_few_and_odd_tokens(route, tokens):
    # T = 1 and 7: an expert with no token, or with one; T = 0: no rows at all.
    problem = make_problem(tokens, 12, 10, 5, 3, seed=17, with_router_input=True)
    if tokens == 0:
        y, grads = run_backend(problem, "cpu", random_grad((0, 10), torch.float32), top_k=2)
        assert y.shape == (0, 10)
        assert not grads["B"].any() and not grads["A"].any()
        return
    assert_matches_oracle(problem, "cpu", 1e-5, 1e-4, top_k=2)


@pytest.mark.parametrize("row", [*(r for r in ACCURACY_ROWS if r.startswith("fp32")), "fp64"])
@pytest.mark.parametrize("rank", [3, 4, 16])
def test_topk_direct_route_loops_over_an_experts_few_rows(monkeypatch, rank, row):
    # An expert with at most 8 rows (every expert at 8 tokens) forms e, dh and dB by loops
    # over B_i's rows, without a GEMM; one with more rows (48 tokens over 4 experts)
    # takes the GEMMs. Both match the oracle at the row's tolerance.
    dtype, collapse, tolerance = _row(row)
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    for tokens, experts, gemms in ((8, 16, False), (48, 4, True)):
        problem = make_problem(tokens, 24, 20, experts, rank, seed=31, dtype=dtype,
                               collapse=collapse)
        p = {n: t.detach().requires_grad_(True) for n, t in problem.tensors().items()}
        with profile() as prof:
            y = ok.omoe_lora(p["x"], p["A"], p["B"], p["router_weight"],
                             base_out=p["base_out"], top_k=2, backend="cpu")
            y.backward(torch.ones_like(y))
        in_route = [e.name for e in prof.events() if e.cpu_parent is not None
                    and e.cpu_parent.name in ("omoe::direct", "omoe::direct_backward")]
        assert any(n in ("aten::mm", "aten::addmm") for n in in_route) == gemms, in_route
        assert_matches_oracle(problem, "cpu", *tolerance, top_k=2)


@pytest.mark.parametrize("row", [*ACCURACY_ROWS, "fp64"])
def test_topk_direct_route_forms_y_dz_and_dB_on_the_active_rows(monkeypatch, row):
    # y, the expand's dz and dB come from each token's active experts (no B_cat, no
    # expand GEMM). 250 tokens with d_out = 2048 at E = 3 take three chunks of at least
    # 96 tokens (64 rows per expert), dB summed over them; 9 tokens take one. The
    # scaling is not 1, and base_out is given or not.
    dtype, collapse, tolerance = _row(row)
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    for tokens, d_out, with_base in ((250, 2048, True), (9, 20, False)):
        problem = make_problem(tokens, 16, d_out, 3, 4, seed=37, dtype=dtype,
                               collapse=collapse, with_base_out=with_base)
        p = {n: t.detach().requires_grad_(True) for n, t in problem.tensors().items()}
        with profile() as prof:
            y = ok.omoe_lora(p["x"], p["A"], p["B"], p["router_weight"],
                             base_out=p.get("base_out"), scaling=0.75, top_k=2, backend="cpu")
            y.backward(torch.ones_like(y))
        names = {e.name for e in prof.events()}
        assert "omoe::direct" in names and "omoe::expand" not in names, names
        assert "omoe::expand_backward_input" not in names, names
        assert_matches_oracle(problem, "cpu", *tolerance, scaling=0.75, top_k=2)


def test_topk_direct_route_loops_split_experts_across_threads(monkeypatch):
    # 64 tokens over 32 experts: every expert's few rows take the loops (e, dz, dh and dB),
    # which two threads share out by expert. Forward and gradients match the oracle.
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    problem = make_problem(64, 16, 2048, 32, 16, seed=47)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_matches_oracle(problem, "cpu", 1e-5, 1e-4, top_k=2)
    finally:
        torch.set_num_threads(threads)


def test_route_topk_ties_and_nan_logits_route_as_the_oracle(route):
    # Experts 1 and 2 tie in every token's logits (ties go to the lower index); token 3's
    # logits are all NaN (NaN ranks above every number, the lowest indices win, and its
    # output is NaN). The direct route groups tokens by the same routing as the pass.
    problem = make_problem(9, 12, 10, 4, 3, dtype=torch.float64, seed=18)
    W = problem.router_weight.clone()
    W[2] = W[1]
    problem = problem.replace(router_weight=W)
    assert_matches_oracle(problem, "cpu", 1e-12, 1e-10, top_k=2)
    assert_matches_oracle(problem, "cpu", 1e-12, 1e-10, top_k=3)
    x = problem.x.clone()
    x[3, 0] = float("nan")
    problem = problem.replace(x=x)
    y, _ = run_backend(problem, "cpu", top_k=2)
    y_ref, _ = oracle(problem, top_k=2)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref)) and torch.isnan(y[3]).all()
    assert_rel_close(y[torch.arange(9) != 3], y_ref[torch.arange(9) != 3], 1e-12, "forward")


@pytest.mark.parametrize("experts,top_k", [(5, 2), (9, 4), (32, 2), (32, 7), (40, 3)])
def test_route_topk_breaks_many_ties_as_the_oracle(route, experts, top_k):
    # Logits that count the ones two 0/1 vectors share take a few exact values, so most
    # tokens tie at their k-th place: each expert's insertion among the best so far must
    # land where the oracle's stable sort puts it, at any E and top_k.
    gen = torch.Generator().manual_seed(experts * 10 + top_k)
    problem = make_problem(23, 6, top_k + 5, experts, 2, dtype=torch.float64, seed=41,
                           with_router_input=True)
    problem = problem.replace(
        router_input=torch.randint(0, 2, (23, 6), generator=gen).to(torch.float64),
        router_weight=torch.randint(0, 2, (experts, 6), generator=gen).to(torch.float64))
    logits = problem.router_input @ problem.router_weight.t()
    kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1:top_k + 1]
    assert (kth[:, 0] == kth[:, 1]).sum() >= 12, "too few tokens tie at the k-th place"
    assert_matches_oracle(problem, "cpu", 1e-12, 1e-10, top_k=top_k)


def _routed_to_experts_0_and_1(tokens, rank, seed):
    """Logits c_i·Σ(router_input) with c = (3, 2, 1, 0) and a positive router_input: under
    top-2 every token routes to experts 0 and 1, never to 3."""
    problem = make_problem(tokens, 8, 7, 4, rank, seed=seed, with_router_input=True)
    W = torch.tensor([3.0, 2.0, 1.0, 0.0]).unsqueeze(1).expand(4, 8).contiguous()
    return problem.replace(router_input=problem.router_input.abs() + 0.1, router_weight=W)


def test_route_topk_nan_in_an_unrouted_expert_stays_out(route):
    # Expert 3's A holds a NaN (so its h_3 is NaN).
    clean = _routed_to_experts_0_and_1(6, 2, seed=19)
    A = clean.A.clone()
    A[3, 1, 2] = float("nan")
    grad_y = random_grad((6, 7), torch.float32)
    y_clean, _ = run_backend(clean, "cpu", top_k=2)
    y, grads = run_backend(clean.replace(A=A), "cpu", grad_y, top_k=2)
    assert torch.equal(y, y_clean), "an unrouted expert's NaN reached the output"
    if route == "direct":  # no GEMM reads expert 3: its dB is exactly 0, the rest finite
        assert torch.equal(grads["B"][3], torch.zeros_like(grads["B"][3]))
        assert torch.isfinite(grads["B"]).all() and torch.isfinite(grads["router_weight"]).all()


@pytest.mark.parametrize("tokens", [6, 40])
def test_topk_direct_route_keeps_an_unrouted_experts_inf_in_B_out(monkeypatch, tokens):
    # y, dz and dB come from the active experts' rows (6 tokens: loops; 40: GEMMs): an Inf
    # in the B of expert 3, which no token routes to, reaches neither y nor any gradient.
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    clean = _routed_to_experts_0_and_1(tokens, 4, seed=23)
    B = clean.B.clone()
    B[3, 2, 1] = float("inf")
    grad_y = random_grad((tokens, 7), torch.float32)
    y_clean, grads_clean = run_backend(clean, "cpu", grad_y, top_k=2)
    y, grads = run_backend(clean.replace(B=B), "cpu", grad_y, top_k=2)
    assert torch.equal(y, y_clean), "an unrouted expert's Inf reached the output"
    for name, grad in grads.items():
        assert torch.equal(grad, grads_clean[name]), f"an unrouted expert's Inf reached d{name}"
    assert not grads["B"][3].any()


_FORWARD_ROUTES = {"omoe::direct": "direct", "omoe::pairs": "G", "omoe::batched": "G"}
_BACKWARD_ROUTES = {"omoe::direct_backward": "direct", "omoe::pairs_backward": "G",
                    "omoe::pairs_gemm_backward": "G", "omoe::batched_backward": "G"}


@pytest.mark.parametrize("experts, rank", [(32, 4), (8, 16), (4, 64)])
def test_a_top2_training_step_goes_direct_or_through_g_both_ways(monkeypatch, experts, rank):
    # A direct forward leaves no G, so a backward through G would pack B_cat and form G
    # itself: the model sends a forward direct only where its backward goes direct too.
    # At T = 512, d = 1024 these points sit near the crossover of the two.
    monkeypatch.delenv("OMOE_ROUTE", raising=False)
    p = make_problem(512, 1024, 1024, experts, rank, seed=43)
    leaves = {n: t.detach().requires_grad_(True) for n, t in p.tensors().items()}
    with profile() as prof:
        y = ok.omoe_lora(leaves["x"], leaves["A"], leaves["B"], leaves["router_weight"],
                         base_out=leaves["base_out"], top_k=2, backend="cpu")
        y.backward(torch.ones_like(y))
    names = [e.name for e in prof.events()]
    forward = {_FORWARD_ROUTES[n] for n in names if n in _FORWARD_ROUTES}
    backward = {_BACKWARD_ROUTES[n] for n in names if n in _BACKWARD_ROUTES}
    assert len(forward) == 1 and forward == backward, (forward, backward)


def _cpu_gradcheck(problem, top_k) -> bool:
    """torch.autograd.gradcheck of the cpu backend over every input of a float64 problem."""
    names = list(problem.tensors())
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in problem.tensors().values())

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return ok.omoe_lora(kw["x"], kw["A"], kw["B"], kw["router_weight"], scaling=0.7,
                            base_out=kw.get("base_out"), router_input=kw.get("router_input"),
                            top_k=top_k, backend="cpu")

    return torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("tokens, top_k, experts, d_out",
                         [(5, 2, 4, 5), (24, 2, 3, 5), (5, None, 4, 5), (5, None, 17, 20)],
                         ids=["top2", "top2-gemms", "dense", "dense-17"])
def test_route_direct_gradcheck_float64(monkeypatch, tokens, top_k, experts, d_out):
    # dense: S and de by the loops over tiles of rows, and by the GEMMs batched over tokens
    # above 16 experts (d_out > E keeps the 17 outputs independent); top-2: on the active
    # rows, by loops over B_i's rows (5 tokens) and by GEMMs (24 tokens over 3 experts).
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    problem = make_problem(tokens, 4, d_out, experts, 2, dtype=torch.float64, seed=20,
                           with_router_input=True)
    assert _cpu_gradcheck(problem, top_k)


@pytest.mark.parametrize("route_name", ["pairs", "pairs_gemm"])
@pytest.mark.parametrize("top_k", [2, None], ids=["top2", "dense"])
def test_route_pairs_gradcheck_float64(monkeypatch, route_name, top_k):
    # The backward through G: pairs sweeps each active block of G per token into dh and
    # dG; pairs_gemm hands W to two GEMMs. Rank 3: no 8-wide chunk of the pair products.
    monkeypatch.setenv("OMOE_ROUTE", route_name)
    problem = make_problem(5, 4, 5, 4, 3, dtype=torch.float64, seed=22, with_router_input=True)
    assert _cpu_gradcheck(problem, top_k)


@pytest.mark.parametrize("route_name", ["pairs", "pairs_gemm"])
def test_route_through_g_formed_by_panels_gradcheck_float64(monkeypatch, route_name):
    # E·r = 102 on one thread: G from the GEMMs of its upper block triangle (d_out > E
    # keeps the 6 outputs independent).
    monkeypatch.setenv("OMOE_ROUTE", route_name)
    problem = make_problem(3, 3, 8, 6, 17, dtype=torch.float64, seed=23)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _cpu_gradcheck(problem, None)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("top_k", [2, None], ids=["top2", "dense"])
def test_pairs_gemm_backward_makes_as_many_calls_at_any_expert_count(monkeypatch, top_k):
    # dG + dGᵀ is one batched GEMM per chunk, not a GEMM per expert: at a few tokens the
    # calls would outweigh the arithmetic.
    from torch.profiler import profile

    monkeypatch.setenv("OMOE_ROUTE", "pairs_gemm")
    calls = {}
    for E in (4, 16):
        problem = make_problem(8, 24, 20, E, 4, seed=23)
        p = {n: t.detach().requires_grad_(True) for n, t in problem.tensors().items()}
        y = ok.omoe_lora(p["x"], p["A"], p["B"], p["router_weight"], base_out=p["base_out"],
                         top_k=top_k, backend="cpu")
        with profile() as prof:
            y.backward(torch.ones_like(y))
        calls[E] = sorted(e.name for e in prof.events() if e.cpu_parent is not None
                          and e.cpu_parent.name == "omoe::pairs_gemm_backward")
    assert calls[4] and calls[16] == calls[4], calls


@pytest.mark.parametrize("tokens", [4, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gram_backward_is_one_gemm_in_the_accumulate_dtype(monkeypatch, tokens, dtype):
    # B_cat (dG + dGᵀ) multiplies the float32 B_cat by dG + dGᵀ rounded to float32, adding
    # into B_cat's gradient: no float64 copy of B_cat, no float64 product to convert back.
    monkeypatch.setenv("OMOE_ROUTE", "pairs_gemm")
    problem = make_problem(tokens, 64, 48, 4, 8, dtype=dtype, seed=29)
    p = {n: t.detach().requires_grad_(True) for n, t in problem.tensors().items()}
    y = ok.omoe_lora(p["x"], p["A"], p["B"], p["router_weight"], backend="cpu")
    with profile(record_shapes=True) as prof:
        y.backward(torch.ones_like(y))
    ops = [e for e in prof.events()
           if e.cpu_parent is not None and e.cpu_parent.name == "omoe::gram_backward"]
    gemms = [e.name for e in ops if e.name in ("aten::mm", "aten::addmm", "aten::addmm_")]
    assert gemms == ["aten::addmm_"], ops
    # The one conversion: dG + dGᵀ ([E·r, E·r]) to float32, never B_cat ([d_out, E·r]).
    converted = [e.input_shapes[0] for e in ops if e.name == "aten::to"]
    assert converted == [[32, 32]], converted


def test_route_bad_name_is_refused(monkeypatch):
    monkeypatch.setenv("OMOE_ROUTE", "fastest")
    problem = make_problem(*SHAPE, seed=14)
    with pytest.raises(RuntimeError, match="OMOE_ROUTE must be"):
        run_backend(problem, "cpu")


# ---- the cost model's choice (unset OMOE_ROUTE) ---------------------------------------

def _ranges(T, E, r, d, top_k=None, train=True, calls=1, with_ops=False):
    """The omoe:: profiler ranges of the last of `calls` calls with the same weights (and,
    with_ops, the names of every event too)."""
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
    names = {e.name for e in prof.events()}
    ranges = {n for n in names if n.startswith("omoe::")}
    return (ranges, names) if with_ops else ranges


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


def test_dense_training_at_large_er_and_few_tokens_takes_the_direct_route(auto_route):
    # E·r = 256, 64 tokens, B new: G and B_cat(dG + dGᵀ) cost 2·d·(E·r)²; the direct route
    # forms S and de by float64 GEMMs batched over the tokens, T·E²·d each.
    names = _ranges(T=64, E=16, r=16, d=256)
    assert {"omoe::direct", "omoe::direct_backward"} <= names
    assert "omoe::gram" not in names and "omoe::gram_recompute" not in names


def test_a_backward_without_G_weighs_its_own_costs(auto_route):
    # 32 tokens of E·r = 64 at d = 256: the forward forms y from the expert outputs, which
    # leaves no G. Its cost is paid, so the backward compares its own: the direct route
    # against forming G (d·R²) and B_cat(dG + dGᵀ) for one use.
    names = _ranges(T=32, E=2, r=32, d=256)
    assert {"omoe::direct", "omoe::direct_backward"} <= names
    assert "omoe::gram_recompute" not in names


@pytest.mark.parametrize("E, r, batched", [(17, 4, True), (16, 4, False), (8, 64, False)])
def test_dense_direct_route_batches_S_only_where_S_outweighs_e(monkeypatch, E, r, batched):
    # The forced direct forward, past the few tokens whose e = B h is a loop over B's rows,
    # makes one batched GEMM for e per chunk, and a second for every token's S = e eᵀ only
    # when E >= r and E > 16; below E >= r the per-token loops cost less than copying e to
    # float64 for the GEMM (bench/notes/cpu-dense-direct-gemm.md), and up to 16 experts
    # they work on tiles of rows (bench/notes/cpu-direct-row-tiles.md).
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(16, 64, generator=gen)
    A = torch.randn(E, r, 64, generator=gen).div_(8)
    B = torch.randn(E, 64, r, generator=gen).div_(r ** 0.5)
    W = torch.randn(E, 64, generator=gen)
    with torch.no_grad(), profile() as prof:
        y = ok.omoe_lora(x, A, B, W, backend="cpu")
    assert [e.name for e in prof.events()].count("aten::bmm") == (2 if batched else 1)
    assert_rel_close(y, ok.omoe_lora(x.double(), A.double(), B.double(), W.double(),
                                     backend="reference").float(), 1e-5, "direct, dense")


def test_top1_of_many_experts_takes_the_active_pairs(auto_route):
    # k² r² per token from G, not the (E·r)² of all pairs.
    names = _ranges(T=512, E=16, r=2, d=64, top_k=1)
    assert {"omoe::pairs", "omoe::pairs_backward"} <= names


def test_top2_of_many_experts_trains_on_the_active_rows(auto_route):
    # A training step at E·r = 256 with B new: forming G costs d·(E·r)², the direct route
    # T·k·r·d for the 2 active experts of each token, by a GEMM per expert (no batched GEMM
    # over all E).
    names, ops = _ranges(T=64, E=16, r=16, d=256, top_k=2, with_ops=True)
    assert {"omoe::direct", "omoe::direct_backward"} <= names
    assert "omoe::gram" not in names and "aten::bmm" not in ops


def test_reused_weights_switch_to_the_cached_gram(auto_route):
    # First call with new weights: direct. The same weights again: G is formed once and
    # kept, so later calls cost T·(E·r)² plus the check that B is unchanged, not T·E·r·d.
    assert "omoe::direct" in _ranges(T=16, E=4, r=16, d=256, train=False, calls=1)
    assert "omoe::gram" in _ranges(T=16, E=4, r=16, d=256, train=False, calls=2)


@pytest.mark.parametrize("E, r, d", [(4, 64, 1024), (4, 8, 256)])
def test_decoding_reads_each_weight_once(empty_weight_cache, E, r, d):
    # One token: a route through the cached G reads B, the cache's copy of B, G and B_cat;
    # y from the expert outputs reads B once and keeps nothing. At E·r = 32, d = 256 (the
    # tiny LLaMA of bench.decode) the arithmetic alone would favour G; the reads do not.
    names = _ranges(T=1, E=E, r=r, d=d, train=False, calls=3)
    assert "omoe::direct" in names and not names & {"omoe::gram", "omoe::expand"}
    assert torch.ops.omoe_cache.stats()[2] == 0, "the weight cache kept an entry"


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
@pytest.mark.parametrize("row", list(ACCURACY_ROWS))
def test_few_tokens_form_y_from_the_expert_outputs(auto_route, row, top_k):
    # 2 tokens against E·r = 64 at d = 36: y = base + s·Σ a_i e_i, no expand GEMM.
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    problem = make_problem(2, 40, 36, 4, 16, dtype=dtype, collapse=collapse, seed=21)
    with torch.no_grad(), profile() as prof:
        run_backend(problem, "cpu", top_k=top_k)
    names = {e.name for e in prof.events()}
    assert "omoe::direct" in names and "omoe::expand" not in names
    assert_matches_oracle(problem, "cpu", fwd_tol, grad_tol, scaling=0.75, top_k=top_k)


def test_y_from_expert_outputs_leaves_an_unrouted_experts_nan_out(auto_route):
    # Expert 3's B holds a NaN, so its e_3 is NaN; its coefficient 0 must keep it out of y.
    clean = _routed_to_experts_0_and_1(1, 8, seed=22)
    B = clean.B.clone()
    B[3, 1, 0] = float("nan")
    with torch.no_grad(), profile() as prof:
        y, _ = run_backend(clean.replace(B=B), "cpu", top_k=2)
    assert "omoe::expand" not in {e.name for e in prof.events()}
    y_clean, _ = run_backend(clean, "cpu", top_k=2)
    assert torch.equal(y, y_clean), "an unrouted expert's NaN reached the output"


def test_auto_route_matches_the_oracle_at_one_token(auto_route):
    problem = make_problem(1, 40, 36, 4, 4, seed=15)
    assert_matches_oracle(problem, "cpu", 1e-5, 1e-4)
