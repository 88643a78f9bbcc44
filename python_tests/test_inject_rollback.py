"""Changes to the user's model are all-or-nothing, and adapter files are read safely
(docs/contract.md §4), plus the eps contract near B = 0 (docs/integration.md).

Each model test records the model's full observable state (modules by identity, ties,
requires_grad flags, attributes, adapter tensors) and checks it is unchanged after a call
that fails.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import omoe_kernels as ok
from helpers import DEVICE

OPTIONS = dict(num_experts=3, rank=2, top_k=2)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.q_proj(x)) * self.v_proj(x)


class Net(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.Sequential(Block(d), Block(d), Block(d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.blocks(x))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(DEVICE)


def inputs() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was."""
    return {"modules": [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
            "flags": [(n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
            "values": {n: p.detach().clone() for n, p in model.named_parameters()},
            "attrs": sorted(vars(model))}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "modules (or their ties) changed"
    assert after["flags"] == before["flags"], "requires_grad flags changed"
    assert after["attrs"] == before["attrs"], "attributes changed"
    assert after["values"].keys() == before["values"].keys()
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name


# ------------------------------------------------------------------ item 4: atomic inject

def test_failed_inject_on_an_int8_target_leaves_the_model_as_it_was():
    model = net()
    model.head.requires_grad_(False)  # a user's own flag, which must survive too
    linear = model.blocks[2].q_proj
    linear.weight = nn.Parameter(linear.weight.detach().to(torch.int8), requires_grad=False)
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError), match="int8"):
        ok.inject(model, ["q_proj"], **OPTIONS)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="nothing to remove"):
        ok.remove(model)


def test_inject_failing_while_building_wrappers_rolls_back(monkeypatch):
    model = net()
    model.blocks[1].q_proj = model.blocks[0].q_proj  # tied: must stay tied
    before = snapshot(model)
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
    assert_unchanged(model, before)
    assert model.blocks[0].q_proj is model.blocks[1].q_proj


def test_inject_failing_after_the_swap_rolls_back(monkeypatch):
    """A failure after every wrapper is in place puts the original modules back."""
    from omoe_kernels.adapters import model as adapters_model

    model = net()
    ok.inject(model, ["v_proj"], **OPTIONS)  # an adapter that is there before, and stays
    before = snapshot(model)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure after the swap")

    monkeypatch.setattr(adapters_model, "_sync_hf_config", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        ok.inject(model, ["q_proj"], adapter_name="second", **OPTIONS)
    assert_unchanged(model, before)
    assert ok.adapter_names(model) == ["default"]


# ------------------------------------------------------------------ item 5: pickling

def test_pickled_injected_model_loads_back():
    model = ok.inject(net(), ["q_proj"], **OPTIONS)
    with torch.no_grad():
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_()
    x = inputs()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert "trainable params" in repr(loaded).splitlines()[1]
    ok.remove(loaded)  # the inject state travelled with the model
    assert type(loaded.blocks[0].q_proj) is nn.Linear


# ------------------------------------------------------------------ item 6: twice

def test_second_inject_of_the_same_adapter_says_already_injected():
    model = ok.inject(net(), ["q_proj"], **OPTIONS)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already injected"):
        ok.inject(model, ["q_proj"], **OPTIONS)
    with pytest.raises(ValueError, match="already injected"):
        ok.inject(model, ["v_proj"], **OPTIONS)  # same adapter name, other targets
    assert_unchanged(model, before)


# ------------------------------------------------------------------ item 7: MHA.out_proj

def test_multihead_attention_out_proj_is_refused_at_inject():
    class WithAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out_proj = nn.Linear(8, 8)  # a plain Linear of the same name elsewhere

        def forward(self, x):
            return self.out_proj(self.attn(x, x, x)[0])

    model = WithAttention().to(DEVICE)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"attn.out_proj .*MultiheadAttention reads"):
        ok.inject(model, ["out_proj"], **OPTIONS)
    assert_unchanged(model, before)
    ok.inject(model, r"out_proj", **OPTIONS)  # the top-level one alone is fine
    assert list(ok.omoe_layers(model)) == ["out_proj"]


# ------------------------------------------------------------------ item 14: adapter files

@pytest.fixture
def injected():
    model = ok.inject(net(), ["q_proj"], **OPTIONS)
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
    before = snapshot(injected)
    with pytest.raises(ValueError) as info:
        ok.load_adapter(injected, path)
    assert path in str(info.value) and re.search(message, str(info.value)), str(info.value)
    assert_unchanged(injected, before)


def test_directory_or_missing_path_is_named(tmp_path, injected):
    before = snapshot(injected)
    with pytest.raises(ValueError, match=rf"{tmp_path}.* is a directory"):
        ok.load_adapter(injected, tmp_path)
    with pytest.raises(ValueError, match="no such adapter file"):
        ok.load_adapter(injected, tmp_path / "absent.safetensors")
    assert_unchanged(injected, before)


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
    before = snapshot(injected)
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
    assert_unchanged(injected, before)


# ------------------------------------------------------------------ the eps contract

def _mixture_grad_B(normalize: bool, orthogonalize: bool, eps: float = 1e-6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64)
    B = torch.zeros(3, 4, 2, dtype=torch.float64, requires_grad=True)
    router = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    y = ok.omoe_lora(x, A, B, router, orthogonalize=orthogonalize, normalize=normalize,
                     eps=eps, backend="reference")
    y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64))
    return B.grad


@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_eps_contract_gradient_of_B_at_zero_is_eps_to_the_minus_half_times_the_mixtures(eps):
    """At B = 0, q_i = v_i / sqrt(<v_i, v_i> + eps) is linear in B with slope eps^-1/2, and
    the projections are second order: grad B = eps^-1/2 x the plain mixture's (1000x at
    the default eps)."""
    omoe = _mixture_grad_B(normalize=True, orthogonalize=True, eps=eps)
    plain = _mixture_grad_B(normalize=False, orthogonalize=False, eps=eps)
    assert plain.abs().max() > 0
    torch.testing.assert_close(omoe, plain * eps ** -0.5, rtol=1e-10, atol=0)


def test_eps_contract_q_is_unit_only_where_vv_is_much_larger_than_eps():
    """One expert, one token, scaling 1: y = q_1, and |q_1| = sqrt(<v,v> / (<v,v> + eps))."""
    eps = 1e-6
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(1, 2, 6, generator=gen, dtype=torch.float64)
    B0 = torch.randn(1, 4, 2, generator=gen, dtype=torch.float64)
    router = torch.zeros(1, 6, dtype=torch.float64)
    e = B0[0] @ (A[0] @ x[0])
    for ratio in (1.0, 1e2, 1e6):
        expected = (ratio / (ratio + 1)) ** 0.5  # 0.707 at <v, v> = eps
        B = B0 * (ratio * eps / (e @ e)) ** 0.5  # <v, v> = ratio * eps
        for backend in ok.available_backends(DEVICE):
            y = ok.omoe_lora(x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), router.to(DEVICE), eps=eps,
                             backend=backend)
            assert abs(y.norm().item() - expected) < 1e-9, (ratio, backend)
