"""Fuzz the raw ops of both families with malformed arguments: each call must raise.

`torch.ops.omoe.{forward,backward}` and `torch.ops.omoe_triton.{forward,backward}` get
valid tiny arguments with one to three of them broken at random (wrong rank, shape,
dtype or device, size 0, negative and huge integers, NaN and infinite floats, None or a
non-tensor for a tensor). Every call must raise a Python exception; a call that returns
means an input went unchecked (for Triton, under TRITON_INTERPRET=1, the kernels would
really run on it). The calls run in a subprocess, so a crash (segfault, abort) is a test
failure with its signal, not a dead test run. Bounded to a few seconds.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

CALLS_PER_OP = 250
NAN, INF = float("nan"), float("inf")


def _bad_forward_mutations(torch):
    """name -> (argument, fn(value) -> broken value). Each one alone makes the call invalid."""
    return {
        "x_1d": ("x", lambda v: v[0]), "x_3d": ("x", lambda v: v[None]),
        "x_int": ("x", lambda v: v.long()), "x_bool": ("x", lambda v: v > 0),
        "x_complex": ("x", lambda v: v.to(torch.complex64)), "x_meta": ("x", lambda v: v.to("meta")),
        "x_none": ("x", lambda v: None), "x_float": ("x", lambda v: 1.5),
        "A_d_in": ("A", lambda v: v[:, :, :-1]), "A_2d": ("A", lambda v: v[0]),
        "A_no_experts": ("A", lambda v: v[:0]), "A_rank0": ("A", lambda v: v[:, :0]),
        "A_double": ("A", lambda v: v.double()), "A_list": ("A", lambda v: [1.0, 2.0]),
        "B_experts": ("B", lambda v: v[:2]), "B_rank": ("B", lambda v: v[:, :, :1]),
        "B_d_out0": ("B", lambda v: v[:, :0]), "B_4d": ("B", lambda v: v[None]),
        "B_half": ("B", lambda v: v.half()),
        "W_short": ("router_weight", lambda v: v[:1]),
        "W_long": ("router_weight", lambda v: torch.cat([v, v])),
        "W_d_in": ("router_weight", lambda v: v[:, :-1]), "W_1d": ("router_weight", lambda v: v[0]),
        "W_meta": ("router_weight", lambda v: v.to("meta")),
        "R_rows": ("router_input", lambda v: v[:2]), "R_d_in": ("router_input", lambda v: v[:, :2]),
        "R_int": ("router_input", lambda v: v.int()),
        "base_rows": ("base_out", lambda v: v[:1]), "base_d_out": ("base_out", lambda v: v[:, :3]),
        "base_double": ("base_out", lambda v: v.double()),
        "top_k_0": ("top_k", lambda v: 0), "top_k_neg": ("top_k", lambda v: -1),
        "top_k_E+1": ("top_k", lambda v: 4), "top_k_huge": ("top_k", lambda v: 2 ** 62),
        "top_k_neg_huge": ("top_k", lambda v: -(2 ** 62)), "top_k_overflow": ("top_k", lambda v: 2 ** 70),
        "eps_0": ("eps", lambda v: 0.0), "eps_neg": ("eps", lambda v: -1e-6),
        "eps_nan": ("eps", lambda v: NAN), "eps_inf": ("eps", lambda v: INF),
        "scaling_nan": ("scaling", lambda v: NAN), "scaling_inf": ("scaling", lambda v: -INF),
        "orth_str": ("orthogonalize", lambda v: "yes"),
    }


def _bad_backward_mutations(torch):
    forward = _bad_forward_mutations(torch)
    skip = ("base_rows", "base_d_out", "base_double")
    out = {k: v for k, v in forward.items() if k not in skip}
    out.update({
        "grad_y_rows": ("grad_y", lambda v: v[:2]), "grad_y_int": ("grad_y", lambda v: v.long()),
        "grad_y_1d": ("grad_y", lambda v: v[0]), "grad_y_meta": ("grad_y", lambda v: v.to("meta")),
        "h_width": ("h", lambda v: v[:, :-1]), "h_double": ("h", lambda v: v.double()),
        "h_1d": ("h", lambda v: v[0]), "h_rows": ("h", lambda v: v[:1]),
        "h_meta": ("h", lambda v: v.to("meta")), "h_none": ("h", lambda v: None),
        "logits_wide": ("logits", lambda v: torch.cat([v, v], 1)),
        "logits_half": ("logits", lambda v: v.half()), "logits_0d": ("logits", lambda v: v[0, 0]),
    })
    return out


def _run_fuzz(seed: int) -> dict:
    """Runs in the subprocess; returns {"accepted": [...], "calls": n, "valid_ok": [...]}."""
    import torch

    import omoe_kernels  # noqa: F401  (registers both families)
    from omoe_kernels.ops import compiled
    from omoe_kernels.ops.triton import launch as triton_ops

    families = []
    if compiled.has_kernels("cpu"):
        families.append(compiled.FAMILY)
    if triton_ops.AVAILABLE:
        families.append(triton_ops.FAMILY)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    T, d_in, d_out, E, r = 5, 6, 7, 3, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    forward_bad, backward_bad = _bad_forward_mutations(torch), _bad_backward_mutations(torch)
    accepted, valid_ok, calls = [], [], 0
    for family in families:
        fwd = dict(x=randn(T, d_in), A=randn(E, r, d_in), B=randn(E, d_out, r),
                   router_weight=randn(E, d_in), router_input=randn(T, d_in),
                   base_out=randn(T, d_out), scaling=0.5, top_k=2, orthogonalize=True,
                   normalize=True, eps=1e-6)
        _, h, logits, *_ = family.op("forward")(**fwd)   # a valid call must work
        bwd = {k: v for k, v in fwd.items() if k != "base_out"}
        bwd.update(grad_y=randn(T, d_out), h=h, logits=logits)
        family.op("backward")(**bwd)
        valid_ok.append(family.namespace)
        for op_name, valid, bad in (("forward", fwd, forward_bad), ("backward", bwd, backward_bad)):
            op = family.op(op_name)
            names = sorted(bad)
            for _ in range(CALLS_PER_OP):
                chosen, used = [], set()
                for name in rng.sample(names, rng.randint(1, 3)):
                    arg = bad[name][0]
                    if arg not in used:     # two breaks of one argument could cancel out
                        used.add(arg)
                        chosen.append(name)
                args = dict(valid)
                for name in chosen:
                    arg, fn = bad[name]
                    args[arg] = fn(args[arg])
                calls += 1
                try:
                    op(**args)
                except Exception:  # noqa: BLE001  (any Python exception is the right outcome)
                    continue
                accepted.append(f"{family.namespace}::{op_name} with {chosen}")
    return {"accepted": accepted, "calls": calls, "valid_ok": valid_ok}


@pytest.mark.timeout(300)
def test_raw_ops_refuse_malformed_arguments_and_never_crash():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--run", "2026"],
                          cwd=here, env=env, capture_output=True, text=True, timeout=280)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode >= 0, f"the fuzz process crashed with signal {-proc.returncode}:\n{tail}"
    assert proc.returncode == 0, f"the fuzz process failed:\n{tail}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["valid_ok"], "no op family available to fuzz"
    assert result["calls"] >= CALLS_PER_OP * 2 * len(result["valid_ok"])
    assert not result["accepted"], (
        f"{len(result['accepted'])} malformed calls returned instead of raising, e.g. "
        f"{result['accepted'][:5]}")


if __name__ == "__main__" and sys.argv[1:2] == ["--run"]:
    print(json.dumps(_run_fuzz(int(sys.argv[2]))))
