"""OMoE on a LLaMA-architecture model, the Hugging Face way, on the CPU, with no downloads.

The paper's setting at toy scale: a LLaMA built from a `LlamaConfig` (random init, saved
once to stand in for a pretrained checkpoint), OMoE adapters on all seven projections
(q/k/v/o/gate/up/down), trained with the Hugging Face `Trainer` on a synthetic task
(count up: s, s+1, s+2, ... modulo the vocabulary). Then:

  1. `ok.save_pretrained` writes the adapter directory (config JSON + adapter tensors);
  2. `ok.from_pretrained` restores it onto a freshly loaded base: same logits;
  3. `generate()` continues a count with the restored model;
  4. under `ok.disable_adapters` the model gives exactly the base model's logits (the
     reference logits DPO-style methods need).

    python examples/train_llama_omoe.py              # about 20 s on an idle 2-core CPU (AMD EPYC)
    python examples/train_llama_omoe.py --steps 2    # a smoke run (the test suite's)

The time is an idle-machine figure: with other processes on the same cores it has taken
over 6 minutes.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import omoe_kernels as ok  # noqa: E402
from omoe_kernels.tools.cli import ArgumentParser, positive_float, positive_int  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB, SEQ_LEN = 64, 24


class Counting(torch.utils.data.Dataset):
    """Sequences that count up modulo the vocabulary from a random start (s, s+1, s+2, ...):
    the next token is a fixed function of the current one, which adapters can learn on a
    frozen random base."""

    def __init__(self, size: int, seed: int):
        starts = torch.randint(0, VOCAB, (size,), generator=torch.Generator().manual_seed(seed))
        self.items = [(start + torch.arange(SEQ_LEN)) % VOCAB for start in starts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.items[i], "labels": self.items[i]}


@torch.no_grad()
def mean_loss(model, data: Counting) -> float:
    ids = torch.stack(data.items)
    return model(input_ids=ids, labels=ids).loss.item()


def main(argv=None) -> dict:
    parser = ArgumentParser(prog="python examples/train_llama_omoe.py", description=__doc__)
    parser.add_argument("--steps", type=positive_int, default=150, help="Trainer steps")
    parser.add_argument("--lr", type=positive_float, default=1e-2, help="AdamW learning rate")
    parser.add_argument("--experts", type=positive_int, default=4, help="experts per layer")
    parser.add_argument("--rank", type=positive_int, default=4, help="rank of each expert")
    parser.add_argument("--top-k", type=positive_int, default=None,
                        help="experts per token; None: dense routing")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the base checkpoint, Trainer output and adapter go; "
                             "None: a new temporary directory")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is more than --experts {args.experts}")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    out = args.out_dir or Path(tempfile.mkdtemp(prefix="omoe_llama_"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(out / "base")  # stands in for a pretrained model

    model = LlamaForCausalLM.from_pretrained(out / "base")
    omoe = ok.OMoEConfig(target_modules=TARGETS, num_experts=args.experts, rank=args.rank,
                         alpha=2 * args.rank, top_k=args.top_k)
    ok.inject(model, omoe)
    ok.print_trainable_parameters(model)
    train, test = Counting(512, seed=1), Counting(64, seed=2)
    loss_before = mean_loss(model, test)

    trainer_args = TrainingArguments(
        output_dir=os.fspath(out / "trainer"), max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=16, lr_scheduler_type="cosine", warmup_steps=args.steps // 10,
        save_strategy="no", logging_steps=max(1, args.steps // 5), report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0)
    Trainer(model=model, args=trainer_args, train_dataset=train).train()
    model.eval()
    loss_after = mean_loss(model, test)

    ok.save_pretrained(model, out / "adapter")
    restored = ok.from_pretrained(LlamaForCausalLM.from_pretrained(out / "base"), out / "adapter").eval()
    base = LlamaForCausalLM.from_pretrained(out / "base").eval()
    ids = torch.stack(test.items[:8])
    with torch.no_grad():
        trained_logits = model(ids).logits
        restored_equal = torch.equal(restored(ids).logits, trained_logits)
        with ok.disable_adapters(restored):
            reference_equal = torch.equal(restored(ids).logits, base(ids).logits)
        prompt = test.items[0][:9].unsqueeze(0)
        generated = restored.generate(prompt, max_new_tokens=9, do_sample=False,
                                      pad_token_id=0)[0, 9:]
    expected = test.items[0][9:18]
    result = {"loss_before": loss_before, "loss_after": loss_after,
              "restored_logits_equal": restored_equal, "disabled_equals_base": reference_equal,
              "generated": generated.tolist(), "expected": expected.tolist(),
              "adapter_files": sorted(os.listdir(out / "adapter")), "out_dir": os.fspath(out)}
    print(f"test loss {loss_before:.3f} -> {loss_after:.3f}; restored logits equal the trained "
          f"model's: {restored_equal}; disable_adapters gives the base model's logits: "
          f"{reference_equal}")
    print(f"generate: prompt {prompt[0].tolist()} -> {generated.tolist()} "
          f"(the count continues as {expected.tolist()})")
    return result


if __name__ == "__main__":
    main()
