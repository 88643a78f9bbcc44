"""Cost growth of OMoE against a plain LoRA of rank E·r: `python -m bench.sweep`.

docs/contract.md §6: the ratio OMoE ÷ plain LoRA should stay near 1 at every point, with
top-k costing like k·r. This sweeps T ∈ {1, 8, 64, 512, 4096}, E ∈ {2, 4, 8, 16},
r ∈ {4, 16, 64}, dense and top-2, and E = 32 top-2 at r ∈ {4, 16}, at two levels:

- `layer`: a whole layer, frozen base GEMM included — `OMoELinear` against
  `base(x) + s·(x A_catᵀ) B_catᵀ` with the same base;
- `adapter`: `omoe_lora(..., base_out=...)` against `base_out + s·(x A_catᵀ) B_catᵀ`.

Each in two modes: `train` (forward + backward into x and the adapter weights, then an
SGD update of those weights, so that whatever the weights determine, such as the CPU's
cached `G = B_catᵀB_cat`, is formed again every step, as in training) and `infer`
(forward under `torch.no_grad()`, the weights unchanged between calls, as in decoding). Providers are timed interleaved, one call each per round, order rotating, so
a busy neighbour slows both alike; medians. Results: `bench/results/sweep-<tag>.json`
and `.md`, plus a PNG of OMoE ÷ LoRA against T and against E. Standalone: it imports
only omoe_kernels, torch and (for the PNG) matplotlib.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import omoe_kernels as ok

from .machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(T=(1, 8, 64, 512, 4096), E=(2, 4, 8, 16), r=(4, 16, 64), routing=("dense", "top2"))
QUICK = dict(T=(1, 8, 512), E=(4, 16), r=(16,), routing=("dense", "top2"))
# Points outside the grid's product (T, E, r, routing), swept after it when their values
# are chosen: many experts with top-2 routing (dense E = 32 would be R = 32·r columns).
EXTRA = tuple((T, 32, r, "top2") for T in FULL["T"] for r in (4, 16))


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


class PlainLoRA(nn.Module):
    """base(x) + s·(x A_catᵀ) B_catᵀ: a LoRA of rank E·r, eager."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float):
        super().__init__()
        self.base, self.scaling = base, scaling
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, rank) / rank ** 0.5)

    def adapter(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + self.scaling * ((x @ self.A.t()) @ self.B.t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x, self.base(x))


def make_point(T: int, E: int, r: int, routing: str, d: int, seed: int = 0):
    torch.manual_seed(seed)
    base = nn.Linear(d, d)
    top_k = None if routing == "dense" else int(routing.removeprefix("top"))
    omoe = ok.OMoELinear(base, E, r, top_k=top_k, backend="cpu")
    with torch.no_grad():  # a trained-looking adapter: B = 0 would be a special case
        omoe.lora_B.normal_(0, 1 / r ** 0.5)
    lora = PlainLoRA(base, E * r, omoe.scaling)
    x = torch.randn(T, d)
    base_out = base(x).detach()
    return omoe, lora, x, base_out, top_k


def providers(level: str, mode: str, omoe: ok.OMoELinear, lora: PlainLoRA, x, base_out, top_k):
    """Two zero-argument callables that run one call of each provider."""
    xg = x.clone().requires_grad_(mode == "train")
    omoe_params = [omoe.lora_A, omoe.lora_B, omoe.router_weight]
    lora_params = [lora.A, lora.B]

    def run(fn, params):
        def call():
            for p in params:
                p.grad = None
            xg.grad = None
            if mode == "infer":
                with torch.no_grad():
                    fn()
            else:
                fn().sum().backward()
                with torch.no_grad():  # the weights change every step, as in training
                    for p in params:
                        p.sub_(p.grad, alpha=1e-6)
        return call

    if level == "layer":
        return {"omoe": run(lambda: omoe(xg), omoe_params),
                "lora": run(lambda: lora(xg), lora_params)}
    return {
        "omoe": run(lambda: ok.omoe_lora(xg, omoe.lora_A, omoe.lora_B, omoe.router_weight,
                                         scaling=omoe.scaling, top_k=top_k, base_out=base_out,
                                         backend="cpu"), omoe_params),
        "lora": run(lambda: lora.adapter(xg, base_out), lora_params),
    }


def time_interleaved(calls: dict, budget_s: float, min_rounds: int = 5,
                     max_rounds: int = 200) -> dict:
    """Median seconds per call of each provider, one call each per round, order rotating."""
    names = list(calls)
    slowest = 0.0
    for name in names:  # warm-up (caches, allocator, first-call dispatch)
        for _ in range(2):
            t0 = time.perf_counter()
            calls[name]()
            slowest = max(slowest, time.perf_counter() - t0)
            if slowest > 0.2:  # big points: one warm-up call, three rounds keep it minutes
                min_rounds = min(min_rounds, 3)
                break
    times = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(v) for name, v in times.items()} | {"rounds": rounds}


def sweep(grid: dict, levels, modes, d: int, budget_s: float, log=print) -> list[dict]:
    rows = []
    points = list(itertools.product(grid["T"], grid["E"], grid["r"], grid["routing"]))
    points += [p for p in grid.get("extra", ()) if p not in points]
    for n, (T, E, r, routing) in enumerate(points):
        omoe, lora, x, base_out, top_k = make_point(T, E, r, routing, d)
        for level, mode in itertools.product(levels, modes):
            med = time_interleaved(providers(level, mode, omoe, lora, x, base_out, top_k),
                                   budget_s)
            row = dict(T=T, E=E, r=r, routing=routing, level=level, mode=mode,
                       omoe_ms=med["omoe"] * 1e3, lora_ms=med["lora"] * 1e3,
                       ratio=med["omoe"] / med["lora"], rounds=med["rounds"])
            rows.append(row)
            log(f"[{n + 1}/{len(points)}] T={T:5d} E={E:2d} r={r:2d} {routing:5s} {level:7s} "
                f"{mode:5s} omoe {row['omoe_ms']:8.3f} ms  lora {row['lora_ms']:8.3f} ms  "
                f"ratio {row['ratio']:.2f}")
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# OMoE ÷ plain LoRA of rank E·r (d = {meta['d']}, fp32, medians, interleaved)", "",
             f"Machine: {meta['cpu']}, {meta['threads']} thread(s), torch {meta['torch']}; "
             f"load average {meta['load_start']} at the start, {meta['load_end']} at the end; "
             f"{meta['date']}; {meta['seconds']:.0f} s.", "",
             "| T | E | r | routing | level | mode | OMoE ms | LoRA ms | ÷ LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        lines.append(f"| {w['T']} | {w['E']} | {w['r']} | {w['routing']} | {w['level']} | "
                     f"{w['mode']} | {w['omoe_ms']:.3f} | {w['lora_ms']:.3f} | {w['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    level = "layer" if any(w["level"] == "layer" for w in rows) else rows[0]["level"]
    mid_r = sorted({w["r"] for w in rows})[len({w["r"] for w in rows}) // 2]
    experts = sorted({w["E"] for w in rows})
    colors = {E: plt.cm.viridis(n / max(1, len(experts) - 1) * 0.9) for n, E in enumerate(experts)}
    for (routing, mode), style in zip(itertools.product(("dense", "top2"), ("train", "infer")),
                                      ("-o", "--o", "-s", "--s")):
        sel = [w for w in rows if w["level"] == level and w["routing"] == routing
               and w["mode"] == mode and w["r"] == mid_r]
        for E in sorted({w["E"] for w in sel}):
            pts = sorted((w["T"], w["ratio"]) for w in sel if w["E"] == E)
            if pts:
                axes[0].plot(*zip(*pts), style, color=colors[E], markersize=3,
                             label=f"E={E} {routing} {mode}")
        big_T = max((w["T"] for w in sel), default=None)
        pts = sorted((w["E"], w["ratio"]) for w in sel if w["T"] == big_T)
        if pts:
            axes[1].plot(*zip(*pts), style, label=f"T={big_T} {routing} {mode}")
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log", base=2)
    axes[0].set_xlabel("tokens T")
    axes[1].set_xlabel("experts E")
    for ax in axes:
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel(f"OMoE ÷ LoRA ({level} level, r={mid_r})")
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replot(tag: str) -> None:
    """Redraws bench/results/sweep-<tag>.png from its JSON."""
    data = json.loads((RESULTS / f"sweep-{tag}.json").read_text())
    meta = data["meta"]
    plot(data["rows"], RESULTS / f"sweep-{tag}.png",
         f"{meta['cpu']}, {meta['threads']} thread(s), load {meta['load_start']}–"
         f"{meta['load_end']}, {meta['date']}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (about a minute)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--d", type=int, default=1024, help="d_in = d_out")
    parser.add_argument("--levels", default="layer,adapter")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--budget", type=float, default=None, help="seconds per point and mode")
    parser.add_argument("--T", default=None, help="comma-separated token counts (override)")
    parser.add_argument("--E", default=None)
    parser.add_argument("--r", default=None)
    parser.add_argument("--routing", default=None)
    parser.add_argument("--tag", default=None, help="results file name: sweep-<tag>.*")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = dict(QUICK if args.quick else FULL, extra=() if args.quick else EXTRA)
    for key in ("T", "E", "r"):
        if getattr(args, key):
            grid[key] = tuple(int(v) for v in getattr(args, key).split(","))
    if args.routing:
        grid["routing"] = tuple(args.routing.split(","))
    grid["extra"] = tuple(p for p in grid["extra"] if all(
        getattr(args, key) is None or str(value) in getattr(args, key).split(",")
        for key, value in zip(("T", "E", "r", "routing"), p)))
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.4)
    meta = dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                d=args.d, load_start=load_average(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    t0 = time.perf_counter()
    rows = sweep(grid, args.levels.split(","), args.modes.split(","), args.d, budget)
    meta.update(load_end=load_average(), seconds=time.perf_counter() - t0)
    tag = args.tag or (f"{'quick-' if args.quick else ''}cpu-{meta['threads']}thread")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sweep-{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (RESULTS / f"sweep-{tag}.md").write_text(markdown(rows, meta))
    title = (f"{meta['cpu']}, {meta['threads']} thread(s), load {meta['load_start']}–"
             f"{meta['load_end']}, {meta['date']}")
    plot(rows, RESULTS / f"sweep-{tag}.png", title)
    print(f"wrote {RESULTS}/sweep-{tag}.{{json,md,png}}")
    return rows


if __name__ == "__main__":
    main()
