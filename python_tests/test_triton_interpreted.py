"""Cases only the triton backend has, on CPU tensors under the Triton interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so these cases run in a session
started with it: `TRITON_INTERPRET=1 pytest python_tests/test_triton_interpreted.py`, or
`make test`, where test_triton.py starts such sessions for this file and the shared
suites' `interpreter` cases. In any other session the module is skipped. The shared suites
cover what every backend must do; this file covers the triton backend's own paths: 16-bit
operands with padded experts, the fused shrink epilogue, the fp16 hi/lo split at large
scale, float64 operands, its custom ops and its padded layout. bf16 runs with its operands
upcast to fp32 inside the kernels (the interpreter cannot do bf16 arithmetic); fp16 runs
the real 16-bit path. conftest poisons every buffer a kernel writes with NaN.
"""
from __future__ import annotations

import inspect
import os
import re

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from the session's start (test_triton.py runs it so)",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import omoe_kernels  # noqa: E402
from helpers import (  # noqa: E402
    ACCURACY_ROWS,
    ACCURACY_SHAPE,
    assert_matches_oracle,
    assert_rel_close,
    make_problem,
    oracle,
    random_grad,
    run_backend,
)
from omoe_kernels.ops.triton import configs as triton_configs  # noqa: E402
from omoe_kernels.ops.triton import gemm_kernels, token_kernels  # noqa: E402
from omoe_kernels.ops.triton import launch as triton_ops  # noqa: E402
from omoe_kernels.ops.triton.launch import Epilogue, Operands  # noqa: E402

pytestmark = pytest.mark.interpreter

BACKEND = "triton"


def test_triton_is_available_under_the_interpreter():
    assert triton_ops.AVAILABLE, triton_ops.IMPORT_ERROR
    assert "triton" in omoe_kernels.available_backends("cpu")


@pytest.mark.parametrize("options", [dict(normalize=False, top_k=2), dict(orthogonalize=False, top_k=1),
                                     dict(orthogonalize=False, normalize=False)],
                         ids=["topk_no_normalize", "top1_no_orthogonalize", "plain_mixture"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_odd_shape(dtype, options):
    problem = make_problem(33, 42, 38, 3, 4, dtype=dtype, seed=23, with_router_input=True)
    _, _, fwd_tol, grad_tol = ACCURACY_ROWS["fp16-random" if dtype == torch.float16 else "bf16-random"]
    assert_matches_oracle(problem, BACKEND, fwd_tol, grad_tol, **options)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_per_token_kernels_over_several_token_blocks(top_k):
    """T past two per-token blocks (one token per lane, at most TOKEN_BLOCK tokens a
    program), with a partial last block: the block offsets and the tail mask of the
    per-token kernels."""
    T = 2 * triton_configs.TOKEN_BLOCK + 37
    _, collapse, fwd_tol, grad_tol = ACCURACY_ROWS["fp32-collapse0.99"]
    problem = make_problem(T, 12, 10, 3, 2, dtype=torch.float32, collapse=collapse, seed=51)
    assert_matches_oracle(problem, BACKEND, fwd_tol, grad_tol, top_k=top_k)


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_per_token_programs_with_idle_lanes(top_k, monkeypatch):
    """Fewer tokens a program than lanes, as on a GPU (configs.tokens_per_program: 31 of
    32 at T = 8192 on 132 SMs): 7 tokens a program, the lanes past them idle, the last
    program partial. Every token is written once (outputs are poisoned)."""
    monkeypatch.setattr(triton_configs, "tokens_per_program", lambda T, num_sms, **_: 7)
    _, collapse, fwd_tol, grad_tol = ACCURACY_ROWS["fp32-collapse0.99"]
    problem = make_problem(40, 12, 10, 3, 2, dtype=torch.float32, collapse=collapse, seed=52)
    assert_matches_oracle(problem, BACKEND, fwd_tol, grad_tol, top_k=top_k)
    L = triton_ops.layout(3, 2)
    h = torch.zeros(40, L.ERP)
    launch, _ = triton_ops.plan_token_forward(h, torch.zeros(40, 3), None, L, 2, False, True,
                                              1e-6, triton_ops.Target.of(h.device))
    assert launch.grid == (6,)   # 7 tokens a program


@pytest.mark.parametrize("case", [
    ("fp32-collapse0.999", (48, 40, 36, 4, 4), dict(top_k=None), False),
    ("bf16-random", (33, 42, 38, 3, 4), dict(top_k=2), True),
    ("fp32-random", (33, 42, 38, 8, 1), dict(top_k=3, normalize=False), False),
    ("fp16-random", (7, 6, 42, 3, 4), dict(orthogonalize=False), True),
], ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}")
def test_token_algebra_fused_into_the_shrink(case, monkeypatch):
    """OMOE_TRITON_FUSE_TOKEN=1: routing and MGS in the shrink's epilogue."""
    monkeypatch.setenv("OMOE_TRITON_FUSE_TOKEN", "1")
    row, shape, options, with_router_input = case
    dtype, collapse, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    problem = make_problem(*shape, dtype=dtype, collapse=collapse, seed=32,
                           with_router_input=with_router_input)
    assert_matches_oracle(problem, BACKEND, fwd_tol, grad_tol, scaling=0.75, **options)


@pytest.mark.parametrize("top_k", [None, 2])
def test_fp16_coefficients_beyond_the_fp16_range(top_k):
    """Tiny B and large h: z = a ⊙ h exceeds 65504, so its fp16 hi/lo parts need a scale."""
    p = make_problem(33, 42, 38, 3, 4, dtype=torch.float64, seed=33)
    p = p.replace(x=p.x * 300, B=p.B * 1e-6).to(torch.float16)
    grad_y = random_grad((33, 38), torch.float16)
    y, grads = run_backend(p, BACKEND, grad_y, top_k=top_k)
    y_ref, grads_ref = oracle(p, grad_y, top_k=top_k)
    assert_rel_close(y, y_ref, 3e-3, "forward")
    for name in ("x", "A", "router_weight", "base_out"):
        assert_rel_close(grads[name], grads_ref[name], 1e-2, f"grad {name}")
    # grad B itself is ~1e6 here (1/‖B‖): compare where it fits in fp16.
    fits = grads_ref["B"].abs() < 6e4
    assert fits.float().mean() > 0.1
    assert_rel_close(grads["B"][fits], grads_ref["B"][fits], 1e-2, "grad B (fp16-representable part)")


def test_float64_inputs():
    problem = make_problem(33, 42, 38, 3, 4, dtype=torch.float64, seed=28)
    assert_matches_oracle(problem, BACKEND, 1e-12, 1e-10, top_k=2)


def test_opcheck_forward_op():
    problem = make_problem(7, 6, 42, 3, 4, dtype=torch.float32, seed=30)
    p = problem
    args = (p.x, p.A.requires_grad_(), p.B, p.router_weight, None, p.base_out, 0.5, 2, True, True, 1e-6)
    torch.library.opcheck(torch.ops.omoe_triton.forward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("with_gram", [True, False])
def test_opcheck_backward_op(with_gram):
    p = make_problem(7, 6, 42, 3, 4, dtype=torch.float32, seed=31, with_router_input=True)
    y, h, logits, G = torch.ops.omoe_triton.forward(p.x, p.A, p.B, p.router_weight, p.router_input,
                                                    None, 0.5, 2, True, False, 1e-6)
    grad_y = random_grad(y.shape, y.dtype)
    args = (grad_y, p.x, p.A, p.B, p.router_weight, p.router_input, h, logits, 0.5, 2, True,
            False, 1e-6) + ((G,) if with_gram else ())
    torch.library.opcheck(torch.ops.omoe_triton.backward.default, args, test_utils=("test_schema", "test_faketensor"))


def _gram_of(B: torch.Tensor, L) -> torch.Tensor:
    """B_catᵀB_cat in float64 on G's padded layout ([ERP, ERP], zero padding)."""
    E, d_out, r = B.shape
    columns = B.double().permute(1, 0, 2).reshape(d_out, E * r)
    G = torch.zeros(L.EP, L.RP, L.EP, L.RP, dtype=torch.float64)
    G[:E, :r, :E, :r] = (columns.t() @ columns).view(E, r, E, r)
    return G.view(L.ERP, L.ERP)


def test_backward_takes_the_forwards_gram_matrix(monkeypatch):
    """The forward op returns the G its shrink built; the training step's backward, by the
    eager autograd path and the registered op's alike, passes it on: its dZ builds none
    and splits d_out into partials that token_backward sums. The gradients equal those of
    the backward op called without G (dZ building it, in one pass over d_out)."""
    from omoe_kernels.ops.triton import replay

    plans = []   # (dZ's WITH_GRAM, its split-K partials) per backward planned
    plan = triton_ops.plan_backward

    def spy(*args, **kwargs):
        launches, outputs = plan(*args, **kwargs)
        dz = launches["dZ"]
        plans.append((dz.meta["WITH_GRAM"], dz.grid(dz.meta)[1]))
        return launches, outputs

    monkeypatch.setattr(triton_ops, "plan_backward", spy)
    replay.clear_all()
    p = make_problem(9, 6, 150, 3, 3, dtype=torch.float64, seed=46, with_router_input=True)
    L, options = triton_ops.layout(3, 3), (0.7, 2, True, True, 1e-6)
    inputs = (p.x, p.A, p.B, p.router_weight, p.router_input, p.base_out)
    y, h, logits, G = torch.ops.omoe_triton.forward(*inputs, *options)
    torch.testing.assert_close(G, _gram_of(p.B, L), rtol=1e-13, atol=1e-13)
    grad_y = random_grad(y.shape, y.dtype)
    rebuilt = torch.ops.omoe_triton.backward(grad_y, *inputs[:5], h, logits, *options)
    assert plans == [(True, 1)]
    for call in (lambda t: omoe_kernels.omoe_lora(*t[:4], router_input=t[4], base_out=t[5],
                                                  backend=BACKEND, scaling=0.7, top_k=2),
                 lambda t: torch.ops.omoe_triton.forward(*t, *options)[0]):
        leaves = [t.detach().requires_grad_(t is not p.base_out) for t in inputs]
        planned = len(plans)
        call(leaves).backward(grad_y)
        assert len(plans) == planned + 1 and plans[-1] == (False, 3)
        for leaf, expected in zip(leaves, rebuilt):
            torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("orthogonalize", [True, False])
def test_raw_ops_at_zero_tokens(orthogonalize):
    """T = 0 through the ops themselves (the public API returns before them): empty
    outputs and zero weight gradients, without launching a kernel on an empty grid."""
    p = make_problem(1, 6, 5, 3, 2, dtype=torch.float32, seed=34, with_router_input=True)
    x, r_in = p.x[:0], p.router_input[:0]
    y, h, logits, G = torch.ops.omoe_triton.forward(x, p.A, p.B, p.router_weight, r_in, p.base_out[:0],
                                                    0.5, 2, orthogonalize, True, 1e-6)
    assert y.shape == (0, 5) and h.shape[0] == 0 and logits.shape == (0, 3)
    if orthogonalize:   # G all the same (by torch: no kernel launched)
        torch.testing.assert_close(G, _gram_of(p.B, triton_ops.layout(3, 2)), rtol=1e-13, atol=1e-13)
    else:
        assert G.shape == (0,) and G.dtype == torch.float64
    grads = torch.ops.omoe_triton.backward(y, x, p.A, p.B, p.router_weight, r_in, h, logits, 0.5,
                                           2, orthogonalize, True, 1e-6)
    expected = [(0, 6), p.A.shape, p.B.shape, p.router_weight.shape, (0, 6)]
    for g, shape in zip(grads, expected):
        assert tuple(g.shape) == tuple(shape) and torch.equal(g, torch.zeros_like(g))


def test_raw_ops_refuse_more_active_experts_than_the_kernels_take():
    """The per-token kernels unroll over the k active slots: k = 16 did not compile in 15
    minutes. The ops say so instead of compiling (the registry's bound, 8)."""
    bound = omoe_kernels.backends.REGISTRY["triton"].max_active_experts
    p = make_problem(3, 4, 5, bound + 1, 2, dtype=torch.float32, seed=35)
    with pytest.raises(RuntimeError, match=f"Triton ops on cpu take at most {bound} active experts"):
        torch.ops.omoe_triton.forward(p.x, p.A, p.B, p.router_weight, None, None, 1.0, bound + 1,
                                      True, True, 1e-6)
    L = triton_ops.layout(bound + 1, 2)
    h, logits = torch.zeros(3, L.ERP), torch.zeros(3, bound + 1)
    with pytest.raises(RuntimeError, match="at most"):
        torch.ops.omoe_triton.backward(torch.zeros(3, 5), p.x, p.A, p.B, p.router_weight, None, h,
                                       logits, 1.0, bound + 1, True, True, 1e-6)


def test_layout_pads_for_tl_dot():
    for E in range(1, 17):
        for r in (1, 2, 3, 4, 8, 16):
            L = triton_ops.layout(E, r)
            assert L.EP >= E and L.RP >= r and L.ERP == L.EP * L.RP and L.ERP >= 16
            assert L.EPL >= 16 and L.EPL >= E


@triton.jit
def _triangle_kernel(out_ptr, count, NT: tl.constexpr, BLOCK: tl.constexpr):
    # BLOCK program indices at once (_triangle is elementwise): one interpreted program
    # rather than one per tile.
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i, j = gemm_kernels._triangle(tl.minimum(p, count - 1), NT)  # no root of < 0 past the end
    tl.store(out_ptr + 2 * p, i, mask=p < count)
    tl.store(out_ptr + 2 * p + 1, j, mask=p < count)


@pytest.mark.parametrize("NT", [1, 2, 3, 8, 37, 64])
def test_gram_programs_cover_the_upper_triangle_once(NT):
    """Program p of the gram programs builds the p-th tile (i <= j) of the upper
    triangle, row by row: every tile exactly once."""
    count = NT * (NT + 1) // 2
    out = torch.empty(count, 2, dtype=torch.int32)
    _triangle_kernel[(triton.cdiv(count, 1024),)](out, count, NT=NT, BLOCK=1024)
    expected = [(i, j) for i in range(NT) for j in range(i, NT)]
    assert [tuple(t) for t in out.tolist()] == expected


def test_gram_programs_over_several_trips():
    """d_out past one trip of a gram program (several row vectors a trip, a partial last
    one): G still exact and symmetric."""
    E, d_out, r = 2, 3000, 3
    rows = triton_configs.gram_rows(d_out, None)
    assert rows["GR"] > 1 and triton_configs.gram_trips(d_out, None) > 1
    B = torch.randn(E, d_out, r, dtype=torch.float32)
    L = triton_ops.layout(E, r)
    G = triton_ops.gram_only(B, L)
    B_cat = torch.zeros(d_out, L.EP, L.RP, dtype=torch.float64)
    B_cat[:, :E, :r] = B.permute(1, 0, 2).double()
    B_cat = B_cat.reshape(d_out, L.ERP)
    torch.testing.assert_close(G, B_cat.t() @ B_cat, rtol=1e-13, atol=1e-12)
    assert torch.equal(G, G.t())


def test_gram_programs_build_the_exact_symmetric_gram_matrix():
    """G = B_catᵀB_cat built by the programs appended to a GEMM launch, from B in place
    (E=3, r=5: padded experts and ranks), every element written (outputs are poisoned)."""
    E, d_out, r = 3, 37, 5
    B = torch.randn(E, d_out, r, dtype=torch.float32).transpose(1, 2).contiguous().transpose(1, 2)
    L = triton_ops.layout(E, r)
    G = triton_ops.gram_only(B, L)
    B_cat = torch.zeros(d_out, L.EP, L.RP, dtype=torch.float64)
    B_cat[:, :E, :r] = B.permute(1, 0, 2).double()
    B_cat = B_cat.reshape(d_out, L.ERP)
    torch.testing.assert_close(G, B_cat.t() @ B_cat, rtol=1e-13, atol=1e-13)
    assert torch.equal(G, G.t())


def test_bf16_operands_are_rounded_as_on_the_gpu():
    """Under the interpreter a bf16 dot runs in fp32 on operands rounded as the GPU's
    tensor cores see them: an fp32 operand in one bf16 MMA loses its low bits; as scaled
    fp16 (one MMA) it keeps 11 significant bits; hi + lo (two MMAs) keep 16."""
    L = triton_ops.layout(2, 8)
    z = torch.randn(40, L.ERP) * (1 + torch.rand(40, L.ERP)) * 300
    B = (torch.randn(2, 24, 8) * 1e-3).to(torch.bfloat16)   # small weights: fp16 subnormals unscaled
    B_cat = B.permute(1, 0, 2).reshape(24, L.ERP).double()
    exact = z.double() @ B_cat.t()
    # One chunk (ERP <= BLOCK_K): each row of z scaled by a power of 2 into [1, 2) at its max.
    row_exp = torch.floor(torch.log2(z.abs().amax(1, keepdim=True)))
    fp16_rounded = (z / 2 ** row_exp).half().double() * 2 ** row_exp
    expected = {"bf16": z.bfloat16().double() @ B_cat.t(), "fp16": fp16_rounded @ B_cat.t(),
                "hi_lo": exact}
    errors = {}
    for mode, tol in (("bf16", 1e-6), ("fp16", 1e-6), ("hi_lo", 1e-5)):
        flags = triton_configs.a_operand_flags(triton_configs.DOT_BF16, mode)
        y = triton_ops.matmul(z, B, L, Operands(triton_configs.DOT_BF16, True, "Bk", **flags),
                              Epilogue(torch.float32))
        assert_rel_close(y, expected[mode], tol, mode)
        errors[mode] = ((expected[mode] - exact).norm() / exact.norm()).item()
    assert errors["bf16"] > 4 * errors["fp16"] > 0 and errors["fp16"] > 1e-5, errors


def test_scaled_fp16_operands_keep_extreme_and_non_finite_values():
    """The power-of-2 scaling of _dot_fp16_scaled: a row of Z past 2^127 keeps its values
    (an unclamped exponent would make its scale 0.0), and NaN/Inf reach exactly the
    outputs they reach in eager (a NaN in B: its column; an Inf in Z: its row)."""
    L = triton_ops.layout(2, 8)
    z = torch.randn(4, L.ERP)
    z[1] *= 1.5 * 2.0 ** 127 / z[1].abs().max()
    B = (torch.randn(2, 24, 8) * 1e-3).to(torch.bfloat16)
    B_cat = B.permute(1, 0, 2).reshape(24, L.ERP).double()
    flags = triton_configs.a_operand_flags(triton_configs.DOT_BF16, "fp16")

    def expand(z, B):
        return triton_ops.matmul(z, B, L, Operands(triton_configs.DOT_BF16, True, "Bk", **flags),
                                 Epilogue(torch.float32))

    assert_rel_close(expand(z, B), z.double() @ B_cat.t(), 1e-3, "row past 2^127")
    z_bad, B_bad = z.clone(), B.clone()
    z_bad[2, 3] = float("inf")
    B_bad[1, 5, 2] = float("nan")
    eager = z_bad.double() @ B_bad.permute(1, 0, 2).reshape(24, L.ERP).double().t()
    got = expand(z_bad, B_bad)
    assert not torch.isfinite(eager).all()
    assert torch.equal(torch.isfinite(got), torch.isfinite(eager))


def _scaled_rows(z: torch.Tensor):
    """(fp16 z · 2^-e, 2^e) per row with e from the row's fp32 max: the format the
    per-token kernels write for the expand and dX (token_kernels._pow2_scales)."""
    bits = z.float().abs().amax(1).view(torch.int32)
    e = ((bits >> 23) & 0xFF).clamp(1, 253) - 127
    return (z.float() * torch.exp2(-e.float())[:, None]).half(), torch.exp2(e.float())


def test_token_forward_writes_the_expands_fp16_operand():
    """16-bit steps: token_forward writes Z once as fp16 scaled per row (the row's max in
    [1, 2)) plus the row's power-of-2 scale: exactly the fp32 Z's values rounded to 11
    significant bits; a NaN in h stays in its token's row."""
    L = triton_ops.layout(3, 4)
    h = torch.randn(40, L.ERP) * torch.logspace(-30, 30, 40)[:, None]
    h[:, 12:] = 0.0                         # padding expert columns
    h[5, 2] = float("nan")
    logits = torch.randn(40, 3)
    logits[5, 0] = 10.0                     # token 5 routes to expert 0 (its NaN column)
    outs = {}
    for scaled in (False, True):
        launch, outs[scaled] = triton_ops.plan_token_forward(
            h, logits, None, L, 2, False, True, 1e-6, triton_ops.Target.of(h.device), scaled)
        launch.run()
    z32 = outs[False][0]
    z16, scale = outs[True]
    assert z16.dtype == torch.float16 and scale.shape == (40,)
    want16, want_scale = _scaled_rows(z32)
    finite = torch.isfinite(z32).all(1)
    assert torch.equal(z16[finite], want16[finite]) and torch.equal(scale[finite], want_scale[finite])
    assert torch.equal(torch.isnan(z16), torch.isnan(z32)) and torch.isnan(z32[5]).any()
    row_max = z16[finite].float().abs().amax(1)
    assert ((row_max >= 1) & (row_max < 2)).all()


def test_scaled_expand_keeps_extreme_and_non_finite_values():
    """The expand on the per-token kernels' operand format (SCALED_A): B scaled per
    output column over all of K, both scales factored out of one accumulator. A row of Z
    past 2^127 keeps its values; NaN/Inf reach exactly the outputs eager's reach."""
    L = triton_ops.layout(2, 8)
    z = torch.randn(6, L.ERP) * torch.logspace(-20, 20, 6)[:, None]
    z[1] = torch.randn(L.ERP)
    z[1] *= 1.5 * 2.0 ** 127 / z[1].abs().max()
    B = (torch.randn(2, 24, 8) * 1e-3).to(torch.bfloat16)
    B[0, 3] *= 1e-4                         # a column of B_cat below fp16's normal range
    B_cat = lambda B: B.permute(1, 0, 2).reshape(24, L.ERP).double()  # noqa: E731
    flags = triton_configs.a_operand_flags(triton_configs.DOT_BF16, "fp16")

    def expand(z, B):
        z16, scale = _scaled_rows(z)
        return triton_ops._run(triton_ops.plan_matmul(
            z16, B, L, Operands(triton_configs.DOT_BF16, True, "Bk", **flags),
            Epilogue(torch.float32), triton_ops.Target.of(z.device), a_scale=scale))[0]

    exact = z.double() @ B_cat(B).t()
    got = expand(z, B)
    # Each product keeps 11 bits of z and all 8 of B: row by row within fp16's rounding.
    assert ((got.double() - exact).norm(dim=1) <= 2e-3 * exact.norm(dim=1)).all()
    z_bad, B_bad = z.clone(), B.clone()
    z_bad[2, 3] = float("inf")
    B_bad[1, 5, 2] = float("nan")
    eager = z_bad.double() @ B_cat(B_bad).t()
    assert not torch.isfinite(eager).all()
    assert torch.equal(torch.isfinite(expand(z_bad, B_bad)), torch.isfinite(eager))


@pytest.mark.parametrize("case", ["expand", "dx", "dx_router_input"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_grouped_scaled_gemm_matches_float64(dtype, case, monkeypatch):
    """scaled_matmul_kernel: each program holds its rows of the fp16 operand and walks
    N_GROUP column tiles. M and N off the tiles (a partial last group), padded experts
    (E·r = 9 in ERP = 16), base added (expand), the router term added (dX) or written
    apart (a separate router input). Within fp16 rounding of float64, as matmul_kernel's
    SCALED_A path (run here for comparison with GROUPED_MAX_K lowered)."""
    L = triton_ops.layout(3, 3)
    M, N, s = 37, 75, 0.75
    kind = triton_configs.DOT_BF16 if dtype == torch.bfloat16 else triton_configs.DOT_FP16
    flags = triton_configs.a_operand_flags(kind, "fp16")
    g = torch.Generator().manual_seed(5)
    a = torch.randn(M, L.ERP, generator=g) * torch.logspace(-3, 3, M)[:, None]
    a[:, [3, 7, 11, 12, 13, 14, 15]] = 0.0           # the padding columns (rank 3 of RP 4)
    a16, scale = _scaled_rows(a)
    a = a16.double() * scale.double()[:, None]
    weight = torch.randn(3, 3, N, generator=g).to(dtype)     # A [E, r, d_in] ("Ak")
    w_cat = torch.zeros(L.ERP, N, dtype=torch.float64)
    for e in range(3):
        w_cat[e * L.RP:e * L.RP + 3] = weight[e].double()
    packed = "Ak"
    if case == "expand":                                      # B [E, d_out, r] ("Bk")
        weight = weight.permute(0, 2, 1).contiguous()
        packed = "Bk"
    base = torch.randn(M, N, generator=g).to(dtype)
    dl = torch.randn(M, L.EPL, generator=g)
    router_w = torch.randn(3, N, generator=g).to(dtype)
    grad_r = torch.empty(M, N, dtype=dtype) if case == "dx_router_input" else None
    epi = (Epilogue(dtype, s, add=base) if case == "expand"
           else Epilogue(dtype, router=(dl, router_w, grad_r)))
    want = s * (a @ w_cat) + base.double() if case == "expand" else a @ w_cat
    router = dl[:, :3].double() @ router_w.double()
    if case == "dx":
        want = want + router

    def run(max_k):
        monkeypatch.setattr(triton_configs, "GROUPED_MAX_K", max_k)
        launch, out = triton_ops.plan_matmul(a16, weight, L, Operands(kind, dtype == torch.bfloat16, packed, **flags),
                                             epi, triton_ops.Target.of(a16.device), a_scale=scale)
        launch.run()
        return launch, out[0].double(), None if grad_r is None else grad_r.double().clone()

    launch, got, got_r = run(128)
    assert launch.kernel.__name__ == "scaled_matmul_kernel" and launch.meta["N_GROUP"] == 2
    assert launch.grid(launch.meta) == (2 * 2, 1)      # 2 m-tiles × 2 groups of 32-wide tiles
    old, got_old, got_r_old = run(0)
    assert old.kernel.__name__ == "matmul_kernel"
    # The output's own rounding (the interpreter's fp32 → bf16 cast truncates: 2^-8).
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for out in (got, got_old):
        assert ((out - want).norm(dim=1) <= tol * want.norm(dim=1)).all()
    if got_r is not None:
        for out in (got_r, got_r_old):
            assert ((out - router).norm(dim=1) <= tol * router.norm(dim=1)).all()


@pytest.mark.parametrize("top_k", [None, 2], ids=["dense", "top2"])
def test_bf16_collapse_keeps_the_operand_precision(top_k):
    """Near collapse `B_cat z` and `dH A_cat` cancel (κ ≈ 3e2), so the precision Z and dH
    enter the bf16 MMAs with shows (the errors of each operand mode are in bench/README.md,
    "Accuracy choices"). Tighter than docs/contract.md §2's row (3e-2, gradients finite)
    on purpose: one bf16 rounding misses these bounds, the scaled fp16 operands
    (triton_configs.EXPAND_Z, DX_DH) meet them, so the test pins the operand modes."""
    problem = make_problem(*ACCURACY_SHAPE, dtype=torch.bfloat16, collapse=0.99, seed=1,
                           with_router_input=top_k is not None)
    grad_y = random_grad((ACCURACY_SHAPE[0], ACCURACY_SHAPE[2]), torch.bfloat16)
    y, grads = run_backend(problem, BACKEND, grad_y, top_k=top_k)
    y_ref, grads_ref = oracle(problem, grad_y, top_k=top_k)
    assert_rel_close(y, y_ref, 8e-3, "forward")
    assert_rel_close(grads["x"], grads_ref["x"], 3e-2, "grad x")


def test_autotune_keys_follow_no_exact_token_count():
    """A new T re-tunes only when it crosses a power of 2: the autotune keys name the
    bucketed sizes, never T, M or K themselves."""
    for key in (triton_configs.MATMUL_AUTOTUNE_KEY, triton_configs.SHRINK_AUTOTUNE_KEY):
        assert not {"T", "M", "K", "k_per_split"} & set(key), key
    assert "t_bucket" in triton_configs.SHRINK_AUTOTUNE_KEY
    assert {"m_bucket", "k_bucket"} <= set(triton_configs.MATMUL_AUTOTUNE_KEY)


# ---- reliability (the Triton share of test_fake_kernels.py and test_non_finite_values.py) --------------------------------

@pytest.mark.parametrize("experts,top_k", [(1, None), (3, 1)], ids=["E1-dense", "top1"])
def test_nan_in_the_routed_experts_B_poisons_its_tokens(experts, top_k):
    """A NaN in a routed expert's B reaches every output eager's reaches: a clamp of
    <v, v> must not turn it into finite values (scaled by 1/sqrt(eps))."""
    problem = make_problem(5, 4, 6, experts, 2, dtype=torch.float32, seed=40)
    B = problem.B.clone()
    B[:, 2, 1] = float("nan")
    problem = problem.replace(B=B)
    grad_y = random_grad((5, 6), torch.float32)
    y, grads = run_backend(problem, BACKEND, grad_y, top_k=top_k)
    y_ref, grads_ref = run_backend(problem, "reference", grad_y, top_k=top_k)
    assert torch.isnan(y_ref).any()
    for what, got, eager in [("forward", y, y_ref)] + [
            (f"grad {n}", g, grads_ref[n]) for n, g in grads.items()]:
        hidden = torch.isfinite(got) & ~torch.isfinite(eager)
        assert not hidden.any(), f"{what}: {int(hidden.sum())} values finite where eager's are not"


def test_scaling_zero_with_base_out_keeps_nan():
    problem = make_problem(5, 4, 6, 2, 2, dtype=torch.float32, seed=41)
    B = problem.B.clone()
    B[1, 1, 0] = float("nan")
    problem = problem.replace(B=B)
    y, _ = run_backend(problem, BACKEND, scaling=0.0)
    y_ref, _ = run_backend(problem, "reference", scaling=0.0)
    assert torch.isnan(y_ref).any() and torch.equal(torch.isnan(y), torch.isnan(y_ref))


def test_double_backward_is_refused():
    p = make_problem(4, 5, 6, 2, 2, dtype=torch.float32, seed=42, with_base_out=False)
    x = p.x.detach().requires_grad_()
    y = omoe_kernels.omoe_lora(x, p.A, p.B, p.router_weight, backend=BACKEND)
    with pytest.raises(RuntimeError, match="double backward.*'triton'.*backend='reference'"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_jvp_is_refused():
    p = make_problem(4, 5, 6, 2, 2, dtype=torch.float32, seed=43, with_base_out=False)
    f = lambda t: omoe_kernels.omoe_lora(t, p.A, p.B, p.router_weight, backend=BACKEND)  # noqa: E731
    with pytest.raises(RuntimeError, match="torch.func transform"):
        torch.func.jvp(f, (p.x,), (torch.ones_like(p.x),))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_opcheck_non_contiguous_inputs(layout):
    p = make_problem(5, 4, 6, 3, 2, dtype=torch.float32, seed=44, with_router_input=True)

    def lay(t):
        return {"transposed": t.t().contiguous().t(),
                "sliced": torch.cat([t, t], dim=-1)[..., : t.shape[-1]],
                "expanded": t[:1].expand_as(t)}[layout]

    x, router_input, W = lay(p.x), lay(p.router_input), lay(p.router_weight)
    options = (0.5, 2, True, True, 1e-6)
    args = (x.requires_grad_(), p.A.requires_grad_(), p.B, W, router_input, p.base_out)
    torch.library.opcheck(torch.ops.omoe_triton.forward.default, (*args, *options),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y, h, logits, _ = torch.ops.omoe_triton.forward(*args, *options)
    torch.library.opcheck(torch.ops.omoe_triton.backward.default,
                          (lay(random_grad(y.shape, y.dtype)), x.detach(), p.A.detach(), p.B, W,
                           router_input, h.t().contiguous().t(), logits, *options),
                          test_utils=("test_schema", "test_faketensor"))


def test_per_token_pass_matches_the_coefficient_oracle():
    from omoe_kernels.testing import oracle as co

    p = make_problem(9, 6, 7, 3, 2, dtype=torch.float64, seed=45, collapse=0.9)
    y, h, logits, _ = torch.ops.omoe_triton.forward(p.x, p.A, p.B, p.router_weight, None,
                                                 p.base_out, 0.7, 2, True, True, 1e-6)
    L = triton_ops.layout(3, 2)
    h_unpadded = h.view(9, L.EP, L.RP)[:, :3, :2].reshape(9, 6)
    z = co.token_outputs(h_unpadded, logits, p.B, top_k=2, orthogonalize=True, normalize=True,
                         eps=1e-6)
    torch.testing.assert_close(y, p.base_out + 0.7 * z @ co.concat_experts(p.B).t(),
                               rtol=1e-10, atol=1e-12)


# ---- per-token kernels: gram gradient over active pairs, 64-bit row offsets ---------------

def _gram_grad_reference(h, ds, L):
    """dG = Σ_t Σ_(i,j) dS[t, i, j] h_i h_jᵀ in float64, from SlotGrads (slot layout)."""
    T = h.shape[0]
    values = ds.values.view(T, ds.slots, ds.slots)
    if ds.experts is None:                       # dense: slot s is expert s
        full = values
    else:
        full = torch.zeros(T, L.EP, L.EP, dtype=torch.float64)
        for s1 in range(ds.slots):
            for s2 in range(ds.slots):
                e1, e2 = ds.experts[:, s1].long(), ds.experts[:, s2].long()
                on = (e1 >= 0) & (e2 >= 0)
                full[on, e1[on], e2[on]] = values[on, s1, s2]
    hh = h.double().view(T, L.EP, L.RP)
    return torch.einsum("tij,tia,tjb->iajb", full, hh, hh).reshape(L.ERP, L.ERP)


def _slot_grads(T, E, r, top_k, seed):
    """Random h and SlotGrads as token_backward writes them: symmetric per token, top-k
    slots hold distinct experts in ascending order (-1 in padding slots), padding slots'
    values are 0."""
    L = triton_ops.layout(E, r)
    KP = triton_configs.TokenConfig.of(L, top_k, True, True).KP
    gen = torch.Generator().manual_seed(seed)
    h = torch.zeros(T, L.EP, L.RP)
    h[:, :E, :r] = torch.randn(T, E, r, generator=gen)
    values = torch.zeros(T, KP, KP, dtype=torch.float64)
    values[:, :top_k, :top_k] = torch.randn(T, top_k, top_k, dtype=torch.float64, generator=gen)
    values = values + values.transpose(1, 2)
    experts = None
    if top_k < E:
        chosen = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :top_k].sort(dim=1).values
        experts = torch.full((T, KP), -1, dtype=torch.int32)
        experts[:, :top_k] = chosen.int()
    ds = triton_ops.SlotGrads(values.view(T, KP * KP), experts, KP)
    return h.view(T, L.ERP), ds, L


def _upper_blocks(L) -> torch.Tensor:
    """[ERP, ERP] mask of dG's expert blocks (i, j) with i <= j."""
    block = torch.arange(L.ERP) // L.RP
    return block[:, None] <= block[None, :]


@pytest.mark.parametrize("E, r, top_k", [(3, 2, 3), (4, 4, 2), (6, 2, 3), (5, 3, 1), (2, 11, 2),
                                          (3, 16, 2)],
                         ids=["dense-padded-experts", "top2", "top3-padding-slot", "top1",
                              "dense-rank-dot", "top2-rank-dot"])
def test_gram_grad_partials_sum_active_pairs(E, r, top_k):
    """gram_grad writes every element of the upper triangle of expert blocks of its
    [splits, ERP, ERP] partials (outputs start as NaN), the diagonal blocks symmetric; they
    sum to dG over the active pairs, and a pair no token activates is exactly 0."""
    T = 3 * triton_configs.gram_grad_block(triton_ops.layout(E, r)) + 5
    h, ds, L = _slot_grads(T, E, r, top_k, seed=E * 10 + top_k)
    if ds.experts is not None:                  # no token routes to the last expert
        ds.experts[ds.experts == E - 1] = -1
    partials = triton_ops.gram_grad(h, ds, L)
    upper = _upper_blocks(L)
    assert partials.shape[0] >= 2 and partials.shape[1:] == (L.ERP, L.ERP)
    assert torch.isfinite(partials[:, upper]).all()
    dG = partials.sum(0)
    full = torch.where(upper, dG, dG.t())
    torch.testing.assert_close(full, full.t(), rtol=0, atol=0)   # diagonal blocks symmetric
    torch.testing.assert_close(full, _gram_grad_reference(h, ds, L), rtol=1e-12, atol=1e-12)
    if ds.experts is not None:
        last = slice((E - 1) * L.RP, E * L.RP)
        assert torch.equal(full[:, last], torch.zeros_like(full[:, last]))


@pytest.mark.parametrize("r", [2, 16], ids=["products", "dot"])
def test_gram_grad_keeps_a_nan_to_its_pair(r):
    """A NaN in one token's dS of pair (i, j) reaches dG's (i, j) block only
    (the kernel selects a token's pair value; it does not multiply the others by 0)."""
    h, ds, L = _slot_grads(40, 4, r, 2, seed=3)
    t = 7
    i, j = (int(e) for e in ds.experts[t, :2])   # i < j
    ds.values.view(40, 2, 2)[t, 0, 1] = ds.values.view(40, 2, 2)[t, 1, 0] = float("nan")
    dG = triton_ops.gram_grad(h, ds, L).sum(0).view(L.EP, L.RP, L.EP, L.RP)
    nan_blocks = {(a, b) for a in range(4) for b in range(a, 4) if torch.isnan(dG[a, :, b]).any()}
    assert nan_blocks == {(i, j)}


@triton.jit
def _row_offsets_kernel(tokens_ptr, out_ptr, stride, N: tl.constexpr):
    n = tl.arange(0, N)
    tl.store(out_ptr + n, token_kernels._row_offsets(tl.load(tokens_ptr + n), stride))


def test_row_offsets_are_64_bit():
    """token · stride passes 2³¹ once T · E·r does (h, z, dHL; T · KP² for dS): the row
    bases are int64. Checked on the index arithmetic itself (no 2³¹-element buffers), and
    every row base of the kernels goes through it."""
    tokens = torch.tensor([0, 1, 3, (1 << 25) + 5], dtype=torch.int32)
    stride = (1 << 30) - 16                     # an int32 kernel argument
    out = torch.empty(4, dtype=torch.int64)
    _row_offsets_kernel[(1,)](tokens, out, stride, N=4)
    assert out.tolist() == [t * stride for t in tokens.tolist()]
    source = inspect.getsource(token_kernels)
    assert not re.search(r"\*\s*stride_", source), "a row stride multiplied outside _row_offsets"
    assert not re.search(r"offs_t(\[[^\]]*\])?\s*\*", source), "a token index multiplied outside _row_offsets"
