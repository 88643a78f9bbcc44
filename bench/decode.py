"""Greedy decoding with the KV cache: OMoE against a peft LoRA and no adapter.

`python -m bench.decode` builds a tiny LLaMA-architecture model from `LlamaConfig`
(random init, no downloads) and three copies of it:

- `base`: no adapter;
- `omoe`: `omoe_kernels.inject` on all seven projections (q, k, v, o, gate, up, down),
  E experts of rank r;
- `lora`: peft's LoRA on the same seven projections with rank E·r, the rank of the plain
  LoRA every other benchmark compares against (docs/contract.md §6).

Both adapters get random non-zero B (a trained-looking adapter; B = 0 is a special case).
Per-token decode time = (time of `generate` for N new tokens − time for 1 new token) /
(N − 1), so the prefill is left out. The three models run interleaved, one generate call
each per round, order rotating; medians. Results: `bench/results/decode-<tag>.json` and
`.md` with the machine and its load.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import omoe_kernels as ok

from .machine import cpu_model
from .sweep import RESULTS, load_average

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 16 * 16,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), vocab_size=vocab,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def with_omoe(model, experts: int, rank: int, top_k):
    model = ok.inject(copy.deepcopy(model), PROJECTIONS, num_experts=experts, rank=rank,
                      top_k=top_k)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model.eval()


def with_peft_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=PROJECTIONS, lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, pad_token_id=0)


def measure(models: dict, prompt: torch.Tensor, new_tokens: int, rounds: int) -> dict:
    """Median per-token decode ms of each model (prefill subtracted), interleaved."""
    for model in models.values():  # warm-up: caches, allocator, first-call work
        generate(model, prompt, new_tokens)
    names = list(models)
    long_runs = {n: [] for n in names}
    short_runs = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            for tokens, store in ((new_tokens, long_runs), (1, short_runs)):
                t0 = time.perf_counter()
                generate(models[n], prompt, tokens)
                store[n].append(time.perf_counter() - t0)
    return {n: (statistics.median(long_runs[n]) - statistics.median(short_runs[n]))
            / (new_tokens - 1) * 1e3 for n in names}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = tiny_llama(args.hidden, args.layers, args.vocab)
    models = {"base": base,
              "omoe": with_omoe(base, args.experts, args.rank, args.top_k),
              "lora": with_peft_lora(base, args.experts * args.rank)}
    prompt = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    # The same greedy tokens from OMoE on its own backends is a cheap end-to-end check.
    meta = dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                load_start=load_average(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                config=vars(args))
    t0 = time.perf_counter()
    ms = measure(models, prompt, args.new_tokens, args.rounds)
    meta.update(load_end=load_average(), seconds=time.perf_counter() - t0)
    result = dict(meta=meta, ms_per_token=ms,
                  omoe_over_lora=ms["omoe"] / ms["lora"], omoe_over_base=ms["omoe"] / ms["base"],
                  lora_over_base=ms["lora"] / ms["base"])
    tag = args.tag or f"cpu-{meta['threads']}thread"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"decode-{tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Greedy decoding, tiny LLaMA (hidden {args.hidden}, {args.layers} layers), "
             f"ms per new token (prefill excluded), medians of {args.rounds} interleaved rounds", "",
             f"Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}; load "
             f"average {meta['load_start']} → {meta['load_end']}; {meta['date']}.", "",
             f"OMoE: E={args.experts}, r={args.rank}, "
             f"{'dense' if args.top_k is None else f'top-{args.top_k}'}, all 7 projections; "
             f"peft LoRA rank {args.experts * args.rank}.", "",
             "| model | ms / token | ÷ base | ÷ peft LoRA |", "|---|---|---|---|"]
    for n in ("base", "lora", "omoe"):
        lines.append(f"| {n} | {ms[n]:.3f} | {ms[n] / ms['base']:.2f} | {ms[n] / ms['lora']:.2f} |")
    (RESULTS / f"decode-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
