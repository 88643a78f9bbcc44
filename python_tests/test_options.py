"""The layer's options are defined once (`OMoEOptions`, options.py): `OMoELinear`,
`OMoEConfig`, `config()` and the functional API take their names, defaults and rules
from it, and a bad value fails where it is given, naming the field (and the file)."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math

import pytest
import torch
from torch import nn

import omoe_kernels as ok
from omoe_kernels.backends import REGISTRY
from omoe_kernels.bases import dispatch
from omoe_kernels.layer import OMoELinear
from omoe_kernels.options import FUNCTION_OPTIONS, OPTION_NAMES, OMoEOptions

TARGETS = ["q_proj", "v_proj"]


def option_defaults() -> dict:
    """Name -> default (inspect's `empty` for a required option)."""
    return {f.name: inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(OMoEOptions)}


def test_layer_config_and_config_keys_are_the_options_fields():
    parameters = inspect.signature(OMoELinear).parameters
    layer_options = {n: p.default for n, p in parameters.items() if n not in ("base", "adapter_name")}
    assert layer_options == option_defaults()
    config_fields = dict(inspect.signature(ok.OMoEConfig).parameters)
    assert config_fields.pop("target_modules").default is None     # by model type, at inject
    assert config_fields.pop("modules_to_save").default is None
    # The config's defaults are the layer's, plus E and r (peft's LoraConfig() is complete).
    assert {n: p.default for n, p in config_fields.items()} == {
        **option_defaults(), "num_experts": 4, "rank": 8}
    config = ok.OMoEConfig(TARGETS, 2, 2)
    assert list(config.layer_options()) == list(OPTION_NAMES)
    layer = OMoELinear(nn.Linear(4, 4), **config.layer_options())
    assert set(layer.config()) == set(FUNCTION_OPTIONS) < set(OPTION_NAMES)


@pytest.mark.parametrize("adapter_dtype", [
    None, "base", "float32", "bfloat16", "float16", "float64", "bf16", "fp16", "fp32",
    torch.bfloat16, torch.float64, "int8", torch.int8, "half precision", "", 3, "BF16"])
def test_layer_and_config_accept_the_same_adapter_dtypes(adapter_dtype):
    def outcome(build):
        try:
            return build()
        except (TypeError, ValueError) as exc:
            assert "adapter_dtype" in str(exc)
            return None

    config = outcome(lambda: ok.OMoEConfig(TARGETS, 2, 2, adapter_dtype=adapter_dtype))
    layer = outcome(lambda: OMoELinear(nn.Linear(4, 4), 2, 2, adapter_dtype=adapter_dtype))
    assert (config is None) == (layer is None), adapter_dtype
    if config is not None:
        json.loads(config.to_json_string())  # a canonical name, JSON-friendly
        from_config = OMoELinear(nn.Linear(4, 4), **config.layer_options())
        assert from_config.lora_A.dtype == layer.lora_A.dtype


def test_dtype_aliases_are_stored_by_their_canonical_name():
    assert ok.OMoEConfig(TARGETS, 2, 2, adapter_dtype="bf16").adapter_dtype == "bfloat16"
    assert ok.OMoEConfig(TARGETS, 2, 2, adapter_dtype=torch.float16).adapter_dtype == "float16"
    assert OMoELinear(nn.Linear(4, 4), 2, 2, adapter_dtype="bf16").lora_A.dtype == torch.bfloat16


@pytest.mark.parametrize("field,change", [
    ("num_experts", dict(num_experts=0)),
    ("num_experts", dict(num_experts="4")),
    ("rank", dict(rank=0)),
    ("rank", dict(rank=1.5)),
    ("alpha", dict(alpha=math.nan)),
    ("alpha", dict(alpha="16")),
    ("top_k", dict(top_k=5)),
    ("top_k", dict(top_k=0)),
    ("dropout", dict(dropout=1.0)),
    ("orthogonalize", dict(orthogonalize=1)),
    ("normalize", dict(normalize="yes")),
    ("eps", dict(eps=0.0)),
    ("backend", dict(backend="tpu")),
    ("backend", dict(backend=0)),
])
def test_config_rejects_a_bad_option_at_construction(field, change):
    with pytest.raises((TypeError, ValueError), match=f"`{field}`"):
        ok.OMoEConfig(TARGETS, **{**dict(num_experts=4, rank=8), **change})


@pytest.mark.parametrize("name", [n for n, b in REGISTRY.items() if b.max_active_experts])
def test_explicit_backend_without_room_for_k_fails_at_construction(name):
    experts = REGISTRY[name].max_active_experts + 1
    for build in (lambda: ok.OMoEConfig(TARGETS, experts, 2, backend=name),
                  lambda: OMoELinear(nn.Linear(4, 4), experts, 2, backend=name)):
        with pytest.raises(ValueError, match=f"backend.*{name}.*at most"):
            build()
    ok.OMoEConfig(TARGETS, experts, 2, top_k=2, backend=name)  # k = 2 fits


def test_config_is_frozen_so_its_checks_hold():
    config = ok.OMoEConfig(TARGETS, 4, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 0


@pytest.mark.parametrize("option,value", [("top_k", 3), ("top_k", 1.0), ("eps", 0.0),
                                          ("eps", "1e-6")])
def test_functional_layer_and_config_give_one_message(option, value):
    """The functional API checks top_k and eps with the same validators."""
    x, A = torch.randn(3, 4), torch.randn(2, 2, 4)
    B, router_weight = torch.randn(2, 4, 2), torch.randn(2, 4)
    messages = []
    for build in (lambda: ok.omoe_lora(x, A, B, router_weight, **{option: value}),
                  lambda: OMoELinear(nn.Linear(4, 4), 2, 2, **{option: value}),
                  lambda: ok.OMoEConfig(TARGETS, 2, 2, **{option: value})):
        with pytest.raises((TypeError, ValueError)) as info:
            build()
        messages.append((type(info.value), str(info.value)))
    assert messages[0] == messages[1] == messages[2]


def tiny_model() -> nn.Module:
    model = nn.Module()
    model.q_proj, model.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)
    return model


@pytest.mark.parametrize("field,value", [("rank", "8"), ("top_k", 2.5), ("eps", "1e-6"),
                                         ("orthogonalize", "yes"), ("num_experts", None),
                                         ("adapter_dtype", "int8")])
def test_a_bad_field_in_omoe_config_json_names_the_file_and_the_field(tmp_path, field, value):
    model = ok.inject(tiny_model(), ok.OMoEConfig(TARGETS, 2, 2))
    directory = tmp_path / "adapter"
    ok.save_pretrained(model, directory)
    path = directory / "omoe_config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, field: value}))
    for load in (lambda: ok.OMoEConfig.load(path), lambda: ok.from_pretrained(tiny_model(), directory)):
        with pytest.raises(ValueError) as info:
            load()
        assert str(path) in str(info.value) and f"`{field}`" in str(info.value), str(info.value)


def test_the_torch_ao_quantized_base_is_a_dispatched_kind():
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(8, 8)),
                                                       {nn.Linear}, dtype=torch.qint8)[0]
    assert dispatch(quantized).name == "torch.ao quantized Linear"
    assert dispatch(nn.Linear(8, 8)).name == "linear-like module"
    assert "quantized" not in inspect.getsource(OMoELinear.forward)
