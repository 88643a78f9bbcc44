"""The compiled ops' weight cache (csrc/omoe_weight_cache.h): G = B_catᵀB_cat is reused
while B is unchanged (compared bitwise with a copy), and never once it changes.

Each invalidation test first fills the cache with no-grad calls, changes the weights the
way users do, and checks the next call against the reference backend on the new weights:
a stale G would give the old weights' answer.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import omoe_kernels as ok
from helpers import COMPILED_BACKENDS

pytestmark = pytest.mark.skipif("cpu" not in COMPILED_BACKENDS,
                                reason="the compiled CPU op is not built")


def _stats() -> dict:
    hits, misses, entries, nbytes = torch.ops.omoe_cache.stats()
    return dict(hits=hits, misses=misses, entries=entries, bytes=nbytes)


@pytest.fixture(autouse=True)
def _empty_cache(empty_weight_cache):
    yield


def _layer(seed=0, top_k=None):
    torch.manual_seed(seed)
    layer = ok.OMoELinear(nn.Linear(24, 20), 4, 3, top_k=top_k, backend="cpu")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


def _assert_matches_reference(layer, x):
    with torch.no_grad():
        y = layer(x)
        layer.backend = "reference"
        y_ref = layer(x)
        layer.backend = "cpu"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def _warm(layer, x):
    """Two no-grad calls: the second one forms and keeps G (weights reused)."""
    with torch.no_grad():
        layer(x)
        layer(x)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_unchanged_weights_are_reused(top_k):
    layer, x = _layer(top_k=top_k), torch.randn(6, 24)
    _warm(layer, x)
    before = _stats()
    with torch.no_grad():
        layer(x)
    after = _stats()
    assert after["hits"] == before["hits"] + 1  # G found
    assert after["misses"] == before["misses"]
    _assert_matches_reference(layer, x)


def test_the_backward_reuses_the_forward_gram_matrix():
    layer, x = _layer(), torch.randn(64, 24)  # enough tokens for the Gram route
    y = layer(x)
    before = _stats()
    y.sum().backward()
    after = _stats()
    assert after["misses"] == before["misses"], "the backward rebuilt the forward's G"
    assert after["hits"] == before["hits"] + 1


def test_optimizer_step_invalidates():
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    layer(torch.randn(6, 24)).pow(2).sum().backward()
    opt.step()
    _assert_matches_reference(layer, x)


def test_load_state_dict_invalidates():
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    layer.load_state_dict(_layer(seed=1).state_dict())
    _assert_matches_reference(layer, x)


def test_in_place_edit_invalidates():
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    with torch.no_grad():
        layer.lora_B[1].mul_(-3.0)
        layer.router_weight[0].add_(1.0)
    _assert_matches_reference(layer, x)


def test_dtype_round_trip_invalidates():
    # .half().float() keeps the same Parameter objects and version counters (set_data),
    # and the new fp32 storage may land at the old address; the values are rounded.
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    layer.half()
    layer.float()
    _assert_matches_reference(layer, x)


def test_edit_through_data_invalidates():
    # `.data` edits bypass the version counter (gradcheck, hand-written optimizers, EMA).
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    layer.lora_B.data[2].add_(0.7)
    _assert_matches_reference(layer, x)


def test_data_assignment_invalidates():
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    layer.lora_B.data = torch.randn_like(layer.lora_B)
    _assert_matches_reference(layer, x)


def test_a_loaded_copy_does_not_see_the_original_entries():
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    other = _layer(seed=2)
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    with torch.no_grad():
        other.lora_B.add_(0.1)
    _assert_matches_reference(other, x)


def test_dead_weights_leave_the_cache():
    layer, x = _layer(), torch.randn(6, 24)
    _warm(layer, x)
    assert _stats()["entries"] == 1
    del layer
    other = _layer(seed=3)
    _warm(other, x)  # inserting drops the entries of freed weights
    assert _stats()["entries"] == 1
