"""Several adapters in one batch on the CPU: `python -m bench.mixed_adapters`.

Layer level (a frozen `nn.Linear` d × d plus adapters; inference, no grad), a batch of T
tokens in samples of min(64, T/N) tokens, the samples spread evenly over N adapters in a
shuffled order. Providers, interleaved, medians:

- `grouped`: `base(x)` + `ok.omoe_lora_mixed` on the `cpu` backend (one sort by adapter,
  then one `omoe::mixed_forward` call that runs every adapter segment in C++);
- `single`: `base(x)` + `ok.omoe_lora` of one adapter on all T tokens (what one adapter's
  batch of the same T costs);
- `separate`: N separate calls, `base(x_n)` + `ok.omoe_lora` on each adapter's own samples
  (the batch already split, as N separate requests would arrive);
- `masked`: each adapter on all T tokens, rows picked afterwards (the naive loop without
  grouping);
- `peft`: peft's LoRA layer with N adapters of rank E·r, `layer(x, adapter_names=...)`
  (its mixed-batch forward).

Then greedy decoding of a tiny LLaMA (bench.decode's model, OMoE on all seven
projections) with 4 adapters: one `generate` of 4 prompts with `adapter_names` against 4
`generate` calls of one prompt each with its adapter active; whole calls, prefill
included. Results: `bench/out/mixed-adapters-<tag>.json` and `.md` (`--publish`:
`bench/results/`) with the machine and its load.
"""
from __future__ import annotations

import copy
import json
import statistics
import time

import torch
from torch import nn

import omoe_kernels as ok
from omoe_kernels.tools.cli import ArgumentParser, positive_int

from .decode import PROJECTIONS, tiny_llama
from .machine import LoadWatch, cpu_model, load_line, output_dir

QUICK_GRID = dict(N=(1, 4, 8), T=(64, 512))
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
FULL_GRID = dict(N=(1, 2, 4, 8), T=(64, 512, 4096))


def _peft_layer(base: nn.Linear, adapters: int, rank: int):
    """peft's LoRA `Linear` on `base` with `adapters` adapters of `rank` (random B)."""
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.proj = copy.deepcopy(base)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(holder, config, adapter_name="a0")
    for n in range(1, adapters):
        model.add_adapter(f"a{n}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval().base_model.model.proj


def point(N: int, T: int, d: int, E: int, r: int, top_k, seed: int = 0) -> dict:
    """The zero-argument callables of one (N, T) point."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = nn.Linear(d, d).requires_grad_(False)
    # Per-adapter tensors that live across calls, as a layer's parameters do: the `cpu`
    # backend keeps each B's Gram matrix while B is the same tensor (csrc/omoe_weight_cache.h).
    A = [torch.randn(E, r, d, generator=gen) / d ** 0.5 for _ in range(N)]
    B = [torch.randn(E, d, r, generator=gen) / r ** 0.5 for _ in range(N)]
    W = [torch.randn(E, d, generator=gen) / d ** 0.5 for _ in range(N)]
    length = max(1, min(64, T // N))
    samples = T // length
    owner = torch.arange(samples) % N
    owner = owner[torch.randperm(samples, generator=gen)]
    x = torch.randn(samples, length, d, generator=gen)
    own = [x[owner == n] for n in range(N)]
    peft = _peft_layer(base, N, E * r)
    names = [f"a{int(n)}" for n in owner]
    opts = dict(top_k=top_k, backend="cpu")

    def grouped():
        return ok.omoe_lora_mixed(x, A, B, W, owner, base_out=base(x), **opts)

    def single():
        return ok.omoe_lora(x, A[0], B[0], W[0], base_out=base(x), **opts)

    def separate():
        return [ok.omoe_lora(xn, A[n], B[n], W[n], base_out=base(xn), **opts)
                for n, xn in enumerate(own)]

    def masked():
        base_out = base(x)
        ys = [ok.omoe_lora(x, A[n], B[n], W[n], base_out=base_out, **opts) for n in range(N)]
        return torch.stack(ys)[owner, torch.arange(samples)]

    def peft_mixed():
        return peft(x, adapter_names=names)

    calls = dict(grouped=grouped, single=single, separate=separate, masked=masked,
                 peft=peft_mixed)

    def run(fn):
        def call():
            with torch.no_grad():
                fn()
        return call
    return {name: run(fn) for name, fn in calls.items()}


def time_interleaved(calls: dict, budget_s: float, clock, min_rounds: int = 5,
                     max_rounds: int = 2000) -> dict:
    """Median seconds per call of each provider by `clock`, one call each per round, the
    order rotating (bench.sweep's method with a choice of clock)."""
    names = list(calls)
    for name in names:  # warm-up: caches, allocator, first-call dispatch, Gram matrices
        calls[name]()
    times = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name in names[rounds % len(names):] + names[:rounds % len(names)]:
            t0 = clock()
            calls[name]()
            times[name].append(clock() - t0)
        rounds += 1
    return {name: statistics.median(v) for name, v in times.items()} | {"rounds": rounds}


def measure_layers(grid: dict, d: int, E: int, r: int, top_k, budget_s: float, clock,
                   log=print) -> list[dict]:
    rows = []
    for T in grid["T"]:
        for N in grid["N"]:
            med = time_interleaved(point(N, T, d, E, r, top_k), budget_s, clock)
            row = dict(N=N, T=T, rounds=med.pop("rounds"),
                       **{f"{k}_ms": v * 1e3 for k, v in med.items()})
            row["grouped_over_single"] = med["grouped"] / med["single"]
            row["separate_over_grouped"] = med["separate"] / med["grouped"]
            row["masked_over_grouped"] = med["masked"] / med["grouped"]
            row["peft_over_grouped"] = med["peft"] / med["grouped"]
            rows.append(row)
            log(f"N={N} T={T:5d}  grouped {row['grouped_ms']:8.3f} ms  single "
                f"{row['single_ms']:8.3f}  separate {row['separate_ms']:8.3f}  masked "
                f"{row['masked_ms']:8.3f}  peft {row['peft_ms']:8.3f}  grouped/single "
                f"{row['grouped_over_single']:.2f}  separate/grouped "
                f"{row['separate_over_grouped']:.2f}", flush=True)
    return rows


def measure_generate(hidden: int, layers: int, vocab: int, E: int, r: int, top_k,
                     prompt_len: int, new_tokens: int, rounds: int, clock) -> dict:
    """Median ms of one mixed `generate` of 4 prompts and of 4 single-prompt calls."""
    model = tiny_llama(hidden, layers, vocab)
    names = ["a", "b", "c", "d"]
    for name in names:
        ok.inject(model, PROJECTIONS, num_experts=E, rank=r, top_k=top_k, adapter_name=name)
    with torch.no_grad():
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_(0, 0.02)
    model.eval()
    prompts = torch.randint(1, vocab, (4, prompt_len), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(prompts))

    def mixed():
        return model.generate(prompts, adapter_names=names, **kwargs)

    def separate():
        out = []
        for i, name in enumerate(names):
            ok.set_adapter(model, name)
            out.append(model.generate(prompts[i:i + 1], **{**kwargs, "attention_mask":
                                                          kwargs["attention_mask"][i:i + 1]}))
        return torch.cat(out)

    with torch.no_grad():
        same = mixed().tolist() == separate().tolist()
        times = {"mixed": [], "separate": []}
        for k in range(rounds):
            for name in (["mixed", "separate"] if k % 2 == 0 else ["separate", "mixed"]):
                t0 = clock()
                (mixed if name == "mixed" else separate)()
                times[name].append(clock() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return dict(mixed_ms=med["mixed"], separate_ms=med["separate"],
                separate_over_mixed=med["separate"] / med["mixed"], same_tokens=same,
                hidden=hidden, layers=layers, new_tokens=new_tokens, prompt=prompt_len)


def markdown(rows: list[dict], gen: dict | None, meta: dict) -> str:
    lines = [f"# Several adapters in one batch: layer level, d = {meta['d']}, E = {meta['E']}, "
             f"r = {meta['r']}, {meta['routing']}, fp32, inference, ms per call (medians, "
             f"interleaved, {meta['config']['clock']} clock)", "",
             f"Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}, "
             f"{meta['date']}; {load_line(meta)}.", "",
             "| N | T | grouped | single | separate | masked | peft mixed | grouped ÷ single "
             "| separate ÷ grouped | masked ÷ grouped | peft ÷ grouped |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        lines.append(f"| {w['N']} | {w['T']} | {w['grouped_ms']:.3f} | {w['single_ms']:.3f} | "
                     f"{w['separate_ms']:.3f} | {w['masked_ms']:.3f} | {w['peft_ms']:.3f} | "
                     f"{w['grouped_over_single']:.2f} | {w['separate_over_grouped']:.2f} | "
                     f"{w['masked_over_grouped']:.2f} | {w['peft_over_grouped']:.2f} |")
    if gen is not None:
        lines += ["", f"Greedy `generate`, tiny LLaMA (hidden {gen['hidden']}, {gen['layers']} "
                  f"layers, OMoE on all seven projections), 4 adapters, prompt {gen['prompt']}, "
                  f"{gen['new_tokens']} new tokens, whole calls: one mixed call of 4 prompts "
                  f"{gen['mixed_ms']:.1f} ms, 4 separate calls {gen['separate_ms']:.1f} ms, "
                  f"separate ÷ mixed {gen['separate_over_mixed']:.2f}; same tokens: "
                  f"{gen['same_tokens']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = ArgumentParser(prog="python -m bench.mixed_adapters", description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="N in 1,2,4,8 and T in 64,512,4096")
    parser.add_argument("--N", default=None, help="adapters per batch, comma-separated")
    parser.add_argument("--T", default=None, help="tokens per batch, comma-separated")
    parser.add_argument("--d", type=positive_int, default=1024, help="d_in = d_out")
    parser.add_argument("--experts", type=positive_int, default=4)
    parser.add_argument("--rank", type=positive_int, default=16)
    parser.add_argument("--top-k", type=positive_int, default=None, help="None: dense routing")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per point")
    parser.add_argument("--hidden", type=positive_int, default=256, help="tiny LLaMA hidden size")
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--vocab", type=positive_int, default=2048)
    parser.add_argument("--new-tokens", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=5, help="generate rounds")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: this thread's CPU time (less sensitive to other processes; "
                             "meaningful with --threads 1)")
    parser.add_argument("--tag", default=None,
                        help="file name mixed-adapters-<tag>.* (default: cpu-<threads>thread)")
    parser.add_argument("--publish", action="store_true",
                        help="write to bench/results/ (the published files) instead of bench/out/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = dict(FULL_GRID if args.full else QUICK_GRID)
    for key in ("N", "T"):
        if getattr(args, key):
            grid[key] = tuple(int(v) for v in getattr(args, key).split(","))
    meta = dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                d=args.d, E=args.experts, r=args.rank,
                routing="dense" if args.top_k is None else f"top-{args.top_k}",
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), config=vars(args))
    watch = LoadWatch()
    clock = CLOCKS[args.clock]
    rows = measure_layers(grid, args.d, args.experts, args.rank, args.top_k, args.budget, clock)
    gen = None
    if not args.no_generate:
        gen = measure_generate(args.hidden, args.layers, args.vocab, args.experts, 8,
                               args.top_k, 16, args.new_tokens, args.rounds, clock)
        print(f"generate: mixed {gen['mixed_ms']:.1f} ms, 4 separate {gen['separate_ms']:.1f} "
              f"ms, separate/mixed {gen['separate_over_mixed']:.2f}, same tokens "
              f"{gen['same_tokens']}", flush=True)
    meta.update(watch.finish(meta["threads"]))
    tag = args.tag or f"cpu-{meta['threads']}thread"
    out = output_dir(args.publish)
    result = dict(meta=meta, rows=rows, generate=gen)
    (out / f"mixed-adapters-{tag}.json").write_text(json.dumps(result, indent=1))
    (out / f"mixed-adapters-{tag}.md").write_text(markdown(rows, gen, meta))
    print(f"mixed_adapters: {load_line(meta)}")
    print(f"wrote {out}/mixed-adapters-{tag}.{{json,md}}")
    return result


if __name__ == "__main__":
    main()
