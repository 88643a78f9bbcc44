"""The eps contract near B = 0 (docs/integration.md): q_i = v_i / sqrt(<v_i, v_i> + eps).

At B = 0 (LoRA's init) the gradient of B is eps^-1/2 times the plain mixture's, and q is
a unit vector only where <v, v> is much larger than eps; every backend agrees.
"""
from __future__ import annotations

import pytest
import torch

import omoe_kernels as ok
from helpers import DEVICE


def _mixture_grad_B(normalize: bool, orthogonalize: bool, eps: float = 1e-6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(3, 2, 6, generator=gen, dtype=torch.float64)
    B = torch.zeros(3, 4, 2, dtype=torch.float64, requires_grad=True)
    router = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    y = ok.omoe_lora(x, A, B, router, orthogonalize=orthogonalize, normalize=normalize,
                     eps=eps, backend="reference")
    y.backward(torch.randn(y.shape, generator=gen, dtype=torch.float64))
    return B.grad


@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_eps_contract_gradient_of_B_at_zero_is_eps_to_the_minus_half_times_the_mixtures(eps):
    """At B = 0, q_i = v_i / sqrt(<v_i, v_i> + eps) is linear in B with slope eps^-1/2, and
    the projections are second order: grad B = eps^-1/2 x the plain mixture's (1000x at
    the default eps)."""
    omoe = _mixture_grad_B(normalize=True, orthogonalize=True, eps=eps)
    plain = _mixture_grad_B(normalize=False, orthogonalize=False, eps=eps)
    assert plain.abs().max() > 0
    torch.testing.assert_close(omoe, plain * eps ** -0.5, rtol=1e-10, atol=0)


def test_eps_contract_q_is_unit_only_where_vv_is_much_larger_than_eps():
    """One expert, one token, scaling 1: y = q_1, and |q_1| = sqrt(<v,v> / (<v,v> + eps))."""
    eps = 1e-6
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    A = torch.randn(1, 2, 6, generator=gen, dtype=torch.float64)
    B0 = torch.randn(1, 4, 2, generator=gen, dtype=torch.float64)
    router = torch.zeros(1, 6, dtype=torch.float64)
    e = B0[0] @ (A[0] @ x[0])
    for ratio in (1.0, 1e2, 1e6):
        expected = (ratio / (ratio + 1)) ** 0.5  # 0.707 at <v, v> = eps
        B = B0 * (ratio * eps / (e @ e)) ** 0.5  # <v, v> = ratio * eps
        for backend in ok.available_backends(DEVICE):
            y = ok.omoe_lora(x.to(DEVICE), A.to(DEVICE), B.to(DEVICE), router.to(DEVICE), eps=eps,
                             backend=backend)
            assert abs(y.norm().item() - expected) < 1e-9, (ratio, backend)
