"""TRL's SFT, DPO and GRPO trainers on a tiny LLaMA with OMoE adapters (omoe_kernels.integrations.trl):
the reference is the base model through `ok.disable_adapters`, with no second model."""
from __future__ import annotations

import ast
import copy
import os
from pathlib import Path

import pytest
import torch

import omoe_kernels as ok

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj", "up_proj"]
WORDS = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(10)] + list("abcdefghij")


def test_the_core_never_imports_the_integrations_or_trl():
    """`import omoe_kernels` must work without trl: only omoe_kernels/integrations/ names it."""
    bad = []
    for path in (ROOT / "omoe_kernels").rglob("*.py"):
        if "integrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [])
            if any(n.split(".")[0] == "trl" or "integrations" in n for n in names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


trl = pytest.importorskip("trl", reason="trl (the hf extra's preference trainers) is not installed")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("TQDM_DISABLE", "1")

from omoe_kernels.integrations.trl import (  # noqa: E402
    BaseModelReference,
    OMoEDPOTrainer,
    OMoEGRPOTrainer,
)


@pytest.fixture(scope="module")
def setup():
    """A word-level tokenizer over digits and letters, and a random 2-layer LLaMA (the base)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>",
                                                     eos_token="<eos>", unk_token="<unk>")
    config = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1)
    torch.manual_seed(0)
    return tokenizer, transformers.LlamaForCausalLM(config).eval()


def policy(base, seed: int = 1):
    """The base with OMoE adapters whose B is nonzero, so the policy differs from the base."""
    model = ok.inject(copy.deepcopy(base), ok.OMoEConfig(TARGETS, num_experts=2, rank=2))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in ok.adapter_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    return model


def preferences():
    """A fixed fingerprint, as a dataset loaded from files has: TRL caches the precomputed
    reference log-probs under it."""
    data = datasets.Dataset.from_dict({
        "prompt": ["1 2", "3 4", "5 6", "7 8"],
        "chosen": [" 3 4", " 5 6 7", " 7 8", " 9 0"],
        "rejected": [" a b", " c", " e f g", " h i"]})
    return data.map(lambda row: row, new_fingerprint="test-trl-preferences")


def common(out, **extra):
    return dict(output_dir=os.fspath(out), per_device_train_batch_size=2, learning_rate=1e-2,
                report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, logging_steps=1, seed=0,
                **extra)


def dpo_args(out, **extra):
    return trl.DPOConfig(**common(out, **{"precompute_ref_log_probs": True, **extra}))


def n_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def assert_round_trips(base, model, checkpoint: Path, tmp_path: Path) -> None:
    """The Trainer checkpoint and ok.save_pretrained each restore the trained adapters."""
    ids = torch.tensor([[3, 4, 5, 13, 14, 6]])
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        assert not torch.allclose(trained, base(ids).logits)
        restored = ok.from_pretrained(copy.deepcopy(base), checkpoint).eval()
        assert torch.equal(restored(ids).logits, trained)
        ok.save_pretrained(model, tmp_path / "adapter")
        again = ok.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
        assert torch.equal(again(ids).logits, trained)


def test_sft_trainer_runs_as_is_and_checkpoints(setup, tmp_path):
    tokenizer, base = setup
    model = policy(base)
    before = n_params(model)
    adapter = {k: v.clone() for k, v in ok.adapter_state_dict(model).items()}
    data = datasets.Dataset.from_dict({"prompt": preferences()["prompt"], "completion": preferences()["chosen"]})
    args = trl.SFTConfig(**common(tmp_path, max_steps=2, save_steps=2))
    trainer = trl.SFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    assert n_params(trainer.model) == before
    assert any(not torch.equal(v, adapter[k]) for k, v in ok.adapter_state_dict(model).items())
    assert_round_trips(base, model, tmp_path / "checkpoint-2", tmp_path)


def completion_logps(model, prompt_ids, completion_ids) -> float:
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    targets = ids[0, 1:]
    return logp[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].sum().item()


def test_dpo_reference_is_the_base_model_with_no_copy(setup, tmp_path):
    tokenizer, base = setup
    model = policy(base)
    before = n_params(model)
    trainer = OMoEDPOTrainer(model, args=dpo_args(tmp_path, max_steps=2, save_steps=2),
                             train_dataset=preferences(), processing_class=tokenizer)
    assert trainer.ref_model is None and n_params(trainer.model) == before
    data = trainer.train_dataset
    for row in data:
        for side in ("chosen", "rejected"):
            expected = completion_logps(base, row["prompt_ids"], row[f"{side}_ids"])
            assert row[f"ref_{side}_logps"] == pytest.approx(expected, rel=1e-5, abs=1e-5), side
            # The policy (adapters on) differs: the check above can tell them apart.
            assert abs(completion_logps(model, row["prompt_ids"], row[f"{side}_ids"]) - expected) > 1e-2
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert n_params(trainer.model) == before
    assert_round_trips(base, model, tmp_path / "checkpoint-2", tmp_path)


def test_dpo_initial_reference_is_the_policy_as_built(setup, tmp_path):
    """reference="initial" (DPO after an SFT of the same adapters): the adapters stay on.
    The same model and data with reference="base" come first: the cache must tell them apart."""
    tokenizer, base = setup
    model = policy(base)
    OMoEDPOTrainer(model, args=dpo_args(tmp_path), train_dataset=preferences(), processing_class=tokenizer)
    trainer = OMoEDPOTrainer(model, args=dpo_args(tmp_path), train_dataset=preferences(),
                             processing_class=tokenizer, reference="initial")
    row = trainer.train_dataset[1]
    expected = completion_logps(model, row["prompt_ids"], row["chosen_ids"])
    assert row["ref_chosen_logps"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert trainer.ref_model is None


def one_batch_loss_and_grads(trainer):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    model = trainer.model
    model.train()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_dpo_loss_and_grads_equal_an_explicit_base_copy_reference(setup, tmp_path):
    tokenizer, base = setup
    no_copy = OMoEDPOTrainer(policy(base), args=dpo_args(tmp_path / "a"), train_dataset=preferences(),
                             processing_class=tokenizer)
    ref = copy.deepcopy(base).requires_grad_(False)
    with_copy = trl.DPOTrainer(policy(base), ref_model=ref, args=trl.DPOConfig(**common(tmp_path / "b")),
                               train_dataset=preferences(), processing_class=tokenizer)
    loss_a, grads_a = one_batch_loss_and_grads(no_copy)
    loss_b, grads_b = one_batch_loss_and_grads(with_copy)
    assert grads_a and grads_a.keys() == grads_b.keys()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for key, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[key], rtol=1e-4, atol=1e-6, msg=key)
    # A reference equal to the policy (adapters on) would give log 2.
    assert abs(loss_a.item() - 0.6931471805599453) > 1e-4


def test_grpo_kl_reference_is_the_base_model_with_no_copy(setup, tmp_path):
    tokenizer, base = setup
    model = policy(base)
    before = n_params(model)

    def digits(completions, **kwargs):
        return [float(sum(w.isdigit() for w in c.split())) for c in completions]

    args = trl.GRPOConfig(**common(tmp_path, max_steps=2, save_steps=2, beta=0.1, num_generations=2,
                                   max_completion_length=4))
    trainer = OMoEGRPOTrainer(model, digits, args=args, processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_dict({"prompt": preferences()["prompt"]}))
    assert isinstance(trainer.ref_model, BaseModelReference) and trainer.beta == args.beta == 0.1
    assert n_params(trainer.model) == before
    ids = torch.tensor([[3, 4, 5, 13, 14, 6], [5, 6, 7, 8, 15, 16]])
    with torch.no_grad():
        ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, torch.ones_like(ids), 3)
        pol, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, torch.ones_like(ids), 3)
        logp = torch.log_softmax(base(ids).logits[:, -4:-1], -1)
    expected = logp.gather(-1, ids[:, -3:, None])[..., 0]
    torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-5)
    assert (pol - expected).abs().max() > 1e-2
    trainer.train()
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert len(kls) == 2 and all(k > 0 for k in kls)
    assert n_params(trainer.model) == before
    assert_round_trips(base, model, tmp_path / "checkpoint-2", tmp_path)


@pytest.mark.parametrize("case,message", [
    ("ref_model", "omit `ref_model`"),
    ("per_step_reference", "precompute_ref_log_probs=True"),
    ("no_adapters", "call omoe_kernels.inject first"),
    ("sync_ref_model", "sync_ref_model=False"),
    ("grpo_no_adapters", "call omoe_kernels.inject first"),
    ("grpo_trainable_base", "outside the OMoE adapters are trainable"),
    ("reference", "`reference` must be one of"),
])
def test_a_setup_that_needs_a_reference_copy_is_refused(setup, tmp_path, case, message):
    tokenizer, base = setup
    model = copy.deepcopy(base) if "no_adapters" in case else policy(base)
    kwargs = dict(train_dataset=preferences(), processing_class=tokenizer)
    with pytest.raises(ValueError, match=message):
        if case == "grpo_trainable_base":
            model.lm_head.requires_grad_(True)
        if case.startswith("grpo"):
            OMoEGRPOTrainer(model, lambda completions, **kw: [0.0] * len(completions),
                            args=trl.GRPOConfig(**common(tmp_path, beta=0.1, num_generations=2)), **kwargs)
        elif case == "ref_model":
            OMoEDPOTrainer(model, copy.deepcopy(base), args=dpo_args(tmp_path), **kwargs)
        elif case == "reference":
            OMoEDPOTrainer(model, args=dpo_args(tmp_path), reference="sft", **kwargs)
        else:
            extra = {"per_step_reference": dict(precompute_ref_log_probs=False),
                     "sync_ref_model": dict(sync_ref_model=True)}.get(case, {})
            OMoEDPOTrainer(model, args=dpo_args(tmp_path, **extra), **kwargs)


def test_dpo_example_smoke(tmp_path):
    """examples/dpo_llama_omoe.py end to end at 2 steps (OMoE only; LoRA is peft's own path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_llama_omoe", ROOT / "examples" / "dpo_llama_omoe.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--smoke", "--kinds", "omoe", "--out-dir", str(tmp_path)])
    (run,) = result["runs"]
    assert len(run["dpo_loss"]) == 2 and run["after"]["diversity"] is not None
    assert result["grpo"]["extra_parameters"] == 0 and len(result["grpo"]["kl"]) == 2
    assert "OMoE (E=4" in (tmp_path / "dpo_llama_omoe_results.md").read_text()
