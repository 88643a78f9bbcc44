"""Count the kernel launches of one OMoE step without a GPU.

Under `TRITON_INTERPRET=1` every Triton launch goes through
`triton.runtime.interpreter.InterpretedFunction.run`. `count_launches` wraps that method,
marks each launch with a `torch.profiler.record_function` range, and runs the step under
`torch.profiler` on CPU tensors. It counts

- each Triton launch, and
- each outermost ATen op that would launch a kernel on a GPU (`mm`, `clone`, `zeros`,
  `add`, `sum`, `cat`, ...) as one launch, whatever it calls inside (on the CPU `sum`
  zero-fills its output and `add` wraps a Python scalar in a tensor: not GPU launches);
  views, metadata ops and the composite wrappers that launch nothing themselves (`to`,
  `contiguous`, `reshape`, `matmul`, ...) are looked through to the ops they call,

and leaves out everything inside a Triton launch range (the interpreter's own host
copies). ATen ops of the compiled `cpu` backend count the same way, which gives the
CUDA fallback's torch launches; its hand-written loops (the per-token passes) are not ATen
ops and are not in the count.

`step_launches` counts a training forward, its backward, and a no-grad forward
(decoding, weights unchanged), each after one warm-up call of the same kind.
`mixed_launches` counts a no-grad `omoe_lora_mixed` call of several adapters (a layer
of a mixed decoding batch), to set beside the single-adapter no-grad forward.

`--host` (`host_step_us`) times instead the host side of a training step at the GPU
shapes on CPU tensors, with the device launches stubbed out (`stubbed_launches`): what a
GPU step costs the CPU before any kernel runs. It prints `host µs per step: X` per shape,
beside the floor of any eager autograd step with the same leaves (`host_floor_us`).
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from ..backends import triton_interpreting

TRITON_RANGE = "triton_launch::"

# ATen ops that launch no GPU kernel themselves: views, metadata, allocation without
# fill, host-side scalar reads, and composite wrappers (their callees are counted instead).
LOOK_THROUGH = frozenset(f"aten::{name}" for name in (
    # views and metadata
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "as_strided_",
    "permute", "t", "transpose", "expand", "expand_as", "slice", "select", "narrow",
    "unsqueeze", "squeeze", "unflatten", "flatten", "view_as", "split", "split_with_sizes",
    "chunk", "unbind", "detach", "detach_", "alias", "lift_fresh", "resolve_conj",
    "resolve_neg", "set_", "result_type", "is_nonzero", "size", "stride", "numel", "dim",
    "is_same_size", "_has_compatible_shallow_copy_type", "requires_grad_", "broadcast_to",
    "movedim", "diagonal", "_version", "output_nr", "storage_offset", "is_contiguous",
    # allocation without a fill, host reads (a sync, not a launch)
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "item",
    "_local_scalar_dense",
    # composite wrappers: what they call is what launches
    "to", "type_as", "contiguous", "matmul", "linear", "einsum", "tensordot",
))

@dataclass
class Launches:
    """Launches of one call: Triton kernel names and leaf ATen op names, in order."""

    triton: list[str] = field(default_factory=list)
    aten: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.triton) + len(self.aten)

    def as_dict(self) -> dict:
        return dict(total=self.total, triton=len(self.triton), aten=len(self.aten),
                    triton_kernels=dict(Counter(self.triton)), aten_ops=dict(Counter(self.aten)))

    def summary(self) -> str:
        parts = [f"{n}×{k}" if n > 1 else k for k, n in Counter(self.triton + self.aten).items()]
        return f"{self.total} ({len(self.triton)} triton + {len(self.aten)} aten: {', '.join(parts)})"


@contextlib.contextmanager
def _marked_triton_launches() -> Iterator[None]:
    """Wrap every interpreted Triton launch in a profiler range named after the kernel."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:        # no triton: only ATen ops to count
        yield
        return
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        with record_function(TRITON_RANGE + self.fn.__name__):
            return original(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _count_tree(event, out: Launches) -> None:
    """Add the launches of `event` and the events below it to `out`."""
    name = event.name
    if name.startswith(TRITON_RANGE):
        out.triton.append(name[len(TRITON_RANGE):])   # its inner host copies are not launches
    elif name.startswith("aten::") and name not in LOOK_THROUGH:
        out.aten.append(name[len("aten::"):])
    else:
        for child in event.cpu_children:
            _count_tree(child, out)


def count_launches(fn: Callable[[], object]) -> Launches:
    """The launches `fn()` would make on a GPU, counted on CPU tensors. Triton launches
    are seen only under `TRITON_INTERPRET=1` (step_launches checks it; a compiled launch
    goes through no hook here)."""
    with _marked_triton_launches(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = Launches()
    events = sorted((e for e in prof.events() if e.cpu_parent is None),
                    key=lambda e: e.time_range.start)
    for event in events:
        _count_tree(event, out)
    return out


@dataclass
class StepLaunches:
    backend: str
    top_k: int | None
    forward: Launches
    backward: Launches
    no_grad_forward: Launches

    def as_dict(self) -> dict:
        return dict(backend=self.backend, routing="dense" if self.top_k is None else f"top-{self.top_k}",
                    forward=self.forward.as_dict(), backward=self.backward.as_dict(),
                    no_grad_forward=self.no_grad_forward.as_dict())


def step_launches(backend: str = "triton", top_k: int | None = None, num_tokens: int = 64,
                  d_model: int = 64, num_experts: int = 4, rank: int = 16) -> StepLaunches:
    """Launches of one OMoE step on CPU tensors (fp32; `backend` "triton" needs
    TRITON_INTERPRET=1 set before triton is imported)."""
    from ..functional import omoe_lora

    if backend == "triton" and not triton_interpreting():
        raise RuntimeError("step_launches(backend='triton') counts interpreted launches: "
                           "set TRITON_INTERPRET=1 before importing triton")
    gen = torch.Generator().manual_seed(0)
    T, d, E, r = num_tokens, d_model, num_experts, rank
    x = torch.randn(T, d, generator=gen, requires_grad=True)
    A = (torch.randn(E, r, d, generator=gen) / d ** 0.5).requires_grad_()
    B = (torch.randn(E, d, r, generator=gen) / r ** 0.5).requires_grad_()
    W = (torch.randn(E, d, generator=gen) / d ** 0.5).requires_grad_()
    base = torch.randn(T, d, generator=gen, requires_grad=True)
    grad_y = torch.randn(T, d, generator=gen)

    def forward():
        return omoe_lora(x, A, B, W, scaling=2.0, top_k=top_k, base_out=base, backend=backend)

    def no_grad_forward():
        with torch.no_grad():
            forward()

    forward().backward(grad_y)                       # warm-up: first-call work is not a step's
    y = None

    def counted_forward():
        nonlocal y
        y = forward()

    fwd = count_launches(counted_forward)
    for leaf in (x, A, B, W, base):
        leaf.grad = None                             # a step starts with no gradients
    bwd = count_launches(lambda: y.backward(grad_y))
    no_grad_forward()
    return StepLaunches(backend, top_k, fwd, bwd, count_launches(no_grad_forward))


def mixed_launches(backend: str = "triton", top_k: int | None = None, num_tokens: int = 64,
                   d_model: int = 64, num_adapters: int = 4, num_experts: int = 4,
                   rank: int = 4) -> Launches:
    """Launches of one no-grad `omoe_lora_mixed` call (a layer of a mixed decoding batch):
    2·(N + 1) samples cycling over "no adapter" and the N adapters, the batch's Grouping
    made once and reused as every layer of a model reuses it, after one warm-up call.
    Rank 4 by default: the launches do not depend on the shape, and every adapter's G
    costs the interpreter time that grows with (E·r)²."""
    from ..mixed import group, omoe_lora_mixed

    if backend == "triton" and not triton_interpreting():
        raise RuntimeError("mixed_launches(backend='triton') counts interpreted launches: "
                           "set TRITON_INTERPRET=1 before importing triton")
    gen = torch.Generator().manual_seed(0)
    N, d, E, r = num_adapters, d_model, num_experts, rank
    samples = 2 * (N + 1)
    per_sample = max(1, num_tokens // samples)
    x = torch.randn(samples, per_sample, d, generator=gen)
    A = torch.randn(N, E, r, d, generator=gen) / d ** 0.5
    B = torch.randn(N, E, d, r, generator=gen) / r ** 0.5
    W = torch.randn(N, E, d, generator=gen) / d ** 0.5
    base = torch.randn(samples, per_sample, d, generator=gen)
    grouping = group(torch.arange(samples) % (N + 1) - 1, N)

    def forward():
        with torch.no_grad():
            omoe_lora_mixed(x, A, B, W, grouping, scaling=[2.0] * N, top_k=top_k,
                            base_out=base, backend=backend)

    forward()
    return count_launches(forward)


@contextlib.contextmanager
def stubbed_launches(num_sms: int = 132) -> Iterator[None]:
    """The host path of the `triton` backend on CPU tensors, with the device launches
    stubbed out: a Triton kernel call returns at once (JITFunction.run is the stub, so
    Triton's own argument binding, specialisation and driver call are not in it), the
    autotuner's benchmark ranks configs by their order instead of timing them (its key
    and cache run as on a GPU), the backend counts as available on CPU, and every launch
    is sized for a `num_sms` GPU that autotunes (as on a GPU without
    OMOE_TRITON_FIXED_CONFIG)."""
    import dataclasses

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from .. import backends
    from ..ops.triton import launch

    saved = (JITFunction.run, Autotuner._bench, backends.REGISTRY["triton"], launch.Target.of)
    JITFunction.run = lambda self, *args, **kwargs: None
    Autotuner._bench = lambda self, *args, config, **kwargs: [float(self.configs.index(config))]
    backends.REGISTRY["triton"] = dataclasses.replace(saved[2], available=lambda device_type: True)
    launch.Target.of = classmethod(lambda cls, device: cls(num_sms, False, not launch.fixed_config()))
    try:
        yield
    finally:
        (JITFunction.run, Autotuner._bench, backends.REGISTRY["triton"], launch.Target.of) = saved


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    import statistics
    import time

    # This thread's CPU time, not wall time: a busy neighbour on a shared machine
    # (bench/notes/busy-machine.md) then stretches the figure less.
    times = []
    for _ in range(repeats):
        start = time.thread_time_ns()
        fn()
        times.append(time.thread_time_ns() - start)
    return statistics.median(times) / 1e3


def _host_leaves(shape_name: str, dtype):
    """(x, A, B, W) leaves that require grad, base and grad_y at a §6 shape (uninitialised:
    nothing reads them with the launches stubbed)."""
    from ..testing.shapes import SHAPES

    shape = SHAPES[shape_name]
    T, d, E, r = shape.num_tokens, shape.d_model, shape.num_experts, shape.rank
    leaves = [torch.empty(T, d, dtype=dtype), torch.empty(E, r, d, dtype=dtype),
              torch.empty(E, d, r, dtype=dtype), torch.empty(E, d, dtype=dtype)]
    for t in leaves:
        t.requires_grad_()
    return shape, leaves, torch.empty(T, d, dtype=dtype), torch.empty(T, d, dtype=dtype)


class _Floor(torch.autograd.Function):
    """A step's least host work: the forward allocates y, the backward the four weight
    and input gradients; no checks, no plans, no launches."""

    @staticmethod
    def forward(ctx, x, A, B, W, base):
        ctx.save_for_backward(x, A, B, W)
        return torch.empty_like(base)

    @staticmethod
    def backward(ctx, grad_y):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors) + (None,)


def host_floor_us(shape_name: str, repeats: int = 100, dtype=torch.bfloat16) -> float:
    """Host µs of the same step through `_Floor` instead of omoe_lora: what autograd and
    five allocations cost before any OMoE code (the median of `repeats` steps)."""
    _, leaves, base, grad_y = _host_leaves(shape_name, dtype)
    x = leaves[0]

    def step():
        _Floor.apply(x.reshape(x.shape), *leaves[1:], base).backward(grad_y)
        for t in leaves:
            t.grad = None

    for _ in range(10):
        step()
    return _median_us(step, repeats)


def host_step_us(shape_name: str, repeats: int = 100, dtype=torch.bfloat16) -> dict:
    """Host µs of one training step of the `triton` backend at a docs/contract.md §6
    shape (validation, custom op, autograd and launcher code up to Triton's
    JITFunction.run; stubbed_launches), of its forward and backward alone, and of the
    floor (host_floor_us): medians of `repeats` steps after a warm-up. Leaves
    are given no gradient between steps (an optimizer's zero_grad(set_to_none=True)), so
    no gradient accumulation enters the time."""
    from ..functional import omoe_lora

    shape, leaves, base, grad_y = _host_leaves(shape_name, dtype)
    x, A, B, W = leaves

    def forward():
        return omoe_lora(x, A, B, W, scaling=2.0, top_k=shape.top_k, base_out=base,
                         backend="triton")

    def backward(y, retain=False):
        y.backward(grad_y, retain_graph=retain)
        for t in leaves:
            t.grad = None

    def step():
        backward(forward())

    with stubbed_launches():
        for _ in range(10):
            step()
        step_us = _median_us(step, repeats)
        forward_us = _median_us(forward, repeats)
        y = forward()
        backward_us = _median_us(lambda: backward(y, retain=True), repeats)
    return dict(shape=shape_name, step_us=step_us, forward_us=forward_us,
                backward_us=backward_us, floor_us=host_floor_us(shape_name, repeats, dtype),
                repeats=repeats)


# glibc returns a freed block of 32 MiB or more to the OS and maps it again at the next
# allocation; a GPU's caching allocator does neither. These keep freed blocks for reuse,
# so that the host time has no mmap in it.
HOST_MALLOC_ENV = dict(MALLOC_MMAP_THRESHOLD_=str(1 << 34), MALLOC_TRIM_THRESHOLD_=str(1 << 34))
HOST_CHILD = "OMOE_HOST_TIME_CHILD"


def format_launches(steps: list[StepLaunches], num_tokens: int) -> str:
    lines = [f"Launches of one step, counted on CPU (T={num_tokens}; Triton interpreted, "
             "plus the ATen ops that would launch on a GPU)"]
    for s in steps:
        routing = "dense" if s.top_k is None else f"top-{s.top_k}"
        for label, launches in (("forward", s.forward), ("backward", s.backward),
                                ("no-grad forward", s.no_grad_forward)):
            lines.append(f"  {s.backend:7s} {routing:6s} {label:16s} {launches.summary()}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description="Count one OMoE step's kernel launches on CPU.")
    parser.add_argument("--backends", default="triton", help="comma-separated: triton, cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16,
                        help="rank of the single-adapter steps (E = 4; the counts do not "
                             "depend on it, the interpreter's time grows with (E·r)²)")
    parser.add_argument("--top-k", type=int, default=2, help="the top-k case (E = 4); dense always runs")
    parser.add_argument("--adapters", type=int, default=4,
                        help="also count a no-grad mixed batch of this many adapters (0: skip)")
    parser.add_argument("--json", help="write the counts here ('-': stdout, instead of the table)")
    parser.add_argument("--host", action="store_true",
                        help="instead: host µs per training step at each GPU shape, launches stubbed")
    parser.add_argument("--repeats", type=int, default=100, help="--host: steps timed per shape")
    args = parser.parse_args(argv)
    if args.host:
        return _host_main(args, argv)
    if "triton" in args.backends.split(",") and not triton_interpreting():
        # The variable must be set before triton is imported: rerun in a child process.
        import subprocess

        env = dict(os.environ, TRITON_INTERPRET="1")
        rest = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "omoe_kernels.tools.launch_count", *rest],
                              env=env).returncode
    steps = [step_launches(b, k, args.tokens, args.d_model, rank=args.rank)
             for b in args.backends.split(",") for k in (None, args.top_k)]
    mixed = [(b, k, mixed_launches(b, k, args.tokens, args.d_model, args.adapters))
             for b in args.backends.split(",") for k in (None, args.top_k) if args.adapters]
    data = dict(num_tokens=args.tokens, d_model=args.d_model,
                steps=[s.as_dict() for s in steps],
                mixed=[dict(backend=b, routing="dense" if k is None else f"top-{k}",
                            adapters=args.adapters, no_grad_forward=m.as_dict())
                       for b, k, m in mixed])
    if args.json == "-":
        print(json.dumps(data, indent=1))
        return 0
    print(format_launches(steps, args.tokens))
    for b, k, m in mixed:
        routing = "dense" if k is None else f"top-{k}"
        print(f"  {b:7s} {routing:6s} {f'mixed N={args.adapters}':16s} {m.summary()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    return 0


def _host_main(args, argv) -> int:
    import json
    import subprocess
    import sys

    if os.environ.get(HOST_CHILD) != "1":
        # A child with the compiled Triton path (no interpreter) and the allocator settings.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(HOST_MALLOC_ENV, **{HOST_CHILD: "1"})
        rest = sys.argv[1:] if argv is None else list(argv)
        return subprocess.run([sys.executable, "-m", "omoe_kernels.tools.launch_count", *rest],
                              env=env).returncode
    torch.set_num_threads(1)
    results = [host_step_us(name, args.repeats) for name in ("llama7b", "llama7b-top2", "wide")]
    print("Host time of one triton training step (bf16, launches stubbed: validation, custom op, "
          "autograd and launcher code; medians of %d steps, CPU time of the thread, 1 thread)" % args.repeats)
    for r in results:
        print(f"  {r['shape']:13s} host µs per step: {r['step_us']:.1f} "
              f"(forward {r['forward_us']:.1f}, backward {r['backward_us']:.1f}; "
              f"floor {r['floor_us']:.1f})")
    print("floor: the same step through an autograd.Function that only allocates y and "
          "the gradients")
    if args.json:
        text = json.dumps(dict(host=results), indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
