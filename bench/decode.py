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
each per round, order rotating; medians. Results: `bench/out/decode-<tag>.json` and `.md`
(`--publish`: `bench/results/`) with the machine and its load.
"""
from __future__ import annotations

import copy
import json
import statistics
import time

import torch

import omoe_kernels as ok
from omoe_kernels.tools.cli import ArgumentParser, positive_int

from .machine import LoadWatch, cpu_model, load_line, output_dir

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
    parser = ArgumentParser(prog="python -m bench.decode", description=__doc__)
    parser.add_argument("--hidden", type=positive_int, default=256, help="hidden size of the tiny LLaMA")
    parser.add_argument("--layers", type=positive_int, default=4, help="decoder layers")
    parser.add_argument("--vocab", type=positive_int, default=2048, help="vocabulary size")
    parser.add_argument("--experts", type=positive_int, default=4, help="OMoE experts E")
    parser.add_argument("--rank", type=positive_int, default=8, help="rank r of each expert")
    parser.add_argument("--top-k", type=positive_int, default=None, help="None: dense routing")
    parser.add_argument("--prompt", type=positive_int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=positive_int, default=32,
                        help="tokens generated per timed call (at least 2)")
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tag", default=None, help="file name decode-<tag>.* (default: cpu-<threads>thread)")
    parser.add_argument("--publish", action="store_true",
                        help="write to bench/results/ (the published files) instead of bench/out/")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the time of 1 token is subtracted)")
    if args.top_k is not None and args.top_k > args.experts:
        parser.error(f"--top-k {args.top_k} is more than --experts {args.experts}")
    if args.hidden % 64 and args.hidden > 64:
        parser.error(f"--hidden {args.hidden}: use a multiple of 64 (64-wide attention heads)")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = tiny_llama(args.hidden, args.layers, args.vocab)
    models = {"base": base,
              "omoe": with_omoe(base, args.experts, args.rank, args.top_k),
              "lora": with_peft_lora(base, args.experts * args.rank)}
    prompt = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    # The same greedy tokens from OMoE on its own backends is a cheap end-to-end check.
    meta = dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), config=vars(args))
    watch = LoadWatch()
    t0 = time.perf_counter()
    ms = measure(models, prompt, args.new_tokens, args.rounds)
    meta.update(watch.finish(meta["threads"]), seconds=time.perf_counter() - t0)
    result = dict(meta=meta, ms_per_token=ms,
                  omoe_over_lora=ms["omoe"] / ms["lora"], omoe_over_base=ms["omoe"] / ms["base"],
                  lora_over_base=ms["lora"] / ms["base"])
    tag = args.tag or f"cpu-{meta['threads']}thread"
    out = output_dir(args.publish)
    (out / f"decode-{tag}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Greedy decoding, tiny LLaMA (hidden {args.hidden}, {args.layers} layers), "
             f"ms per new token (prefill excluded), medians of {args.rounds} interleaved rounds", "",
             f"Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}; "
             f"{meta['date']}; {meta['seconds']:.0f} s.", "", f"Load: {load_line(meta)}.", "",
             f"OMoE: E={args.experts}, r={args.rank}, "
             f"{'dense' if args.top_k is None else f'top-{args.top_k}'}, all 7 projections; "
             f"peft LoRA rank {args.experts * args.rank}.", "",
             "| model | ms / token | ÷ base | ÷ peft LoRA |", "|---|---|---|---|"]
    for n in ("base", "lora", "omoe"):
        lines.append(f"| {n} | {ms[n]:.3f} | {ms[n] / ms['base']:.2f} | {ms[n] / ms['lora']:.2f} |")
    (out / f"decode-{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}/decode-{tag}.{{json,md}}")
    return result


if __name__ == "__main__":
    main()
