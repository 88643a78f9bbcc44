"""Adapter files are read safely (docs/contract.md §4).

A malformed adapter file (bad JSON config, missing or mistyped records, missing or
integer tensors), a directory or a missing path gives one clear error that names the
path, and leaves the model as it was; loading never runs code from the file (a pickle
disguised as safetensors, a Trainer checkpoint with only a pickled pytorch_model.bin).
"""
from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file

import omoe_kernels as ok
from helpers import assert_model_unchanged, model_snapshot, tiny_model

OPTIONS = dict(num_experts=3, rank=2, top_k=2)


# ---- adapter files -----------------------------------------------------------------------

@pytest.fixture
def injected():
    model = ok.inject(tiny_model(), ["q_proj"], **OPTIONS)
    with torch.no_grad():
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_()
    return model


def _write(path, tensors, config) -> str:
    metadata = None if config is None else {
        "omoe_config": config if isinstance(config, str) else json.dumps(config)}
    save_file(tensors, os.fspath(path), metadata=metadata)
    return os.fspath(path)


def _good(model):
    tensors = {k: v.contiguous().clone() for k, v in ok.adapter_state_dict(model).items()}
    record = {**ok.omoe_layers(model)["blocks.0.q_proj"].config(), "in_features": 8,
              "out_features": 8}
    config = {"format": ok.ADAPTER_FORMAT if hasattr(ok, "ADAPTER_FORMAT") else "omoe_kernels.adapter",
              "version": 1, "layers": {n: dict(record) for n in ok.omoe_layers(model)}}
    return tensors, config


MALFORMED = {
    "config_not_a_dict": (lambda t, c: (t, [1, 2, 3]), r"must be a JSON object, got list"),
    "layers_missing": (lambda t, c: (t, {k: v for k, v in c.items() if k != "layers"}),
                       r"needs 'layers'"),
    "record_not_a_dict": (lambda t, c: (t, {**c, "layers": {n: "rank=2" for n in c["layers"]}}),
                          r"record of layer 'blocks.0.q_proj' must be a JSON object"),
    "record_field_wrong_type": (
        lambda t, c: (t, {**c, "layers": {n: {**r, "num_experts": "3"}
                                          for n, r in c["layers"].items()}}),
        r"num_experts='3'; expected int"),
    "deeply_nested_json": (lambda t, c: (t, "[" * 100_000 + "]" * 100_000), r"not valid JSON"),
    "missing_tensor": (lambda t, c: ({k: v for k, v in t.items() if k != "blocks.1.q_proj.lora_B"}, c),
                       r"lacks the adapter tensors \['blocks.1.q_proj.lora_B'\]"),
    "integer_tensor": (lambda t, c: ({**t, "blocks.0.q_proj.lora_A":
                                      t["blocks.0.q_proj.lora_A"].to(torch.int32)}, c),
                       r"'blocks.0.q_proj.lora_A' is torch.int32"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapter_file_gives_one_clear_error_and_leaves_the_model(tmp_path, injected, case):
    make, message = MALFORMED[case]
    tensors, config = make(*_good(injected))
    path = _write(tmp_path / f"{case}.safetensors", tensors, config)
    with torch.no_grad():
        for tensor in ok.adapter_state_dict(injected).values():
            tensor.add_(1.0)  # so the file's values differ from the model's
    before = model_snapshot(injected)
    with pytest.raises(ValueError) as info:
        ok.load_adapter(injected, path)
    assert path in str(info.value) and re.search(message, str(info.value)), str(info.value)
    assert_model_unchanged(injected, before)


def test_directory_or_missing_path_is_named(tmp_path, injected):
    before = model_snapshot(injected)
    with pytest.raises(ValueError, match=rf"{tmp_path}.* is a directory"):
        ok.load_adapter(injected, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such adapter file"):
        ok.load_adapter(injected, tmp_path / "absent.safetensors")
    assert_model_unchanged(injected, before)


class _Payload:
    """Unpickling this creates a marker file: the proof that code from a file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_executes_code_from_the_file(tmp_path, injected):
    marker = tmp_path / "code_ran"
    pickled = tmp_path / "adapter.safetensors"
    pickled.write_bytes(pickle.dumps(_Payload(os.fspath(marker))))
    torch_saved = tmp_path / "torch_saved.safetensors"
    torch.save({"x": _Payload(os.fspath(marker))}, torch_saved)
    before = model_snapshot(injected)
    for path in (pickled, torch_saved):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            ok.load_adapter(injected, path)
    # A Trainer-style checkpoint that has only a pickled pytorch_model.bin is refused too.
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(
        {"omoe": {"adapters": {"x": ok.OMoEConfig(["v_proj"], 2, 2).to_dict()}, "active": "x"}}))
    torch.save({"x": _Payload(os.fspath(marker))}, checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no model.safetensors"):
        ok.from_pretrained(injected, checkpoint)
    assert not marker.exists(), "loading ran code from the file"
    assert_model_unchanged(injected, before)
