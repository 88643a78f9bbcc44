"""Fake kernels and the op schema (docs/contract.md §4: no silent wrong answers from the op layer).

The compiled (`omoe::`) and Triton (`omoe_triton::`) ops each have a fake kernel, which
torch.compile traces instead of the real one. Here the fake kernels run the same argument
checks as the real kernels (same first line of the error) and describe the real outputs'
shapes, dtypes and strides for any input layout (opcheck; a fullgraph compile whose
inductor asserts the strides at run time); both families share one schema; and a Triton
op refuses a too-short `router_weight` before launching rather than reading past its end.
The Triton kernels' share runs under the interpreter (test_triton.py starts that session).
"""
from __future__ import annotations

import pytest
import torch

from helpers import COMPILED_BACKENDS, DEVICE, make_problem, random_grad, run_backend
from omoe_kernels import omoe_lora
from omoe_kernels.ops import compiled
from omoe_kernels.ops.triton import launch as triton_ops

needs_compiled = pytest.mark.skipif(not COMPILED_BACKENDS,
                                    reason=f"no compiled backend on {DEVICE.type}")
BACKEND = COMPILED_BACKENDS[0] if COMPILED_BACKENDS else "reference"
NAN = float("nan")


# ---- fake kernels: the same checks and the real strides ---------------------------------

FAMILIES = [pytest.param(compiled.FAMILY, marks=pytest.mark.skipif(
                not compiled.has_kernels("cpu"), reason="compiled extension not built for CPU")),
            pytest.param(triton_ops.FAMILY, marks=pytest.mark.skipif(
                not triton_ops.AVAILABLE, reason="triton not importable"))]


def _valid_forward_args(device="cpu"):
    p = make_problem(4, 5, 6, 3, 2, dtype=torch.float32, seed=6, device=device,
                     with_router_input=True)
    return dict(x=p.x, A=p.A, B=p.B, router_weight=p.router_weight, router_input=p.router_input,
                base_out=p.base_out, scaling=0.5, top_k=2, orthogonalize=True, normalize=True,
                eps=1e-6)


BAD_FORWARD = {
    "x_1d": lambda a: dict(x=a["x"][0]),
    "x_int": lambda a: dict(x=a["x"].long()),
    "top_k_99": lambda a: dict(top_k=99),
    "top_k_0": lambda a: dict(top_k=0),
    "eps_0": lambda a: dict(eps=0.0),
    "eps_nan": lambda a: dict(eps=NAN),
    "eps_inf": lambda a: dict(eps=float("inf")),
    "scaling_nan": lambda a: dict(scaling=NAN),
    "A_d_in": lambda a: dict(A=a["A"][:, :, :-1]),
    "B_rank": lambda a: dict(B=a["B"][:, :, :1]),
    "B_2d": lambda a: dict(B=a["B"][0]),
    "router_short": lambda a: dict(router_weight=a["router_weight"][:2]),
    "router_input_rows": lambda a: dict(router_input=a["router_input"][:3]),
    "router_input_dtype": lambda a: dict(router_input=a["router_input"].double()),
    "base_out_shape": lambda a: dict(base_out=a["base_out"][:, :5]),
    "B_dtype": lambda a: dict(B=a["B"].double()),
    "no_experts": lambda a: dict(A=a["A"][:0], B=a["B"][:0], router_weight=a["router_weight"][:0]),
}


def _message(fn) -> str:
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("case", list(BAD_FORWARD))
@pytest.mark.parametrize("family", FAMILIES)
def test_fake_forward_runs_the_real_checks(family, case):
    args = _valid_forward_args()
    args.update(BAD_FORWARD[case](args))
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    op = family.op("forward")
    real = _message(lambda: op(**args))
    assert _message(lambda: op(**meta)) == real
    assert real.startswith(f"{family.namespace}: ")


@pytest.mark.skipif(not compiled.has_kernels("cpu"), reason="compiled extension not built for CPU")
@pytest.mark.parametrize("beyond_bound", [False, True], ids=["at-bound", "beyond-bound"])
def test_fake_and_real_agree_on_the_active_expert_bound(beyond_bound):
    """The CPU kernels take up to max_active_experts (dense) experts and refuse more; the
    fake kernel, on fake CPU tensors as torch.compile traces them, does exactly the same."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    E = compiled.FAMILY.max_active_experts("cpu") + int(beyond_bound)
    p = make_problem(2, 3, 4, E, 1, dtype=torch.float32, seed=9, device="cpu")
    args = (p.x, p.A, p.B, p.router_weight, None, None, 1.0, E, True, True, 1e-6)
    def message_or_none(call):
        try:
            call()
        except RuntimeError as exc:
            return str(exc).splitlines()[0]
        return None

    mode = FakeTensorMode()
    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    real = message_or_none(lambda: torch.ops.omoe.forward(*args))
    with mode:
        traced = message_or_none(lambda: torch.ops.omoe.forward(*fake))
    assert traced == real
    assert (real is not None) == beyond_bound
    if beyond_bound:
        assert f"take at most {E - 1} active experts" in real


BAD_BACKWARD = {
    "h_width": lambda a: dict(h=a["h"][:, :-1]),
    "h_dtype": lambda a: dict(h=a["h"].double()),
    "logits_shape": lambda a: dict(logits=a["logits"][:, :1]),
    "grad_y_shape": lambda a: dict(grad_y=a["grad_y"][:2]),
    "top_k_99": lambda a: dict(top_k=99),
    "router_short": lambda a: dict(router_weight=a["router_weight"][:1]),
    "scaling_inf": lambda a: dict(scaling=float("inf")),
}


@pytest.mark.parametrize("case", list(BAD_BACKWARD))
@pytest.mark.parametrize("family", FAMILIES)
def test_fake_backward_runs_the_real_checks(family, case):
    f = _valid_forward_args()
    # The saved tensors of the family's layout (meta: no kernel runs to make them).
    width = family.hidden_width(3, 2)
    args = dict(grad_y=random_grad((4, 6), torch.float32, "cpu"), x=f["x"], A=f["A"], B=f["B"],
                router_weight=f["router_weight"], router_input=f["router_input"],
                h=torch.randn(4, width), logits=torch.randn(4, 3), scaling=0.5, top_k=2,
                orthogonalize=True, normalize=True, eps=1e-6)
    args.update(BAD_BACKWARD[case](args))
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    op = family.op("backward")
    real = _message(lambda: op(**args))
    assert _message(lambda: op(**meta)) == real


@pytest.mark.skipif(not triton_ops.AVAILABLE, reason="triton not importable")
@pytest.mark.parametrize("gram", ["float32", "short", "flat"])
def test_triton_backward_refuses_a_gram_that_is_not_the_forwards(gram):
    """A G that cannot be the forward's (dtype, shape) is refused by the real op before it
    launches, and by its fake kernel with the same message."""
    f = _valid_forward_args()
    width = triton_ops.FAMILY.hidden_width(3, 2)
    G = {"float32": torch.zeros(width, width), "short": torch.zeros(width - 1, width, dtype=torch.float64),
         "flat": torch.zeros(width * width, dtype=torch.float64)}[gram]
    args = dict(grad_y=random_grad((4, 6), torch.float32, "cpu"), x=f["x"], A=f["A"], B=f["B"],
                router_weight=f["router_weight"], router_input=f["router_input"],
                h=torch.randn(4, width), logits=torch.randn(4, 3), scaling=0.5, top_k=2,
                orthogonalize=True, normalize=True, eps=1e-6, gram=G)
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    op = triton_ops.FAMILY.op("backward")
    real = _message(lambda: op(**args))
    assert "gram must be the forward's G" in real
    assert _message(lambda: op(**meta)) == real


def test_the_two_families_share_one_schema():
    """The compiled ops' schema; the Triton ops' is the same with G added (saves_gram)."""
    assert not compiled.FAMILY.saves_gram and triton_ops.FAMILY.saves_gram
    for family in (compiled.FAMILY, triton_ops.FAMILY):
        if family is compiled.FAMILY and not compiled.LOADED:
            continue
        if family is triton_ops.FAMILY and not triton_ops.AVAILABLE:
            continue
        for name, schema in zip(("forward", "backward"), family.schemas):
            op_schema = str(family.op(name)._schema)
            assert op_schema == f"{family.namespace}::{name}{schema}", op_schema


@pytest.mark.skipif(not triton_ops.AVAILABLE, reason="triton not importable")
def test_triton_op_refuses_a_short_router_weight_before_launching():
    """The kernels mask router_weight's rows by A's E, so a shorter router_weight would be
    read past its end: the op checks its shape before it launches anything."""
    args = _valid_forward_args()
    args["router_weight"] = args["router_weight"][:1]
    with pytest.raises(RuntimeError, match=r"omoe_triton: router_weight must be \[E, d_in\]"):
        torch.ops.omoe_triton.forward(**args)


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """t in three non-contiguous layouts with the same values."""
    doubled = torch.cat([t, t], dim=-1)
    return {"transposed": t.t().contiguous().t(),
            "sliced": doubled[..., : t.shape[-1]],
            "expanded": t[:1].expand_as(t)}


@needs_compiled
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_opcheck_non_contiguous_inputs(layout):
    """Fake kernels describe the real outputs (shapes, dtypes, strides) for any input layout,
    forward and backward; opcheck compares them and checks autograd and the schema."""
    p = make_problem(5, 4, 6, 3, 2, dtype=torch.float32, seed=7, with_router_input=True)
    x = _layouts(p.x)[layout]
    router_input = _layouts(p.router_input)[layout]
    W = _layouts(p.router_weight)[layout]
    options = (0.5, 2, True, True, 1e-6)
    args = (x.requires_grad_(), p.A.requires_grad_(), p.B, W, router_input, p.base_out)
    torch.library.opcheck(torch.ops.omoe.forward.default, (*args, *options))
    y, h, logits = torch.ops.omoe.forward(*args, *options)
    grad_y = _layouts(random_grad(y.shape, y.dtype))[layout]
    torch.library.opcheck(torch.ops.omoe.backward.default,
                          (grad_y, x.detach(), p.A.detach(), p.B, W, router_input,
                           h.t().contiguous().t(), logits, *options))


@needs_compiled
def test_compiled_fullgraph_backward_with_transposed_x():
    """Inductor asserts the fake strides at run time, so a fake kernel whose output strides
    differ from the real kernel's for a transposed x fails here."""
    torch._dynamo.reset()
    p = make_problem(6, 5, 4, 2, 3, dtype=torch.float32, seed=8, with_base_out=False)
    x = p.x.t().contiguous().t()

    def f(x, A, B, W):
        return omoe_lora(x, A, B, W, backend=BACKEND)

    grad_y = random_grad((6, 4), torch.float32)
    y_eager, g_eager = run_backend(p.replace(x=x), BACKEND, grad_y)
    leaves = [t.detach().requires_grad_() for t in (x, p.A, p.B, p.router_weight)]
    with torch._inductor.config.patch(fx_graph_cache=False):   # a cached graph would hide it
        y = torch.compile(f, fullgraph=True)(*leaves)
        y.backward(grad_y)
    torch.testing.assert_close(y, y_eager)
    for leaf, name in zip(leaves, ("x", "A", "B", "router_weight")):
        torch.testing.assert_close(leaf.grad, g_eager[name])
