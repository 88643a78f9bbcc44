"""No silent wrong answers from the op layer (docs/contract.md §4).

Each test pins one way the compiled (`omoe::`) and Triton (`omoe_triton::`) ops used to
give a wrong answer without a word, or to accept what they cannot serve:
- a NaN that became finite through the `<v, v>` clamp (one active expert), or through
  `addmm`'s alpha = 0 shortcut (`scaling=0` with `base_out`);
- double backward and forward-mode AD / torch.func transforms (wrong or zero derivatives);
- fake kernels that checked nothing and described other strides than the real kernels;
- Triton ops that read past the end of a too-short `router_weight`;
- non-finite `scaling` / `alpha` and an `eps` that rounds to 0 in the inputs' dtype.
The Triton kernels' share runs under the interpreter in triton_interpreted_cases.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import COMPILED_BACKENDS, DEVICE, make_problem, random_grad, run_backend
from omoe_kernels import OMoELinear, omoe_lora
from omoe_kernels.ops import compiled, registration
from omoe_kernels.ops.triton import launch as triton_ops

needs_compiled = pytest.mark.skipif(not COMPILED_BACKENDS,
                                    reason=f"no compiled backend on {DEVICE.type}")
BACKEND = COMPILED_BACKENDS[0] if COMPILED_BACKENDS else "reference"
NAN = float("nan")


def _non_finite_where_eager_is(problem, backend, skip=(), **options):
    """Forward and every gradient are non-finite wherever eager's are (the fused backward
    may spread a NaN of B further: its Gram terms mix every entry of B_cat)."""
    grad_y = random_grad(run_backend(problem, "reference", **options)[0].shape, problem.x.dtype)
    y, grads = run_backend(problem, backend, grad_y, **options)
    y_ref, grads_ref = run_backend(problem, "reference", grad_y, **options)
    assert torch.isnan(y_ref).any(), "the case must poison something"
    pairs = [("forward", y, y_ref)]
    pairs += [(f"grad {n}", g, grads_ref[n]) for n, g in grads.items() if n not in skip]
    for what, got, eager in pairs:
        hidden = torch.isfinite(got) & ~torch.isfinite(eager)
        assert not hidden.any(), (
            f"{what}: {int(hidden.sum())} values finite where eager's are not "
            f"(largest {got[hidden].abs().max().item():.3g})")


# ---- NaN through the <v, v> clamp (one active expert) -----------------------------------

@needs_compiled
@pytest.mark.parametrize("experts,top_k", [(1, None), (3, 1)], ids=["E1-dense", "top1"])
@pytest.mark.parametrize("normalize", [True, False])
def test_nan_in_the_routed_experts_B_poisons_its_tokens(experts, top_k, normalize):
    problem = make_problem(6, 5, 7, experts, 2, dtype=torch.float64, seed=3)
    B = problem.B.clone()
    B[:, 2, 1] = NAN            # every expert: whichever one a token routes to
    # Top-k without normalizing (README, known difference): eager's backward of its masked
    # MGS multiplies a zero gradient by the NaN and makes entries of grad B NaN that the
    # fused backward leaves finite. grad B is not compared there; everything else is.
    _non_finite_where_eager_is(problem.replace(B=B), BACKEND, top_k=top_k, normalize=normalize,
                               skip=() if normalize or top_k is None else ("B",))


@needs_compiled
@pytest.mark.parametrize("where", ["B", "x"])
def test_scaling_zero_with_base_out_keeps_nan(where):
    problem = make_problem(5, 4, 6, 2, 2, dtype=torch.float64, seed=4)
    t = getattr(problem, where).clone()
    t[(1, 1, 0) if where == "B" else (2, 3)] = NAN
    problem = problem.replace(**{where: t})
    y, _ = run_backend(problem, BACKEND, scaling=0.0)
    y_ref, _ = run_backend(problem, "reference", scaling=0.0)
    assert torch.isnan(y_ref).any()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    _non_finite_where_eager_is(problem, BACKEND, scaling=0.0)   # and the gradients


# ---- autograd modes the fused ops do not implement --------------------------------------

def _inputs(seed=5):
    p = make_problem(4, 5, 6, 3, 2, dtype=torch.float64, seed=seed, with_base_out=False)
    return p.x, p.A, p.B, p.router_weight


@needs_compiled
def test_double_backward_is_refused_with_the_way_out():
    x, A, B, W = (t.detach().requires_grad_(True) for t in _inputs())
    y = omoe_lora(x, A, B, W, backend=BACKEND)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad(y.square().sum(), (x, B), create_graph=True)
    # First-order backward is untouched.
    y = omoe_lora(x, A, B, W, backend=BACKEND)
    gx, = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(gx).all()


def test_reference_double_backward_is_right():
    """The way out the error names does serve second derivatives."""
    p = make_problem(2, 3, 3, 2, 1, dtype=torch.float64, seed=5, with_base_out=False)
    x, B = p.x.detach().requires_grad_(True), p.B.detach().requires_grad_(True)
    f = lambda x, B: omoe_lora(x, p.A, B, p.router_weight, backend="reference")  # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, B))


FUNC_TRANSFORMS = {
    "jvp": lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
    "grad": lambda f, x: torch.func.grad(lambda t: f(t).sum())(x),
    "jacrev": lambda f, x: torch.func.jacrev(f)(x),
    "jacfwd": lambda f, x: torch.func.jacfwd(f)(x),
    "hessian": lambda f, x: torch.func.hessian(lambda t: f(t).sum())(x),
}


@needs_compiled
@pytest.mark.parametrize("transform", list(FUNC_TRANSFORMS))
def test_torch_func_transforms_are_refused_clearly(transform):
    x, A, B, W = _inputs()
    f = lambda t: omoe_lora(t, A, B, W, backend=BACKEND)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"torch\.func transform.*backend='reference'"):
        FUNC_TRANSFORMS[transform](f, x)
    g = lambda t: omoe_lora(t, A, B, W, backend="reference")  # noqa: E731
    FUNC_TRANSFORMS[transform](g, x)   # the way out works


@needs_compiled
@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_still_works(reentrant):
    """The double-backward refusal keys on create_graph, not on the grad mode around a
    recomputation (reentrant checkpointing runs its backward under enable_grad)."""
    from torch.utils.checkpoint import checkpoint

    x, A, B, W = (t.detach().requires_grad_(True) for t in _inputs())
    f = lambda t: omoe_lora(t, A, B, W, backend=BACKEND)  # noqa: E731
    checkpoint(f, x, use_reentrant=reentrant).square().sum().backward()
    expected, = torch.autograd.grad(f(x).square().sum(), x)
    torch.testing.assert_close(x.grad, expected)


@needs_compiled
def test_vmap_alone_is_served():
    """vmap is not a derivative transform: the dispatcher loops over the batch."""
    x, A, B, W = _inputs()
    xs = torch.stack([x, 2 * x])
    out = torch.func.vmap(lambda t: omoe_lora(t, A, B, W, backend=BACKEND))(xs)
    expected = torch.stack([omoe_lora(t, A, B, W, backend="reference") for t in xs])
    torch.testing.assert_close(out, expected)


@needs_compiled
def test_forward_mode_ad_is_refused_clearly():
    import torch.autograd.forward_ad as fwAD

    x, A, B, W = _inputs()
    with fwAD.dual_level():
        dual_B = fwAD.make_dual(B, torch.randn_like(B))
        with pytest.raises(RuntimeError, match="forward-mode AD.*backend='reference'"):
            omoe_lora(x, A, dual_B, W, backend=BACKEND)
        tangent = fwAD.unpack_dual(omoe_lora(x, A, dual_B, W, backend="reference")).tangent
        assert tangent is not None and tangent.abs().sum() > 0
    omoe_lora(x, A, B, W, backend=BACKEND)  # no dual level: fine


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


def test_the_two_families_share_one_schema():
    for name, schema in (("forward", registration.FORWARD_SCHEMA),
                         ("backward", registration.BACKWARD_SCHEMA)):
        for family in (compiled.FAMILY, triton_ops.FAMILY):
            if family is compiled.FAMILY and not compiled.LOADED:
                continue
            if family is triton_ops.FAMILY and not triton_ops.AVAILABLE:
                continue
            op_schema = str(family.op(name)._schema)
            assert op_schema == f"{family.namespace}::{name}{schema}", op_schema


@pytest.mark.skipif(not triton_ops.AVAILABLE, reason="triton not importable")
def test_triton_op_refuses_a_short_router_weight_before_launching():
    """It used to read past the end of router_weight (its rows were masked by A's E)."""
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
    """Inductor asserts the fake strides at run time: a transposed x used to fail there."""
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


# ---- non-finite options -----------------------------------------------------------------

@pytest.mark.parametrize("value", [NAN, float("inf"), -float("inf")])
def test_non_finite_scaling_is_refused(value):
    x, A, B, W = _inputs()
    with pytest.raises(ValueError, match="`scaling`"):
        omoe_lora(x, A, B, W, scaling=value, backend="reference")


@pytest.mark.parametrize("value", [NAN, float("inf")])
def test_non_finite_alpha_is_refused(value):
    with pytest.raises(ValueError, match="`alpha`"):
        OMoELinear(nn.Linear(4, 4), 2, 2, alpha=value)


@pytest.mark.parametrize("dtype,eps", [(torch.float16, 1e-9), (torch.float32, 1e-50),
                                       (torch.bfloat16, 1e-45)])
def test_eps_that_underflows_the_dtype_is_refused(dtype, eps):
    x, A, B, W = (t.to(dtype) for t in _inputs())
    with pytest.raises(ValueError, match="`eps`.*underflows"):
        omoe_lora(x, A, B, W, eps=eps, backend="reference")


def test_smallest_eps_that_fits_is_accepted():
    x, A, B, W = (t.to(torch.float16) for t in _inputs())
    omoe_lora(x, A, B, W, eps=6e-8, backend="reference")       # 2^-24 is fp16's smallest
