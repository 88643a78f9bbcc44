"""inject changes the user's model all-or-nothing (docs/contract.md §4).

A call that fails (an int8 target, an error while building the wrappers, an error after
the swap) or is refused (the same adapter twice, a MultiheadAttention's out_proj) leaves
the model's whole observable state as it was: modules by identity and their ties,
requires_grad flags, attributes, parameter values (helpers.model_snapshot). An injected
model pickles and loads back with its inject state.
"""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import omoe_kernels as ok
from helpers import DEVICE, assert_model_unchanged, model_snapshot, tiny_model, tiny_model_inputs

OPTIONS = dict(num_experts=3, rank=2, top_k=2)


# ---- atomic inject -----------------------------------------------------------------------

def test_failed_inject_on_an_int8_target_leaves_the_model_as_it_was():
    model = tiny_model()
    model.head.requires_grad_(False)  # a user's own flag, which must survive too
    linear = model.blocks[2].q_proj
    linear.weight = nn.Parameter(linear.weight.detach().to(torch.int8), requires_grad=False)
    before = model_snapshot(model)
    with pytest.raises((ValueError, TypeError), match="int8"):
        ok.inject(model, ["q_proj"], **OPTIONS)
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="nothing to remove"):
        ok.remove(model)


def test_inject_failing_while_building_wrappers_rolls_back(monkeypatch):
    model = tiny_model()
    model.blocks[1].q_proj = model.blocks[0].q_proj  # tied: must stay tied
    before = model_snapshot(model)
    calls = []
    original = ok.OMoELinear.reset_parameters

    def fail_on_second_layer(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure while building the second wrapper")
        original(self)

    monkeypatch.setattr(ok.OMoELinear, "reset_parameters", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="simulated"):
        ok.inject(model, ["q_proj", "v_proj"], **OPTIONS)
    assert_model_unchanged(model, before)
    assert model.blocks[0].q_proj is model.blocks[1].q_proj


def test_inject_failing_after_the_swap_rolls_back(monkeypatch):
    """A failure after every wrapper is in place puts the original modules back."""
    from omoe_kernels.adapters import model as adapters_model

    model = tiny_model()
    ok.inject(model, ["v_proj"], **OPTIONS)  # an adapter that is there before, and stays
    before = model_snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure after the swap")

    monkeypatch.setattr(adapters_model, "_sync_hf_config", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        ok.inject(model, ["q_proj"], adapter_name="second", **OPTIONS)
    assert_model_unchanged(model, before)
    assert ok.adapter_names(model) == ["default"]


# ---- pickling ----------------------------------------------------------------------------

def test_pickled_injected_model_loads_back():
    model = ok.inject(tiny_model(), ["q_proj"], **OPTIONS)
    with torch.no_grad():
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_()
    x = tiny_model_inputs()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert ok.active_adapter(loaded) == "default"
    ok.remove(loaded)  # the inject state travelled with the model
    assert type(loaded.blocks[0].q_proj) is nn.Linear


# ---- twice -------------------------------------------------------------------------------

def test_second_inject_of_the_same_adapter_says_already_injected():
    model = ok.inject(tiny_model(), ["q_proj"], **OPTIONS)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="already injected"):
        ok.inject(model, ["q_proj"], **OPTIONS)
    with pytest.raises(ValueError, match="already injected"):
        ok.inject(model, ["v_proj"], **OPTIONS)  # same adapter name, other targets
    assert_model_unchanged(model, before)


# ---- MHA.out_proj ------------------------------------------------------------------------

def test_multihead_attention_out_proj_is_refused_at_inject():
    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out_proj = nn.Linear(8, 8)  # a plain Linear of the same name elsewhere

        def forward(self, x):
            return self.out_proj(self.attn(x, x, x)[0])

    model = WithAttention().to(DEVICE)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"attn.out_proj .*MultiheadAttention reads"):
        ok.inject(model, ["out_proj"], **OPTIONS)
    assert_model_unchanged(model, before)
    ok.inject(model, r"out_proj", **OPTIONS)  # the top-level one alone is fine
    assert list(ok.omoe_layers(model)) == ["out_proj"]
