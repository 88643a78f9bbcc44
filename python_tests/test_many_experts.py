"""Many experts and a large E·r (docs/contract.md §4: any E that fits, no (E·r)² workspace at once).

- Any number of experts works. The compiled CPU pass takes up to 256 active experts
  (min(top_k, E)), the Triton kernels up to 8; beyond that `auto` runs the next backend
  (the reference at last), and an explicit backend that cannot take the layer's k fails
  when the layer is built, saying why.
- A large E·r never allocates (E·r)² at once: past 512 MiB for G = B_catᵀB_cat the CPU op
  takes the direct route (no G) over chunks of tokens; a route forced onto G says how
  big G would be.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import omoe_kernels as ok
from helpers import COMPILED_BACKENDS, assert_matches_oracle, make_problem

needs_cpu_op = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS,
                                  reason="the compiled CPU op is not built")


def _layer(num_experts, rank=2, top_k=None, backend="auto", d=12, seed=0):
    torch.manual_seed(seed)
    layer = ok.OMoELinear(nn.Linear(d, d), num_experts, rank, top_k=top_k, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    return layer


def _against_reference(layer, tokens=5):
    x = torch.randn(tokens, layer.in_features, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    grads = [p.grad.clone() for p in (x, layer.lora_A, layer.lora_B, layer.router_weight)]
    layer.zero_grad()
    x.grad = None
    layer.backend = "reference"
    y_ref = layer(x)
    y_ref.sum().backward()
    refs = [p.grad for p in (x, layer.lora_A, layer.lora_B, layer.router_weight)]
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, refs):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-5)


@needs_cpu_op
@pytest.mark.parametrize("num_experts,top_k", [(33, None), (40, 3), (300, 2)],
                         ids=["E33-dense", "E40-top3", "E300-top2"])
def test_more_than_32_experts_run_on_the_cpu_op(num_experts, top_k):
    # Failed before: "the compiled ops take 1 to 32 experts" at the first forward.
    # d_out >= k: more active experts than d_out would make the q_i ill-defined.
    _against_reference(_layer(num_experts, rank=1, top_k=top_k, backend="cpu", d=40))


@needs_cpu_op
def test_the_cpu_op_matches_the_oracle_with_40_dense_experts():
    problem = make_problem(6, 10, 48, 40, 1, seed=3)
    assert_matches_oracle(problem, "cpu", 1e-5, 1e-4)


def test_an_explicit_backend_that_cannot_take_k_fails_at_construction():
    with pytest.raises(ValueError, match=r"at most 256 active experts.*got 257"):
        ok.OMoELinear(nn.Linear(4, 4), 257, 1, backend="cpu")
    with pytest.raises(ValueError, match=r"'cuda'.*at most 32 active experts"):
        ok.OMoELinear(nn.Linear(4, 4), 33, 1, backend="cuda")
    # top-k within the bound is fine, whatever E
    ok.OMoELinear(nn.Linear(4, 4), 300, 1, top_k=8, backend="cpu")


def test_the_triton_bound_fails_explicit_layers_and_auto_passes_over_it(monkeypatch):
    """The per-token Triton kernels unroll their MGS over k = min(top_k, E) slots: the
    registry records the k they take. Failed before: no bound, so a layer with many
    dense experts compiled for many minutes on first use."""
    from omoe_kernels.backends import REGISTRY, resolve_backend

    bound = REGISTRY["triton"].max_active_experts
    assert bound is not None
    with pytest.raises(ValueError, match=rf"'triton'.*at most {bound} active experts.*got {bound + 1}"):
        ok.OMoELinear(nn.Linear(4, 4), bound + 1, 1, backend="triton")
    ok.OMoELinear(nn.Linear(4, 4), 4 * bound, 1, top_k=bound, backend="triton")
    # On a GPU (both backends available), auto takes triton up to its bound, cuda beyond.
    monkeypatch.delenv("OMOE_BACKEND", raising=False)
    for name in ("triton", "cuda"):
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name],
                                                                available=lambda device_type: True))
    gpu = torch.device("cuda")
    assert resolve_backend("auto", gpu, bound) == "triton"
    assert resolve_backend("auto", gpu, bound + 1) == "cuda"


def test_auto_runs_a_working_backend_beyond_the_compiled_bound():
    layer = _layer(257, rank=1, d=6)
    x = torch.randn(3, 6)
    with torch.no_grad():
        y = layer(x)
    layer.backend = "reference"
    with torch.no_grad():
        y_ref = layer(x)
    torch.testing.assert_close(y, y_ref)


@needs_cpu_op
def test_large_e_times_r_takes_no_gram_matrix():
    # E·r = 65536: G would be 32 GiB of float64. Failed before: the op tried to allocate it.
    E, r, d, T = 32, 2048, 8, 3
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(T, d, generator=gen)
    A = (torch.randn(E, r, d, generator=gen) / d ** 0.5).requires_grad_()
    B = (torch.randn(E, d, r, generator=gen) / r ** 0.5).requires_grad_()
    W = torch.randn(E, d, generator=gen).requires_grad_()
    y = ok.omoe_lora(x, A, B, W, top_k=2, backend="cpu")
    y.sum().backward()
    grads = [t.grad.clone() for t in (A, B, W)]
    for t in (A, B, W):
        t.grad = None
    y_ref = ok.omoe_lora(x, A, B, W, top_k=2, backend="reference")
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for g, t in zip(grads, (A, B, W)):
        torch.testing.assert_close(g, t.grad, rtol=1e-3, atol=1e-5)


@needs_cpu_op
def test_a_route_forced_onto_a_huge_gram_matrix_names_its_size(monkeypatch):
    monkeypatch.setenv("OMOE_ROUTE", "batched")
    E, r, d = 32, 2048, 8
    x, A = torch.randn(2, d), torch.randn(E, r, d)
    B, W = torch.randn(E, d, r), torch.randn(E, d)
    with pytest.raises(RuntimeError, match=r"32768 MiB \(E·r = 65536\)"):
        ok.omoe_lora(x, A, B, W, top_k=2, backend="cpu")
