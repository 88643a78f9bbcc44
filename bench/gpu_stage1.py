"""Stage 1 of the GPU check (bench/gpu_check.sh): the most evidence in at most 6 minutes.

    python -m bench.gpu_stage1 --out bench/results            # on the GPU machine
    python -m bench.gpu_stage1 --dry-run --out "$(mktemp -d)"  # on a CPU: interpreter, tiny shapes

No build of the extension, no test suite, no autotuning (fixed launch configs). In order,
each part under the time left of `--budget-s` (a part that would start past it is skipped
and named in the results):

1. the card and the software;
2. accuracy: one small training step per dtype (fp32, bf16, fp16) against float64;
3. per shape (`llama7b`, `llama7b-top2`, `wide`):
   - the training step (fwd+bwd) of `triton`, a plain bf16 LoRA of rank E·r and a
     peft-style LoRA (unfused: dropout, lora_B(lora_A(x)) · scaling, + base), timed by
     `do_bench` and by CUDA-graph replay (bench/graphs.py);
   - per-kernel µs of one step from `torch.profiler`;
   - dZ with and without the G programs appended to it;
   - the per-token kernels at two program sizes (the default BT and half of it).

Writes `<out>/<card>.md` and `<out>/<card>.json` (card: `h100`, `h200`, or `cpu-dry-run`).
The dry run proves that the script runs end to end: its numbers are CPU times of the
interpreter, not GPU timings.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import replace

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"        # before triton is imported
os.environ.setdefault("OMOE_TRITON_FIXED_CONFIG", "1")

import torch  # noqa: E402

import omoe_kernels as ok  # noqa: E402
from omoe_kernels.testing.oracle import omoe_lora_oracle  # noqa: E402
from omoe_kernels.testing.shapes import RANDOM_TOLERANCE, SHAPES  # noqa: E402

from .providers import SCALING, make_inputs  # noqa: E402

GPU_SHAPES = ("llama7b", "llama7b-top2", "wide")


class Stage:
    """The run's clock and its results: each part records into `results`, or its error."""

    def __init__(self, budget_s: float, dry_run: bool):
        self.start = time.time()
        self.budget_s = budget_s
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.results: dict = dict(parts={}, skipped=[], errors={})

    def left(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def part(self, name: str, fn, *args):
        if self.left() <= 0:
            self.results["skipped"].append(name)
            print(f"[stage1] {name}: skipped, budget spent", flush=True)
            return None
        began = time.time()
        try:
            value = fn(*args)
        except Exception as exc:   # record it and go on: the next part still runs
            self.results["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            value = None
        self.results["parts"][name] = dict(seconds=round(time.time() - began, 2), value=value)
        print(f"[stage1] {name}: {time.time() - began:.1f} s", flush=True)
        return value


def shape_of(name: str, dry_run: bool):
    """The §6 shape, or for a dry run the same routing at T = 32, d = 32, r = 4 and at
    most 4 experts (the interpreter runs one program at a time through numpy)."""
    shape = SHAPES[name]
    if not dry_run:
        return shape
    return replace(shape, num_tokens=32, d_model=32, rank=4,
                   num_experts=min(shape.num_experts, 4))


# ---- timing -------------------------------------------------------------------------------

def median_us(fn, device: torch.device, reps: int = 1) -> float:
    """do_bench's median on a GPU; on the CPU (dry run) the median wall time of `reps` calls."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
    times = []
    for _ in range(reps):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


def graph_us(step, leaves, device: torch.device, replays: int = 20):
    """Median µs of a CUDA-graph replay of `step` (None on the CPU: no graphs there)."""
    if device.type != "cuda":
        return None
    from .graphs import graphed_step

    replay = graphed_step(step, leaves)
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3)
    return statistics.median(times)


# ---- the parts ---------------------------------------------------------------------------

def environment(stage: Stage) -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__,
                dry_run=stage.dry_run, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable: {exc}"
    if stage.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1))
    else:
        info.update(card=f"CPU ({platform.processor() or platform.machine()}), dry run", sms=0)
    return info


def card_slug(info: dict) -> str:
    name = info.get("card", "").lower()
    if info.get("dry_run"):
        return "cpu-dry-run"
    for slug in ("h200", "h100", "a100"):
        if slug in name:
            return slug
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "gpu"


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def accuracy(stage: Stage) -> dict:
    """One training step per dtype at a small top-2 shape against the float64 oracle:
    relative Frobenius errors of y and of every gradient, with the random-row bounds."""
    out = {}
    T, d, E, r = (48, 40, 4, 4) if stage.dry_run else (512, 256, 4, 16)
    shape = replace(SHAPES["llama7b-top2"], num_tokens=T, d_model=d, num_experts=E, rank=r)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        inp = make_inputs(shape, stage.device, dtype, seed=1)
        leaves = [inp.x, inp.A, inp.B, inp.router_weight]
        y = ok.omoe_lora(*leaves, scaling=SCALING, top_k=2, base_out=inp.base_out, backend="triton")
        got = torch.autograd.grad(y, leaves, inp.grad_y)
        ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
        y64 = omoe_lora_oracle(*ref_leaves, scaling=SCALING, top_k=2,
                               base_out=inp.base_out.detach().double())
        want = torch.autograd.grad(y64, ref_leaves, inp.grad_y.double())
        fwd_bound, grad_bound = RANDOM_TOLERANCE[dtype]
        errors = dict(y=_rel(y, y64), **{f"grad_{n}": _rel(g, w) for n, g, w in
                                         zip(("x", "A", "B", "W"), got, want)})
        worst_grad = max(v for k, v in errors.items() if k.startswith("grad_"))
        out[name] = dict(errors=errors, forward_bound=fwd_bound, gradient_bound=grad_bound,
                         ok=errors["y"] <= fwd_bound and worst_grad <= grad_bound)
    return out


def _providers(shape, inp):
    """The training steps compared: (forward closure, leaves) per provider."""
    lora_a = torch.nn.Linear(shape.d_model, shape.num_experts * shape.rank, bias=False,
                             device=inp.x.device, dtype=inp.x.dtype)
    lora_b = torch.nn.Linear(shape.num_experts * shape.rank, shape.d_model, bias=False,
                             device=inp.x.device, dtype=inp.x.dtype)
    dropout = torch.nn.Dropout(0.0)

    def triton_step():
        return ok.omoe_lora(inp.x, inp.A, inp.B, inp.router_weight, scaling=SCALING,
                            top_k=shape.top_k, base_out=inp.base_out, backend="triton")

    def plain_lora():
        return inp.base_out + SCALING * (inp.x @ inp.A_cat.t()) @ inp.B_cat.t()

    def peft_style():   # peft's LoRA Linear forward: result + lora_B(lora_A(dropout(x))) * scaling
        return inp.base_out + lora_b(lora_a(dropout(inp.x))) * SCALING

    return {"triton": (triton_step, inp.omoe_leaves()),
            "lora": (plain_lora, inp.lora_leaves()),
            "peft-lora": (peft_style, [inp.x, inp.base_out, lora_a.weight, lora_b.weight])}


def step_times(stage: Stage, name: str) -> dict:
    shape = shape_of(name, stage.dry_run)
    inp = make_inputs(shape, stage.device, torch.bfloat16)
    out = {}
    for provider, (forward, leaves) in _providers(shape, inp).items():
        def step(forward=forward, leaves=leaves):
            forward().backward(inp.grad_y)
            for t in leaves:
                t.grad = None

        if not stage.dry_run:      # warm-up (the dry run proves the path, once)
            step()
        out[provider] = dict(do_bench_us=median_us(step, stage.device))
        if not stage.dry_run:
            out[provider]["forward_us"] = median_us(forward, stage.device)
        try:
            out[provider]["graph_us"] = graph_us(lambda f=forward: f().backward(inp.grad_y),
                                                 leaves, stage.device)
        except Exception as exc:
            out[provider]["graph_error"] = f"{type(exc).__name__}: {exc}"
    return out


def kernel_profile(stage: Stage, name: str) -> dict:
    """µs per kernel (device time on a GPU, CPU time in a dry run) of one training step."""
    from torch.profiler import ProfilerActivity, profile

    shape = shape_of(name, stage.dry_run)
    inp = make_inputs(shape, stage.device, torch.bfloat16)
    forward, leaves = _providers(shape, inp)["triton"]
    if not stage.dry_run:   # warm-up: compiles stay out of the profile
        forward().backward(inp.grad_y)
        for t in leaves:
            t.grad = None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if stage.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        forward().backward(inp.grad_y)
        if stage.device.type == "cuda":
            torch.cuda.synchronize()
    kernels = {}
    for e in prof.key_averages():
        if stage.device.type == "cuda":
            # Kernels only (device-side events), not the CPU ops that launched them.
            on_device = str(getattr(e, "device_type", "")).endswith("CUDA")
            self_us = getattr(e, "self_device_time_total", 0.0)
            if on_device and self_us > 0:
                kernels[e.key] = dict(us=round(self_us / max(e.count, 1), 2), calls=e.count)
        elif e.key.startswith("omoe_triton::"):
            kernels[e.key] = dict(us=round(e.cpu_time_total / max(e.count, 1), 2), calls=e.count)
    return kernels


def dz_with_and_without_g(stage: Stage, name: str) -> dict:
    """The dZ launch (s·dY·B_cat) alone, with its G programs (the backward op called
    without the forward's G) and without (the training step's: split-K partials)."""
    from omoe_kernels.ops.triton import configs as C
    from omoe_kernels.ops.triton import launch as L
    from omoe_kernels.ops.triton.params import Epilogue, Operands

    shape = shape_of(name, stage.dry_run)
    inp = make_inputs(shape, stage.device, torch.bfloat16)
    B, grad_y = inp.B.detach(), inp.grad_y
    lay = L.layout(shape.num_experts, shape.rank)
    G = torch.empty(lay.ERP, lay.ERP, device=stage.device, dtype=torch.float64)
    kind = L.dot_kind(B.dtype, stage.device.type)
    operands = Operands(kind, L._upcast(B.dtype), "Bn")

    def run(gram):
        epilogue = Epilogue(torch.float32, SCALING, long_k=gram is None, gram=gram, per_sm=1)
        return lambda: L.matmul(grad_y, B, lay, operands, epilogue)

    with_g, without_g = run((B, G)), run(None)
    if not stage.dry_run:
        with_g(), without_g()
    return dict(with_g_us=median_us(with_g, stage.device),
                without_g_us=median_us(without_g, stage.device), kind=kind,
                gram_tile=C.GRAM_TILE)


def token_program_sizes(stage: Stage, name: str) -> dict:
    """token_forward and token_backward at their default tokens per program
    (configs.tokens_per_program, a run-time argument) and at half of it (twice the
    programs): the launcher's own plan, with that argument and the grid changed."""
    import triton

    from omoe_kernels.ops.triton import launch as L

    shape = shape_of(name, stage.dry_run)
    T, E, r = shape.num_tokens, shape.num_experts, shape.rank
    top_k = shape.top_k or E
    lay = L.layout(E, r)
    gen = torch.Generator(device=stage.device).manual_seed(0)
    h = torch.randn(T, lay.ERP, device=stage.device, generator=gen)
    logits = torch.randn(T, E, device=stage.device, generator=gen)
    dz = torch.randn(2, T, lay.ERP, device=stage.device, generator=gen)   # dZ's two split-K partials
    B = torch.randn(E, shape.d_model, r, device=stage.device, generator=gen) / r ** 0.5
    B_cat = B.permute(1, 0, 2).reshape(shape.d_model, E * r)
    G = torch.zeros(lay.ERP, lay.ERP, device=stage.device, dtype=torch.float64)
    for i in range(E):
        for j in range(E):
            block = (B_cat[:, i * r:(i + 1) * r].double().t() @ B_cat[:, j * r:(j + 1) * r].double())
            G[i * lay.RP:i * lay.RP + r, j * lay.RP:j * lay.RP + r] = block
    args = (lay, top_k, True, True, 1e-6, L.Target.of(h.device))
    plans = dict(forward=L.plan_token_forward(h, logits, G, *args)[0],
                 backward=L.plan_token_backward(h, logits, G, dz, *args)[0])
    out = {}
    for which, launch in plans.items():
        block_t = launch.config.block_t
        for size in sorted({block_t, max(1, block_t // 2)}, reverse=True):
            at = launch.kernel.arg_names.index("per_program")  # the run-time tokens per program
            variant = replace(launch, args=launch.args[:at] + (size,) + launch.args[at + 1:],
                              grid=(triton.cdiv(T, size),))
            warps = launch.options["num_warps"]
            if not stage.dry_run:
                variant.run()
            out[f"{which}_bt{size}"] = dict(us=median_us(variant.run, stage.device),
                                           programs=triton.cdiv(T, size), warps=warps)
    return out


# ---- output ------------------------------------------------------------------------------

def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(results: dict) -> str:
    env = results["parts"].get("environment", {}).get("value") or {}
    lines = [f"# GPU check, stage 1: {env.get('card', '?')}", "",
             f"{env.get('date', '?')}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"Python {env.get('python')}; fixed launch configs, bf16 unless named.",
             "" if not env.get("dry_run") else
             "\n**Dry run on a CPU (Triton interpreter, T = 32, d = 32, r = 4, E <= 4): these are "
             "CPU times, "
             "not GPU timings.**", ""]
    acc = results["parts"].get("accuracy", {}).get("value") or {}
    if acc:
        lines += ["## Accuracy (one step against float64)", "",
                  "| dtype | y | worst gradient | bounds | ok |", "|---|---|---|---|---|"]
        for dtype, a in acc.items():
            worst = max(v for k, v in a["errors"].items() if k.startswith("grad_"))
            lines.append(f"| {dtype} | {a['errors']['y']:.2e} | {worst:.2e} | "
                         f"{a['forward_bound']:.0e} / {a['gradient_bound']:.0e} | {a['ok']} |")
        lines.append("")
    for name in GPU_SHAPES:
        steps = (results["parts"].get(f"step {name}") or {}).get("value")
        if steps:
            lines += [f"## {name}: training step (µs)", "",
                      "| provider | fwd+bwd do_bench | fwd+bwd graph replay | fwd do_bench |",
                      "|---|---|---|---|"]
            for p, t in steps.items():
                lines.append(f"| {p} | {_fmt(t.get('do_bench_us'))} | {_fmt(t.get('graph_us'))} | "
                             f"{_fmt(t.get('forward_us'))} |")
            lines.append("")
        kernels = (results["parts"].get(f"profile {name}") or {}).get("value")
        if kernels:
            lines += [f"## {name}: per kernel (µs, torch.profiler)", "", "| kernel | µs | calls |",
                      "|---|---|---|"]
            for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]["us"]):
                lines.append(f"| {k[:80]} | {v['us']:.1f} | {v['calls']} |")
            lines.append("")
        dz = (results["parts"].get(f"dz {name}") or {}).get("value")
        if dz:
            lines += [f"dZ at {name}: {_fmt(dz['with_g_us'])} µs with G, "
                      f"{_fmt(dz['without_g_us'])} µs without.", ""]
        tok = (results["parts"].get(f"token {name}") or {}).get("value")
        if tok:
            lines.append(f"Per-token kernels at {name}: " + "; ".join(
                f"{k} {_fmt(v['us'])} µs ({v['programs']} programs)" for k, v in tok.items()))
            lines.append("")
    lines += ["## Parts", "", "| part | seconds | error |", "|---|---|---|"]
    for part, p in results["parts"].items():
        lines.append(f"| {part} | {p['seconds']} | {results['errors'].get(part, '')[:100]} |")
    if results["skipped"]:
        lines += ["", "Skipped (budget spent): " + ", ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_stage1", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results", help="directory of <card>.md and <card>.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes: proves the script runs")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="parts that would start after this many seconds are skipped")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated (default: {','.join(GPU_SHAPES)}; dry run: wide)")
    args = parser.parse_args(argv)
    args.shapes = args.shapes or ("wide" if args.dry_run else ",".join(GPU_SHAPES))
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_stage1: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    stage = Stage(args.budget_s, args.dry_run)
    env = stage.part("environment", environment, stage)
    stage.part("accuracy", accuracy, stage)
    shapes = [s for s in args.shapes.split(",") if s]
    for name in shapes:
        stage.part(f"step {name}", step_times, stage, name)
    for name in shapes:
        stage.part(f"profile {name}", kernel_profile, stage, name)
    for name in shapes:
        stage.part(f"dz {name}", dz_with_and_without_g, stage, name)
    for name in dict.fromkeys((shapes[0], shapes[-1])):   # llama7b (dense) and wide (top-2)
        stage.part(f"token {name}", token_program_sizes, stage, name)
    stage.results["total_s"] = round(time.time() - stage.start, 1)
    os.makedirs(args.out, exist_ok=True)
    slug = card_slug(env or {})
    with open(os.path.join(args.out, f"{slug}.json"), "w") as f:
        json.dump(stage.results, f, indent=1, default=str)
    with open(os.path.join(args.out, f"{slug}.md"), "w") as f:
        f.write(markdown(stage.results))
    print(markdown(stage.results))
    print(f"[stage1] wrote {args.out}/{slug}.md and .json in {stage.results['total_s']} s")
    return 1 if stage.results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
