"""SFT then DPO with OMoE adapters on a small random LLaMA, TRL's trainers, on the CPU.

Does preference tuning keep the experts diverse, and does orthogonalization matter there
(the OMoE paper's open question)? Three adapters, same data and seeds:
  - omoe:    ok.inject(..., num_experts=4, rank=2)       (orthogonalized mixture)
  - mixture: the same with orthogonalize=False           (plain mixture)
  - lora:    a peft LoRA whose parameter count is the closest to the mixtures' (router included)

The task: a prompt is three random digits ("4 9 2"); the preferred completion counts up
from the last one (" 3 4 5", mod 10), the rejected one counts down (" 1 0 9").
Each adapter is first trained by SFT (trl.SFTTrainer) on both kinds of completion, so the
SFT policy has no preference; then DPO (OMoEDPOTrainer with reference="initial", the SFT
policy as the reference, no copy; trl.DPOTrainer with its "ref" adapter for peft) teaches
it. Reported per seed: per-step DPO loss and reward margin, the held-out preference
accuracy (the policy gives the preferred completion the higher log-prob, on prompts never
trained on) before and after DPO, TRL's implicit-reward accuracy on the held-out set,
and the expert diversity (mean |cos| of the raw expert outputs e_i = B_i A_i x, as in
train_minilm_omoe.py) before and after DPO. Then a GRPO smoke run (OMoEGRPOTrainer,
beta > 0, the base as the KL reference through ok.disable_adapters) with a rule-based
reward, and the peak memory of one SFT step, one no-copy DPO step and one DPO step with
TRL's default reference copy, each in a fresh process (peak RSS, Linux).

    .venv/bin/python examples/dpo_llama_omoe.py            # 3 seeds x 3 adapters, GRPO, memory
    .venv/bin/python examples/dpo_llama_omoe.py --smoke    # 2 steps, one seed, no memory runs

The defaults took 1.7 min on an idle 2-core Intel Xeon; the committed results file gives
its run's time and the machine's load.

Writes dpo_llama_omoe_results.md, dpo_llama_omoe_curves.png and dpo_llama_omoe_history.json
to --out-dir, by default examples/out/ (git-ignored); --publish writes examples/results/.
"""
from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

import omoe_kernels as ok  # noqa: E402
from omoe_kernels.tools.cli import ArgumentParser, positive_float, positive_int  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
KINDS = ("omoe", "mixture", "lora")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ["<pad>", "<eos>", "<unk>"] + [str(i) for i in range(10)]
NUM_EXPERTS, EXPERT_RANK = 4, 2
TERMS = 3  # prompt and completion length, in digits


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def base_model(seed: int, hidden: int = 64, layers: int = 2, intermediate: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def count(start: int, step: int, n: int = 3) -> str:
    return " " + " ".join(str((start + (i + 1) * step) % 10) for i in range(n))


def make_data(seed: int = 1234, n_train: int = 60, n_test: int = 30):
    """Prompts of three random digits; the preferred completion counts up from the last one
    (mod 10), the rejected one counts down. Held-out prompts are never trained on."""
    import datasets

    rng = random.Random(seed)
    prompts = rng.sample([f"{a} {b} {c}" for a in range(10) for b in range(10) for c in range(10)],
                         n_train + n_test)
    rows = [{"prompt": p, "chosen": count(int(p[-1]), 1), "rejected": count(int(p[-1]), -1)} for p in prompts]
    sft = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r[side]} for r in rows[n_test:] for side in ("chosen", "rejected")])
    return sft, datasets.Dataset.from_list(rows[n_test:]), datasets.Dataset.from_list(rows[:n_test])


def inject(model, kind: str):
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank(model)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
    return ok.inject(model, ok.OMoEConfig(TARGETS, num_experts=NUM_EXPERTS, rank=EXPERT_RANK,
                                          orthogonalize=kind == "omoe"))


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank(model) -> int:
    """The LoRA rank whose parameter count is the closest to the mixtures' on this model."""
    linears = [m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    mixture = sum(NUM_EXPERTS * (EXPERT_RANK * (m.in_features + m.out_features) + m.in_features)
                  for m in linears)
    per_rank = sum(m.in_features + m.out_features for m in linears)
    return max(1, round(mixture / per_rank))


@torch.no_grad()
def completion_logps(model, tok, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and the rejected completions given the prompts."""
    out = []
    model.eval()
    for side in ("chosen", "rejected"):
        prompt = [tok(p)["input_ids"] for p in data["prompt"]]
        full = [tok(p + c)["input_ids"] for p, c in zip(data["prompt"], data[side])]
        ids = torch.tensor(full)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        tokens = logp.gather(-1, ids[:, 1:, None])[..., 0]
        start = len(prompt[0]) - 1
        out.append(tokens[:, start:].sum(-1))
    return out[0], out[1]


def preference_accuracy(model, tok, data) -> float:
    chosen, rejected = completion_logps(model, tok, data)
    return (chosen > rejected).float().mean().item()


@torch.no_grad()
def expert_diversity(model, tok, data) -> float | None:
    """Mean |cos(e_i, e_j)|, i < j, over the tokens of the held-out prompts + chosen
    completions and every OMoE layer (train_minilm_omoe.py's measure)."""
    layers = ok.omoe_layers(model) if not hasattr(model, "peft_config") else {}
    if not layers:
        return None
    inputs = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, layer in layers.items()]
    model.eval()
    model(input_ids=torch.tensor([tok(p + c)["input_ids"] for p, c in zip(data["prompt"], data["chosen"])]))
    for hook in hooks:
        hook.remove()
    values = []
    upper = torch.triu(torch.ones(NUM_EXPERTS, NUM_EXPERTS, dtype=torch.bool), 1)
    for name, layer in layers.items():
        x = inputs[name].reshape(-1, layer.in_features).float()
        h = torch.einsum("td,erd->ter", x, layer.lora_A.float())
        e = torch.nn.functional.normalize(torch.einsum("ter,eor->teo", h, layer.lora_B.float()), dim=-1)
        values.append(torch.einsum("tio,tjo->tij", e, e).abs()[:, upper].mean())
    return torch.stack(values).mean().item()


def config_kwargs(args, out: Path, seed: int) -> dict:
    return dict(output_dir=os.fspath(out), learning_rate=args.lr, report_to=[], use_cpu=True, bf16=False,
                disable_tqdm=True, logging_steps=1, save_strategy="no", seed=seed, data_seed=seed,
                lr_scheduler_type="constant")


def run(kind: str, seed: int, args, data, out: Path) -> dict:
    import trl

    from omoe_kernels.integrations.trl import OMoEDPOTrainer

    tok = tokenizer()
    sft_data, train, test = data
    model = inject(base_model(seed), kind)
    n_trainable = trainable(model)
    rank = model.peft_config["default"].r if kind == "lora" else None
    started = time.perf_counter()
    sft = trl.SFTTrainer(model, args=trl.SFTConfig(per_device_train_batch_size=args.batch_size,
                                                   max_steps=args.sft_steps,
                                                   **config_kwargs(args, out / "sft", seed)),
                         train_dataset=sft_data, processing_class=tok)
    sft.train()
    model = sft.model
    before = {"accuracy": preference_accuracy(model, tok, test), "diversity": expert_diversity(model, tok, test)}
    dpo_config = trl.DPOConfig(per_device_train_batch_size=args.batch_size // 2, max_steps=args.dpo_steps,
                               beta=args.beta, precompute_ref_log_probs=True,
                               per_device_eval_batch_size=len(test), **config_kwargs(args, out / "dpo", seed))
    common = dict(args=dpo_config, train_dataset=train, eval_dataset=test, processing_class=tok)
    if kind == "lora":
        dpo = trl.DPOTrainer(model, **common)  # TRL keeps a frozen "ref" copy of the SFT adapter
    else:
        dpo = OMoEDPOTrainer(model, reference="initial", **common)
    dpo.train()
    model.train(False)
    evaluation = dpo.evaluate()
    after = {"accuracy": preference_accuracy(model, tok, test), "diversity": expert_diversity(model, tok, test)}
    log = [h for h in dpo.state.log_history if "loss" in h and "eval_loss" not in h]
    return {"kind": kind, "seed": seed, "trainable": n_trainable, "lora_rank": rank,
            "sft_loss": [h["loss"] for h in sft.state.log_history if "loss" in h],
            "dpo_loss": [h["loss"] for h in log], "dpo_margin": [h["rewards/margins"] for h in log],
            "before": before, "after": after,
            "eval_reward_accuracy": evaluation["eval_rewards/accuracies"],
            "eval_margin": evaluation["eval_rewards/margins"],
            "seconds": time.perf_counter() - started}


def grpo_smoke(args, out: Path) -> dict:
    """A few OMoEGRPOTrainer steps, beta > 0: the KL reference is the base model through
    ok.disable_adapters. Reward: the fraction of completion digits that count up."""
    import datasets
    import trl

    from omoe_kernels.integrations.trl import OMoEGRPOTrainer

    def continues(prompts, completions, **kwargs):
        rewards = []
        for prompt, completion in zip(prompts, completions):
            want = [int(w) for w in count(int(prompt[-1]), 1).split()]
            got = [w for w in completion.split() if w.isdigit()][:TERMS]
            rewards.append(sum(int(g) == w for g, w in zip(got, want)) / TERMS)
        return rewards

    _, train, _ = make_data()
    model = inject(base_model(args.seeds[0]), "omoe")
    n_params = sum(p.numel() for p in model.parameters())
    config = trl.GRPOConfig(per_device_train_batch_size=8, num_generations=4, max_completion_length=TERMS + 1,
                            max_steps=args.grpo_steps, beta=0.04,
                            **config_kwargs(args, out / "grpo", args.seeds[0]))
    trainer = OMoEGRPOTrainer(model, continues, args=config, processing_class=tokenizer(),
                              train_dataset=datasets.Dataset.from_dict({"prompt": train["prompt"]}))
    trainer.train()
    log = [h for h in trainer.state.log_history if "reward" in h]
    return {"steps": len(log), "reward": [h["reward"] for h in log], "kl": [h["kl"] for h in log],
            "ref_model": repr(trainer.ref_model),
            "extra_parameters": sum(p.numel() for p in trainer.model.parameters()) - n_params}


# ---- memory: each path in a fresh process ------------------------------------------------

MEMORY_PATHS = ("sft", "sft-16", "dpo-no-copy", "dpo-trl-copy")
MEMORY_MODEL = dict(hidden=512, layers=4, intermediate=1376)


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_child(path: str, base_dir: str, steps: int) -> None:
    """Peak RSS of building the trainer and `steps` steps, above the RSS once the libraries
    are imported, in MiB; printed as JSON. The model is loaded from `base_dir`, so TRL's
    default reference (for dpo-trl-copy) is a second load of it."""
    import trl
    from transformers import LlamaForCausalLM

    from omoe_kernels.integrations.trl import OMoEDPOTrainer

    sft_data, train, _ = make_data()
    tok = tokenizer()
    torch.set_num_threads(1)
    baseline = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
        f.write("5")
    model = inject(LlamaForCausalLM.from_pretrained(base_dir), "omoe")
    kwargs = dict(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=8,
                  report_to=[], use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no", seed=0)
    if path.startswith("sft"):
        kwargs["per_device_train_batch_size"] = 16 if path == "sft-16" else 8
        trainer = trl.SFTTrainer(model, args=trl.SFTConfig(**kwargs), train_dataset=sft_data, processing_class=tok)
    elif path == "dpo-no-copy":
        trainer = OMoEDPOTrainer(model, args=trl.DPOConfig(precompute_ref_log_probs=True, **kwargs),
                                 train_dataset=train, processing_class=tok)
    else:
        trainer = trl.DPOTrainer(model, args=trl.DPOConfig(**kwargs), train_dataset=train, processing_class=tok)
    ref = getattr(trainer, "ref_model", None)
    built = (_rss_kib("VmHWM") - baseline) / 1024
    trainer.train()
    print(json.dumps({"path": path, "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024, "built_mib": built,
                      "model_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                      "ref_model": type(ref).__name__ if ref is not None else None}))


def measure_memory(steps: int, repeats: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as base_dir:
        base_model(0, **MEMORY_MODEL).save_pretrained(base_dir)
        for _ in range(repeats):
            for path in MEMORY_PATHS:
                out = subprocess.run([sys.executable, __file__, "--memory-child", path, base_dir, str(steps)],
                                     capture_output=True, text=True, check=True)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


# ---- report --------------------------------------------------------------------------------

def _spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    t = torch.tensor(values, dtype=torch.float64)
    std = t.std().item() if len(values) > 1 else 0.0
    return f"{t.mean().item():.3f} ± {std:.3f} [{t.min().item():.3f}, {t.max().item():.3f}]"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


NAMES = {"omoe": f"OMoE (E={NUM_EXPERTS}, r={EXPERT_RANK}, dense)",
         "mixture": f"plain mixture (E={NUM_EXPERTS}, r={EXPERT_RANK}, orthogonalize=False)",
         "lora": "LoRA (peft, r={rank})"}


def run_meta(args, seconds: float, load_at_start: float) -> dict:
    return {"machine": machine(), "load_avg_1min_at_start": round(load_at_start, 1),
            "load_avg_1min_at_end": round(os.getloadavg()[0], 1),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
            "minutes": round(seconds / 60, 1),
            "command": f"python examples/dpo_llama_omoe.py --seeds {','.join(map(str, args.seeds))} "
                       f"--sft-steps {args.sft_steps} --dpo-steps {args.dpo_steps} --batch-size "
                       f"{args.batch_size} --lr {args.lr:g} --beta {args.beta:g}"}


def _mean(values) -> float:
    return statistics.mean(values)


def findings(runs) -> list[str]:
    """The answers, computed from the runs (means over the seeds)."""
    by = {k: [r for r in runs if r["kind"] == k] for k in KINDS}
    if not by["omoe"] or not by["mixture"]:
        return []
    div = {k: (_mean([r["before"]["diversity"] for r in by[k]]), _mean([r["after"]["diversity"] for r in by[k]]))
           for k in ("omoe", "mixture")}
    more_diverse = all(o["after"]["diversity"] < m["after"]["diversity"] for o in by["omoe"] for m in by["mixture"])
    acc = {k: _mean([r["after"]["accuracy"] for r in v]) for k, v in by.items() if v}
    margin = {k: _mean([r["eval_margin"] for r in v]) for k, v in by.items() if v}
    sft = {k: _mean([statistics.mean(r["sft_loss"][-5:]) for r in v]) for k, v in by.items() if v}
    return [
        "## What the runs say", "",
        f"- Expert diversity under DPO: mean |cos| goes {div['omoe'][0]:.3f} → {div['omoe'][1]:.3f} for OMoE "
        f"and {div['mixture'][0]:.3f} → {div['mixture'][1]:.3f} for the plain mixture. "
        + ("In every seed OMoE's experts stay more diverse (lower |cos|) than the plain mixture's after DPO"
           if more_diverse else "The seeds overlap: no consistent diversity difference after DPO")
        + "; DPO does not collapse either mixture's experts at this scale.",
        "- Preference accuracy on held-out prompts after DPO: "
        + ", ".join(f"{k} {acc[k]:.3f}" for k in acc) + "; held-out reward margin: "
        + ", ".join(f"{k} {margin[k]:.3f}" for k in margin) + ".",
        "- At the same learning rate and alpha, the adapters do not train at the same speed: the last-5-step "
        "SFT loss is " + ", ".join(f"{k} {sft[k]:.2f}" for k in sft) + ". A gap in DPO accuracy or margin "
        "therefore mixes the adapter's optimization speed with any preference-specific effect; no learning-"
        "rate sweep was run.", "",
    ]


def write_report(runs, grpo, memory, args, meta: dict, path: Path) -> None:
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        "# SFT then DPO with OMoE adapters on a small random LLaMA: results", "",
        f"Machine: {meta['machine']} (1-min load average {meta.get('load_avg_1min_at_start', '?')} "
        f"at the start, {meta['load_avg_1min_at_end']} at the end: near 0 is idle, near or above "
        f"the core count is busy). Date: {meta['date']}. torch {meta['torch']}, CPU, float32. "
        f"Whole run: {meta['minutes']} min (wall clock).", "",
        f"Command: `{meta['command']}`.", "",
        "Model: LLaMA, 2 layers, hidden 64, random init (seed = the run's seed); adapters on all "
        "seven projections. Task: prompts of 3 random digits; the preferred completion counts up "
        "from the last digit (mod 10, 3 digits), the rejected one counts down. 60 prompts train, "
        "30 held out (never trained on). SFT on both completions of each train prompt, then "
        "DPO on the pairs with the SFT policy as the reference (no reference copy).", "",
        f"Seeds: {seeds} ({len(args.seeds)} runs per adapter). Each cell: mean ± std [min, max] over "
        "the seeds.", "",
        *findings(runs),
        "| adapter | trainable params | SFT loss (last 5 steps) | held-out preference acc, after SFT | after DPO | TRL implicit-reward acc (held out) | held-out reward margin | expert diversity after SFT | after DPO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in args.kinds:
        rs = [r for r in runs if r["kind"] == kind]
        name = NAMES[kind].format(rank=rs[0]["lora_rank"])
        lines.append(
            f"| {name} | {rs[0]['trainable']:,} | {_spread([statistics.mean(r['sft_loss'][-5:]) for r in rs])} | "
            f"{_spread([r['before']['accuracy'] for r in rs])} | "
            f"{_spread([r['after']['accuracy'] for r in rs])} | {_spread([r['eval_reward_accuracy'] for r in rs])} | "
            f"{_spread([r['eval_margin'] for r in rs])} | {_spread([r['before']['diversity'] for r in rs])} | "
            f"{_spread([r['after']['diversity'] for r in rs])} |")
    lines += [
        "", "Held-out preference acc: the fraction of held-out pairs whose preferred completion gets "
        "the higher log-prob under the policy. TRL implicit-reward acc: the fraction where "
        "β·(log π − log π_ref) is higher for the preferred completion. Expert diversity: mean |cos| "
        "between the raw expert outputs e_i = B_i A_i x over expert pairs, tokens of the held-out "
        "sequences and the 14 adapted linears (0 = orthogonal, 1 = collapsed); n/a for LoRA.", "",
        "## Memory of one training step (peak RSS, fresh process each)", "",
        f"LLaMA with hidden {MEMORY_MODEL['hidden']}, {MEMORY_MODEL['layers']} layers, intermediate "
        f"{MEMORY_MODEL['intermediate']}, OMoE on all projections, 2 steps. DPO: 8 pairs a step, "
        "16 sequences; SFT: 8 sequences a step, and sft-16: 16 sequences, the DPO step's count. "
        "Peak RSS (VmHWM, reset once the libraries are imported) while loading the model, building "
        "the trainer and training, minus the RSS then: it counts the model, the trainer (DPO's "
        "reference precompute included) and the steps.", "",
        "| path | reference | peak above imports (MiB), median (runs) | × sft-16 (same sequences) | × sft "
        "(same prompts) | model parameters (MiB) |", "|---|---|---|---|---|---|",
    ]

    def median_of(name: str) -> float:
        peaks = [m["peak_mib"] for m in memory if m["path"] == name]
        return statistics.median(peaks) if peaks else float("nan")

    what = {"sft": "none", "sft-16": "none", "dpo-no-copy": "OMoEDPOTrainer: base through ok.disable_adapters, precomputed",
            "dpo-trl-copy": "trl.DPOTrainer default: a second model loaded from the checkpoint"}
    for name in MEMORY_PATHS:
        peaks = [m["peak_mib"] for m in memory if m["path"] == name]
        if not peaks:
            continue
        median = statistics.median(peaks)
        model_mib = next(m["model_mib"] for m in memory if m["path"] == name)
        lines.append(f"| {name} | {what[name]} | {median:.0f} ({', '.join(f'{p:.0f}' for p in peaks)}) | "
                     f"{median / median_of('sft-16'):.2f} | {median / median_of('sft'):.2f} | {model_mib:.0f} |")
    lines += [
        "", "## GRPO smoke run", "",
        f"OMoEGRPOTrainer, {grpo['steps']} steps, beta 0.04, 4 generations per prompt; reward: the "
        "fraction of the completion's 3 digits that count up from the prompt's last digit. Reference: "
        f"`{grpo['ref_model']}`; parameters added by the trainer: {grpo['extra_parameters']}.", "",
        "| step | " + " | ".join(str(i + 1) for i in range(grpo["steps"])) + " |",
        "|---|" + "---|" * grpo["steps"],
        "| mean reward | " + " | ".join(f"{r:.3f}" for r in grpo["reward"]) + " |",
        "| KL to the base | " + " | ".join(f"{k:.4f}" for k in grpo["kl"]) + " |",
        "", "Per-step histories: `dpo_llama_omoe_history.json`.", "", "![curves](dpo_llama_omoe_curves.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(runs, kinds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    colors = dict(zip(KINDS, ("tab:blue", "tab:orange", "tab:green")))
    for kind in kinds:
        rs = [r for r in runs if r["kind"] == kind]
        for i, r in enumerate(rs):
            label = kind if i == 0 else None
            axes[0].plot(r["dpo_loss"], color=colors[kind], alpha=0.6, label=label)
            axes[1].plot(r["dpo_margin"], color=colors[kind], alpha=0.6, label=label)
        for j, key in enumerate(("accuracy", "diversity")):
            ax = axes[2 + j]
            for stage, x in (("before", 0), ("after", 1)):
                values = [r[stage][key] for r in rs if r[stage][key] is not None]
                ax.scatter([x + 0.08 * (KINDS.index(kind) - 1)] * len(values), values, color=colors[kind],
                           label=kind if stage == "before" and values else None)
    axes[0].set(title="DPO loss", xlabel="step")
    axes[1].set(title="DPO reward margin (train batch)", xlabel="step")
    axes[2].set(title="held-out preference accuracy", xticks=[0, 1], xticklabels=["after SFT", "after DPO"])
    axes[3].set(title="expert diversity: mean |cos(e_i, e_j)|", xticks=[0, 1],
                xticklabels=["after SFT", "after DPO"])
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv=None):
    parser = ArgumentParser(prog="python examples/dpo_llama_omoe.py", description=__doc__)
    parser.add_argument("--seeds", type=lambda t: tuple(int(s) for s in t.split(",")), default=(0, 1, 2),
                        help="comma-separated seeds (model init and data order)")
    parser.add_argument("--sft-steps", type=positive_int, default=40)
    parser.add_argument("--dpo-steps", type=positive_int, default=30)
    parser.add_argument("--grpo-steps", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="SFT sequences per step; DPO pairs: half")
    parser.add_argument("--lr", type=positive_float, default=1e-2)
    parser.add_argument("--beta", type=positive_float, default=0.1, help="DPO beta")
    parser.add_argument("--kinds", type=lambda t: tuple(t.split(",")), default=KINDS)
    parser.add_argument("--memory-repeats", type=int, default=2, help="fresh processes per memory path; 0: skip")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the figure, report and history go; None: examples/out/ (git-ignored)")
    parser.add_argument("--publish", action="store_true",
                        help="write to examples/results/, the committed files, instead of --out-dir")
    parser.add_argument("--smoke", action="store_true", help="one seed, 2 steps each, no memory runs (tests)")
    parser.add_argument("--report-only", action="store_true",
                        help="only redraw the figure and rewrite the markdown from the history JSON")
    args = parser.parse_args(argv)
    if args.publish and args.out_dir is not None:
        parser.error("--out-dir and --publish name two places; give one")
    if any(k not in KINDS for k in args.kinds):
        parser.error(f"--kinds: choose among {', '.join(KINDS)}")
    if args.smoke:
        args.seeds, args.sft_steps, args.dpo_steps, args.grpo_steps, args.memory_repeats = (0,), 2, 2, 2, 0
    if args.out_dir is None:
        args.out_dir = EXAMPLES / ("results" if args.publish else "out")
    return args


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.report_only:
        return report(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    data = make_data()
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            for kind in args.kinds:
                runs.append(run(kind, seed, args, data, Path(scratch)))
                r = runs[-1]
                print(f"seed {seed} {kind:8s} acc {r['before']['accuracy']:.3f} -> {r['after']['accuracy']:.3f}  "
                      f"diversity {r['before']['diversity']} -> {r['after']['diversity']}  {r['seconds']:.0f} s",
                      flush=True)
        grpo = grpo_smoke(args, Path(scratch))
    memory = measure_memory(steps=2, repeats=args.memory_repeats) if args.memory_repeats else []
    meta = run_meta(args, time.perf_counter() - started, load_at_start)
    (args.out_dir / "dpo_llama_omoe_history.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "grpo": grpo, "memory": memory}, indent=1))
    report(args)
    print(f"wrote {args.out_dir / 'dpo_llama_omoe_results.md'} ({meta['minutes']} min)")
    return {"runs": runs, "grpo": grpo, "memory": memory}


def report(args) -> None:
    """The figure and the markdown from --out-dir's history JSON."""
    data = json.loads((args.out_dir / "dpo_llama_omoe_history.json").read_text())
    plot(data["runs"], args.kinds, args.out_dir / "dpo_llama_omoe_curves.png")
    write_report(data["runs"], data["grpo"], data["memory"], args, data["meta"],
                 args.out_dir / "dpo_llama_omoe_results.md")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--memory-child":
        memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
