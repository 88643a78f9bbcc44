"""The triton backend's mixed batches (omoe_kernels/mixed.py, ops/triton/mixed_kernels.py),
on CPU tensors under the Triton interpreter: the grouped forward, and the gradients of the
per-segment calls autograd records.

TRITON_INTERPRET=1 must be set before triton is imported: test_triton.py runs this file in
such a session (`make test`); in any other session the module is skipped. conftest
poisons every buffer a kernel writes with NaN, so a padded row or a token the kernels
leave unwritten fails here.

Each sample's output equals the single-adapter triton run of that sample alone with its
adapter (the same kernels' arithmetic: to rounding) and the float64 oracle within the
accuracy row's bound; a sample with no adapter gets base_out exactly, an adapter in no
sample changes nothing, and segments of 5-token samples leave every GEMM tile partly
padded.
"""
from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 from the session's start (test_triton.py runs it so)",
                allow_module_level=True)

import omoe_kernels as ok  # noqa: E402
from helpers import ACCURACY_ROWS, assert_rel_close, make_mixed_problem  # noqa: E402
from omoe_kernels.mixed import group  # noqa: E402

pytestmark = pytest.mark.interpreter

SAMPLES, TOKENS, D_OUT = 4, 5, 18   # make_mixed_problem: d_in 20, d_out 18, E 4, r 3
# Adapter 1 of 3 is in no sample; sample 1 takes no adapter; adapter 2 has two samples.
INDEX = [2, -1, 0, 2]
SCALING = [0.75, 2.0, 1.5]
VARIANTS = {"dense": (dict(top_k=None), False), "topk": (dict(top_k=2), True)}




def _sample(t, name, i):
    return None if t[name] is None else t[name][i]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("row", ["fp32-random", "bf16-random", "fp16-random"])
def test_mixed_forward_matches_each_sample_alone(row, variant):
    dtype, _, fwd_tol, _ = ACCURACY_ROWS[row]
    options, with_router_input = VARIANTS[variant]
    t = make_mixed_problem(SAMPLES, TOKENS, dtype, with_router_input)
    with torch.no_grad():
        y = ok.omoe_lora_mixed(t["x"], t["A"], t["B"], t["router_weight"], torch.tensor(INDEX),
                               scaling=SCALING, base_out=t["base_out"],
                               router_input=t["router_input"], backend="triton", **options)
    assert y.dtype == dtype and y.shape == (SAMPLES, TOKENS, D_OUT)
    assert torch.equal(y[1], t["base_out"][1]), "a sample with no adapter gets base_out"
    t64 = {n: None if v is None else v.to(torch.float64) for n, v in t.items()}
    for n in sorted(set(INDEX) - {-1}):
        i = [s for s, m in enumerate(INDEX) if m == n]   # the samples of adapter n, alone
        alone = ok.omoe_lora(t["x"][i], t["A"][n], t["B"][n], t["router_weight"][n],
                             scaling=SCALING[n], base_out=t["base_out"][i],
                             router_input=_sample(t, "router_input", i), backend="triton",
                             **options)
        torch.testing.assert_close(y[i], alone, rtol=1e-6, atol=1e-6 * alone.abs().max().item())
        want = ok.omoe_lora(t64["x"][i], t64["A"][n], t64["B"][n], t64["router_weight"][n],
                            scaling=SCALING[n], base_out=t64["base_out"][i],
                            router_input=_sample(t64, "router_input", i), backend="reference",
                            **options)
        assert_rel_close(y[i], want, fwd_tol, f"triton mixed, adapter {n}")


def test_per_token_index_without_base_and_a_reused_grouping():
    """Adapters mixed inside a sample, no base_out (no-adapter tokens get 0), float64,
    and a Grouping reused across calls (as every layer of a batch reuses it)."""
    t = make_mixed_problem(SAMPLES, TOKENS, torch.float64, False)
    per_token = torch.tensor(INDEX).repeat_interleave(TOKENS).reshape(SAMPLES, TOKENS)
    per_token[0, :2] = 0
    per_token[3, 4] = -1
    want = ok.omoe_lora_mixed(t["x"], t["A"], t["B"], t["router_weight"], per_token,
                              top_k=2, backend="reference")
    got = ok.omoe_lora_mixed(t["x"], list(t["A"]), list(t["B"]), list(t["router_weight"]),
                             per_token, top_k=2, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not got[1].any() and not got[3, 4].any(), "no adapter and no base_out: 0"
    grouping = group(torch.tensor(INDEX), 3)
    ref = ok.omoe_lora_mixed(t["x"], t["A"], t["B"], t["router_weight"], torch.tensor(INDEX),
                             top_k=2, base_out=t["base_out"], backend="reference")
    for _ in range(2):
        again = ok.omoe_lora_mixed(t["x"], t["A"], t["B"], t["router_weight"], grouping,
                                   top_k=2, base_out=t["base_out"], backend="triton")
        torch.testing.assert_close(again, ref, rtol=1e-12, atol=1e-12)
    assert len(grouping.segments) == 1, "the segment rows are made once per Grouping"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_gradients_match_each_sample_alone(variant):
    """With autograd recording each segment is a single-adapter triton call: every
    gradient equals the float64 oracle of each sample alone; the unused adapter and the
    no-adapter sample get zeros."""
    dtype, _, fwd_tol, grad_tol = ACCURACY_ROWS["fp32-random"]
    options, with_router_input = VARIANTS[variant]
    t = make_mixed_problem(SAMPLES, TOKENS, dtype, with_router_input)
    grad_y = torch.randn(SAMPLES, TOKENS, D_OUT, generator=torch.Generator().manual_seed(3))

    def run(dtype, backend):
        leaves = {n: None if v is None else v.detach().to(dtype).requires_grad_()
                  for n, v in t.items()}
        y = ok.omoe_lora_mixed(leaves["x"], leaves["A"], leaves["B"], leaves["router_weight"],
                               torch.tensor(INDEX), scaling=SCALING, base_out=leaves["base_out"],
                               router_input=leaves["router_input"], backend=backend, **options)
        y.backward(grad_y.to(dtype))
        return y.detach(), {n: v.grad for n, v in leaves.items() if v is not None}

    y, grads = run(dtype, "triton")
    y_ref, grads_ref = run(torch.float64, "reference")
    assert_rel_close(y, y_ref, fwd_tol, "triton mixed forward")
    for name, g in grads.items():
        assert_rel_close(g, grads_ref[name], grad_tol, f"triton mixed grad {name}")
    assert not grads["A"][1].any() and not grads["B"][1].any(), "unused adapter: zero grads"
    assert not grads["x"][1].any(), "no adapter: no gradient into x"


def test_model_with_adapter_names_on_triton_matches_per_adapter_runs():
    """A model with several injected adapters serves a mixed batch on triton (each layer
    one grouped forward) as the per-adapter runs on triton do."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    for name in ("a", "b", "c"):
        ok.inject(model, ["q_proj", "v_proj"], num_experts=4, rank=2, top_k=2,
                  adapter_name=name, backend="triton")
    with torch.no_grad():  # B = 0 at init: make each adapter change the output
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    ids = torch.randint(1, 64, (3, 4), generator=torch.Generator().manual_seed(1))
    names = ["b", "__base__", "a"]   # "c" in no sample
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with ok.disable_adapters(model):
                    alone = model(ids[i:i + 1]).logits
            else:
                ok.set_adapter(model, name)
                alone = model(ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i], alone[0], rtol=1e-5, atol=1e-5)
