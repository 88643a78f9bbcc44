"""OMoELinear inside training jobs: torch.compile, autocast, activation checkpointing,
router statistics, DistributedDataParallel and FSDP2 — each compared with plain eager.

Every check uses a small injected model (two OMoELinear layers with non-zero B, so the
adapter contributes) on the backends available on DEVICE.
"""
from __future__ import annotations

import copy
import os
import socket
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import omoe_kernels as ok
from helpers import BACKENDS, DEVICE, rel_err

D_IN, D_HID, D_OUT = 24, 20, 12


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D_IN, D_HID)
        self.act = nn.GELU()
        self.down = nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def make_model(backend: str, seed: int = 0, device=DEVICE, **options) -> nn.Module:
    """A Block with both linears injected and B drawn at random (not LoRA's zero init)."""
    torch.manual_seed(seed)
    model = Block()
    options = {"num_experts": 3, "rank": 4, "top_k": 2, **options}
    ok.inject(model, ["up", "down"], backend=backend, **options)
    with torch.no_grad():
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    return model.to(device)


def make_input(seed: int = 1, shape=(3, 7), device=DEVICE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape + (D_IN,), generator=gen).to(device)


def loss_and_grads(model: nn.Module, x: torch.Tensor, run=None):
    """Output, and the gradient of a fixed random projection of it w.r.t. x and every
    trainable parameter (by name)."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = (model if run is None else run)(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.device)
    (y.float() * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.detach().clone()
    return y.detach(), grads


def assert_all_close(actual: dict, expected: dict, tol: float, what: str) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        assert actual[name] is not None, f"{what}: no gradient for {name}"
        err = rel_err(actual[name], expected[name])
        assert err <= tol, f"{what}: gradient {name} relative error {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- compile

@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = make_model(backend)
    ok.track_router_stats(model)  # the statistics path must not break the graph either
    x = make_input()
    y_ref, g_ref = loss_and_grads(model, x)
    stats_ref = ok.router_stats(model)
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    y, g = loss_and_grads(model, x, run=compiled)
    assert rel_err(y, y_ref) <= 1e-5
    assert_all_close(g, g_ref, 1e-4, f"compiled {backend}")
    for name, stats in ok.router_stats(model).items():
        assert torch.equal(stats.load, stats_ref[name].load)
        assert rel_err(stats.mean_gate, stats_ref[name].mean_gate) <= 1e-5


# ----------------------------------------------------------------------------- autocast

@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_matches_fp32(backend):
    if DEVICE.type == "cpu" and backend == "triton":
        pytest.skip("the Triton interpreter does not compute in bf16 (TOOLCHAIN.md)")
    model = make_model(backend)
    x = make_input()
    y_ref, g_ref = loss_and_grads(model, x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, g = loss_and_grads(model, x)
    # The adapter runs in the autocast dtype, as the base nn.Linear does ...
    assert y.dtype == torch.bfloat16
    # ... and the fp32 parameters receive fp32 gradients.
    for layer in ok.omoe_layers(model).values():
        assert layer.lora_A.grad.dtype == torch.float32
    # bf16 has 8 mantissa bits: two chained layers, each base + adapter, in bf16.
    assert rel_err(y, y_ref) <= 2e-2
    assert_all_close(g, g_ref, 5e-2, f"autocast {backend}")


# ------------------------------------------------------------------------ checkpointing

@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_checkpointing_matches_eager(backend):
    # dropout > 0: checkpointing must replay the same dropout mask when it recomputes.
    model = make_model(backend, dropout=0.2)
    x = make_input()
    torch.manual_seed(3)
    y_ref, g_ref = loss_and_grads(model, x)
    torch.manual_seed(3)
    y, g = loss_and_grads(model, x, run=lambda t: checkpoint(model, t, use_reentrant=False))
    assert torch.equal(y, y_ref)
    assert_all_close(g, g_ref, 1e-6, f"checkpointed {backend}")


# --------------------------------------------------------------------- router statistics

@pytest.mark.parametrize("backend", BACKENDS)
def test_router_stats_values_and_balance_loss_gradient(backend):
    model = make_model(backend, num_experts=4, top_k=2)
    layer = model.up
    with pytest.raises(RuntimeError, match="track_router_stats"):
        layer.router_stats
    ok.track_router_stats(model)
    x = make_input()
    model(x)
    stats = layer.router_stats
    logits = x.reshape(-1, D_IN) @ layer.router_weight.detach().t()
    top2 = logits.topk(2, dim=-1).indices
    expected_load = torch.zeros(4, device=DEVICE).index_add_(
        0, top2.reshape(-1), torch.ones(top2.numel(), device=DEVICE)) / logits.shape[0]
    assert torch.allclose(stats.load, expected_load)
    assert abs(stats.load.sum().item() - 2) < 1e-6  # every token picks k = 2 experts
    assert abs(stats.mean_gate.sum().item() - 1) < 1e-5
    assert torch.allclose(stats.mean_prob, torch.softmax(logits, -1).mean(0), atol=1e-6)
    loss = ok.load_balancing_loss(model)
    loss.backward()
    assert layer.router_weight.grad is not None and layer.router_weight.grad.abs().sum() > 0
    # A copy of the model (deepcopy refuses tensors with a graph) starts without statistics.
    copied = copy.deepcopy(model)
    assert copied.up._router_logits is None and copied.up.track_router_stats
    # A perfectly balanced router gives E · Σ (k/E / k) · (1/E) = 1.
    uniform = ok.RouterStats(torch.full((4,), 0.5), torch.full((4,), 0.25),
                             torch.full((4,), 0.25), top_k=2, num_tokens=8)
    assert abs(uniform.balance_loss().item() - 1) < 1e-6


# ------------------------------------------------------------------- DDP and FSDP2 (CPU)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Trains one step of the same model on this rank's half of the batch, with DDP and
    then with FSDP2, and saves the resulting full gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x = make_input(shape=(4, 5), device="cpu").chunk(world_size)[rank]
        model = make_model("cpu", device="cpu")
        ddp = DistributedDataParallel(model)
        _, grads = loss_and_grads(ddp, x)
        grads.pop("x")
        torch.save({n.removeprefix("module."): g for n, g in grads.items()},
                   os.path.join(out_dir, f"ddp{rank}.pt"))

        result: dict = {}
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError as exc:  # an older torch: the test skips, saying so
            result = {"unavailable": f"{type(exc).__name__}: {exc}"}
        if not result:
            try:
                model = make_model("cpu", device="cpu")
                fully_shard(model)
                model.zero_grad(set_to_none=True)
                y = model(x)
                weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
                (y * weights).sum().backward()
                result = {n: p.grad.full_tensor() for n, p in model.named_parameters()
                          if p.requires_grad}
            except Exception as exc:  # the test fails with it: FSDP2 exists but broke
                result = {"error": f"{type(exc).__name__}: {exc}"}
        torch.save(result, os.path.join(out_dir, f"fsdp{rank}.pt"))
        # Both ranks finish every collective before either tears the group down: a rank
        # aborted ("terminate called without an active exception") twice in a full suite.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    """Runs the two-rank gloo job once for the DDP and FSDP2 tests."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this torch build")
    if "cpu" not in ok.available_backends("cpu"):
        pytest.skip("the compiled cpu backend is not built")
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_distributed_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True)
        yield {name: [torch.load(os.path.join(out_dir, f"{name}{r}.pt")) for r in range(2)]
               for name in ("ddp", "fsdp")}


def _single_process_grads() -> dict:
    """The gradients of the whole batch in one process. Each rank's loss is a sum over
    its half, and DDP/FSDP average over 2 ranks, so the reference is the full sum / 2."""
    model = make_model("cpu", device="cpu")
    x = make_input(shape=(4, 5), device="cpu")
    halves = []
    for part in x.chunk(2):
        _, grads = loss_and_grads(model, part)
        grads.pop("x")
        halves.append(grads)
    return {n: (halves[0][n] + halves[1][n]) / 2 for n in halves[0]}


def test_ddp_two_ranks_matches_single_process(distributed_results):
    expected = _single_process_grads()
    for rank, grads in enumerate(distributed_results["ddp"]):
        assert_all_close(grads, expected, 1e-6, f"DDP rank {rank}")


def test_fsdp2_fully_shard_matches_single_process(distributed_results):
    results = distributed_results["fsdp"]
    if "unavailable" in results[0]:
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard "
                    f"(FSDP2 not tested): {results[0]['unavailable']}")
    for rank, result in enumerate(results):
        assert "error" not in result, f"FSDP2 rank {rank} raised: {result['error']}"
    expected = _single_process_grads()
    for rank, grads in enumerate(results):
        assert_all_close(grads, expected, 1e-6, f"FSDP2 rank {rank}")


# ---------------------------------------------------------------------------- profiling

def test_profile_module_writes_trace_and_times_every_stage(tmp_path, capsys):
    from omoe_kernels.tools import profile

    trace = tmp_path / "trace.json"
    result = profile.main(["--tokens", "40", "--d-in", "24", "--d-out", "20", "--experts", "3",
                           "--rank", "4", "--top-k", "2", "--iters", "1", "--device", DEVICE.type,
                           "--trace", str(trace)])
    # The staged execution computes the same function as the reference backend.
    assert result["staged_rel_err"]["forward"] <= 1e-5
    assert result["staged_rel_err"]["grad_x"] <= 1e-4
    times = result["ms_per_iter"]
    for stage in profile.STAGES:
        for direction in ("forward", "backward"):
            assert times.get(f"omoe.staged.{direction}.{stage}", 0) > 0, (stage, direction)
    for key in ("omoe.fused.forward.base", "omoe.fused.forward.adapter", "omoe.fused.backward"):
        assert times.get(key, 0) > 0, key
    assert trace.stat().st_size > 0 and "omoe.staged.backward.orthogonalize.mgs" in trace.read_text()
    assert "orthogonalize.gram" in capsys.readouterr().out


def test_profile_cli_help_trace_only_when_asked_and_no_error_on_cpu(tmp_path):
    """--help describes every option with its default; no trace file unless --trace; bench's
    dtype names; no ERROR line from the profiler on a machine without a GPU."""
    import subprocess
    import sys

    from omoe_kernels.tools import profile

    help_text = subprocess.run([sys.executable, "-m", "omoe_kernels.tools.profile", "--help"],
                               capture_output=True, text=True, check=True).stdout
    for option in ("--tokens", "--d-in", "--d-out", "--experts", "--rank", "--top-k", "--dtype",
                   "--device", "--backend", "--iters", "--trace"):
        assert option in help_text, option
    assert help_text.count("(default:") == 11, help_text
    assert "{fp32,bf16,fp16}" in help_text
    with pytest.raises(SystemExit):
        profile.parse_args(["--dtype", "bfloat16"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(profile.__file__)))),
         os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "omoe_kernels.tools.profile", "--tokens", "16",
                          "--d-in", "16", "--d-out", "16", "--experts", "2", "--rank", "2",
                          "--iters", "1", "--dtype", "bf16", "--device", "cpu"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "ERROR" not in run.stdout + run.stderr, run.stderr
    assert "omoe.fused" not in os.listdir(tmp_path) and not os.listdir(tmp_path), os.listdir(tmp_path)
    assert "bf16 on cpu" in run.stdout and "Chrome trace" not in run.stdout
