"""omoe_kernels.testing.reference_forward: the benchmark's torch.compile(reference) baseline.

It runs omoe_lora's checks once and returns the reference algebra as a function of the
tensors alone; its results are the reference backend's, and it refuses what omoe_lora
refuses.
"""
from __future__ import annotations

import pytest
import torch

from helpers import make_problem, run_backend
from omoe_kernels.testing.reference import reference_forward


@pytest.mark.parametrize("top_k", [None, 2])
def test_reference_forward_is_the_reference_backend(top_k):
    p = make_problem(6, 5, 7, 3, 2, dtype=torch.float64, seed=11, with_router_input=True)
    options = dict(scaling=0.5, top_k=top_k, normalize=False)
    forward = reference_forward(p.x, p.A, p.B, p.router_weight, base_out=p.base_out,
                                router_input=p.router_input, **options)
    expected, _ = run_backend(p, "reference", **options)
    torch.testing.assert_close(
        forward(p.x, p.A, p.B, p.router_weight, p.base_out, p.router_input), expected,
        rtol=0, atol=0)


def test_reference_forward_checks_its_arguments_as_omoe_lora_does():
    p = make_problem(4, 5, 6, 3, 2)
    with pytest.raises(ValueError, match="`router_weight` must be"):
        reference_forward(p.x, p.A, p.B, p.router_weight[:2])
