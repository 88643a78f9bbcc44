"""One op glue for both op families: `omoe::` (compiled, csrc/) and `omoe_triton::` (Triton).

Both families have the same two ops with the same schema (`FORWARD_SCHEMA`,
`BACKWARD_SCHEMA`): the forward returns `(y, h, logits)`, and `h` and `logits`
(accumulator dtype: float32, or float64 for float64 inputs) are all it saves for the
backward besides its inputs. A family with `saves_gram` (Triton) extends both by one
tensor (`GRAM_FORWARD_SCHEMA`, `GRAM_BACKWARD_SCHEMA`): the forward also returns the
`G = B_catᵀB_cat` it formed (float64 [ERP, ERP]; empty without orthogonalization), and
the backward takes it as an optional last argument, so that it does not form G again.
`register_family` gives a family, in one place:

- fake (meta) kernels that run the same checks as the real ones, with the same message
  (`check_forward_args` / `check_backward_args` mirror `check_common` in csrc/omoe_ops.cpp;
  the Triton ops call them before launching), and describe the real outputs' strides
  (every output is a fresh contiguous tensor);
- autograd, which refuses a backward with `create_graph=True` (double backward is not
  implemented by the fused backends: its result would be silently wrong).

`call_forward` is what a backend runs: it refuses forward-mode AD and the `torch.func`
transforms (whose derivative would be zero or missing) before calling the op.
Both refusals name the `reference` backend as the way out (docs/contract.md §4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .problem import Problem

FORWARD_SCHEMA = (
    "(Tensor x, Tensor A, Tensor B, Tensor router_weight, Tensor? router_input, "
    "Tensor? base_out, float scaling, int top_k, bool orthogonalize, bool normalize, "
    "float eps) -> (Tensor y, Tensor h, Tensor logits)"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor router_weight, "
    "Tensor? router_input, Tensor h, Tensor logits, float scaling, int top_k, "
    "bool orthogonalize, bool normalize, float eps) -> (Tensor grad_x, Tensor grad_A, "
    "Tensor grad_B, Tensor grad_router_weight, Tensor grad_router_input)"
)
GRAM_FORWARD_SCHEMA = FORWARD_SCHEMA.replace("Tensor logits)", "Tensor logits, Tensor gram)")
GRAM_BACKWARD_SCHEMA = BACKWARD_SCHEMA.replace("float eps)", "float eps, Tensor? gram=None)")


@dataclass(frozen=True)
class OpFamily:
    """What differs between the two op families; everything else is shared."""

    namespace: str                      # "omoe" or "omoe_triton"
    backends: str                       # how messages name the backends, e.g. "'cpu'/'cuda'"
    hidden_width: Callable[[int, int], int]   # columns of the saved h, from (E, r)
    # device type -> the most active experts min(top_k, E) its kernels take; None: any
    max_active_experts: Optional[Callable[[str], int]] = None
    kernels: str = "compiled"           # how messages name the kernels ("compiled", "Triton")
    # the forward also returns G ([width, width] float64, width = hidden_width) and the
    # backward takes it (GRAM_*_SCHEMA)
    saves_gram: bool = False

    @property
    def schemas(self) -> tuple[str, str]:
        """(forward, backward) schema of the family's ops."""
        if self.saves_gram:
            return GRAM_FORWARD_SCHEMA, GRAM_BACKWARD_SCHEMA
        return FORWARD_SCHEMA, BACKWARD_SCHEMA

    def op(self, name: str) -> torch._ops.OpOverload:
        key = (self.namespace, name)
        found = _OPS.get(key)
        if found is None:  # torch.ops attribute lookups cost microseconds: once per op
            found = _OPS[key] = getattr(getattr(torch.ops, self.namespace), name).default
        return found


_OPS: dict[tuple[str, str], torch._ops.OpOverload] = {}


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of h, logits and the per-token algebra's inputs for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------
# Checks of the raw ops (omoe_lora has checked its arguments before it gets here, in _validate.py).

# c10's names for dtypes, so that a fake kernel's message is the C++ kernel's, word for word.
_C10_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def _format(part) -> str:
    """A message part as a C++ ostream prints it: sizes of a tensor, c10's dtype name, %g."""
    if isinstance(part, torch.Tensor):
        return str(list(part.shape))
    if isinstance(part, torch.dtype):
        return _C10_NAMES.get(part, str(part))
    if isinstance(part, float):
        return f"{part:g}"
    return str(part)


def _require(ok: bool, ns: str, *message) -> None:
    """Raises RuntimeError("ns: message") unless ok; the parts are formatted only then."""
    if not ok:
        raise RuntimeError(f"{ns}: " + "".join(_format(m) for m in message))


def _check_common(family: OpFamily, x, A, B, router_weight, router_input, top_k, eps, scaling):
    """check_common in csrc/omoe_ops.cpp, in the same order; returns (T, d_in, d_out, E, r)."""
    ns = family.namespace
    _require(x.dtype.is_floating_point, ns, "x must be a floating tensor, got ", x.dtype)
    _require(x.dim() == 2, ns, "x must be 2-D [T, d_in], got ", x)
    _require(A.dim() == 3, ns, "A must be 3-D [E, r, d_in], got ", A)
    _require(B.dim() == 3, ns, "B must be 3-D [E, d_out, r], got ", B)
    _require(router_weight.dim() == 2, ns, "router_weight must be 2-D [E, d_in], got ",
             router_weight)
    T, d_in = x.shape
    E, r = A.shape[0], A.shape[1]
    d_out = B.shape[1]
    _require(E >= 1, ns, "A must hold at least one expert, got E=", E)
    _require(r >= 1, ns, "A must have rank >= 1, got ", r)
    _require(d_out >= 1, ns, "B must have d_out >= 1")
    _require(A.shape[2] == d_in, ns, "A is [E, r, d_in] with d_in=", A.shape[2],
             " but x has d_in=", d_in)
    _require(B.shape[0] == E and B.shape[2] == r, ns, "B must be [E, d_out, r] = [", E,
             ", d_out, ", r, "], got ", B)
    _require(tuple(router_weight.shape) == (E, d_in), ns, "router_weight must be [E, d_in] = [",
             E, ", ", d_in, "], got ", router_weight)
    _require(1 <= top_k <= E, ns, "top_k must be in [1, E=", E, "], got ", top_k)
    if family.max_active_experts is not None:
        device_type = x.device.type
        limit, k = family.max_active_experts(device_type), min(top_k, E)
        _require(k <= limit, ns, "the ", family.kernels, " ops on ", device_type,
                 " take at most ", limit, " active experts (min(top_k, E)), got ", k,
                 "; use backend='reference' or a smaller top_k")
    _require(eps > 0.0 and math.isfinite(eps), ns, "eps must be finite and > 0, got ", eps)
    same = [(A, "A"), (B, "B"), (router_weight, "router_weight")]
    if router_input is not None:
        _require(router_input.dim() == 2 and tuple(router_input.shape) == (T, d_in), ns,
                 "router_input must be [T, d_in] = [", T, ", ", d_in, "], got ",
                 router_input)
        same.append((router_input, "router_input"))
    for t, name in same:
        _require(t.dtype == x.dtype, ns, name, " has dtype ", t.dtype, " but x has ",
                 x.dtype)
        _require(t.device == x.device, ns, name, " is on ", t.device, " but x is on ", x.device)
    _require(math.isfinite(scaling), ns, "scaling must be finite, got ", scaling)
    return T, d_in, d_out, E, r


def check_forward_args(family: OpFamily, x: Tensor, A: Tensor, B: Tensor, router_weight: Tensor,
                       router_input: Optional[Tensor], base_out: Optional[Tensor],
                       scaling: float, top_k: int, eps: float) -> tuple[int, int, int, int, int]:
    """The forward op's checks (message for message those of csrc/omoe_ops.cpp)."""
    T, d_in, d_out, E, r = _check_common(family, x, A, B, router_weight, router_input, top_k,
                                         eps, scaling)
    if base_out is not None:
        ns = family.namespace
        _require(base_out.dim() == 2 and tuple(base_out.shape) == (T, d_out), ns,
                 "base_out must be [T, d_out] = [", T, ", ", d_out, "], got ", base_out)
        _require(base_out.dtype == x.dtype and base_out.device == x.device, ns,
                 "base_out must match x's dtype and device")
    return T, d_in, d_out, E, r


def check_backward_args(family: OpFamily, grad_y: Tensor, x: Tensor, A: Tensor, B: Tensor,
                        router_weight: Tensor, router_input: Optional[Tensor], h: Tensor,
                        logits: Tensor, scaling: float, top_k: int, eps: float,
                        gram: Optional[Tensor] = None,
                        orthogonalize: bool = False) -> tuple[int, int, int, int, int]:
    """The backward op's checks: the forward's, plus the saved h and logits, grad_y, and
    (orthogonalized) the forward's G where one is given."""
    ns = family.namespace
    T, d_in, d_out, E, r = _check_common(family, x, A, B, router_weight, router_input, top_k,
                                         eps, scaling)
    acc = accumulate_dtype(x.dtype)
    width = family.hidden_width(E, r)
    _require(grad_y.dim() == 2 and tuple(grad_y.shape) == (T, d_out), ns,
             "grad_y must be [T, d_out] = [", T, ", ", d_out, "], got ", grad_y)
    _require(h.dim() == 2 and tuple(h.shape) == (T, width) and h.dtype == acc, ns,
             "h must be [T, E*r] = [", T, ", ", width, "] of ", acc, ", got ",
             h, " of ", h.dtype)
    _require(logits.dim() == 2 and tuple(logits.shape) == (T, E) and logits.dtype == acc, ns,
             "logits must be [T, E] = [", T, ", ", E, "] of ", acc, ", got ",
             logits, " of ", logits.dtype)
    for t in (grad_y, h, logits):
        _require(t.device == x.device, ns, "backward tensors must be on x's device")
    _require(grad_y.dtype.is_floating_point, ns, "grad_y must be floating")
    if gram is not None and orthogonalize:
        _require(gram.dim() == 2 and tuple(gram.shape) == (width, width)
                 and gram.dtype == torch.float64 and gram.device == x.device, ns,
                 "gram must be the forward's G, [", width, ", ", width, "] of Double on x's "
                 "device, got ", gram, " of ", gram.dtype)
    return T, d_in, d_out, E, r


# ---------------------------------------------------------------------------------------
# Autograd modes the fused backends do not implement.


def _unsupported(family: OpFamily, what: str) -> RuntimeError:
    return RuntimeError(
        f"omoe_lora: {what} is not implemented by the {family.backends} backend; its "
        "result would be wrong, so it is refused. Use backend='reference' (eager PyTorch, "
        "every autograd mode) for this computation."
    )


def _functorch_transforms() -> list[str]:
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return [str(i.key()).split(".")[-1] for i in retrieve_all_functorch_interpreters()]


def check_autograd_mode(family: OpFamily, tensors: Sequence[Optional[Tensor]]) -> None:
    """Refuses forward-mode AD and torch.func's grad/jvp transforms, which the registered
    autograd cannot serve (they would give a zero or missing derivative)."""
    if torch.compiler.is_compiling():
        return  # dynamo inlines this; neither mode reaches a compiled graph through it
    # peek is the cheap test (no transform active: None); vmap alone is fine (it loops).
    transforms = ([t for t in _functorch_transforms() if t in ("Grad", "Jvp")]
                  if torch._C._functorch.peek_interpreter_stack() is not None else [])
    if transforms:
        raise _unsupported(
            family, "a torch.func transform that differentiates (grad, vjp, jvp, jacrev, "
                    f"jacfwd, hessian; active here: {transforms[0].lower()})")
    if torch.autograd.forward_ad._current_level >= 0:
        for t in tensors:
            if t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None:
                raise _unsupported(family, "forward-mode AD (torch.autograd.forward_ad)")


# ---------------------------------------------------------------------------------------
# Registration.


def save_context(ctx, tensors: tuple, options: tuple, h: Tensor, logits: Tensor,
                 gram: Optional[Tensor] = None) -> None:
    """What the backward op needs, kept on an autograd ctx: tensors = (x, A, B,
    router_weight, router_input, base_out), options = (scaling, top_k, orthogonalize,
    normalize, eps), and a saves_gram family's G."""
    x, A, B, router_weight, router_input, base_out = tensors
    ctx.save_for_backward(x, A, B, router_weight, router_input, h, logits, gram)
    ctx.options = tuple(options)
    ctx.has_base = base_out is not None


def tensor_grads(family: OpFamily, ctx, grad_y: Optional[Tensor],
                 backward: Optional[Callable] = None) -> tuple:
    """The gradients of (x, A, B, router_weight, router_input, base_out) from grad_y, by
    `family`'s backward op (or `backward`, its impl with the same arguments): the
    backward of every autograd path to the ops."""
    if torch.is_grad_enabled():  # the autograd engine enables grad only for create_graph=True
        raise _unsupported(family, "double backward (a backward with create_graph=True, "
                                   "e.g. a gradient penalty)")
    if grad_y is None:   # unmaterialized: nothing flowed into y
        return (None,) * 6
    x, A, B, router_weight, router_input, h, logits, gram = ctx.saved_tensors
    extra = dict(gram=gram) if family.saves_gram else {}
    # base_out's gradient is grad_y itself: the contiguous one, so that a strided grad_y
    # (sum()'s expanded ones) is not copied again by the base's backward.
    grad_y = grad_y.contiguous()
    grad_x, grad_A, grad_B, grad_W, grad_router_input = (backward or family.op("backward"))(
        grad_y, x, A, B, router_weight, router_input, h, logits, *ctx.options, **extra)
    return (grad_x, grad_A, grad_B, grad_W,
            grad_router_input if router_input is not None else None,
            grad_y if ctx.has_base else None)


def register_family(family: OpFamily) -> None:
    """Registers the fake kernels and the autograd of `family`'s forward and backward ops."""
    forward_op, backward_op = family.op("forward"), family.op("backward")

    def forward_fake(x, A, B, router_weight, router_input, base_out, scaling, top_k,
                     orthogonalize, normalize, eps):
        T, _, d_out, E, r = check_forward_args(family, x, A, B, router_weight, router_input,
                                               base_out, scaling, top_k, eps)
        acc = accumulate_dtype(x.dtype)
        width = family.hidden_width(E, r)
        outputs = (x.new_empty((T, d_out)), x.new_empty((T, width), dtype=acc),
                   x.new_empty((T, E), dtype=acc))
        if family.saves_gram:
            gram = (width, width) if orthogonalize else (0,)
            outputs += (x.new_empty(gram, dtype=torch.float64),)
        return outputs

    def backward_fake(grad_y, x, A, B, router_weight, router_input, h, logits, scaling, top_k,
                      orthogonalize, normalize, eps, gram=None):
        check_backward_args(family, grad_y, x, A, B, router_weight, router_input, h, logits,
                            scaling, top_k, eps, gram, orthogonalize)
        # Fresh contiguous tensors, as the real kernels return, whatever the inputs' strides.
        grad_router_input = (x.new_empty(router_input.shape) if router_input is not None
                             else x.new_empty((0,)))
        return (x.new_empty(x.shape), x.new_empty(A.shape), x.new_empty(B.shape),
                x.new_empty(router_weight.shape), grad_router_input)

    def setup_context(ctx, inputs, output):
        _, h, logits, *gram = output
        save_context(ctx, inputs[:6], inputs[6:], h, logits, *gram)
        ctx.mark_non_differentiable(*output[1:])
        # h, logits (and G) get no gradient: without this autograd would fill zero tensors
        # for them (launches per backward on a GPU).
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_y, *_grad_saved):
        return tensor_grads(family, ctx, grad_y) + (None,) * 5   # the five options

    torch.library.register_fake(forward_op)(forward_fake)
    torch.library.register_fake(backward_op)(backward_fake)
    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def call_forward(family: OpFamily, x: Tensor, A: Tensor, B: Tensor, router_weight: Tensor,
                 router_input: Optional[Tensor], base_out: Optional[Tensor],
                 problem: Problem) -> Tensor:
    """A backend's body: `family`'s forward op on x: [T, d_in]; returns y."""
    check_autograd_mode(family, (x, A, B, router_weight, router_input, base_out))
    return family.op("forward")(
        x, A, B, router_weight, router_input, base_out, problem.scaling, problem.top_k,
        problem.orthogonalize, problem.normalize, problem.eps)[0]
