"""The training step in a CUDA graph: one replay launches the whole step's kernels, with
no host work between them (no validation, custom-op dispatch, autograd or launcher code).

    step = lambda: layer(x).backward(grad_y)     # static inputs, read in place
    replay = graphed_step(step, leaves=[x, *layer.parameters()])
    replay()                                     # the step again; grads in leaf.grad

What capture needs of the `triton` backend, and why it holds:
- no host synchronisation in the step (python_tests/test_host_path.py proves it);
- launch configs fixed before capture: the warm-up runs on a side stream first, which
  autotunes once per launch signature; later launches go straight to the chosen config
  (ops/triton/tuned.py), so capture records no benchmarking;
- static tensors: the captured kernels read the inputs' and write the outputs' memory in
  place, so new data is copied into the same tensors (`x.copy_(batch)`) before a replay;
  the gradients come out in the `.grad` tensors allocated during capture (leaves are
  given no gradient before capture, so a replay writes rather than accumulates).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def graphed_step(step: Callable[[], object], leaves: Sequence[torch.Tensor],
                 warmup: int = 3) -> Callable[[], None]:
    """Captures `step` (forward + backward on CUDA tensors) into a CUDA graph after
    `warmup` eager calls on a side stream; returns a function that replays it."""
    if not torch.cuda.is_available():
        raise RuntimeError("graphed_step needs a CUDA device (CUDA graphs)")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for t in leaves:
                t.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay
