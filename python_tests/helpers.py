"""Shared functions and constants of the omoe_kernels test suite.

Test files import them with ``from helpers import ...``; ``conftest.py`` holds only
pytest's hooks and fixtures (it imports the constants it needs from here).

Where the tests run is set by the environment, so the same suite runs on a CPU CI
machine and on a GPU machine:

- ``OMOE_TEST_DEVICE`` (default ``"cpu"``): the device every test tensor lives on.
- ``BACKENDS`` = ``omoe_kernels.available_backends(DEVICE)`` (the backend registry):
  every backend present there (``["cpu", "reference"]`` on CPU CI, plus ``"triton"``
  under ``TRITON_INTERPRET=1``; ``["triton", "cuda", "reference"]`` on a GPU). Suites
  parametrise over it, so a new backend joins them by being registered.
- Under ``TRITON_INTERPRET=1`` on CPU, the ``triton`` cases carry the ``interpreter``
  marker (conftest adds it): ``test_triton.py`` runs them (``-m interpreter``) in a child
  process, since the variable must be set before triton is imported.
  ``skip_if_interpreted`` leaves out the few cases too slow for the interpreter (they run
  on a GPU).

The functions (all take ``device`` / ``dtype`` so any test file can use them):

- ``CallInputs``: the tensor inputs of one ``omoe_lora`` call (x, A, B, router_weight and
  the optional base_out and router_input). ``make_problem`` draws random ones, with
  docs/contract.md §2's special cases: ``collapse=c`` builds experts as
  ``(1-c)·random + c·expert_0`` for both A and B, ``identical_experts`` makes expert 1 a
  copy of expert 0, ``zero_B`` sets B = 0 (LoRA's init).
- ``run_backend``: one forward and backward through ``omoe_lora`` with a given upstream
  gradient; returns the output and the gradient of every tensor input.
- ``oracle``: the same on float64 copies of the inputs through the ``reference`` backend
  (docs/contract.md §1 literally, gradients by autograd): what every result is compared with.
- ``assert_matches_oracle``: forward and every gradient of a backend against the oracle
  at given tolerances (``ACCURACY_ROWS`` holds docs/contract.md §2's, ``VARIANTS`` its variants).
- ``rel_err`` / ``assert_rel_close``: relative Frobenius error (docs/contract.md §2's measure).
- ``non_contiguous``: the same values in a strided or transposed layout.
- ``condition_numbers``: κ of each token's matrix ``[e_i]``.
- ``poison_allocator`` / ``poisoned_empty``: NaN-filled memory, so that an output element
  a kernel forgets to write shows up as NaN instead of a lucky zero.
- ``tiny_model`` / ``model_snapshot`` / ``assert_model_unchanged``: a small model with
  ``q_proj`` / ``v_proj`` linears to inject into, and the check that a failed or refused
  call left its whole observable state as it was.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import pytest
import torch
from torch import nn

import omoe_kernels
from omoe_kernels import omoe_lora
from omoe_kernels.testing.shapes import ACCURACY_ROWS, ACCURACY_SHAPE  # noqa: F401  (shared)

DEVICE = torch.device(os.environ.get("OMOE_TEST_DEVICE", "cpu"))
BACKENDS: tuple[str, ...] = tuple(omoe_kernels.available_backends(DEVICE))
ON_GPU = DEVICE.type == "cuda"

# The backends built from the compiled extension (they are what torch.ops.omoe runs).
COMPILED_BACKENDS = tuple(b for b in BACKENDS if b in ("cpu", "cuda"))

# The backends that run here under the Triton interpreter (slow: small shapes only).
INTERPRETED_BACKENDS = tuple(b for b in BACKENDS if b == "triton" and DEVICE.type == "cpu")

# Tensor inputs of omoe_lora, in the order of its signature.
INPUT_NAMES = ("x", "A", "B", "router_weight", "base_out", "router_input")

# ACCURACY_ROWS (omoe_kernels/testing/shapes.py, shared with the benchmark): row name ->
# (dtype, collapse, forward tolerance, gradient tolerance); a gradient tolerance of None
# means "finite" only. ACCURACY_SHAPE: the (T, d_in, d_out, E, r) they are checked at.

# The variants docs/contract.md §2 is checked in. Half of them pass a separate router_input so that
# both gradient paths into the router (through x, and through router_input) are covered.
VARIANTS = {
    "dense": (dict(top_k=None), False),
    "topk": (dict(top_k=2), True),
    "no_normalize": (dict(normalize=False), False),
    "no_orthogonalize": (dict(orthogonalize=False), True),
}


def skip_if_interpreted(backend: str, why: str) -> None:
    """Skips a case that would take the Triton interpreter too long; it runs on a GPU
    (OMOE_TEST_DEVICE=cuda) and for every other backend."""
    if backend in INTERPRETED_BACKENDS:
        pytest.skip(f"{backend} under TRITON_INTERPRET=1: {why} (runs with OMOE_TEST_DEVICE=cuda)")


@dataclasses.dataclass
class CallInputs:
    """The tensor inputs of one omoe_lora call (base_out and router_input may be None)."""

    x: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    router_weight: torch.Tensor
    base_out: Optional[torch.Tensor] = None
    router_input: Optional[torch.Tensor] = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The inputs that are present, by argument name."""
        return {n: getattr(self, n) for n in INPUT_NAMES if getattr(self, n) is not None}

    def replace(self, **changes) -> "CallInputs":
        return dataclasses.replace(self, **changes)

    def to(self, dtype=None, device=None) -> "CallInputs":
        return CallInputs(**{n: (t if t is None else t.detach().to(dtype=dtype, device=device))
                          for n, t in dataclasses.asdict(self).items()})

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]


def _randn(shape, generator, scale=1.0):
    return torch.randn(shape, generator=generator, dtype=torch.float64) * scale


def make_problem(num_tokens=32, d_in=24, d_out=20, num_experts=4, rank=3, *,
                 lead_shape=None, dtype=torch.float32, device=None, seed=0,
                 collapse=0.0, identical_experts=False, zero_B=False,
                 with_base_out=True, with_router_input=False, logit_scale=1.0) -> CallInputs:
    """Random inputs of one call, drawn in float64 from `seed`, then cast to `dtype`.

    Scales keep every intermediate O(1): h = A x, e = B h and the router logits are about
    unit size (logit_scale multiplies the router weights). `lead_shape` replaces
    `(num_tokens,)` as x's leading dimensions (e.g. (2, 3) for a 3-D input).
    """
    device = DEVICE if device is None else torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    lead = (num_tokens,) if lead_shape is None else tuple(lead_shape)
    E, r = num_experts, rank
    x = _randn(lead + (d_in,), gen)
    A = _randn((E, r, d_in), gen, 1 / math.sqrt(d_in))
    B = _randn((E, d_out, r), gen, 1 / math.sqrt(r))
    router_weight = _randn((E, d_in), gen, logit_scale / math.sqrt(d_in))
    base_out = _randn(lead + (d_out,), gen)
    router_input = _randn(lead + (d_in,), gen)
    if collapse:
        A = (1 - collapse) * A + collapse * A[:1]
        B = (1 - collapse) * B + collapse * B[:1]
    if identical_experts:
        A[1], B[1] = A[0], B[0]
    if zero_B:
        B = torch.zeros_like(B)
    problem = CallInputs(x, A, B, router_weight,
                      base_out if with_base_out else None,
                      router_input if with_router_input else None)
    return problem.to(dtype=dtype, device=device)

def make_mixed_problem(samples: int, tokens: int, dtype, with_router_input: bool, *,
                       adapters: int = 3, d_in: int = 20, d_out: int = 18, num_experts: int = 4,
                       rank: int = 3) -> dict:
    """Inputs of one mixed-adapter call: x and base_out [samples, tokens, ...] with A, B and
    router_weight of `adapters` adapters stacked on dim 0 (each adapter drawn from its own
    seed)."""
    problems = [make_problem(lead_shape=(samples, tokens), d_in=d_in, d_out=d_out,
                             num_experts=num_experts, rank=rank, dtype=dtype, seed=40 + n,
                             with_router_input=with_router_input) for n in range(adapters)]
    first = problems[0]
    stack = {name: torch.stack([getattr(p, name) for p in problems])
             for name in ("A", "B", "router_weight")}
    return dict(x=first.x, base_out=first.base_out, router_input=first.router_input, **stack)



def condition_numbers(problem: CallInputs) -> torch.Tensor:
    """κ of every token's d_out × E matrix [e_1 … e_E] (float64; inf when singular)."""
    p = problem.to(torch.float64)
    x = p.x.reshape(-1, p.x.shape[-1])
    e = torch.einsum("td,erd,eor->toe", x, p.A, p.B)
    s = torch.linalg.svdvals(e)
    return s[:, 0] / s[:, -1]


def random_grad(shape, dtype, device=None, seed=1234) -> torch.Tensor:
    """A random upstream gradient (never ones: ones hide transposition bugs)."""
    gen = torch.Generator().manual_seed(seed)
    device = DEVICE if device is None else device
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    # detach() keeps the strides, so a non-contiguous input stays non-contiguous.
    return t.detach().requires_grad_(True)


def run_backend(problem: CallInputs, backend: str, grad_y=None, **options):
    """One forward (and, with grad_y, one backward) of omoe_lora.

    Returns (y, grads) with grads[name] the gradient of every tensor input (empty when
    grad_y is None). `options` are omoe_lora's keyword options (scaling, top_k, ...).
    """
    leaves = {n: _leaf(t) for n, t in problem.tensors().items()}
    y = omoe_lora(leaves["x"], leaves["A"], leaves["B"], leaves["router_weight"],
                  base_out=leaves.get("base_out"), router_input=leaves.get("router_input"),
                  backend=backend, **options)
    grads = {}
    if grad_y is not None:
        y.backward(grad_y)
        grads = {n: t.grad for n, t in leaves.items()}
    return y.detach(), grads


def oracle(problem: CallInputs, grad_y=None, **options):
    """docs/contract.md §1 in float64: the reference backend on float64 copies of the inputs.

    Same return value as run_backend (float64 tensors on the problem's device).
    """
    grad64 = None if grad_y is None else grad_y.detach().to(torch.float64)
    return run_backend(problem.to(torch.float64), "reference", grad64, **options)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F in float64 (absolute when expected is 0)."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    diff = torch.linalg.vector_norm(a - e).item()
    ref = torch.linalg.vector_norm(e).item()
    return diff / ref if ref > 0 else diff


def assert_rel_close(actual, expected, tol: float, what: str = "") -> None:
    """Relative Frobenius error ≤ tol (NaN anywhere fails)."""
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_finite(t: torch.Tensor, what: str = "") -> None:
    bad = (~torch.isfinite(t)).sum().item()
    assert bad == 0, f"{what}: {bad} of {t.numel()} values are not finite"


def assert_matches_oracle(problem: CallInputs, backend: str, fwd_tol: float, grad_tol,
                          grad_seed=1234, **options) -> None:
    """Forward and every gradient of `backend` against the float64 oracle.

    grad_tol None checks only that the gradients are finite.
    """
    y0, _ = run_backend(problem, backend, **options)
    grad_y = random_grad(y0.shape, y0.dtype, y0.device, seed=grad_seed)
    y, grads = run_backend(problem, backend, grad_y, **options)
    y_ref, grads_ref = oracle(problem, grad_y, **options)
    assert y.dtype == problem.x.dtype and y.shape == y_ref.shape
    assert_rel_close(y, y_ref, fwd_tol, f"{backend} forward")
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        assert g is not None, f"{backend}: no gradient for {name}"
        assert g.shape == grads_ref[name].shape and g.dtype == problem.tensors()[name].dtype
        if grad_tol is None:
            assert_finite(g, f"{backend} grad {name}")
        else:
            assert_rel_close(g, grads_ref[name], grad_tol, f"{backend} grad {name}")


def non_contiguous(t: torch.Tensor, kind: str = "strided") -> torch.Tensor:
    """The same values in a non-contiguous layout.

    "strided": every other element of a twice-as-long last dimension;
    "transposed": the last two dimensions stored transposed (needs t.dim() >= 2).
    """
    if kind == "strided":
        out = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    elif kind == "transposed":
        out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        raise ValueError(kind)
    assert torch.equal(out, t) and (t.numel() <= 1 or not out.is_contiguous())
    return out


def poison_allocator(device=None, dtype=torch.float32, max_numel=1 << 16) -> None:
    """Fills freed allocator blocks with NaN, so later fresh allocations start as NaN.

    On CUDA the caching allocator hands the same blocks back; on CPU small blocks are
    usually reused by malloc. Best effort: use it before calling an op whose outputs
    are freshly allocated, then check those outputs everywhere.
    """
    device = DEVICE if device is None else torch.device(device)
    blocks = []
    numel = 16
    while numel <= max_numel:
        for _ in range(4):
            blocks.append(torch.full((numel,), float("nan"), dtype=dtype, device=device))
        numel *= 2
    del blocks


def poisoned_empty(shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """An output buffer filled with NaN (for kernels that write into a given tensor)."""
    device = DEVICE if device is None else device
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ---- models to inject into ---------------------------------------------------------------

class TinyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.q_proj(x)) * self.v_proj(x)


class TinyModel(nn.Module):
    """Three blocks of q_proj / v_proj linears and a head: the targets inject looks for."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.Sequential(TinyBlock(d), TinyBlock(d), TinyBlock(d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.blocks(x))


def tiny_model(seed: int = 0, device=None) -> TinyModel:
    torch.manual_seed(seed)
    return TinyModel().to(DEVICE if device is None else device)


def tiny_model_inputs(device=None) -> torch.Tensor:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    return x.to(DEVICE if device is None else device)


def model_snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: modules by identity (and so their
    ties), requires_grad flags, parameter values and the model's attributes."""
    return {"modules": [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
            "flags": [(n, p.requires_grad) for n, p in model.named_parameters(remove_duplicate=False)],
            "values": {n: p.detach().clone() for n, p in model.named_parameters()},
            "attrs": sorted(vars(model))}


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    assert after["modules"] == before["modules"], "modules (or their ties) changed"
    assert after["flags"] == before["flags"], "requires_grad flags changed"
    assert after["attrs"] == before["attrs"], "attributes changed"
    assert after["values"].keys() == before["values"].keys()
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name
