"""Several OMoE adapters in one batch: `omoe_lora_mixed` (docs/integration.md, "Serving
several adapters").

Every token carries an adapter index into stacked adapters (A [N, E, r, d_in], B [N, E,
d_out, r], router_weight [N, E, d_in]); -1 means "no adapter" (the token gets `base_out`,
or 0). The adapters share E, r and the routing options; each has its own scaling.

Backends:
- `reference`: the plain loop over adapters (the oracle, every dtype and autograd mode);
- `cpu`: grouped. One stable sort by adapter makes each adapter's tokens a segment
  (kept on the Grouping: once per batch of `adapter_names`). Inference (nothing to
  differentiate) is one compiled call, `omoe::mixed_forward` (csrc/omoe_mixed.cpp): in
  C++ it runs each non-empty segment through the single-adapter op's CPU routes (its
  shrink, then its per-token pass with the adapter's cached G or, for a few rows, y from
  the expert outputs) and writes the segment's rows of y; rows of no adapter keep
  base_out. With autograd recording, each non-empty segment is
  one compiled single-adapter call with its own backward, and one gather puts the rows
  back in order.
- `triton`: inference is three grouped launches per call, as the single-adapter
  forward, whatever N is (ops/triton/mixed_kernels.py). The tokens are sorted into
  segments once per Grouping, each adapter's segment padded to whole GEMM tiles; each
  tile reads its adapter's slice of the stacked weights, each token its adapter's G.
  With autograd recording there are no grouped backward kernels: each non-empty segment
  is one single-adapter triton call with its own backward, as on `cpu`, so a training
  step's launches grow with the adapters present in the batch.
- `cuda`: no grouped kernels; a mixed call raises an error that names the backends that
  take it.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ._validate import check_inputs
from .backends import REGISTRY, backend_function
from .functional import backend_key, resolved_backend
from .ops import mixed_compiled
from .ops.problem import Problem
from .options import check_finite
from .reference import omoe_lora_reference

NO_ADAPTER = -1
MIXED_BACKENDS = ("cpu", "reference", "triton")

TensorOrStack = Union[torch.Tensor, Sequence[torch.Tensor]]


def _unstack(name: str, t: TensorOrStack, ndim: int) -> tuple[torch.Tensor, ...]:
    """A stacked [N, ...] tensor or a sequence of N tensors -> N tensors (views, no copy)."""
    if isinstance(t, torch.Tensor):
        if t.dim() != ndim + 1:
            raise ValueError(f"`{name}` must be {ndim + 1}-D (N adapters stacked on dim 0), "
                             f"got shape {tuple(t.shape)}")
        parts = tuple(t.unbind(0))
    elif isinstance(t, (list, tuple)) and all(isinstance(p, torch.Tensor) for p in t):
        parts = tuple(t)
    else:
        raise TypeError(f"`{name}` must be a tensor with the adapters stacked on dim 0, or a "
                        f"list of tensors, got {type(t).__name__}")
    if not parts:
        raise ValueError(f"`{name}` must hold at least one adapter")
    return parts


def _scalings(scaling, count: int) -> tuple:
    if isinstance(scaling, (list, tuple)):
        if len(scaling) != count:
            raise ValueError(f"`scaling` must be one number or one per adapter ({count}), "
                             f"got {len(scaling)}")
        return tuple(scaling)
    return (scaling,) * count


def check_adapter_index(adapter_index, lead: tuple, count: int) -> tuple[torch.Tensor, int]:
    """adapter_index: integers in [-1, count), shaped like x's leading dims or [x.shape[0]]
    (one per sample). Returns (the index flattened to int64, the tokens each entry covers:
    1 per token, or the tokens of a sample)."""
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.is_floating_point() \
            or adapter_index.dtype in (torch.bool, torch.complex64, torch.complex128):
        raise TypeError("`adapter_index` must be an integer tensor (-1 = no adapter), got "
                        f"{type(adapter_index).__name__} "
                        f"{getattr(adapter_index, 'dtype', '')}".rstrip())
    shape = tuple(adapter_index.shape)
    span = 1
    if shape != lead:
        if not (len(shape) == 1 and lead and shape[0] == lead[0]):
            raise ValueError(f"`adapter_index` must have shape {lead} (x's leading dims) or "
                             f"({lead[0] if lead else 1},) (one per sample), got {shape}")
        span = math.prod(lead[1:])
    flat = adapter_index.reshape(-1).to(torch.int64)
    if flat.numel():
        low, high = (int(v) for v in torch.aminmax(flat))
        if low < NO_ADAPTER or high >= count:
            raise ValueError(f"`adapter_index` must hold values in [-1, {count}) (-1 = no "
                             f"adapter; {count} adapters), got values in [{low}, {high}]")
    return flat, span


@dataclass(frozen=True)
class Grouping:
    """An adapter index sorted once: `omoe_lora_mixed` makes it per call, a batch of
    `adapter_names` once per batch (for every layer)."""

    index: torch.Tensor           # [S] int64 in [-1, N)
    sizes: tuple[int, ...]        # entries of [no adapter, adapter 0, ..., adapter N-1]
    order: Optional[torch.Tensor]    # stable sort by adapter; None: all in one group
    inverse: Optional[torch.Tensor]  # order's inverse permutation
    # the triton backend's segment rows, by (span, segment length): made once per batch
    segments: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # what the checks of a call with this Grouping found, by the call's signature
    # (_signature): a layer calls with the same one for every token of a batch
    checked: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)


def group(index: torch.Tensor, count: int) -> Grouping:
    """The Grouping of a checked int64 index (values in [-1, count))."""
    sizes = tuple(torch.bincount(index + 1, minlength=count + 1).tolist())
    if max(sizes) == index.numel():
        return Grouping(index, sizes, None, None)
    order = torch.argsort(index, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return Grouping(index, sizes, order, inverse)


def omoe_lora_mixed(x: torch.Tensor, A: TensorOrStack, B: TensorOrStack,
                    router_weight: TensorOrStack, adapter_index, *,
                    scaling: Union[float, Sequence[float]] = 1.0, top_k: Optional[int] = None,
                    orthogonalize: bool = True, normalize: bool = True, eps: float = 1e-6,
                    base_out: Optional[torch.Tensor] = None,
                    router_input: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> torch.Tensor:
    """`omoe_lora` with N adapters in one batch, each token running its own.

    x: [..., d_in]; A: [N, E, r, d_in]; B: [N, E, d_out, r]; router_weight: [N, E, d_in]
    (stacked, or lists of N per-adapter tensors); adapter_index: x's leading dims or one
    per sample ([x.shape[0]]), values in [-1, N), -1 = no adapter (or a `Grouping` of a
    per-sample index); scaling: one number or one per adapter. Token t gets `omoe_lora`
    of adapter adapter_index[t] alone; a token with no adapter gets base_out (or 0).
    Lists of tensors that live across calls (a layer's parameters) let the `cpu` backend
    keep each B's Gram matrix between calls; the views of a stacked tensor are new at
    every call. The `triton` backend reads stacked tensors in place and stacks lists of
    parameters once (kept while they and their versions stay the same).
    """
    As, Bs, Ws = _unstack("A", A, 3), _unstack("B", B, 3), _unstack("router_weight", router_weight, 2)
    found = signature = None
    if isinstance(adapter_index, Grouping) and not torch.compiler.is_compiling():
        signature = _signature(x, As, Bs, Ws, scaling, top_k, orthogonalize, normalize, eps,
                               base_out, router_input, backend)
        try:
            found = adapter_index.checked.get(signature)
        except TypeError:  # an option that does not hash: the checks say what is wrong
            signature = None
    if found is None:
        found = _checked(x, As, Bs, Ws, adapter_index, scaling, top_k, orthogonalize,
                         normalize, eps, base_out, router_input, backend)
        if signature is not None and all(p.scaling != 0 for p in found[0]):
            adapter_index.checked[signature] = found   # ±0 compare equal: not kept
    problems, grouping, span, name = found
    first = problems[0]
    T, d_in, d_out = first.num_tokens, first.d_in, first.d_out
    lead = tuple(x.shape[:-1])
    x2d = x.reshape(T, d_in)
    router2d = None if router_input is None else router_input.reshape(T, d_in)
    base2d = None if base_out is None else base_out.reshape(T, d_out)
    if name == "triton" and T:
        y = mixed_triton(x2d, A, B, router_weight, router2d, base2d, grouping, span,
                         tuple(p.scaling for p in problems), problems)
    elif name == "reference" or T == 0:
        y = mixed_reference(x2d, As, Bs, Ws, router2d, base2d,
                            grouping.index.repeat_interleave(span), problems)
    else:
        y = mixed_grouped(x2d, As, Bs, Ws, router2d, base2d, grouping, span, problems)
    return y.reshape(lead + (d_out,))


def _signature(x, As, Bs, Ws, scaling, top_k, orthogonalize, normalize, eps, base_out,
               router_input, backend) -> tuple:
    """Everything `_checked` reads of a call, data left out: the tensors' types, shapes,
    dtypes and devices, the options with their types, and what resolving the backend
    reads (resolved_backend's key)."""
    def tensor(t):
        return None if t is None else (type(t), t.shape, t.dtype, t.device)

    scalings = tuple((type(s), s) for s in scaling) if isinstance(scaling, (list, tuple)) \
        else (type(scaling), scaling)
    return (tuple(map(tensor, As)), tuple(map(tensor, Bs)), tuple(map(tensor, Ws)), tensor(x),
           tensor(base_out), tensor(router_input), scalings, type(top_k), top_k,
           type(orthogonalize), orthogonalize, type(normalize), normalize, type(eps), eps,
           backend, backend_key(backend))


def _checked(x, As, Bs, Ws, adapter_index, scaling, top_k, orthogonalize, normalize, eps,
             base_out, router_input, backend) -> tuple:
    """(each adapter's Problem, the Grouping, the tokens per index entry, the backend's
    name) of a mixed call; every check of its arguments, raising what is wrong."""
    count = len(As)
    if len(Bs) != count or len(Ws) != count:
        raise ValueError(f"`A`, `B` and `router_weight` must hold the same number of adapters, "
                         f"got {count}, {len(Bs)} and {len(Ws)}")
    scalings = _scalings(scaling, count)
    problems = [check_inputs(x, As[0], Bs[0], Ws[0], scaling=scalings[0], top_k=top_k,
                             orthogonalize=orthogonalize, normalize=normalize, eps=eps,
                             base_out=base_out, router_input=router_input)]
    for n in range(1, count):
        if _like_first(x, As, Bs, Ws, n):  # adapter 0's checks hold: only scaling differs
            problems.append(_with_scaling(problems[0], scalings[n]))
        else:
            problems.append(check_inputs(x, As[n], Bs[n], Ws[n], scaling=scalings[n],
                                         top_k=top_k, orthogonalize=orthogonalize,
                                         normalize=normalize, eps=eps, base_out=base_out,
                                         router_input=router_input))
    first = problems[0]
    for n, p in enumerate(problems[1:], 1):
        if (p.num_experts, p.rank, p.d_out) != (first.num_experts, first.rank, first.d_out):
            raise ValueError(f"adapter {n} has (E, r, d_out) = {(p.num_experts, p.rank, p.d_out)}"
                             f" but adapter 0 has {(first.num_experts, first.rank, first.d_out)}:"
                             " a mixed batch needs adapters of the same shape")
    lead = tuple(x.shape[:-1])
    if isinstance(adapter_index, Grouping):
        grouping = adapter_index
        if len(grouping.sizes) != count + 1 or not lead or grouping.index.numel() != lead[0]:
            raise ValueError(f"the Grouping covers {grouping.index.numel()} samples of "
                             f"{len(grouping.sizes) - 1} adapters; x has leading dims {lead} "
                             f"and there are {count} adapters")
        span = math.prod(lead[1:])
    else:
        index, span = check_adapter_index(adapter_index, lead, count)
        grouping = group(index, count)
    name = resolve_mixed_backend(backend, x.device, first.top_k)
    return problems, grouping, span, name


def _like_first(x, As, Bs, Ws, n: int) -> bool:
    """Whether adapter n's tensors have adapter 0's shapes, x's dtype and x's device."""
    a, b, w = As[n], Bs[n], Ws[n]
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and isinstance(w, torch.Tensor) and a.shape == As[0].shape
            and b.shape == Bs[0].shape and w.shape == Ws[0].shape
            and a.dtype == b.dtype == w.dtype == x.dtype
            and a.device == b.device == w.device == x.device)


_SCALED: dict = {}


def _with_scaling(p: Problem, scaling) -> Problem:
    """p with another adapter's scaling, checked as `check_inputs` checks it (kept: a
    layer's scalings are fixed; ±0 are not kept, they compare equal)."""
    key = (p, type(scaling), scaling)
    found = _SCALED.get(key) if not torch.compiler.is_compiling() else None
    if found is None:
        found = dataclasses.replace(p, scaling=check_finite("scaling", scaling))
        if found.scaling != 0 and not torch.compiler.is_compiling():
            if len(_SCALED) > 4096:
                _SCALED.clear()
            _SCALED[key] = found
    return found


def resolve_mixed_backend(backend: str, device: torch.device, active_experts: int) -> str:
    """The backend of a mixed call: one of MIXED_BACKENDS; ValueError for one without
    grouped kernels (no silent per-adapter loop on a GPU backend)."""
    named = backend in REGISTRY
    name = backend if named else resolved_backend(backend, device, active_experts)[0]
    if name not in MIXED_BACKENDS:
        raise ValueError(f"backend {name!r} has no kernels for a batch of several adapters; "
                         f"mixed batches run on {list(MIXED_BACKENDS)} (`cpu` for CPU tensors, "
                         "`triton` for CUDA ones, `reference` anywhere): pass one of those")
    # A name resolved from "auto" can run here; a name given must still be checked.
    return resolved_backend(name, device, active_experts)[0] if named else name


_SEGMENTS: dict[tuple[Problem, int], Problem] = {}


def _segment_problem(p: Problem, tokens: int) -> Problem:
    """p for `tokens` tokens (kept: a layer asks for the same few every call)."""
    found = _SEGMENTS.get((p, tokens))
    if found is None:
        if len(_SEGMENTS) > 4096:
            _SEGMENTS.clear()
        found = _SEGMENTS[p, tokens] = dataclasses.replace(p, num_tokens=tokens)
    return found


_STACKS: dict = {}
_SCALES: dict = {}


def _stacked(t: TensorOrStack) -> torch.Tensor:
    """A stacked [N, ...] weight as it is, or a list of per-adapter tensors stacked: once
    for parameters (kept while they stay the same objects at the same version), at every
    call for other tensors (a cast made per call would only fill the cache)."""
    if isinstance(t, torch.Tensor):
        return t
    parts = tuple(t)
    if not all(isinstance(p, torch.nn.Parameter) for p in parts):
        with torch.no_grad():
            return torch.stack(parts)
    key = tuple(map(id, parts))
    versions = tuple(p._version for p in parts)
    found = _STACKS.get(key)
    if found is None or found[1] != versions or any(r() is not p for r, p in zip(found[0], parts)):
        if len(_STACKS) > 256:
            _STACKS.clear()
        with torch.no_grad():   # weak references: a removed adapter's parameters are freed
            found = _STACKS[key] = (tuple(map(weakref.ref, parts)), versions, torch.stack(parts))
    return found[2]


def _scale_tensor(scalings: tuple, device: torch.device) -> torch.Tensor:
    """The adapters' scalings as a float32 tensor on `device` (kept: a layer's are fixed)."""
    key = (tuple(float(s) for s in scalings), device)
    found = _SCALES.get(key)
    if found is None:
        if len(_SCALES) > 256:
            _SCALES.clear()
        found = _SCALES[key] = torch.tensor(key[0], dtype=torch.float32, device=device)
    return found


def mixed_triton(x, A, B, W, router_input, base_out, grouping: Grouping, span: int, scalings,
                 problems) -> torch.Tensor:
    """The grouped Triton forward (ops/triton/mixed_launch.py): three launches. With
    autograd recording, one single-adapter triton call per segment (mixed_grouped)."""
    from .ops.triton import launch as triton_launch
    from .ops.triton import mixed_launch

    As, Bs, Ws = map(_listed, (A, B, W))
    if _needs_grad(x, router_input, base_out, As, Bs, Ws):
        return mixed_grouped(x, As, Bs, Ws, router_input, base_out, grouping, span, problems,
                             backend="triton")
    A, B, W = _stacked(A), _stacked(B), _stacked(W)
    p = problems[0]
    L = triton_launch.layout(p.num_experts, p.rank)
    target = triton_launch.Target.of(x.device)
    seg = mixed_launch.segment_length(triton_launch.dot_kind(x.dtype, x.device.type), L.ERP,
                                      target)
    segments = grouping.segments.get((span, seg))
    if segments is None:
        segments = grouping.segments[span, seg] = mixed_launch.segment_rows(
            grouping.sizes, grouping.order, span, seg, x.device)
    scales = _scale_tensor(scalings, x.device)

    def run():
        return mixed_launch.mixed_forward(x, A, B, W, router_input, base_out, scales, segments,
                                          p.top_k, p.orthogonalize, p.normalize, p.eps)

    return run()


def mixed_reference(x, As, Bs, Ws, router_input, base_out, index, problems) -> torch.Tensor:
    """The oracle: each adapter's tokens through the reference backend, one adapter at a time."""
    T, d_out = x.shape[0], problems[0].d_out
    y = base_out if base_out is not None else x.new_zeros((T, d_out))
    for n, p in enumerate(problems):
        rows = (index == n).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        part = omoe_lora_reference(
            x.index_select(0, rows), As[n], Bs[n], Ws[n],
            None if router_input is None else router_input.index_select(0, rows),
            None if base_out is None else base_out.index_select(0, rows),
            _segment_problem(p, rows.numel()))
        y = y.index_copy(0, rows, part)
    return y


def _needs_grad(x, router_input, base_out, As, Bs, Ws) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, router_input, base_out, *As, *Bs, *Ws))


def _listed(t: TensorOrStack) -> Sequence[torch.Tensor]:
    """A stacked [N, ...] weight as its N views (autograd flows to the stack), or the list."""
    return t.unbind(0) if isinstance(t, torch.Tensor) else t


def _token_rows(grouping: Grouping, span: int) -> tuple[torch.Tensor, list[int]]:
    """The token rows of x adapter by adapter (the "no adapter" entries left out) and
    where each adapter's rows start, then the end: omoe::mixed_forward's rows and offsets
    (kept on the Grouping, made once per batch)."""
    found = grouping.segments.get(("cpu", span))
    if found is None:
        order = grouping.order[grouping.sizes[0]:]
        rows = (order.unsqueeze(1) * span
                + torch.arange(span, device=order.device)).reshape(-1)
        offsets = [0]
        for size in grouping.sizes[1:]:
            offsets.append(offsets[-1] + size * span)
        found = grouping.segments["cpu", span] = (rows, offsets)
    return found


def mixed_grouped(x, As, Bs, Ws, router_input, base_out, grouping: Grouping, span: int,
                  problems, backend: str = "cpu") -> torch.Tensor:
    """Entry i of the index covers tokens [i·span, (i+1)·span): a per-sample index moves
    whole samples. With nothing to differentiate (`cpu`), one `omoe::mixed_forward` call
    serves every adapter segment; with autograd recording, one single-adapter call of
    `backend` per non-empty segment of the sorted rows, gathered back (each with its own
    backward)."""
    T, d_out, count = x.shape[0], problems[0].d_out, len(problems)
    sizes, order = grouping.sizes, grouping.order
    if order is None:  # one group: no permutation
        n = next(i for i, size in enumerate(sizes) if size) - 1
        if n == NO_ADAPTER:
            return base_out if base_out is not None else x.new_zeros((T, d_out))
        return backend_function(backend)(x, As[n], Bs[n], Ws[n], router_input, base_out,
                                          problems[n])
    if backend == "cpu" and not _needs_grad(x, router_input, base_out, As, Bs, Ws) \
            and mixed_compiled.LOADED \
            and torch._C._functorch.peek_interpreter_stack() is None \
            and torch.autograd.forward_ad._current_level < 0:
        token_rows, offsets = _token_rows(grouping, span)
        p = problems[0]
        args = (x, As, Bs, Ws, router_input, base_out, token_rows, offsets,
                [q.scaling for q in problems], p.top_k, p.orthogonalize, p.normalize, p.eps)
        if torch.compiler.is_compiling():
            return mixed_compiled.MIXED_FORWARD(*args)
        with torch._C._AutoDispatchBelowAutograd():  # nothing to differentiate: no graph
            return mixed_compiled.MIXED_FORWARD(*args)
    rows = order.numel()
    function = backend_function(backend)

    def gather(t, index):  # rows of `span` tokens each
        return t.reshape(rows, -1).index_select(0, index).reshape(T, -1)

    xs = gather(x, order)
    rs = None if router_input is None else gather(router_input, order)
    bs = None if base_out is None else gather(base_out, order)
    pieces, start = [], 0
    for n in range(NO_ADAPTER, count):
        size = sizes[n + 1] * span
        if size == 0:
            continue
        end = start + size
        base_seg = None if bs is None else bs[start:end]
        if n == NO_ADAPTER:
            pieces.append(base_seg if base_seg is not None else x.new_zeros((size, d_out)))
        else:
            pieces.append(function(xs[start:end], As[n], Bs[n], Ws[n],
                                   None if rs is None else rs[start:end], base_seg,
                                   _segment_problem(problems[n], size)))
        start = end
    return gather(torch.cat(pieces), grouping.inverse)
