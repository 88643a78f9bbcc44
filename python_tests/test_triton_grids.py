"""The Triton step's launch grids at the GPU shapes of docs/contract.md §6, from the
launchers' own plans on meta tensors sized for an H200 (132 SMs; no GPU, no interpreter):
the per-token kernels fill the GPU and the programs that build G = B_catᵀB_cat loop over
d_out in a few trips."""
from __future__ import annotations

import dataclasses
import math

import pytest

pytest.importorskip("triton")

from omoe_kernels.ops.triton import configs as C  # noqa: E402
from omoe_kernels.testing.shapes import SHAPES  # noqa: E402
from omoe_kernels.tools import kernel_model as M  # noqa: E402

GPU_SHAPES = ("llama7b", "llama7b-top2", "wide")


def _launches(name: str, num_tokens: int | None = None, saved_gram: bool = True) -> dict:
    import torch

    from omoe_kernels.tools.kernel_report import _step_launches

    shape = SHAPES[name]
    if num_tokens is not None:
        shape = dataclasses.replace(shape, num_tokens=num_tokens)
    return _step_launches(shape, torch.bfloat16, saved_gram=saved_gram)


def _programs(launch) -> int:
    grid = launch.grid(dict(launch.meta, **launch.config.meta())) if callable(launch.grid) \
        else launch.grid
    return math.prod(grid)


@pytest.mark.parametrize("name", GPU_SHAPES)
@pytest.mark.parametrize("num_tokens, waves", [(8192, 2), (2048, 1)])
def test_per_token_kernels_fill_the_gpu(name, num_tokens, waves):
    """At least two waves of programs over 132 SMs at T = 8192, one at T = 2048, each
    program at most one token per lane."""
    launches = _launches(name, num_tokens)
    for kernel in ("token_forward", "token_backward"):
        launch = launches[kernel]
        per_program = launch.arg("per_program")
        assert 1 <= per_program <= launch.meta["BT"] == 32 * launch.options["num_warps"]
        assert _programs(launch) == math.ceil(num_tokens / per_program)
        assert _programs(launch) >= waves * M.H200_SMS, (kernel, _programs(launch))


@pytest.mark.parametrize("name", GPU_SHAPES)
def test_gram_programs_loop_over_d_out_in_few_trips(name):
    """The programs appended to the shrink and dZ launches (dZ: a backward op called
    without the forward's G) build one tile of the upper triangle of G each, and walk
    d_out in at most 32 trips."""
    launches = _launches(name)
    d_out = SHAPES[name].d_model
    for kernel, launch in (("shrink", launches["shrink"]), ("dZ", _launches(name, saved_gram=False)["dZ"])):
        meta, erp = launch.meta, launch.meta["ERP"]
        tiles = erp // meta["GB"]
        assert launch.arg("num_gram") == tiles * (tiles + 1) // 2 == C.gram_programs(erp)
        assert meta["GD"] == 32 * launch.config.num_warps   # one row per thread
        trips = math.ceil(d_out / (meta["GD"] * meta["GR"]))
        assert trips <= 32 and trips == C.gram_trips(d_out, launch.config.num_warps), (kernel, trips)


@pytest.mark.parametrize("name", GPU_SHAPES)
@pytest.mark.parametrize("num_tokens", [8192, 2048])
def test_backward_reads_the_forwards_gram_and_dz_fills_the_gpu(name, num_tokens):
    """The step's backward takes the G the shrink's programs built: dZ appends no G
    programs, and splits d into partials (one program per SM) that token_backward sums."""
    launches = _launches(name, num_tokens)
    G = launches["shrink"].arg("gram_ptr")
    assert launches["token_backward"].arg("g_ptr") is G and launches["token_forward"].arg("g_ptr") is G
    dz = launches["dZ"]
    assert dz.arg("num_gram") == 0 and not dz.meta["WITH_GRAM"]
    partials, k_per_split = dz.args[2], dz.arg("k_per_split")
    splits = partials.shape[0]
    assert splits == math.ceil(SHAPES[name].d_model / k_per_split) >= 2
    tiles = math.ceil(num_tokens / dz.config.block_m) * math.ceil(dz.meta["ERP"] / dz.config.block_n)
    assert _programs(dz) == tiles * splits and 0.95 * M.H200_SMS <= _programs(dz) <= M.H200_SMS
    backward = launches["token_backward"]
    assert backward.arg("dz_ptr") is partials and backward.arg("dz_splits") == splits
    assert backward.arg("stride_dzs") == partials.stride(0)


@pytest.mark.parametrize("d_out", [1, 37, 4096, 11008, 65536])
@pytest.mark.parametrize("num_warps", [None, 4, 8])
def test_gram_rows_bound_the_trips(d_out, num_warps):
    rows = C.gram_rows(d_out, num_warps)
    assert rows["GD"] == 32 * (num_warps or 4) and rows["GR"] >= 1
    assert C.gram_trips(d_out, num_warps) <= C.GRAM_TRIPS


def test_tokens_per_program():
    assert C.tokens_per_program(8192, 132) == 31
    assert C.tokens_per_program(2048, 132) == 7
    assert C.tokens_per_program(10 ** 6, 132) == C.TOKEN_BLOCK
    assert C.tokens_per_program(5, 132) == 1
    assert C.tokens_per_program(101, 4, interpret=True) == 32
    assert C.tokens_per_program(33, 4, interpret=True) == 17


@pytest.mark.parametrize("name", GPU_SHAPES)
def test_expand_and_dx_take_the_per_token_kernels_fp16_operands(name):
    """bf16 step: the per-token kernels write Z and dH once as fp16 with a scale per row,
    and the expand and dX read that (scaled_matmul_kernel: the whole K in one tile, one
    fp16 MMA per n-tile), in the tile sized for two CTAs per SM."""
    launches = _launches(name)
    T, erp = SHAPES[name].num_tokens, launches["token_forward"].config.ERP
    for token, gemm in (("token_forward", "expand"), ("token_backward", "dX")):
        assert launches[token].meta["SCALED"] and launches[gemm].meta["SCALED_A"]
        a, a_scale = launches[gemm].args[0], launches[gemm].args[8]
        assert a.dtype.itemsize == 2 and tuple(a.shape) == (T, erp)
        assert a_scale.dtype.itemsize == 4 and tuple(a_scale.shape) == (T,)
        assert launches[gemm].config == C.grouped_tile(T, SHAPES[name].d_model, erp, M.H200_SMS)
    assert not launches["dB"].meta["SCALED_A"]   # dB contracts over tokens: fp32 Z


@pytest.mark.parametrize("name", GPU_SHAPES)
@pytest.mark.parametrize("num_tokens", [8192, 2048])
def test_expand_and_dx_read_their_fp16_operand_once_per_group(name, num_tokens):
    """The expand and dX hold a [BLOCK_M, K] tile of Z / dH per program and walk a group of
    n-tiles (scaled_matmul_kernel): Z / dH read from L2 once per group, not once per
    64-wide n-tile, with two programs per SM or more (one wave at two CTAs per SM)."""
    launches = _launches(name, num_tokens)
    d, erp = SHAPES[name].d_model, launches["token_forward"].config.ERP
    for gemm in ("expand", "dX"):
        launch = launches[gemm]
        cfg = launch.config
        assert launch.kernel.__name__ == "scaled_matmul_kernel"
        assert cfg.block_k >= erp and cfg.n_group == launch.meta["N_GROUP"] > 1
        n_tiles = math.ceil(d / cfg.block_n)
        assert _programs(launch) == math.ceil(num_tokens / cfg.block_m) * math.ceil(n_tiles / cfg.n_group)
        assert _programs(launch) >= 2 * M.H200_SMS, (gemm, _programs(launch))
        wider = dataclasses.replace(cfg, n_group=2 * cfg.n_group)   # the most that keeps two per SM
        assert cfg.n_group == C.GROUP_MAX_N_TILES or wider.programs(num_tokens, d) < 2 * M.H200_SMS
    # Past GROUPED_MAX_K the K loop returns (matmul_kernel's SCALED_A path).
    assert C.grouped_tile(num_tokens, d, 2 * C.GROUPED_MAX_K, M.H200_SMS) is None


@pytest.mark.parametrize("name, blocks", [("llama7b", 5), ("llama7b-top2", 16), ("wide", 32)])
def test_gram_grad_walks_blocks_of_64_tokens(name, blocks):
    """gram_grad walks blocks of 64 tokens at every GPU shape, dense or top-k (a float64
    dot at RP = 16, the [BLOCK_T, RP, RP] products at RP = 8), not 16: each block waits for
    its loads whether or not the pair is active in it."""
    gg = _launches(name)["gram_grad"]
    assert gg.meta["TOP_K_ROUTING"] == (SHAPES[name].top_k is not None)
    assert gg.meta["BLOCK_T"] == 64
    assert math.ceil(gg.arg("tokens_per_split") / 64) == blocks


@pytest.mark.parametrize("name", GPU_SHAPES)
def test_gram_grad_runs_the_upper_triangle_of_expert_pairs(name):
    """dG is symmetric: gram_grad runs one program per expert pair i <= j and token split,
    and the finalize's loop reads each split's partial once per chunk of dG."""
    launches = _launches(name)
    gg, fin = launches["gram_grad"], launches["finalize"]
    ep = gg.meta["ERP"] // gg.meta["RP"]
    splits = gg.grid[1]
    assert gg.grid == (ep * (ep + 1) // 2, splits) and fin.arg("g_splits") == splits
    chunks = math.ceil(gg.meta["ERP"] / fin.meta["BLOCK_G"])
    loop = M.finalize_loop(fin.arg("b_splits"), fin.arg("a_splits"), splits, gg.meta["ERP"],
                           fin.meta["BLOCK_G"])
    assert loop.trips == max(fin.arg("b_splits") + chunks * (splits + 1), fin.arg("a_splits"))
