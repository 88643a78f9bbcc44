"""The Hugging Face / peft workflow (docs/contract.md §3): OMoEConfig, named adapters, adapter
directories, Trainer checkpoints, the base model's state-dict keys, peft side by side,
adapter dtype and a quantized base."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import omoe_kernels as ok

TARGETS = ["q_proj", "v_proj"]


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.q_proj(x)) + self.v_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        return sum(layer(x) for layer in self.layers)


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def x_batch() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(9))


def perturb(model: nn.Module, seed: int, adapter_name: str | None = None) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in ok.adapter_state_dict(model, adapter_name).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(x_batch())


# ------------------------------------------------------------------ OMoEConfig

def test_config_round_trips_through_dict_and_json(tmp_path):
    config = ok.OMoEConfig(TARGETS, num_experts=4, rank=8, alpha=16, top_k=2, dropout=0.1,
                           adapter_dtype=torch.bfloat16)
    assert config.adapter_dtype == "bfloat16"
    data = config.to_dict()
    assert data["format"] == "omoe_kernels.config" and data["version"] == 1
    assert ok.OMoEConfig.from_dict(data) == config
    config.save(tmp_path / "c.json")
    assert ok.OMoEConfig.load(tmp_path / "c.json") == config
    assert json.loads(config.to_json_string())["target_modules"] == TARGETS


@pytest.mark.parametrize("change,message", [
    (dict(version=2), "unsupported config format"),
    (dict(format="peft"), "unsupported config format"),
    (dict(lora_alpha=3), r"unknown config keys \['lora_alpha'\]"),
    (dict(target_modules=[]), "target_modules"),
    (dict(adapter_dtype="int8"), "adapter_dtype"),
])
def test_config_from_dict_names_what_is_wrong(change, message):
    data = {**ok.OMoEConfig(TARGETS, 2, 2).to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        ok.OMoEConfig.from_dict(data, "my.json")
    with pytest.raises(ValueError, match="lacks"):
        ok.OMoEConfig.from_dict({"format": "omoe_kernels.config", "version": 1, "rank": 2})
    with pytest.raises(ValueError, match="must be a JSON object"):
        ok.OMoEConfig.from_dict([1])


def test_inject_with_a_config_equals_the_keyword_form():
    a = ok.inject(net(), ok.OMoEConfig(TARGETS, num_experts=3, rank=2, top_k=2))
    b = ok.inject(net(), TARGETS, num_experts=3, rank=2, top_k=2)
    for (ka, va), (kb, vb) in zip(ok.adapter_state_dict(a).items(), ok.adapter_state_dict(b).items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(TypeError, match="not as keywords too"):
        ok.inject(net(), ok.OMoEConfig(TARGETS, 3, 2), rank=4)
    with pytest.raises(TypeError, match="num_experts"):
        ok.inject(net(), TARGETS, rank=2)


def test_the_adapters_module_is_not_shadowed():
    assert ok.read_adapter_config is ok.adapters.read_adapter_config
    assert callable(ok.inject) and ok.adapters.inject is ok.inject


# ------------------------------------------------------------------ named adapters

def test_named_adapters_switch_and_disable():
    model = net()
    base = outputs(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ok.inject(model, ok.OMoEConfig(TARGETS, 2, 2), adapter_name="a")
    perturb(model, 1, "a")
    only_a = outputs(model)
    ok.inject(model, ok.OMoEConfig(["q_proj"], 3, 2, top_k=1), adapter_name="b")
    perturb(model, 2, "b")
    assert ok.adapter_names(model) == ["a", "b"] and ok.active_adapter(model) == "a"
    assert torch.equal(outputs(model), only_a)  # the new adapter waits for set_adapter
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{t}.base.{p}" if t == "q_proj" else f"layers.{i}.{t}.{p}"
                         for i in range(2) for t in TARGETS
                         for p in ("lora_A", "lora_B", "router_weight")}
    ok.set_adapter(model, "b")
    only_b = outputs(model)
    assert not torch.allclose(only_b, only_a) and not torch.allclose(only_b, base)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.q_proj.{p}" for i in range(2) for p in ("lora_A", "lora_B", "router_weight")}
    with ok.disable_adapters(model):
        assert torch.equal(outputs(model), base)
    assert torch.equal(outputs(model), only_b)
    with pytest.raises(RuntimeError), ok.disable_adapters(model):
        raise RuntimeError("the adapters come back after an error too")
    assert torch.equal(outputs(model), only_b)
    with pytest.raises(ValueError, match=r"not an adapter of the model \(it has \['a', 'b'\]\)"):
        ok.set_adapter(model, "c")
    with pytest.warns(UserWarning, match="'a' is active now"):
        ok.remove(model, "b")  # the active one: the remaining adapter takes over
    assert ok.adapter_names(model) == ["a"] and ok.active_adapter(model) == "a"
    assert torch.equal(outputs(model), only_a)
    ok.remove(model)
    assert not ok.omoe_layers(model) and torch.equal(outputs(model), base)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_each_adapter_saves_and_loads_by_name(tmp_path):
    model = ok.inject(net(), ok.OMoEConfig(TARGETS, 2, 2), adapter_name="a")
    ok.inject(model, ok.OMoEConfig(TARGETS, 2, 2), adapter_name="b")
    perturb(model, 1, "a")
    perturb(model, 2, "b")
    assert sorted(ok.adapter_state_dict(model, "b")) == sorted(
        f"layers.{i}.{t}.{p}" for i in range(2) for t in TARGETS
        for p in ("lora_A", "lora_B", "router_weight"))
    ok.save_pretrained(model, tmp_path / "b", adapter_name="b")
    ok.set_adapter(model, "b")
    expected = outputs(model)
    restored = ok.from_pretrained(net(), tmp_path / "b")
    assert ok.adapter_names(restored) == ["b"] and torch.equal(outputs(restored), expected)


def test_mark_trainable_restores_the_active_adapters_flags():
    model = ok.inject(net(), TARGETS, num_experts=2, rank=2)
    model.requires_grad_(False)  # what a library that freezes everything it does not own does
    ok.mark_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.{p}" for name in ok.omoe_layers(model) for p in ("lora_A", "lora_B", "router_weight")}


# ------------------------------------------------------------------ files and state dicts

def test_save_pretrained_through_torch_compile_and_from_pretrained(tmp_path):
    model = ok.inject(net(), ok.OMoEConfig(TARGETS, 3, 2, top_k=2, alpha=4))
    perturb(model, 3)
    compiled = torch.compile(model)
    ok.save_pretrained(compiled, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["omoe_adapter.safetensors", "omoe_config.json"]
    saved = ok.read_adapter_config(tmp_path / "adapter" / "omoe_adapter.safetensors")
    assert not any("_orig_mod" in name for name in saved["layers"])
    from safetensors import safe_open
    with safe_open(os.fspath(tmp_path / "adapter" / "omoe_adapter.safetensors"), "pt") as f:
        assert all(k.rsplit(".", 1)[1] in ("lora_A", "lora_B", "router_weight") for k in f.keys())
    restored = ok.from_pretrained(net(), tmp_path / "adapter")
    assert torch.equal(outputs(restored), outputs(model))
    assert ok.OMoEConfig.load(tmp_path / "adapter" / "omoe_config.json").alpha == 4


def test_from_pretrained_that_fails_leaves_the_model(tmp_path):
    model = ok.inject(net(), ok.OMoEConfig(TARGETS, 2, 2))
    ok.save_pretrained(model, tmp_path / "adapter")
    other = nn.Sequential(nn.Linear(8, 8))  # has no q_proj / v_proj
    flags = [p.requires_grad for p in other.parameters()]
    with pytest.raises(ValueError, match="matches no module"):
        ok.from_pretrained(other, tmp_path / "adapter")
    assert type(other[0]) is nn.Linear and [p.requires_grad for p in other.parameters()] == flags
    (tmp_path / "adapter" / "omoe_adapter.safetensors").write_bytes(b"\x00" * 8)
    fresh = net()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ok.from_pretrained(fresh, tmp_path / "adapter")
    assert not ok.omoe_layers(fresh) and all(p.requires_grad for p in fresh.parameters())
    with pytest.raises(ValueError, match="not a directory"):
        ok.from_pretrained(fresh, tmp_path / "adapter" / "omoe_config.json")


def test_state_dict_keeps_the_base_models_keys():
    plain = net()
    model = ok.inject(net(), TARGETS, num_experts=2, rank=2)
    perturb(model, 4)
    state = model.state_dict()
    adapter_keys = {k for k in state if ".omoe.default." in k}
    assert set(state) - adapter_keys == set(plain.state_dict())
    assert len(adapter_keys) == 12
    # The plain model loads the base weights exactly; the adapter keys are the unexpected ones.
    result = plain.load_state_dict(state, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) == adapter_keys
    # An injected model loads the whole state dict back, strictly.
    other = ok.inject(net(seed=5), TARGETS, num_experts=2, rank=2)
    other.load_state_dict(state)
    assert torch.equal(outputs(other), outputs(model))
    # The single-adapter layout (`q_proj.base.weight`, `q_proj.lora_A`) loads too: users
    # hold checkpoints written in it.
    legacy = {k.replace(".omoe.default.", "."): v for k, v in state.items()}
    legacy = {(k.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.")
               if k.rsplit(".", 1)[1] in ("weight", "bias") and "_proj." in k else k): v
              for k, v in legacy.items()}
    third = ok.inject(net(seed=6), TARGETS, num_experts=2, rank=2)
    third.load_state_dict(legacy)
    assert torch.equal(outputs(third), outputs(model))


# ------------------------------------------------------------------ a LLaMA and the Trainer

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_base")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return transformers, path


class _Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


def _train(transformers, model, out_dir, max_steps, resume=None):
    args = transformers.TrainingArguments(
        output_dir=os.fspath(out_dir), max_steps=max_steps, per_device_train_batch_size=4,
        save_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0, data_seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=_Tokens()).train(
        resume_from_checkpoint=resume)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_trainer_checkpoint_loads_as_the_base_model_and_through_from_pretrained(llama, tmp_path):
    transformers, base_path = llama
    Llama = transformers.LlamaForCausalLM
    model = Llama.from_pretrained(base_path)
    ok.inject(model, ok.OMoEConfig(LLAMA_TARGETS, num_experts=2, rank=2))
    _train(transformers, model, tmp_path, max_steps=4)
    checkpoint = tmp_path / "checkpoint-4"
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        reference = Llama.from_pretrained(base_path).eval()(ids).logits
        assert not torch.allclose(trained, reference)
        # The plain HF loader restores the base model exactly: no layer re-initialised.
        assert torch.equal(Llama.from_pretrained(checkpoint).eval()(ids).logits, reference)
        restored = ok.from_pretrained(Llama.from_pretrained(base_path), checkpoint).eval()
        assert torch.equal(restored(ids).logits, trained)
        with ok.disable_adapters(restored):
            assert torch.equal(restored(ids).logits, reference)
    # Resuming the Trainer from the checkpoint-2 reaches the same adapter as the full run.
    resumed = ok.inject(Llama.from_pretrained(base_path), ok.OMoEConfig(LLAMA_TARGETS, 2, 2))
    _train(transformers, resumed, tmp_path, max_steps=4, resume=os.fspath(tmp_path / "checkpoint-2"))
    for key, tensor in ok.adapter_state_dict(model).items():
        assert torch.equal(ok.adapter_state_dict(resumed)[key], tensor), key


def test_hf_checkpoint_with_two_named_adapters_restores_both(llama, tmp_path):
    transformers, base_path = llama
    Llama = transformers.LlamaForCausalLM
    model = ok.inject(Llama.from_pretrained(base_path), ok.OMoEConfig(["q_proj", "v_proj"], 2, 2),
                      adapter_name="a")
    ok.inject(model, ok.OMoEConfig(["o_proj"], 3, 2, top_k=1), adapter_name="b")
    perturb(model, 1, "a")
    perturb(model, 2, "b")
    ok.set_adapter(model, "b")
    model.save_pretrained(tmp_path / "checkpoint")
    restored = ok.from_pretrained(Llama.from_pretrained(base_path), tmp_path / "checkpoint")
    assert ok.adapter_names(restored) == ["a", "b"] and ok.active_adapter(restored) == "b"
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for name in ("a", "b"):
            ok.set_adapter(model, name)
            ok.set_adapter(restored, name)
            assert torch.equal(restored.eval()(ids).logits, model.eval()(ids).logits), name
    only_b = ok.from_pretrained(Llama.from_pretrained(base_path), tmp_path / "checkpoint", "b")
    assert ok.adapter_names(only_b) == ["b"]


# ------------------------------------------------------------------ peft side by side

def test_peft_lora_then_inject_keeps_pefts_flags_and_refuses_its_layers():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(net(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    peft_trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert peft_trainable
    ok.inject(model, ["v_proj"], num_experts=2, rank=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert peft_trainable <= trainable  # peft's LoRA weights are still trainable
    assert {n for n in trainable - peft_trainable} == {
        f"base_model.model.layers.{i}.v_proj.{p}" for i in range(2)
        for p in ("lora_A", "lora_B", "router_weight")}
    with pytest.raises(ValueError, match=r"q_proj \(Linear is a peft adapter layer \(peft\.tuners"):
        ok.inject(model, ["q_proj"], num_experts=2, rank=2, adapter_name="other")


def test_inject_then_peft_needs_mark_trainable_and_saves_with_save_pretrained(tmp_path):
    peft = pytest.importorskip("peft")
    model = ok.inject(net(), ["v_proj"], num_experts=2, rank=2)
    perturb(model, 5)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ok.mark_trainable(wrapped)  # peft froze the OMoE parameters
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    omoe = {f"base_model.model.layers.0.v_proj.{p}" for p in ("lora_A", "lora_B", "router_weight")}
    assert omoe <= trainable
    assert any("lora_A.default" in n for n in trainable)
    ok.save_pretrained(wrapped, tmp_path / "omoe")  # the OMoE half, under the plain names
    restored = ok.from_pretrained(net(), tmp_path / "omoe")
    for key, tensor in ok.adapter_state_dict(model).items():
        assert torch.equal(ok.adapter_state_dict(restored)[key], tensor)
    # peft's merge_and_unload merges its own layers and leaves the OMoE layers in place.
    before = outputs(wrapped)
    merged = wrapped.merge_and_unload()
    assert sorted(ok.omoe_layers(merged)) == ["layers.0.v_proj", "layers.1.v_proj"]
    torch.testing.assert_close(outputs(merged), before)


# ------------------------------------------------------------------ dtype and quantized base

def test_adapter_is_fp32_on_a_bf16_base_unless_asked_otherwise():
    model = ok.inject(net().to(torch.bfloat16), TARGETS, num_experts=2, rank=2)
    perturb(model, 6)
    layer = ok.omoe_layers(model)["layers.0.q_proj"]
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.router_weight.dtype == torch.float32
    y = model(x_batch().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
    kept = ok.inject(net().to(torch.bfloat16), ok.OMoEConfig(TARGETS, 2, 2, adapter_dtype="base"))
    assert ok.omoe_layers(kept)["layers.0.q_proj"].lora_A.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_dynamic_quantized_linear_base():
    model = net()
    quantized = torch.ao.quantization.quantize_dynamic(model, {"layers.0.q_proj", "layers.1.q_proj"},
                                                       dtype=torch.qint8)
    base = outputs(quantized)
    ok.inject(quantized, ["q_proj"], num_experts=2, rank=2)
    assert torch.equal(outputs(quantized), base)  # B = 0: exactly the quantized model
    perturb(quantized, 7)
    layer = ok.omoe_layers(quantized)["layers.0.q_proj"]
    x = x_batch().requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0
    # The input gradient goes through the frozen quantized map too (torch.ao's op has no
    # autograd formula: without the layer's help it would silently be missing).
    dequantized = nn.Linear(8, 8)
    with torch.no_grad():
        dequantized.weight.copy_(layer.base.weight().dequantize())
        dequantized.bias.copy_(layer.base.bias())
    twin = ok.OMoELinear(dequantized, 2, 2)
    twin.load_state_dict({k: getattr(layer, k) for k in ("lora_A", "lora_B", "router_weight")},
                         strict=False)
    x2 = x.detach().clone().requires_grad_(True)
    twin(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=0.05, atol=0.05)  # int8 weight vs float
    assert "layers.0.q_proj._packed_params._packed_params" in quantized.state_dict()
    ok.remove(quantized)
    assert torch.equal(outputs(quantized), base)


def test_installed_hugging_face_versions_are_the_pinned_ones():
    """The Makefile pins the versions this suite runs against; a venv outside the pins
    makes the tests say nothing about what `make` installs. Without the Hugging
    Face stack at all (the GPU machine's image) the HF tests skip, and so does this one."""
    pytest.importorskip("transformers")
    import re
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    makefile = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Makefile")
    pins = dict(re.findall(r'"([a-z]+)([<>=!~][^"]*)"', open(makefile).read().split("HF_PINS :=")[1]
                           .splitlines()[0]))
    assert set(pins) == {"transformers", "peft", "trl", "accelerate", "bitsandbytes"}
    for package, spec in pins.items():
        assert version(package) in SpecifierSet(spec), (package, version(package), spec)


def test_llama_example_smoke(tmp_path):
    """examples/train_llama_omoe.py end to end at 2 Trainer steps."""
    pytest.importorskip("transformers")
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_llama_omoe.py")
    spec = importlib.util.spec_from_file_location("train_llama_omoe", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--steps", "2", "--out-dir", str(tmp_path)])
    assert result["restored_logits_equal"] and result["disabled_equals_base"]
    assert result["adapter_files"] == ["omoe_adapter.safetensors", "omoe_config.json"]
    assert len(result["generated"]) == 9


@pytest.mark.parametrize("kind", ["Linear4bit", "Linear8bitLt"])
def test_bitsandbytes_base(kind):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (optional) is not installed")
    model = net()
    plain = model.layers[0].q_proj
    quantized = (bnb.nn.Linear4bit(8, 8, compute_dtype=torch.float32) if kind == "Linear4bit"
                 else bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False))
    quantized.load_state_dict(plain.state_dict())
    model.layers[0].q_proj = quantized.to("cpu")  # bitsandbytes quantizes on .to(device)
    base = outputs(model)
    ok.inject(model, r"layers\.0\.q_proj", num_experts=2, rank=2)
    assert torch.equal(outputs(model), base)  # B = 0: exactly the quantized model
    perturb(model, 8)
    layer = ok.omoe_layers(model)["layers.0.q_proj"]
    assert layer.lora_A.dtype == torch.float32
    x = x_batch().requires_grad_(True)
    layer(x).square().sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0 and x.grad.abs().sum() > 0
    ok.remove(model)
    assert type(model.layers[0].q_proj).__name__ == kind and torch.equal(outputs(model), base)
