"""Few tokens on the CPU: the shrink forms h and the router logits by dot products, the
expand and its gradients run on B's own blocks (csrc/omoe_cpu_expand.h), and no packed copy
B_cat of B is made for weights that changed.

The weight cache's counts show whether a call made B_cat: after a few-token step of the
direct route (which needs no G) on fresh weights the cache holds B's copy and no B_cat; a
many-token call on the same weights keeps B_cat in its place. Every case also checks the
results against the float64 oracle, with the route the cost rule picks or the one a case
forces.
"""
from __future__ import annotations

import pytest
import torch

from helpers import ACCURACY_ROWS, COMPILED_BACKENDS, assert_matches_oracle, make_problem
from omoe_kernels import omoe_lora
from omoe_kernels.testing.shapes import RANDOM_TOLERANCE

pytestmark = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS,
                                reason="the compiled CPU op is not built")

FP32_FWD, FP32_GRAD = ACCURACY_ROWS["fp32-random"].forward, ACCURACY_ROWS["fp32-random"].gradient
FEW_TOKENS = 8  # kBlockExpandTokens in csrc/omoe_ops.cpp
DOT_ROWS = 4  # kDotRows in csrc/omoe_cpu_expand.h


def _cache_bytes() -> int:
    return torch.ops.omoe_cache.stats()[3]


def _packed_bytes() -> int:
    """Bytes of the B_cats the weight cache holds."""
    return torch.ops.omoe_cache.stats()[4]


def _assert_no_packed_copy(problem, message="the step packed B_cat"):
    assert _packed_bytes() == 0, message
    assert _cache_bytes() == problem.B.nbytes, "the cache holds more than a copy of B"


@pytest.fixture(autouse=True)
def _empty_cache(empty_weight_cache):
    yield


def _direct_step(problem, monkeypatch, **options):
    """One forward and backward of the cpu backend's direct route on fresh leaves of
    `problem`."""
    monkeypatch.setenv("OMOE_ROUTE", "direct")
    p = {n: t.detach().requires_grad_(True) for n, t in problem.tensors().items()}
    y = omoe_lora(p["x"], p["A"], p["B"], p["router_weight"], base_out=p.get("base_out"),
                  router_input=p.get("router_input"), scaling=0.7, backend="cpu", **options)
    y.backward(torch.randn_like(y))
    monkeypatch.delenv("OMOE_ROUTE")


# rank 3 and 70: the loops' runtime rank (70: longer than one pass of kMaxRow); 8: a
# compile-time rank.
@pytest.mark.parametrize("rank", [3, 8, 70])
@pytest.mark.parametrize("tokens", [1, FEW_TOKENS])
@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_a_few_token_step_makes_no_packed_copy(tokens, rank, top_k, monkeypatch):
    problem = make_problem(tokens, d_in=24, d_out=20, num_experts=4, rank=rank, seed=3)
    _direct_step(problem, monkeypatch, top_k=top_k)
    _assert_no_packed_copy(problem, "a few-token step packed B_cat")
    _direct_step(make_problem(FEW_TOKENS + 1, d_in=24, d_out=20, num_experts=4, rank=rank,
                              seed=3), monkeypatch, top_k=top_k)  # same B, many tokens
    if top_k is None:
        assert _packed_bytes() == problem.B.nbytes, "a many-token step made no B_cat"
        assert _cache_bytes() == problem.B.nbytes, "B_cat packs B: no copy of B is kept beside it"
    else:  # the top-k direct route forms y, dz and dB on the active rows at any T
        assert _packed_bytes() == 0, "a many-token top-k direct step packed B_cat"
    torch.ops.omoe_cache.clear()
    assert_matches_oracle(problem, "cpu", FP32_FWD, FP32_GRAD, top_k=top_k)


# Rank 4 and 16: float rows of half a vector and of two vectors, each in blocks of tokens.
@pytest.mark.parametrize("rank", [4, 16])
@pytest.mark.parametrize("row", list(ACCURACY_ROWS))
def test_a_few_token_step_on_blocks_at_every_accuracy_row(row, rank, monkeypatch):
    # The most tokens that expand on B's blocks, every dtype and the collapse rows of
    # docs/contract.md §2, forward and gradients.
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    problem = make_problem(FEW_TOKENS, d_in=40, d_out=36, num_experts=4, rank=rank,
                           dtype=dtype, collapse=collapse, seed=6)
    _direct_step(problem, monkeypatch)
    _assert_no_packed_copy(problem)
    torch.ops.omoe_cache.clear()
    assert_matches_oracle(problem, "cpu", fwd_tol, grad_tol)


@pytest.mark.parametrize("route", ["pairs", "pairs_gemm", "batched"])
def test_a_few_token_step_through_g_on_blocks(route, monkeypatch):
    # The routes through G form B_cat for G; the gradient B_cat (dG + dGᵀ) is unpacked onto
    # dB's blocks. Forced here: at a few tokens the cost rule takes the direct route.
    problem = make_problem(3, d_in=24, d_out=20, num_experts=4, rank=4, seed=4,
                           with_router_input=True)
    _direct_step(problem, monkeypatch)
    _assert_no_packed_copy(problem)
    monkeypatch.setenv("OMOE_ROUTE", route)
    torch.ops.omoe_cache.clear()
    assert_matches_oracle(problem, "cpu", FP32_FWD, FP32_GRAD)


def test_a_few_token_step_in_chunks(monkeypatch):
    # E·d_out large enough that the direct backward splits 4 tokens into chunks
    # (chunk_tokens: 4 MiB of float64 per chunk, 3 tokens here), each adding its
    # Σ de_iᵀ h_i to dB.
    problem = make_problem(FEW_TOKENS, d_in=8, d_out=20000, num_experts=4, rank=4, seed=5)
    _direct_step(problem, monkeypatch)
    _assert_no_packed_copy(problem)
    torch.ops.omoe_cache.clear()
    assert_matches_oracle(problem, "cpu", FP32_FWD, FP32_GRAD)


# Ranks whose rows are one to four whole vectors (float: 8, 16, 32; double: 4, 8, 16) run
# several tokens, or several rows of dB, side by side (kRowBlock in csrc/omoe_cpu_expand.h);
# float rows of 4 (half a vector) run 4 tokens in dz and dh, 8 in the expand (kQuadTokens).
# 5 tokens and 13 outputs leave some after the last block; 8 tokens fill their blocks.
@pytest.mark.parametrize("dtype,rank", [(torch.float32, 4), (torch.float32, 8),
                                        (torch.float32, 16), (torch.float32, 32),
                                        (torch.float64, 4), (torch.float64, 8)],
                         ids=["fp32-r4", "fp32-r8", "fp32-r16", "fp32-r32", "fp64-r4",
                              "fp64-r8"])
@pytest.mark.parametrize("tokens", [5, FEW_TOKENS])
def test_a_few_token_step_in_blocks_of_tokens_and_rows(dtype, rank, tokens, monkeypatch):
    problem = make_problem(tokens, d_in=24, d_out=13, num_experts=3, rank=rank, dtype=dtype,
                           seed=7)
    monkeypatch.setenv("OMOE_ROUTE", "direct")  # the expand on B's blocks in the forward too
    assert_matches_oracle(problem, "cpu", *RANDOM_TOLERANCE[dtype])
    _assert_no_packed_copy(problem)


# Rank 4 at 8 tokens and 9 outputs: float64 rows of 4 are whole vectors, so the loops run a
# block of 8 tokens and of 8 rows of dB, and one row after it.
@pytest.mark.parametrize("tokens,d_out,rank", [(3, 6, 2), (3, 6, 4), (FEW_TOKENS, 9, 4)])
def test_gradcheck_float64_on_blocks(tokens, d_out, rank, monkeypatch):
    problem = make_problem(tokens, 5, d_out, 3, rank, dtype=torch.float64, seed=22)
    _direct_step(problem, monkeypatch)
    _assert_no_packed_copy(problem)
    names = list(problem.tensors())
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in problem.tensors().values())

    def fn(*tensors):
        kw = dict(zip(names, tensors))
        return omoe_lora(kw["x"], kw["A"], kw["B"], kw["router_weight"], scaling=0.7,
                         base_out=kw.get("base_out"), backend="cpu")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("with_router_input", [False, True], ids=["x", "router_input"])
@pytest.mark.parametrize("tokens", [1, DOT_ROWS, DOT_ROWS + 1])
@pytest.mark.parametrize("row", [*ACCURACY_ROWS, "fp64"])
def test_a_few_tokens_shrink_by_dot_products(row, tokens, with_router_input):
    """Up to DOT_ROWS tokens with the weights in the accumulate dtype (fp32, fp64), the
    shrink forms h and the router logits with no GEMM; more tokens, or 16-bit weights, take
    the GEMMs. Either way the forward and every gradient match the float64 oracle at the
    row's tolerance (fp64: the float64 paths' own)."""
    from torch.profiler import profile

    if row == "fp64":
        dtype, collapse, (fwd_tol, grad_tol) = torch.float64, 0.0, RANDOM_TOLERANCE[torch.float64]
    else:
        dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    # d_in 70: longer than one pass of kMaxRow, so the dot products have a tail.
    problem = make_problem(tokens, d_in=70, d_out=20, num_experts=4, rank=3, seed=5,
                           dtype=dtype, collapse=collapse, with_router_input=with_router_input)
    p = problem.tensors()
    with torch.no_grad(), profile() as prof:
        omoe_lora(p["x"], p["A"], p["B"], p["router_weight"], base_out=p["base_out"],
                  router_input=p.get("router_input"), backend="cpu")
    gemms = [e for e in prof.events() if e.name == "aten::mm" and e.cpu_parent is not None
             and e.cpu_parent.name == "omoe::shrink"]
    by_dots = tokens <= DOT_ROWS and dtype in (torch.float32, torch.float64)
    assert len(gemms) == (0 if by_dots else 2), [e.name for e in prof.events()]
    assert_matches_oracle(problem, "cpu", fwd_tol, grad_tol)
