"""Autograd modes the fused ops do not implement are refused, with the way out named
(docs/contract.md §4: no silent wrong answers).

Double backward and forward-mode AD / torch.func derivative transforms would give wrong or
zero derivatives through the fused ops, so they raise and name `backend='reference'`, which
serves them. First-order backward, activation checkpointing (reentrant or not) and vmap
alone keep working.
"""
from __future__ import annotations

import pytest
import torch

from helpers import COMPILED_BACKENDS, DEVICE, make_problem
from omoe_kernels import omoe_lora

needs_compiled = pytest.mark.skipif(not COMPILED_BACKENDS,
                                    reason=f"no compiled backend on {DEVICE.type}")
BACKEND = COMPILED_BACKENDS[0] if COMPILED_BACKENDS else "reference"


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
