"""The adapter state, peft's rule: exactly one adapter is active unless adapters are
disabled; `disable_adapters` restores on exit the state of the adapter active then;
removing the active adapter activates a remaining one; files and Trainer checkpoints
keep the active adapter and whether adapters are enabled (docs/integration.md)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import omoe_kernels as ok

TARGETS = ["q_proj", "v_proj"]
TENSORS = ("lora_A", "lora_B", "router_weight")


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.q_proj(x)) + self.v_proj(x)


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Block(), Block())


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def perturb(model: nn.Module, seed: int, adapter_name: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in ok.adapter_state_dict(model, adapter_name).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)


def two_adapters():
    """A model with adapters `a` (on q_proj, v_proj) and `b` (on q_proj), and the outputs
    of the base model, of `a` alone and of `b` alone."""
    model = net()
    base = outputs(model)
    ok.inject(model, ok.OMoEConfig(TARGETS, 2, 2), adapter_name="a")
    perturb(model, 1, "a")
    ok.inject(model, ok.OMoEConfig(["q_proj"], 3, 2, top_k=1), adapter_name="b")
    perturb(model, 2, "b")
    only_a = outputs(model)
    ok.set_adapter(model, "b")
    only_b = outputs(model)
    ok.set_adapter(model, "a")
    assert len({tuple(t.flatten().tolist()) for t in (base, only_a, only_b)}) == 3
    return model, base, only_a, only_b


def assert_state(model: nn.Module, active: str, enabled: bool) -> None:
    """The one rule, checked on every layer: the active adapter's layers compute iff
    adapters are enabled and are the only trainable adapter tensors."""
    assert ok.active_adapter(model) == active
    assert ok.adapters_enabled(model) is enabled
    for name, layer in ok.omoe_layers(model).items():
        mine = layer.adapter_name == active
        assert layer.adapter_enabled is (mine and enabled), name
        assert all(getattr(layer, t).requires_grad is mine for t in TENSORS), name
    config = model_config(model)
    if config is not None:
        assert config["active"] == active and config["enabled"] is enabled


def model_config(model):
    config = getattr(model, "config", None)
    return getattr(config, "omoe", None) if config is not None else None


# ------------------------------------------------------------------ transitions

def test_set_adapter_inside_disable_adapters_takes_effect_on_exit():
    model, base, only_a, only_b = two_adapters()
    assert_state(model, "a", True)  # inject: the first adapter is active, a later one waits
    assert torch.equal(outputs(model), only_a)
    with ok.disable_adapters(model):
        assert_state(model, "a", False)
        ok.set_adapter(model, "b")
        assert_state(model, "b", False)
        assert torch.equal(outputs(model), base)  # still the base model inside the block
    assert_state(model, "b", True)  # b computes and trains; a is frozen and off
    assert torch.equal(outputs(model), only_b)


def test_nested_disable_adapters_restore_level_by_level():
    model, base, only_a, only_b = two_adapters()
    with ok.disable_adapters(model):
        with ok.disable_adapters(model):
            ok.set_adapter(model, "b")
        assert_state(model, "b", False)  # the outer block still disables
        assert torch.equal(outputs(model), base)
    assert_state(model, "b", True)
    assert torch.equal(outputs(model), only_b)
    with pytest.raises(RuntimeError, match="raised inside"), ok.disable_adapters(model):
        raise RuntimeError("raised inside")
    assert_state(model, "b", True)


def test_enable_adapters_outside_a_block():
    model, base, only_a, _ = two_adapters()
    ok.enable_adapters(model, False)
    assert_state(model, "a", False)
    assert torch.equal(outputs(model), base)
    with ok.disable_adapters(model):
        pass
    assert_state(model, "a", False)  # the block restores what it found
    ok.mark_trainable(model)  # works while disabled: the active adapter's parameters
    ok.enable_adapters(model)
    assert_state(model, "a", True)
    assert torch.equal(outputs(model), only_a)
    with pytest.raises(TypeError, match="enabled"):
        ok.enable_adapters(model, "yes")
    with pytest.raises(ValueError, match="inject"):
        ok.enable_adapters(net())


def test_removing_adapters_keeps_one_active():
    model, base, only_a, only_b = two_adapters()
    ok.inject(model, ok.OMoEConfig(["v_proj"], 2, 2), adapter_name="c")
    ok.set_adapter(model, "b")
    ok.remove(model, "a")  # an inactive one: the active adapter stays
    assert_state(model, "b", True)
    assert torch.equal(outputs(model), only_b)
    with pytest.warns(UserWarning, match="'c' is active now"):
        ok.remove(model, "b")  # the active one: the first remaining adapter takes over
    assert ok.adapter_names(model) == ["c"]
    assert_state(model, "c", True)
    ok.mark_trainable(model)  # there is an active adapter to mark
    ok.remove(model, "c")  # the last one: the base model is back
    assert not ok.omoe_layers(model) and ok.active_adapter(model) is None
    assert not ok.adapters_enabled(model)
    assert torch.equal(outputs(model), base)
    assert all(p.requires_grad for p in model.parameters())


def test_removing_the_active_adapter_while_disabled_keeps_them_disabled():
    model, base, only_a, _ = two_adapters()
    with ok.disable_adapters(model):
        ok.set_adapter(model, "b")
        with pytest.warns(UserWarning, match="'a' is active now"):
            ok.remove(model, "b")
        assert_state(model, "a", False)
        assert torch.equal(outputs(model), base)
    assert_state(model, "a", True)
    assert torch.equal(outputs(model), only_a)


def test_disabled_adapters_give_errors_that_say_so():
    model, _, _, _ = two_adapters()
    ok.track_router_stats(model)
    with ok.disable_adapters(model):
        with pytest.raises(ValueError, match="adapters of `model` are disabled"):
            ok.load_balancing_loss(model)
        with pytest.raises(ValueError, match="adapters of `model` are disabled"):
            ok.router_stats(model)
    with pytest.raises(ValueError, match="holds no OMoELinear layer"):
        ok.load_balancing_loss(net())


# ------------------------------------------------------------------ files

def test_save_and_load_keep_the_active_adapter_and_disabled_adapters(tmp_path):
    model, base, _, only_b = two_adapters()
    ok.set_adapter(model, "b")
    with ok.disable_adapters(model):
        ok.save_pretrained(model, tmp_path / "b")  # the active adapter, "b"
    restored = ok.from_pretrained(net(), tmp_path / "b", is_trainable=True)
    assert ok.adapter_names(restored) == ["b"]
    assert_state(restored, "b", False)  # computes what the saved model computed
    assert torch.equal(outputs(restored), base)
    ok.enable_adapters(restored)
    assert_state(restored, "b", True)
    assert torch.equal(outputs(restored), only_b)
    # Loading into a model that holds adapters adds one inactive and keeps the model's state.
    ok.from_pretrained(restored, tmp_path / "b", adapter_name="b2", is_trainable=True)
    assert ok.adapter_names(restored) == ["b", "b2"]
    assert_state(restored, "b", True)


def test_directory_without_the_state_loads_active_and_enabled(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, _, only_a, _ = two_adapters()
    with ok.disable_adapters(model):
        ok.save_pretrained(model, tmp_path / "a")
    weights = os.fspath(tmp_path / "a" / "omoe_adapter.safetensors")
    with safe_open(weights, "pt") as f:  # as saved before the state was recorded
        metadata = json.loads(f.metadata()["omoe_config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del metadata["enabled"]
    save_file(tensors, weights, metadata={"omoe_config": json.dumps(metadata)})
    restored = ok.from_pretrained(net(), tmp_path / "a", is_trainable=True)
    assert_state(restored, "a", True)
    assert torch.equal(outputs(restored), only_a)
    metadata["enabled"] = "no"
    save_file(tensors, weights, metadata={"omoe_config": json.dumps(metadata)})
    fresh = net()
    with pytest.raises(ValueError, match="'enabled' must be true or false"):
        ok.from_pretrained(fresh, tmp_path / "a")
    assert not ok.omoe_layers(fresh)


# ------------------------------------------------------------------ Hugging Face checkpoints

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_base")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return transformers.LlamaForCausalLM, path


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def llama_two_adapters(Llama, base_path):
    model = ok.inject(Llama.from_pretrained(base_path), ok.OMoEConfig(["q_proj", "v_proj"], 2, 2),
                      adapter_name="a")
    ok.inject(model, ok.OMoEConfig(["o_proj"], 3, 2, top_k=1), adapter_name="b")
    perturb(model, 1, "a")
    perturb(model, 2, "b")
    return model


@pytest.mark.parametrize("enabled", [True, False])
def test_hf_checkpoint_keeps_the_active_adapter_and_the_enabled_flag(llama, tmp_path, enabled):
    Llama, base_path = llama
    model = llama_two_adapters(Llama, base_path)
    ok.set_adapter(model, "b")
    ok.enable_adapters(model, enabled)
    assert_state(model, "b", enabled)
    expected = logits(model)
    model.save_pretrained(tmp_path / "checkpoint")  # what the Trainer does
    saved = json.loads((tmp_path / "checkpoint" / "config.json").read_text())["omoe"]
    assert saved["active"] == "b" and saved["enabled"] is enabled
    restored = ok.from_pretrained(Llama.from_pretrained(base_path), tmp_path / "checkpoint",
                                  is_trainable=True)
    assert_state(restored, "b", enabled)
    assert torch.equal(logits(restored), expected)
    # The state is followed as it changes: the next checkpoint records it.
    ok.remove(model, "a")
    with ok.disable_adapters(model):
        assert model.config.omoe == {"adapters": {"b": ok.OMoEConfig(["o_proj"], 3, 2, top_k=1)
                                                   .to_dict()}, "active": "b", "enabled": False}
    assert model.config.omoe["enabled"] is enabled


def test_hf_checkpoint_without_the_enabled_key_loads_enabled(llama, tmp_path):
    Llama, base_path = llama
    model = llama_two_adapters(Llama, base_path)
    ok.set_adapter(model, "b")
    expected = logits(model)
    model.save_pretrained(tmp_path / "checkpoint")
    config_path = tmp_path / "checkpoint" / "config.json"
    config = json.loads(config_path.read_text())
    del config["omoe"]["enabled"]
    config_path.write_text(json.dumps(config))
    restored = ok.from_pretrained(Llama.from_pretrained(base_path), tmp_path / "checkpoint",
                                  is_trainable=True)
    assert_state(restored, "b", True)
    assert torch.equal(logits(restored), expected)
