"""A benchmark run's records and how they are reported: the markdown tables, the chart,
the JSON file, and the progress bar. A result file says what was measured and where;
bench/criteria.py judges it against targets."""
from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .machine import BUSY_BANNER, Ceilings


@dataclass
class Record:
    shape: str
    provider: str
    label: str
    err_forward: float | None = None
    err_grad: float | None = None
    err_grad_name: str | None = None
    check_ok: bool | None = None
    forward_ms: float | None = None
    train_ms: float | None = None        # forward + backward
    forward_reps: int | None = None
    train_reps: int | None = None
    forward_min_ms: float | None = None  # CPU: the fastest timed call (least disturbed)
    train_min_ms: float | None = None
    forward_peak_mib: float | None = None
    train_peak_mib: float | None = None
    error: str | None = None             # what failed, if anything


@dataclass
class Run:
    device: torch.device
    device_name: str
    slug: str
    meta: dict
    ceilings: dict[str, Ceilings] = field(default_factory=dict)  # by dtype name
    shapes: dict[str, dict] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:{spec}}{suffix}"


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def shape_table(run: Run, shape_name: str) -> str:
    recs = [r for r in run.records if r.shape == shape_name]
    by = {r.provider: r for r in recs}
    ref, lora = by.get("reference"), by.get("lora")
    floor = run.shapes[shape_name]["floor_ms"]
    with_min = any(r.train_min_ms is not None for r in recs)
    head = ("| provider | rel err fwd / grad | fwd ms | fwd+bwd ms | vs reference fwd / fwd+bwd "
            "| ÷ plain LoRA fwd / fwd+bwd | × floor fwd+bwd | peak MiB fwd / fwd+bwd |"
            + (" min ms fwd / fwd+bwd |" if with_min else ""))
    lines = [head, "|" + "---|" * (9 if with_min else 8)]
    for r in recs:
        if r.error is not None and r.train_ms is None:
            lines.append(f"| {r.label} | error: {r.error.replace('|', '/')} | | | | | | |" + (" |" if with_min else ""))
            continue
        if r.err_forward is not None:
            check = f"{r.err_forward:.1e} / {r.err_grad:.1e}" + ("" if r.check_ok else " **FAIL**")
        else:
            check = "n/a" if r.provider == "lora" else "not checked"
        speed_f = _ratio(ref.forward_ms, r.forward_ms) if ref else None
        speed_t = _ratio(ref.train_ms, r.train_ms) if ref else None
        lora_f = _ratio(r.forward_ms, lora.forward_ms) if lora else None
        lora_t = _ratio(r.train_ms, lora.train_ms) if lora else None
        lines.append(
            f"| {r.label} | {check} | {_fmt(r.forward_ms, '.3f')} | {_fmt(r.train_ms, '.3f')} "
            f"| {_fmt(speed_f, '.2f', '×')} / {_fmt(speed_t, '.2f', '×')} "
            f"| {_fmt(lora_f, '.2f', '×')} / {_fmt(lora_t, '.2f', '×')} "
            f"| {_fmt(_ratio(r.train_ms, floor['train']), '.1f', '×')} "
            f"| {_fmt(r.forward_peak_mib, '.1f')} / {_fmt(r.train_peak_mib, '.1f')} |"
            + (f" {_fmt(r.forward_min_ms, '.3f')} / {_fmt(r.train_min_ms, '.3f')} |" if with_min else "")
            + (f" error: {r.error}" if r.error else ""))
    return "\n".join(lines)


def markdown(run: Run) -> str:
    m = run.meta
    out = [f"# omoe_kernels benchmark: {run.device_name}", ""]
    out += [f"- device: {run.device_name} ({m['device_type']}"
            + (f", {m['threads']} thread{'s' if m['threads'] != 1 else ''}" if m["device_type"] == "cpu" else "") + ")",
            f"- date: {m['date']}; torch {m['torch']}; triton {m['triton']}; python {m['python']}; "
            f"git {m['git']}",
            f"- command: `{m['command']}`",
            f"- other processes kept {m['other_processes_cores']} of {m['cores']} cores busy on "
            f"average during the run (/proc/stat minus this process); load average (1 min) "
            f"{m['load_average_start']} at the start, {m['load_average_end']} at the end"
            + (f" — {BUSY_BANNER}" if m.get("busy") else ""),
            f"- timing: {m['timing']}",
            f"- peak memory: {m['memory']}",
            "- rel err: relative Frobenius error of this provider's output / worst gradient "
            "(x, A, B, router_weight, base_out) against the operator in float64, one step, same inputs",
            "- × floor: fwd+bwd median over the roofline floor from this run's measured ceilings "
            "(bench/shapes.py cost model)"]
    for dtype_name, c in run.ceilings.items():
        out.append(f"- ceilings ({dtype_name}): matmul {c.matmul_flops / 1e9:,.0f} GFLOP/s, "
                   f"copy {c.copy_bytes_per_s / 1e9:,.1f} GB/s ({c.how})")
    for name, info in run.shapes.items():
        c, f = info["cost"], info["floor_ms"]
        out += ["", f"## {name}: {info['describe']}", "",
                f"Model cost: forward {c['forward']['flops'] / 1e9:.2f} GFLOP, "
                f"{c['forward']['bytes'] / 1e6:.1f} MB → floor {f['forward']:.3f} ms; "
                f"fwd+bwd {c['train']['flops'] / 1e9:.2f} GFLOP, {c['train']['bytes'] / 1e6:.1f} MB "
                f"→ floor {f['train']:.3f} ms.", "", shape_table(run, name)]
    return "\n".join(out) + "\n"


def display_name(provider: str) -> str:
    """What a reader calls a provider: the chart's bar labels."""
    fixed = {"reference": "OMoE reference\n(eager PyTorch)",
             "ref-compile": "OMoE reference\nunder torch.compile",
             "lora": "plain LoRA\nof rank E·r"}
    return fixed.get(provider, f"OMoE,\n{provider} backend")


def _ms_label(v: float) -> str:
    return f"{v:,.0f} ms" if v >= 100 else f"{v:.1f} ms" if v >= 1 else f"{v:.3f} ms"


def chart(run: Run, path: Path) -> str | None:
    """Bars per shape (forward, training step), each labelled in ms. None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: {exc}"
    names = list(run.shapes)
    fig, axes = plt.subplots(1, len(names), figsize=(max(7.0, 6.5 * len(names)), 5.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        recs = [r for r in run.records if r.shape == name]
        xs = range(len(recs))
        width = 0.38
        for offset, attr, label in ((-width / 2, "forward_ms", "forward"),
                                    (width / 2, "train_ms", "training step (forward + backward)")):
            vals = [getattr(r, attr) or float("nan") for r in recs]
            bars = ax.bar([x + offset for x in xs], vals, width, label=label)
            for bar, v in zip(bars, vals):
                if math.isfinite(v):
                    ax.annotate(_ms_label(v), (bar.get_x() + bar.get_width() / 2, v), ha="center",
                                va="bottom", fontsize=7)
        floor = run.shapes[name]["floor_ms"]["train"]
        ax.axhline(floor, color="gray", linestyle=":", linewidth=1,
                   label=f"training step floor ({_ms_label(floor)}, this machine's peak)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([display_name(r.provider) for r in recs], fontsize=8)
        ax.set_ylabel("median time per call (ms, lower is better)")
        ax.set_title(f"{name} shape: {run.shapes[name]['describe']}", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
        ax.margins(y=0.12)
    m = run.meta
    where = run.device_name + (f", {m['threads']} thread{'s' if m['threads'] != 1 else ''}"
                               if m.get("device_type") == "cpu" else "")
    busy = "\nthe machine was busy: times inflated and noisy" if m.get("busy") else ""
    fig.suptitle(f"omoe_kernels on {where}, {m.get('date', '')}{busy}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def run_from_payload(data: dict) -> Run:
    """A Run back from its JSON form (payload()), to redraw its chart without measuring."""
    meta = data["meta"]
    device = torch.device(meta["device_type"])
    run = Run(device, meta["device_name"], "", meta)
    run.ceilings = {k: Ceilings(**v) for k, v in data.get("ceilings", {}).items()}
    run.shapes = data["shapes"]
    run.records = [Record(**r) for r in data["results"]]
    return run


class Progress:
    """tqdm when installed (the GPU machine may lack it), plain lines otherwise."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self.bar = None
        self.started = False

    def stage(self, text: str) -> None:
        if self.started and self.bar is not None:
            self.bar.update(1)
        self.started = True
        if self.bar is not None:
            self.bar.set_description_str(text)
        else:
            print(f"[bench] {text}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def payload(run: Run) -> dict:
    """The JSON form of a run (what bench/criteria.py and later tools read)."""
    return {"meta": run.meta, "ceilings": {k: asdict(v) for k, v in run.ceilings.items()},
            "shapes": run.shapes, "results": [asdict(r) for r in run.records]}


def write_results(run: Run, out: Path) -> list[str]:
    """Writes out.md, out.json and out.png; returns what it wrote (or why there is no chart)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(run) + f"\nWhole run: {run.meta['seconds']} s.\n")
    out.with_suffix(".json").write_text(json.dumps(payload(run), indent=1) + "\n")
    chart_note = chart(run, out.with_suffix(".png"))
    written = [str(out.with_suffix(s)) for s in (".md", ".json")]
    return written + [chart_note or str(out.with_suffix(".png"))]
