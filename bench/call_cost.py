"""The fixed cost of one call at T = 1 (or `--tokens T`): `python -m bench.call_cost`.

At one token the work is about a million multiply-adds (microseconds); what a call costs
beyond that is Python, argument checks and ATen dispatch. This times, in µs per call, the
`cpu` backend against a plain LoRA of rank E·r (bench.sweep's providers, the same point
maker) and the bare base layer, at layer level (`OMoELinear`) and adapter level
(`omoe_lora(..., base_out=...)`), `infer` (no-grad forward) and `train` (forward, backward,
SGD update), interleaved, medians.

Timings on a shared machine are noisy; for a before/after comparison count instructions:

    valgrind --tool=callgrind --collect-atstart=no --callgrind-out-file=callgrind.out \\
        python -m bench.call_cost --threads 1 --count omoe --level layer --mode infer --calls 200

(`--threads 1`: with more, callgrind also counts OpenMP workers spinning) collects only the timed calls (torch's own callgrind toggle around them); the summary's
`Ir` ÷ calls is the instruction count per call.
"""
from __future__ import annotations

import json
import time

import torch

from omoe_kernels.tools.cli import ArgumentParser

from .machine import LoadWatch, cpu_model, load_line, output_dir
from .sweep import make_point, providers, time_interleaved

POINTS = ((4, 16, "dense"), (16, 16, "dense"), (8, 8, "top2"))


def calls_for(level: str, mode: str, E: int, r: int, routing: str, d: int, T: int = 1) -> dict:
    """The OMoE, LoRA and bare-base callables of one point (bench.sweep's providers)."""
    omoe, lora, x, base_out, top_k = make_point(T, E, r, routing, d)
    calls = providers(level, mode, omoe, lora, x, base_out, top_k)
    if level == "layer":
        base, xg = omoe.base, x.clone().requires_grad_(mode == "train")

        def bare():
            xg.grad = None
            if mode == "infer":
                with torch.no_grad():
                    base(xg)
            else:
                base(xg).sum().backward()
        calls["base"] = bare
    return calls


def measure(points, levels, modes, d: int, budget_s: float, log=print, T: int = 1) -> list[dict]:
    rows = []
    for E, r, routing in points:
        for level in levels:
            for mode in modes:
                med = time_interleaved(calls_for(level, mode, E, r, routing, d, T), budget_s,
                                       min_rounds=50, max_rounds=5000)
                row = dict(T=T, E=E, r=r, routing=routing, level=level, mode=mode,
                           omoe_us=med["omoe"] * 1e6, lora_us=med["lora"] * 1e6,
                           base_us=med["base"] * 1e6 if "base" in med else None,
                           ratio=med["omoe"] / med["lora"], rounds=med["rounds"])
                rows.append(row)
                base = f"  base {row['base_us']:7.1f}" if row["base_us"] is not None else ""
                log(f"E={E:2d} r={r:2d} {routing:5s} {level:7s} {mode:5s} omoe "
                    f"{row['omoe_us']:7.1f} µs  lora {row['lora_us']:7.1f} µs{base}  "
                    f"÷ {row['ratio']:.2f}")
    return rows


def count(provider: str, level: str, mode: str, E: int, r: int, routing: str, d: int,
          n: int, T: int = 1) -> None:
    """Runs `n` calls of one provider with callgrind collecting only them."""
    call = calls_for(level, mode, E, r, routing, d, T)[provider]
    for _ in range(20):  # warm-up: first-call dispatch, caches, allocator
        call()
    torch._C._valgrind_toggle()
    for _ in range(n):
        call()
    torch._C._valgrind_toggle()
    print(f"{n} calls of {provider} ({level}, {mode}, E={E} r={r} {routing}, T={T}, d={d})")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# The fixed cost of a call: T = {meta.get('T', 1)}, d = {meta['d']}, fp32, µs per call "
             "(medians, interleaved)", "",
             f"Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}, "
             f"{meta['date']}; {load_line(meta)}.", "",
             "| E | r | routing | level | mode | OMoE µs | LoRA µs | base µs | ÷ LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        base = f"{w['base_us']:.1f}" if w["base_us"] is not None else "–"
        lines.append(f"| {w['E']} | {w['r']} | {w['routing']} | {w['level']} | {w['mode']} | "
                     f"{w['omoe_us']:.1f} | {w['lora_us']:.1f} | {base} | {w['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict] | None:
    parser = ArgumentParser(prog="python -m bench.call_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--d", type=int, default=1024, help="d_in = d_out")
    parser.add_argument("--tokens", type=int, default=1, help="T, the tokens of a call")
    parser.add_argument("--levels", default="layer,adapter")
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per point and mode")
    parser.add_argument("--count", choices=("omoe", "lora", "base"), default=None,
                        help="callgrind mode: run --calls calls of this provider, no timing")
    parser.add_argument("--level", default="layer", help="with --count")
    parser.add_argument("--mode", default="infer", help="with --count")
    parser.add_argument("--point", default="4,16,dense", help="with --count: E,r,routing")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--tag", default=None,
                        help="file name call-cost-<tag>.* (default: cpu-<threads>thread)")
    parser.add_argument("--publish", action="store_true",
                        help="write to bench/results/ (the published files) instead of bench/out/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count:
        E, r, routing = args.point.split(",")
        count(args.count, args.level, args.mode, int(E), int(r), routing, args.d, args.calls,
              args.tokens)
        return None
    meta = dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                d=args.d, T=args.tokens, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    watch = LoadWatch()
    rows = measure(POINTS, args.levels.split(","), args.modes.split(","), args.d, args.budget,
                   T=args.tokens)
    meta.update(watch.finish(meta["threads"]))
    tag = args.tag or (f"cpu-{meta['threads']}thread"
                       + (f"-T{args.tokens}" if args.tokens != 1 else ""))
    out = output_dir(args.publish)
    (out / f"call-cost-{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / f"call-cost-{tag}.md").write_text(markdown(rows, meta))
    print(f"call_cost: {load_line(meta)}")
    print(f"wrote {out}/call-cost-{tag}.{{json,md}}")
    return rows


if __name__ == "__main__":
    main()
