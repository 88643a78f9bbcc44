"""The per-token passes against the coefficient-space oracle (omoe_kernels/testing/oracle.py).

The oracle is the fused backends' algebra (Gram matrix, MGS on coefficients, mixture
coefficients) in float64 PyTorch; it must equal the reference (§1 on full vectors), and
the compiled ops' per-token passes must equal it, stage by stage where the ops expose the
stage (h, logits) and end to end for y and every gradient.
"""
from __future__ import annotations

import pytest
import torch

from helpers import COMPILED_BACKENDS, make_problem, random_grad, run_backend
from omoe_kernels.testing import oracle as co

needs_compiled = pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend here")
CASES = [dict(top_k=None, orthogonalize=True, normalize=True),
         dict(top_k=2, orthogonalize=True, normalize=False),
         dict(top_k=1, orthogonalize=True, normalize=True),
         dict(top_k=3, orthogonalize=False, normalize=True)]


def _problem(seed):
    return make_problem(7, 6, 9, 4, 3, dtype=torch.float64, seed=seed, collapse=0.9)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_oracle_equals_the_reference(case):
    options = CASES[case]
    p = _problem(10 + case)
    y_ref, _ = run_backend(p, "reference", **options)
    y = co.omoe_lora_oracle(p.x, p.A, p.B, p.router_weight, base_out=p.base_out, **options)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)


def test_oracle_q_are_orthonormal():
    p = _problem(20)
    h = p.x @ p.A.reshape(-1, p.x.shape[1]).t()
    S = co.gram_matrix(h, p.B)
    C = co.mgs_coefficients(S, torch.ones(S.shape[:2], dtype=torch.bool), True, 1e-14)
    QtQ = torch.einsum("tik,tkl,tjl->tij", C, S, C)          # <q_i, q_j> = C_i S C_jᵀ
    torch.testing.assert_close(QtQ, torch.eye(4, dtype=torch.float64).expand_as(QtQ),
                               rtol=0, atol=1e-8)


@needs_compiled
@pytest.mark.parametrize("case", range(len(CASES)))
def test_per_token_passes_match_the_oracle(case):
    """torch.ops.omoe.forward's z (seen through y - base) and omoe::backward's gradients."""
    options = CASES[case]
    p = _problem(30 + case)
    E = p.A.shape[0]
    top_k = E if options["top_k"] is None else options["top_k"]
    op_options = (0.7, top_k, options["orthogonalize"], options["normalize"], 1e-6)
    y, h, logits = torch.ops.omoe.forward(p.x, p.A, p.B, p.router_weight, None, p.base_out,
                                          *op_options)
    z = co.token_outputs(h, logits, p.B, top_k=top_k, orthogonalize=options["orthogonalize"],
                         normalize=options["normalize"], eps=1e-6)
    y_oracle = p.base_out + 0.7 * z @ co.concat_experts(p.B).t()
    torch.testing.assert_close(y, y_oracle, rtol=1e-10, atol=1e-12)

    grad_y = random_grad(y.shape, y.dtype)
    grads = torch.ops.omoe.backward(grad_y, p.x, p.A, p.B, p.router_weight, None, h, logits,
                                    *op_options)
    leaves = [t.detach().requires_grad_() for t in (p.x, p.A, p.B, p.router_weight)]
    co.omoe_lora_oracle(*leaves, scaling=0.7, eps=1e-6, base_out=p.base_out,
                        **options).backward(grad_y)
    for name, got, leaf in zip(("x", "A", "B", "router_weight"), grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-9, atol=1e-11, msg=f"grad {name}")
