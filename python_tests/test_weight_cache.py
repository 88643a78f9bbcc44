"""The compiled ops' weight cache (csrc/omoe_weight_cache.h): G = B_catᵀB_cat is reused
while B is unchanged (compared bitwise with B_cat, B's packed copy, or with a copy of B),
and never once it changes.

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
    hits, misses, entries, nbytes, packed = torch.ops.omoe_cache.stats()
    return dict(hits=hits, misses=misses, entries=entries, bytes=nbytes, packed=packed)


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


# Rows of B of 12 bytes (float rank 3) are compared row by row, of 16 bytes (float rank 4)
# 8 bytes at a time, of 32 bytes (double rank 4) 32 at a time.
@pytest.mark.parametrize("rank, dtype", [(3, torch.float32), (4, torch.float32),
                                         (4, torch.float64)], ids=["fp32-r3", "fp32-r4", "fp64-r4"])
def test_an_entry_compares_b_with_its_packed_copy(rank, dtype):
    # B_cat in B's dtype is B's packed copy: the entry keeps no other copy of B, and an edit
    # of one value anywhere in B (through .data: no version counter moves) is seen.
    torch.manual_seed(0)
    layer = ok.OMoELinear(nn.Linear(24, 20), 4, rank, backend="cpu").to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    x = torch.randn(16, 24, dtype=dtype)
    _warm(layer, x)
    B, R = layer.lora_B, 4 * rank
    stats = _stats()
    assert stats["packed"] == B.nbytes
    assert stats["bytes"] == B.nbytes + R * R * 8, "the entry holds more than B_cat and G"
    for expert, row, col in [(0, 0, 0), (2, 7, 1), (3, 19, rank - 1)]:
        B.data[expert, row, col] += 1.0
        with torch.no_grad():
            torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["packed", "copy"])
def test_two_threads_compare_b_in_ranges(dtype):
    # 3000 rows of B: two threads each compare a range of rows (fp32, against B_cat: rows
    # 0-1499 and 1500-2999) or of bytes (bf16, against B's copy: 64 KiB, then the rest).
    # A sign flipped (one bit, in a value's last byte) at either end of either range is
    # seen: the next call misses the cache, and its answer is the new weights'.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        layer = ok.OMoELinear(nn.Linear(24, 3000), 4, 4, backend="cpu").to(dtype)
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
        x = torch.randn(16, 24, dtype=dtype)
        _warm(layer, x)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        B = layer.lora_B
        for expert, row, col in [(0, 0, 0), (0, 1499, 3), (1, 1500, 0), (2, 2191, 3),
                                 (2, 2192, 0), (3, 2999, 3)]:
            B.data[expert, row, col] *= -1
            hits = _stats()["hits"]
            with torch.no_grad():
                y = layer(x)
            assert _stats()["hits"] == hits, f"edit at {(expert, row, col)} not seen"
            torch.testing.assert_close(y, _reference(layer, x), **tol)
    finally:
        torch.set_num_threads(threads)


def test_one_expert_keeps_a_copy():
    # With one expert the packing is a view of B itself, which no compare could trust.
    torch.manual_seed(0)
    layer = ok.OMoELinear(nn.Linear(24, 20), 1, 4, backend="cpu")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    x = torch.randn(16, 24)
    _warm(layer, x)
    B = layer.lora_B
    assert _stats()["bytes"] == 2 * B.nbytes + 4 * 4 * 8
    B.data[0, 5, 2] += 1.0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-5, atol=1e-6)


def test_sixteen_bit_weights_keep_a_copy():
    # bf16 weights pack into a float32 B_cat, which is not B's bits: the entry keeps B's copy.
    torch.manual_seed(0)
    layer = ok.OMoELinear(nn.Linear(24, 20), 4, 4, backend="cpu").to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    _warm(layer, torch.randn(16, 24, dtype=torch.bfloat16))
    B = layer.lora_B
    stats = _stats()
    assert stats["packed"] == B.numel() * 4
    assert stats["bytes"] == B.nbytes + stats["packed"] + 16 * 16 * 8


def _reference(layer, x):
    layer.backend = "reference"
    try:
        return layer(x)
    finally:
        layer.backend = "cpu"
