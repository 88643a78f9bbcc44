"""Non-finite values in the inputs and options (docs/contract.md §4: no silent wrong answers).

- A NaN in the inputs stays non-finite wherever eager's result is: through the `<v, v>`
  clamp with one active expert, and through `addmm`'s alpha = 0 shortcut (`scaling=0`
  with `base_out`), which would otherwise turn it into a finite value.
- A non-finite `scaling` / `alpha`, and an `eps` that rounds to 0 in the inputs' dtype,
  are refused.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import COMPILED_BACKENDS, DEVICE, make_problem, random_grad, run_backend
from omoe_kernels import OMoELinear, omoe_lora

needs_compiled = pytest.mark.skipif(not COMPILED_BACKENDS,
                                    reason=f"no compiled backend on {DEVICE.type}")
BACKEND = COMPILED_BACKENDS[0] if COMPILED_BACKENDS else "reference"
NAN = float("nan")


def _inputs(seed=5):
    p = make_problem(4, 5, 6, 3, 2, dtype=torch.float64, seed=seed, with_base_out=False)
    return p.x, p.A, p.B, p.router_weight


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
