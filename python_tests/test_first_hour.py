"""What a new user meets first: no leak through a config shared by two models, peft's
names, errors at the first mistake, and the packaging."""
from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import omoe_kernels as ok
from helpers import TinyModel, assert_model_unchanged, model_snapshot, tiny_model, tiny_model_inputs

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def llama_config(transformers):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=32)


def perturb_b(model: nn.Module, seed: int) -> None:
    """Non-zero lora_B, so that an adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


# ------------------------------------------------------------------ no shared-state leak

def test_two_models_from_one_config_inject_into_one_only(transformers, tmp_path):
    Llama = transformers.LlamaForCausalLM
    config = llama_config(transformers)
    torch.manual_seed(0)
    policy, reference = Llama(config), Llama(config)
    assert policy.config is reference.config  # what HF does: the premise of this test
    ok.inject(policy, ok.OMoEConfig(TARGETS, 2, 2))
    perturb_b(policy, 1)
    assert not hasattr(config, "omoe") and not hasattr(reference.config, "omoe")
    # The injected model records its adapters in its own copy, which its parts share.
    assert policy.config is not config and policy.config.omoe["active"] == "default"
    assert policy.model.config is policy.config
    reference.save_pretrained(tmp_path / "reference")
    saved = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert "omoe" not in saved
    assert not hasattr(Llama.from_pretrained(tmp_path / "reference").config, "omoe")
    # The injected one saves its record; ok.from_pretrained rebuilds it onto a fresh base.
    policy.save_pretrained(tmp_path / "policy")
    assert "omoe" in json.loads((tmp_path / "policy" / "config.json").read_text())
    torch.manual_seed(0)
    restored = ok.from_pretrained(Llama(config), tmp_path / "policy")
    assert torch.equal(logits(restored), logits(policy))
    assert not hasattr(config, "omoe")
    # remove takes the record out of the model's config; the shared one never had it.
    ok.remove(policy)
    assert not hasattr(policy.config, "omoe") and not hasattr(config, "omoe")


def test_plain_hf_load_of_an_injected_checkpoint(transformers, tmp_path):
    Llama = transformers.LlamaForCausalLM
    config = llama_config(transformers)
    torch.manual_seed(0)
    model = ok.inject(Llama(config), ok.OMoEConfig(TARGETS, 2, 2))
    perturb_b(model, 2)
    model.save_pretrained(tmp_path / "checkpoint")  # what a Trainer checkpoint holds
    torch.manual_seed(0)
    base = logits(Llama(config))
    plain = Llama.from_pretrained(tmp_path / "checkpoint")
    assert torch.equal(logits(plain), base)  # the base model, exactly
    # HF keeps config.json's "omoe" on the plain model; injecting into it still works.
    restored = ok.from_pretrained(plain, tmp_path / "checkpoint")
    assert torch.equal(logits(restored), logits(model))
    # Saving the plain model keeps the stale record without the tensors: a clear error.
    Llama.from_pretrained(tmp_path / "checkpoint").save_pretrained(tmp_path / "stale")
    fresh = Llama(config)
    with pytest.raises(ValueError, match="holds none of their tensors"):
        ok.from_pretrained(fresh, tmp_path / "stale")
    assert not ok.omoe_layers(fresh)


# ------------------------------------------------------------------ peft's names

def test_peft_aliases_of_rank_alpha_dropout():
    assert ok.OMoEConfig(TARGETS, 2, r=4, lora_alpha=8) == ok.OMoEConfig(TARGETS, 2, rank=4, alpha=8)
    assert ok.OMoEConfig(TARGETS, num_experts=2, r=4, lora_dropout=0.1).dropout == 0.1
    for both in ({"r": 4, "rank": 4}, {"lora_alpha": 8, "alpha": 8, "rank": 2},
                 {"lora_dropout": 0.1, "dropout": 0.1, "rank": 2}):
        with pytest.raises(TypeError, match="alias"):
            ok.OMoEConfig(TARGETS, 2, **both)
    model = ok.inject(tiny_model(), TARGETS, num_experts=2, r=3, lora_alpha=6)
    assert next(iter(ok.omoe_layers(model).values())).config()["rank"] == 3
    # Files keep the canonical names.
    assert "rank" in ok.OMoEConfig(TARGETS, 2, r=4).to_dict()


def test_a_config_with_peft_names_alone_is_complete(transformers, tmp_path):
    """`OMoEConfig(r=4, lora_alpha=8)` works as peft's `LoraConfig(r=4, lora_alpha=8)`:
    the model type picks the targets, and the file records the names chosen."""
    assert ok.OMoEConfig(r=4, lora_alpha=8) == ok.OMoEConfig(rank=4, alpha=8)
    config = ok.OMoEConfig(r=4, lora_alpha=8)
    assert (config.target_modules, config.num_experts, config.rank) == (None, 4, 4)
    assert (ok.OMoEConfig().num_experts, ok.OMoEConfig().rank) == (4, 8)
    model = ok.inject(transformers.LlamaForCausalLM(llama_config(transformers)), config)
    assert sorted(n.rpartition(".")[2] for n in ok.omoe_layers(model)) == TARGETS
    perturb_b(model, 0)
    ok.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "omoe_config.json").read_text())
    assert saved["target_modules"] == TARGETS and saved["num_experts"] == 4
    loaded = ok.from_pretrained(transformers.LlamaForCausalLM(llama_config(transformers)), tmp_path)
    for (ka, va), (kb, vb) in zip(ok.adapter_state_dict(model).items(),
                                  ok.adapter_state_dict(loaded).items()):
        assert ka == kb and torch.equal(va, vb)
    # Without a model type to look up, the error says what to pass, and nothing changes.
    plain = tiny_model()
    snapshot = model_snapshot(plain)
    with pytest.raises(ValueError, match="no default targets.*pass `target_modules`"):
        ok.inject(plain, ok.OMoEConfig())
    assert_model_unchanged(plain, snapshot)


def test_default_targets_are_peft_defaults():
    constants = pytest.importorskip("peft.utils.constants")
    from omoe_kernels.adapters.targets import DEFAULT_TARGETS
    peft_defaults = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert {t: peft_defaults.get(t) for t in DEFAULT_TARGETS} == DEFAULT_TARGETS


def test_a_config_file_names_its_model_shape():
    """The defaults are for construction: a file without num_experts, rank or targets was
    not written by OMoEConfig, and reading it would guess."""
    data = ok.OMoEConfig(TARGETS, 2, 2).to_dict()
    for key in ("target_modules", "num_experts", "rank"):
        with pytest.raises(ValueError, match=f"lacks.*{key}"):
            ok.OMoEConfig.from_dict({k: v for k, v in data.items() if k != key})


def test_all_linear_wraps_what_peft_wraps(transformers):
    peft = pytest.importorskip("peft")
    config = llama_config(transformers)
    lora = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                               peft.LoraConfig(r=2, target_modules="all-linear"))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in lora.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    model = ok.inject(transformers.LlamaForCausalLM(config), "all-linear", num_experts=2, rank=2)
    assert set(ok.omoe_layers(model)) == peft_targets
    assert "lm_head" not in ok.omoe_layers(model)
    # Beside a peft LoRA, "all-linear" leaves peft's layers alone, as peft does.
    lora_q = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ok.inject(lora_q, "ALL-LINEAR", num_experts=2, rank=2)
    assert set(ok.omoe_layers(lora_q)) == peft_targets - {"model.layers.0.self_attn.q_proj"}


def test_disable_adapter_is_an_alias(transformers):
    model = ok.inject(tiny_model(), TARGETS, num_experts=2, rank=2)
    perturb_b(model, 3)
    x = tiny_model_inputs()
    with torch.no_grad():
        with ok.disable_adapter(model):
            off = model(x)
        assert torch.equal(off, tiny_model()(x)) and not torch.equal(model(x), off)


def test_from_pretrained_is_for_inference_unless_is_trainable(tmp_path):
    model = ok.inject(tiny_model(), TARGETS, num_experts=2, rank=2, dropout=0.5)
    perturb_b(model, 4)
    ok.save_pretrained(model, tmp_path / "adapter")
    loaded = ok.from_pretrained(tiny_model(), tmp_path / "adapter")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = tiny_model_inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded(x))  # eval mode: no dropout
    trainable = ok.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True)
    flags = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert flags and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B", "router_weight") for n in flags)
    with pytest.raises(TypeError, match="is_trainable"):
        ok.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable="yes")


def test_modules_to_save_trains_saves_and_restores_a_head(tmp_path):
    config = ok.OMoEConfig(TARGETS, 2, 2, modules_to_save=["head"])
    model = ok.inject(tiny_model(), config)
    assert model.head.weight.requires_grad and model.head.bias.requires_grad
    perturb_b(model, 5)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ok.save_pretrained(model, tmp_path / "adapter")
    assert ok.OMoEConfig.load(tmp_path / "adapter" / "omoe_config.json").modules_to_save == ["head"]
    x = tiny_model_inputs()
    restored = ok.from_pretrained(tiny_model(), tmp_path / "adapter", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert restored.head.weight.requires_grad
    # A config without it writes the files as before: no new key.
    assert "modules_to_save" not in ok.OMoEConfig(TARGETS, 2, 2).to_dict()
    # The head is not a target, even for "all-linear".
    layers = ok.omoe_layers(ok.inject(tiny_model(), "all-linear", num_experts=2, rank=2,
                                      modules_to_save=["head"]))
    assert "head" not in layers and len(layers) == 6
    with pytest.raises(ValueError, match="`modules_to_save` entry 'haed'"):
        ok.inject(tiny_model(), TARGETS, num_experts=2, rank=2, modules_to_save=["haed"])


def test_modules_to_save_through_an_hf_checkpoint(transformers, tmp_path):
    Llama = transformers.LlamaForCausalLM
    config = llama_config(transformers)
    torch.manual_seed(0)
    model = ok.inject(Llama(config), ok.OMoEConfig(TARGETS, 2, 2, modules_to_save=["lm_head"]))
    perturb_b(model, 6)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    model.save_pretrained(tmp_path / "checkpoint")
    torch.manual_seed(0)
    restored = ok.from_pretrained(Llama(config), tmp_path / "checkpoint")
    assert torch.equal(logits(restored), logits(model))


def test_print_model_is_left_as_torch_prints_it():
    plain = repr(tiny_model())
    model = ok.inject(tiny_model(), TARGETS, num_experts=2, rank=2)
    assert "extra_repr" not in vars(model)
    assert repr(model).splitlines()[0] == plain.splitlines()[0] == "TinyModel("
    assert "trainable params" not in repr(model)


# ------------------------------------------------------------------ errors at the first mistake

def test_each_target_that_matches_nothing_is_named():
    with pytest.warns(UserWarning, match=r"entries \['q_prj'\] match no module"):
        model = ok.inject(tiny_model(), ["q_prj", "v_proj"], num_experts=2, rank=2)
    assert sorted(ok.omoe_layers(model)) == [f"blocks.{i}.v_proj" for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok.inject(tiny_model(), TARGETS, num_experts=2, rank=2)  # all match: no warning
    fresh = tiny_model()
    before = model_snapshot(fresh)
    with pytest.raises(ValueError, match=r"\['q_prj', 'v_prj'\] matches no module"):
        ok.inject(fresh, ["q_prj", "v_prj"], num_experts=2, rank=2)
    assert_model_unchanged(fresh, before)


def test_a_string_target_says_how_it_is_read():
    with pytest.raises(ValueError, match=r"regex that must match a whole module name \(re\.fullmatch\)"
                                         r".*pass a list such as \['q_proj', 'v_proj'\]"):
        ok.inject(tiny_model(), "q_proj", num_experts=2, rank=2)
    model = ok.inject(tiny_model(), r".*\.q_proj", num_experts=2, rank=2)
    assert len(ok.omoe_layers(model)) == 3


def test_inject_refuses_a_backend_that_cannot_run_on_the_models_device():
    model = tiny_model(device="cpu")
    before = model_snapshot(model)
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run .* cpu weights of "
                                         r"'blocks.0.q_proj'.*the backends that can"):
        ok.inject(model, TARGETS, num_experts=2, rank=2, backend="cuda")
    assert_model_unchanged(model, before)
    assert not ok.omoe_layers(model)


def test_a_missing_path_raises_file_not_found(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="no such adapter directory"):
        ok.from_pretrained(model, tmp_path / "absent")
    with pytest.raises(FileNotFoundError):
        ok.OMoEConfig.load(tmp_path / "absent.json")
    injected = ok.inject(tiny_model(), TARGETS, num_experts=2, rank=2)
    with pytest.raises(FileNotFoundError):
        ok.load_adapter(injected, tmp_path / "absent.safetensors")
    assert not ok.omoe_layers(model)


class Deeper(TinyModel):
    def __init__(self):
        super().__init__()
        self.extra = nn.Linear(8, 8)

    def forward(self, x):
        return super().forward(self.extra(x))


def test_not_injected_error_names_the_layers(tmp_path):
    model = ok.inject(tiny_model(), TARGETS, num_experts=2, rank=2)
    ok.save_adapter(model, tmp_path / "a.safetensors")
    deeper = ok.inject(Deeper(), TARGETS + ["extra"], num_experts=2, rank=2)
    with pytest.raises(ValueError) as info:
        ok.load_adapter(deeper, tmp_path / "a.safetensors")
    message = str(info.value)
    assert ": []" not in message
    assert "injected in the model but not in the file: ['extra']" in message
    assert "adapters: ['default']" in message and "blocks.0.q_proj" in message


# ------------------------------------------------------------------ packaging

def test_hf_extra_has_what_the_trainer_and_examples_import():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0] for r in project["optional-dependencies"]["hf"]}
    assert {"accelerate", "tqdm", "transformers", "peft", "safetensors"} <= names
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 10_000


def test_makefile_exports_cuda_home_only_where_it_exists(tmp_path):
    make = "make"
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "MAKEFLAGS")}

    def cuda_home(toolkit: Path) -> str:
        """What the Makefile's recipes see as $CUDA_HOME."""
        out = subprocess.run([make, "-s", "-f", os.fspath(ROOT / "Makefile"), f"CUDA_TOOLKIT={toolkit}",
                              "--eval", "print-cuda-home: ; @echo \"[$$CUDA_HOME]\"", "print-cuda-home"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    try:
        subprocess.run([make, "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("make is not installed")
    assert cuda_home(tmp_path / "absent") == "[]"
    assert cuda_home(tmp_path) == f"[{tmp_path}]"

