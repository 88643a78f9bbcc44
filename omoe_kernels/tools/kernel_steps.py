"""The latency model's view of kernel_report's kernels: what it reads from a launcher's
plan (programs, the longest serial loop by kernel), the per-kernel fields of the report,
and the step's range per shape and card against a plain bf16 LoRA (kernel_model.py)."""
from __future__ import annotations

import inspect
import math
from dataclasses import replace
from typing import Optional

from . import kernel_model as M
from .kernel_model import Work

GPU_SHAPES = ("llama7b", "llama7b-top2", "wide")     # docs/contract.md §6
STEP_PHASES = ("forward", "backward")   # a KernelSpec's `step` in the default training step
MIXED = "mixed"                         # ... in the grouped forward of a mixed batch


def launch_programs(launch) -> int:
    """Programs in a launch's grid (a tuple, or a function of the constexprs)."""
    grid = launch.grid(dict(launch.meta)) if callable(launch.grid) else launch.grid
    return math.prod(int(g) for g in grid)


def _param(launch, name: str):
    """A launch's runtime argument, constexpr or the kernel's default for `name` (None
    when the kernel has no such parameter)."""
    runtime = [p.name for p in launch.kernel.params if not p.is_constexpr]
    if name in runtime:
        return launch.args[runtime.index(name)]
    if name in launch.meta:
        return launch.meta[name]
    for p in launch.kernel.params:
        if p.name == name and p.default is not inspect.Parameter.empty:
            return p.default
    return None


def with_launch(launch, work: Optional[Work]) -> Optional[Work]:
    """`work` with what the latency model needs from the launch: its programs and the
    longest serial loop of one program (kernel_model's loop rules, by kernel), and the
    gram programs appended to a GEMM launch modelled apart."""
    if work is None:
        return None
    name = launch.kernel.__name__
    programs = launch_programs(launch)
    threads = 32 * launch.options.get("num_warps", 4)
    p = lambda key: _param(launch, key)  # noqa: E731
    loop, appended = work.loop, work.appended
    if name in ("matmul_kernel", "shrink_kernel", "weight_grad_kernel", "mixed_shrink_kernel",
                "mixed_expand_kernel"):
        k = next(v for v in (p("k_per_split"), p("D"), p("K")) if v is not None)
        loop = M.gemm_loop(k, p("BLOCK_M"), p("BLOCK_N"), p("BLOCK_K"))
        if p("SCALED_A"):   # the weight's per-column max: as many load-only trips first
            loop = replace(loop, prologue=loop.trips)
        num_gram = (p("num_gram") or 0) * (p("num_adapters") or 1)
        if num_gram and appended is not None:
            rows = (p("GD") or 16) * (p("GR") or 1)  # rows of B one trip covers
            appended = replace(appended, programs=num_gram,
                               loop=M.gram_loop(p("d_out"), rows, p("GB") or 16, threads))
            programs -= num_gram
    elif name == "scaled_matmul_kernel":
        loop = M.grouped_loop(p("N_GROUP"), p("BLOCK_M"), p("BLOCK_N"), p("BLOCK_K"))
    elif name == "gram_grad_kernel":
        block_t, rp = p("BLOCK_T"), p("RP")
        every = block_t * rp * rp * p("E") * (p("E") + 1) * -(-p("T") // block_t)
        loop = M.gram_grad_loop(p("tokens_per_split"), block_t, rp, threads,
                                active=min(1.0, work.flops_issued / every))
    elif name == "finalize_grads_kernel":
        loop = M.finalize_loop(p("b_splits"), p("a_splits"), p("g_splits"), p("ERP"),
                               p("BLOCK_G"))
    return replace(work, programs=programs, loop=loop, appended=appended)


def fmt_latency(r, card: str) -> list[str]:
    times = r.timing(card)
    if times is None:
        return ["-"] * 5
    lo, hi = times
    trips, over = r.serial_loop()
    programs, waves = r.grid(card)
    return [str(programs), str(lo.ctas_per_sm), f"{waves:.2f}", f"{trips} {over}",
            f"{lo.total_s * 1e6:.1f}–{hi.total_s * 1e6:.1f} ({hi.bound})"]


def step_estimates(results: list, all_specs: list, cards=("h200", "h100")) -> dict:
    """Per GPU shape and card: the step's modelled time as a (low, high) range, summed over
    the kernels of a default bf16 step (launch gaps included, host time not), against a
    plain bf16 LoRA of rank E·r modelled the same way; and the roofline sums (the lower
    bound that ignores latency). Only shapes whose step kernels were all selected count.
    With the mixed-batch kernels selected too, "mixed" gives their forward's range per card
    and its ratio to the single-adapter forward at the same T."""
    from ..testing.shapes import SHAPES

    out = {}
    for name in GPU_SHAPES:
        in_step = [r for r in results if r.spec.shape == name and r.spec.step in STEP_PHASES
                   and r.spec.work]
        if len(in_step) != sum(1 for s in all_specs if s.shape == name and s.step in STEP_PHASES):
            continue
        shape = SHAPES[name]
        T, d, R = shape.num_tokens, shape.d_model, shape.num_experts * shape.rank
        lora = M.plain_lora_works(T, d, R)
        entry = {}
        for phase in ("forward", "backward"):
            works = [r.spec.work for r in in_step if r.spec.step == phase]
            entry[phase] = dict(omoe_us=sum(w.estimate_s for w in works) * 1e6,
                                omoe_mb=sum(w.bytes for w in works) / 1e6,
                                lora_us=sum(w.estimate_s for _, w in lora[phase]) * 1e6,
                                lora_mb=sum(w.bytes for _, w in lora[phase]) / 1e6,
                                kernels=len(works))
        total = lambda key: entry["forward"][key] + entry["backward"][key]  # noqa: E731
        entry["fwd+bwd"] = dict(omoe_us=total("omoe_us"), lora_us=total("lora_us"),
                                ratio=total("omoe_us") / total("lora_us"))
        for card in cards:
            ranges = {}
            for phase in ("forward", "backward"):
                times = [r.timing(card) for r in in_step if r.spec.step == phase]
                ranges[phase] = [sum(t[end].total_s for t in times) * 1e6 for end in (0, 1)]
            omoe = [ranges["forward"][e] + ranges["backward"][e] for e in (0, 1)]
            lora_t = [sum(M.plain_lora_timing(T, d, R, e, M.CARDS[card]).values()) * 1e6
                      for e in (0, 1)]
            biggest = max(in_step, key=lambda r: r.timing(card)[1].total_s)
            entry[card] = dict(forward_us=ranges["forward"], backward_us=ranges["backward"],
                               omoe_us=omoe, lora_us=lora_t,
                               ratio=[omoe[0] / lora_t[0], omoe[1] / lora_t[1]],
                               largest=biggest.spec.name)
        mixed = [r for r in results if r.spec.shape == name and r.spec.step == MIXED]
        if mixed and len(mixed) == sum(1 for s in all_specs if s.shape == name and s.step == MIXED):
            entry[MIXED] = {}
            for card in cards:
                times = [r.timing(card) for r in mixed]
                us = [sum(t[end].total_s for t in times) * 1e6 for end in (0, 1)]
                single = entry[card]["forward_us"]
                entry[MIXED][card] = dict(forward_us=us, single_forward_us=single,
                                          ratio=[us[0] / single[0], us[1] / single[1]])
        out[name] = entry
    return out


def format_steps(steps: dict) -> str:
    if not steps:
        return ""
    r = lambda v: f"{v[0]:.0f}–{v[1]:.0f}"  # noqa: E731
    lines = ["Step ESTIMATE, latency model (kernel_model.py, CALIBRATION): fwd+bwd of the "
             "step's Triton kernels with launch gaps, host time left out, vs a plain bf16 "
             "LoRA of rank E·r modelled the same way; low–high ends of the range:",
             "| shape | card | fwd µs | bwd µs | fwd+bwd µs OMoE | LoRA µs | OMoE ÷ LoRA | "
             "roofline ratio | largest kernel |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, e in steps.items():
        for card in ("h200", "h100"):
            if card not in e:
                continue
            c = e[card]
            low, high = sorted(c["ratio"])   # the low ends' ratio may be the larger
            lines.append(f"| {name} | {card} | {r(c['forward_us'])} | {r(c['backward_us'])} | "
                         f"{r(c['omoe_us'])} | {r(c['lora_us'])} | {low:.2f}–{high:.2f}× | "
                         f"{e['fwd+bwd']['ratio']:.2f}× | {c['largest']} |")
    mixed = [(name, e[MIXED]) for name, e in steps.items() if MIXED in e]
    if mixed:
        lines += ["", "Mixed batch ESTIMATE, same model: the grouped forward (3 launches) of the "
                  "shape's T tokens spread over several adapters, vs one adapter's forward:",
                  "| shape | card | mixed fwd µs | one adapter's fwd µs | mixed ÷ one |",
                  "|---|---|---|---|---|"]
        for name, m in mixed:
            for card, c in m.items():
                low, high = sorted(c["ratio"])  # the low ends' ratio may be the larger
                lines.append(f"| {name} | {card} | {r(c['forward_us'])} | "
                             f"{r(c['single_forward_us'])} | {low:.2f}–{high:.2f}× |")
    return "\n".join(lines)


def latency_dict(r, card: str = "h200") -> dict:
    """The latency model's fields of one kernel record (None where it has no Work)."""
    times = r.timing(card)
    if times is None:
        return dict(programs=None, ctas_per_sm=None, waves=None, serial_trips=None,
                    serial_over=None, est_us=None, bound=None)
    lo, hi = times
    trips, over = r.serial_loop()
    programs, waves = r.grid(card)
    return dict(programs=programs, ctas_per_sm=lo.ctas_per_sm, waves=round(waves, 3),
                serial_trips=trips, serial_over=over,
                est_us=[round(lo.total_s * 1e6, 2), round(hi.total_s * 1e6, 2)],
                bound=hi.bound, bound_low=lo.bound)
