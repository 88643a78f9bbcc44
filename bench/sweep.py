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
a busy neighbour slows both alike; medians. Results: `bench/out/sweep-<tag>.json` and
`.md` (`--publish`: `bench/results/`), plus a PNG of OMoE ÷ LoRA against T, one panel
per (routing, mode), one line per E. `--replot FILE.json` redraws a PNG from its JSON.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import omoe_kernels as ok
from omoe_kernels.tools.cli import ArgumentParser, names, positive_float, positive_int, positive_ints

from .machine import LoadWatch, cpu_model, load_line, output_dir

FULL = dict(T=(1, 8, 64, 512, 4096), E=(2, 4, 8, 16), r=(4, 16, 64), routing=("dense", "top2"))
QUICK = dict(T=(1, 8, 512), E=(4, 16), r=(16,), routing=("dense", "top2"))
CAP = 4.0  # the plots' ratio axis ends here
# Points outside the grid's product (T, E, r, routing), swept after it when their values
# are chosen: many experts with top-2 routing (dense E = 32 would be R = 32·r columns).
EXTRA = tuple((T, 32, r, "top2") for T in FULL["T"] for r in (4, 16))


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
             f"{meta['date']}; {meta['seconds']:.0f} s.", "",
             f"Load: {load_line(meta)}.", "",
             "| T | E | r | routing | level | mode | OMoE ms | LoRA ms | ÷ LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for w in rows:
        lines.append(f"| {w['T']} | {w['E']} | {w['r']} | {w['routing']} | {w['level']} | "
                     f"{w['mode']} | {w['omoe_ms']:.3f} | {w['lora_ms']:.3f} | {w['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> bool:
    """OMoE ÷ LoRA against T: one panel per (routing, mode), one line per E, at the layer
    level and the middle r of the grid. False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    level = "layer" if any(w["level"] == "layer" for w in rows) else rows[0]["level"]
    ranks = sorted({w["r"] for w in rows})
    mid_r = ranks[len(ranks) // 2]
    rows = [w for w in rows if w["level"] == level and w["r"] == mid_r]
    panels = [(routing, mode) for routing in ("dense", "top2") for mode in ("train", "infer")
              if any(w["routing"] == routing and w["mode"] == mode for w in rows)]
    experts = sorted({w["E"] for w in rows})
    tokens = sorted({w["T"] for w in rows})
    colors = {E: plt.cm.tab10(n) for n, E in enumerate(experts)}
    # A busy machine throws single points far off; past CAP they sit on the top edge, labelled.
    top = min(max([w["ratio"] for w in rows] + [1.0]), CAP) * 1.08
    ncols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.6 * nrows), squeeze=False,
                             sharex=True, sharey=True)
    labels = {"dense": "dense routing", "top2": "top-2 routing",
             "train": "training step (fwd+bwd+update)", "infer": "no-grad forward"}
    for ax, (routing, mode) in zip(axes.flat, panels):
        for E in experts:
            pts = sorted((w["T"], w["ratio"]) for w in rows
                         if w["E"] == E and w["routing"] == routing and w["mode"] == mode)
            if pts:
                ax.plot([t for t, _ in pts], [min(v, top) for _, v in pts], "-o", color=colors[E],
                        markersize=4, label=f"E = {E}")
                for t, v in pts:
                    if v > top:
                        ax.plot([t], [top], "^", color=colors[E], markersize=8, clip_on=False)
                        last = t == tokens[-1]
                        ax.annotate(f"{v:.3g}×", (t, top), xytext=(-6 if last else 6, -10),
                                    textcoords="offset points", ha="right" if last else "left",
                                    fontsize=8, color=colors[E])
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(tokens, [str(t) for t in tokens])
        ax.minorticks_off()
        ax.set_ylim(0, top)
        ax.set_title(f"{labels[routing]}, {labels[mode]}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("tokens T (log scale)")
    for ax in axes[:, 0]:
        ax.set_ylabel("OMoE ÷ LoRA time (1 = same)")
    fig.suptitle(f"OMoE ÷ plain LoRA of rank E·r, {level} level, r = {mid_r}, {title}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_title(meta: dict) -> str:
    busy = meta.get("busy")
    if busy is None:  # files written before the /proc/stat check: judge by the load average
        busy = min(meta["load_start"], meta["load_end"]) > 2 * meta["threads"]
    busy = " — MACHINE BUSY, times inflated and noisy" if busy else ""
    return (f"d = {meta['d']}\n{meta['cpu']}, {meta['threads']} thread(s), {meta['date']}, load "
            f"{meta['load_start']}–{meta['load_end']}{busy}")


def replot(json_path: Path) -> Path:
    """Redraws sweep-<tag>.png beside its JSON, without measuring anything."""
    data = json.loads(Path(json_path).read_text())
    png = Path(json_path).with_suffix(".png")
    plot(data["rows"], png, plot_title(data["meta"]))
    return png


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m bench.sweep", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="the quick grid: T in {1, 8, 512}, E in {4, 16}, r = 16")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--d", type=positive_int, default=1024, help="d_in = d_out")
    parser.add_argument("--levels", type=names(("layer", "adapter")), default="layer,adapter",
                        help="comma-separated: layer, adapter")
    parser.add_argument("--modes", type=names(("train", "infer")), default="train,infer",
                        help="comma-separated: train, infer")
    parser.add_argument("--budget", type=positive_float, default=None,
                        help="seconds per point and mode (default: 0.2 quick, 0.4 full)")
    parser.add_argument("--T", type=positive_ints, default=None,
                        help="comma-separated token counts (default: the grid's)")
    parser.add_argument("--E", type=positive_ints, default=None, help="comma-separated expert counts")
    parser.add_argument("--r", type=positive_ints, default=None, help="comma-separated ranks")
    parser.add_argument("--routing", type=names(("dense", "top2")), default=None,
                        help="comma-separated: dense, top2")
    parser.add_argument("--tag", default=None,
                        help="file name sweep-<tag>.* (default: [quick-]cpu-<threads>thread)")
    parser.add_argument("--publish", action="store_true",
                        help="write to bench/results/ (the published files) instead of bench/out/")
    parser.add_argument("--replot", type=Path, default=None, metavar="FILE.json",
                        help="only redraw the PNG beside a sweep's JSON file, measuring nothing")
    args = parser.parse_args(argv)
    if args.replot is not None and not args.replot.is_file():
        parser.error(f"--replot {args.replot}: no such file")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.replot is not None:
        print(f"wrote {replot(args.replot)}")
        return []
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = dict(QUICK if args.quick else FULL, extra=() if args.quick else EXTRA)
    for key in ("T", "E", "r", "routing"):
        if getattr(args, key):
            grid[key] = getattr(args, key)
    grid["extra"] = tuple(p for p in grid["extra"] if all(
        getattr(args, key) is None or value in getattr(args, key)
        for key, value in zip(("T", "E", "r", "routing"), p)))
    levels = args.levels if isinstance(args.levels, tuple) else tuple(args.levels.split(","))
    modes = args.modes if isinstance(args.modes, tuple) else tuple(args.modes.split(","))
    budget = args.budget if args.budget is not None else (0.2 if args.quick else 0.4)
    meta = dict(cpu=cpu_model(), threads=torch.get_num_threads(), torch=torch.__version__,
                d=args.d, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    watch = LoadWatch()
    t0 = time.perf_counter()
    rows = sweep(grid, levels, modes, args.d, budget)
    meta.update(watch.finish(meta["threads"]), seconds=time.perf_counter() - t0)
    tag = args.tag or (f"{'quick-' if args.quick else ''}cpu-{meta['threads']}thread")
    out = output_dir(args.publish)
    (out / f"sweep-{tag}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    (out / f"sweep-{tag}.md").write_text(markdown(rows, meta))
    plot(rows, out / f"sweep-{tag}.png", plot_title(meta))
    ratios = [w["ratio"] for w in rows]
    print(f"sweep: {len(rows)} ratios (point, level, mode) in {meta['seconds']:.0f} s, OMoE ÷ LoRA from "
          f"{min(ratios):.2f} to {max(ratios):.2f} (median {statistics.median(ratios):.2f}); "
          f"{load_line(meta)}")
    print(f"wrote {out}/sweep-{tag}.{{json,md,png}}")
    return rows


if __name__ == "__main__":
    main()
