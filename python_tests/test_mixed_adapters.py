"""Several adapters in one batch (docs/integration.md, "Serving several adapters").

- `ok.omoe_lora_mixed` on every backend that takes it (`cpu`, `reference`, `triton` here
  on a GPU and in test_triton_mixed.py under the interpreter): each
  sample's output and every gradient equal the float64 runs of that sample alone with its
  adapter (docs/contract.md §2's rows), with "no adapter" samples and an adapter that
  no sample uses; the backends without grouped kernels raise an error naming those that
  take it.
- A model with several injected adapters: `model(ids, adapter_names=...)` equals the
  per-adapter runs, `model.generate(..., adapter_names=...)` equals per-adapter generation
  token for token, and bad input raises.
"""
from __future__ import annotations

import copy

import pytest
import torch

import omoe_kernels as ok
from helpers import (
    ACCURACY_ROWS,
    BACKENDS,
    DEVICE,
    assert_rel_close,
    make_mixed_problem,
    random_grad,
)

MIXED = tuple(b for b in ("cpu", "reference", "triton") if b in BACKENDS)
SAMPLES, TOKENS, D_OUT = 4, 6, 18   # make_mixed_problem: d_in 20, d_out 18, E 4, r 3
# Adapter 1 of 3 is in no sample; sample 1 takes no adapter.
INDEX = [2, -1, 0, 2]
VARIANTS = {"dense": (dict(top_k=None), False), "topk": (dict(top_k=2), True)}




def _leaves(inputs, dtype=None):
    return {n: None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True)
            for n, t in inputs.items()}


def _mixed(inputs, backend, grad_y, scaling, **options):
    t = _leaves(inputs)
    y = ok.omoe_lora_mixed(t["x"], t["A"], t["B"], t["router_weight"],
                           torch.tensor(INDEX, device=DEVICE), scaling=scaling,
                           base_out=t["base_out"], router_input=t["router_input"],
                           backend=backend, **options)
    if grad_y is None:
        return y, {}
    y.backward(grad_y)
    return y.detach(), {n: v.grad for n, v in t.items() if v is not None}


def _per_sample_oracle(inputs, grad_y, scaling, index=INDEX, **options):
    """Each sample alone, in float64, with its adapter through `omoe_lora` (or base_out)."""
    t = _leaves(inputs, torch.float64)
    rows = []
    for i, n in enumerate(index):
        if n < 0:
            rows.append(t["base_out"][i])
            continue
        router = None if t["router_input"] is None else t["router_input"][i]
        rows.append(ok.omoe_lora(t["x"][i], t["A"][n], t["B"][n], t["router_weight"][n],
                                 scaling=scaling[n], base_out=t["base_out"][i],
                                 router_input=router, backend="reference", **options))
    y = torch.stack(rows)
    y.backward(grad_y.to(torch.float64))
    return y.detach(), {n: v.grad for n, v in t.items() if v is not None}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("row", [r for r in ACCURACY_ROWS if "collapse" not in r])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_matches_each_sample_alone(backend, row, variant):
    dtype, _, fwd_tol, grad_tol = ACCURACY_ROWS[row]
    options, with_router_input = VARIANTS[variant]
    inputs = make_mixed_problem(SAMPLES, TOKENS, dtype, with_router_input)
    scaling = [0.75, 2.0, 1.5]
    grad_y = random_grad((SAMPLES, TOKENS, D_OUT), dtype)
    y_ref, grads_ref = _per_sample_oracle(inputs, grad_y, scaling, **options)
    if backend not in MIXED:
        with pytest.raises(ValueError, match=r"mixed batches run on \['cpu', 'reference', "
                                             r"'triton'\]"):
            _mixed(inputs, backend, grad_y, scaling, **options)
        return
    y, grads = _mixed(inputs, backend, grad_y, scaling, **options)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_rel_close(y, y_ref, fwd_tol, f"{backend} forward")
    assert torch.equal(y[1], inputs["base_out"][1]), "a sample with no adapter gets base_out"
    assert set(grads) == set(grads_ref)
    for name, g in grads.items():
        assert g.dtype == dtype
        if grad_tol is not None:
            assert_rel_close(g, grads_ref[name], grad_tol, f"{backend} grad {name}")
    assert not grads["A"][1].any() and not grads["B"][1].any(), "unused adapter: zero grads"
    assert not grads["x"][1].any(), "no adapter: no gradient into x"


@pytest.mark.parametrize("backend", MIXED)
def test_float64_matches_per_sample_runs_of_the_same_backend(backend):
    """Tight: the grouped permutation and segments change nothing beyond rounding."""
    inputs = make_mixed_problem(SAMPLES, TOKENS, torch.float64, False)
    grad_y = random_grad((SAMPLES, TOKENS, D_OUT), torch.float64)
    y, grads = _mixed(inputs, backend, grad_y, [1.0, 1.0, 1.0], top_k=2)
    y_ref, grads_ref = _per_sample_oracle(inputs, grad_y, [1.0, 1.0, 1.0], top_k=2)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-10, atol=1e-12)


def test_per_token_index_and_list_inputs():
    """adapter_index per token ([..]) and per-adapter lists give the per-sample answer."""
    inputs = make_mixed_problem(SAMPLES, TOKENS, torch.float64, False)
    per_token = torch.tensor(INDEX).repeat_interleave(TOKENS).reshape(SAMPLES, TOKENS)
    per_token[0, :2] = 0  # mixes adapters inside one sample
    want = torch.empty(SAMPLES, TOKENS, D_OUT, dtype=torch.float64)
    for i in range(SAMPLES):
        for j in range(TOKENS):
            n = int(per_token[i, j])
            want[i, j] = inputs["base_out"][i, j] if n < 0 else ok.omoe_lora(
                inputs["x"][i, j:j + 1], inputs["A"][n], inputs["B"][n],
                inputs["router_weight"][n], base_out=inputs["base_out"][i, j:j + 1],
                backend="reference")[0]
    for backend in MIXED:
        got = ok.omoe_lora_mixed(inputs["x"], list(inputs["A"]), list(inputs["B"]),
                                 list(inputs["router_weight"]), per_token,
                                 base_out=inputs["base_out"], backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        no_base = ok.omoe_lora_mixed(inputs["x"], inputs["A"], inputs["B"],
                                     inputs["router_weight"], per_token, backend=backend)
        torch.testing.assert_close(no_base, want - inputs["base_out"], rtol=1e-10, atol=1e-12)
        assert not no_base[1].any(), "no adapter and no base_out: 0"


@pytest.mark.parametrize("backend", ["cuda"])
def test_backends_without_grouped_kernels_name_those_with(backend):
    inputs = make_mixed_problem(SAMPLES, TOKENS, torch.float32, False)
    with pytest.raises(ValueError, match=rf"backend '{backend}' has no kernels for a batch of "
                                         r"several adapters; mixed batches run on \['cpu', "
                                         r"'reference', 'triton'\]"):
        ok.omoe_lora_mixed(inputs["x"], inputs["A"], inputs["B"], inputs["router_weight"],
                           torch.tensor(INDEX), backend=backend)


def test_functional_bad_input_raises():
    inputs = make_mixed_problem(SAMPLES, TOKENS, torch.float32, False)
    x, A, B, W = inputs["x"], inputs["A"], inputs["B"], inputs["router_weight"]
    index = torch.tensor(INDEX)
    with pytest.raises(ValueError, match=r"values in \[-1, 3\)"):
        ok.omoe_lora_mixed(x, A, B, W, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="adapter_index` must have shape"):
        ok.omoe_lora_mixed(x, A, B, W, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer tensor"):
        ok.omoe_lora_mixed(x, A, B, W, index.float())
    with pytest.raises(ValueError, match="same number of adapters"):
        ok.omoe_lora_mixed(x, A, B[:2], W, index)
    with pytest.raises(ValueError, match="one per adapter"):
        ok.omoe_lora_mixed(x, A, B, W, index, scaling=[1.0, 2.0])
    with pytest.raises(ValueError, match="same shape"):
        ok.omoe_lora_mixed(x, [A[0], A[1, :, :2]], [B[0], B[1, :, :, :2]], [W[0], W[1]],
                           torch.tensor([0, 1, 0, 1]))



def test_a_grouping_keeps_what_the_checks_found_for_a_call_like_the_last(monkeypatch):
    """With a Grouping (a batch's index, sorted once) a call like the one before it skips
    the argument checks; a call that differs in an option, a tensor's dtype or shape, or
    the variable that picks the backend is checked again, and a wrong one still raises."""
    from omoe_kernels import mixed
    inputs = make_mixed_problem(SAMPLES, TOKENS, torch.float32, False)
    checks = []
    check_inputs = mixed.check_inputs
    monkeypatch.setattr(mixed, "check_inputs",
                        lambda *args, **kw: checks.append(1) or check_inputs(*args, **kw))
    grouping = mixed.group(torch.tensor(INDEX, device=DEVICE), 3)

    def call(x=inputs["x"], **options):
        return ok.omoe_lora_mixed(x, inputs["A"], inputs["B"], inputs["router_weight"],
                                  grouping, base_out=inputs["base_out"],
                                  **{"scaling": [1.0, 2.0, 0.5], **options})

    y = call()
    checked = len(checks)
    assert checked and torch.equal(call(), y) and len(checks) == checked
    assert not torch.equal(call(scaling=[1.0, 2.0, 2.0]), y) and len(checks) > checked
    checked = len(checks)
    call(top_k=2)
    assert len(checks) > checked
    with pytest.raises(TypeError, match="dtype"):
        call(x=inputs["x"].double())
    with pytest.raises(ValueError, match="d_in"):
        call(x=inputs["x"][..., :-1])
    monkeypatch.setenv("OMOE_BACKEND", "reference")
    checked = len(checks)
    assert_rel_close(call(), y, 1e-5)
    assert len(checks) > checked

# ---- models with several injected adapters ----------------------------------------------

ADAPTERS = ("a", "b", "c", "d")


def _llama(adapters=ADAPTERS, **options):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    for name in adapters:
        ok.inject(model, ["q_proj", "v_proj"], num_experts=4, rank=2, top_k=2,
                  adapter_name=name, **options)
    with torch.no_grad():  # B = 0 at init: make each adapter change the output
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_(0, 0.5)
    return model


def _ids():
    return torch.randint(1, 64, (4, 5), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def _per_adapter(model, name, fn):
    """fn() with only `name` active ("__base__": adapters disabled)."""
    if name == "__base__":
        with ok.disable_adapters(model):
            return fn()
    ok.set_adapter(model, name)
    return fn()


# "b" runs twice, "d" in no sample, one sample without an adapter.
NAMES = ["b", "__base__", "a", "b"]


def test_model_forward_with_adapter_names_matches_per_adapter_runs():
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        mixed = model(ids, adapter_names=NAMES).logits
        for i, name in enumerate(NAMES):
            alone = _per_adapter(model, name, lambda: model(ids).logits)
            torch.testing.assert_close(mixed[i], alone[i], rtol=1e-5, atol=1e-5)
        with ok.adapter_batch(model, NAMES):
            torch.testing.assert_close(model(ids).logits, mixed, rtol=0, atol=0)
    assert all(m.sample_adapters is None for m in ok.omoe_layers(model).values())
    assert not torch.equal(mixed[0], mixed[2]), "the adapters differ"


def test_generate_with_adapter_names_matches_per_adapter_generation():
    model = _llama()
    ids = _ids()
    kwargs = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        mixed = model.generate(ids, adapter_names=NAMES, **kwargs)
        for i, name in enumerate(NAMES):
            alone = _per_adapter(model, name, lambda: model.generate(ids, **kwargs))
            assert mixed[i].tolist() == alone[i].tolist(), f"sample {i} ({name})"
        # A deep copy serves mixed batches by itself.
        twin = copy.deepcopy(model)
        assert twin.generate(ids, adapter_names=NAMES, **kwargs).tolist() == mixed.tolist()
    ok.remove(model)
    assert "generate" not in vars(model) and not model._forward_pre_hooks


def test_model_bad_input_raises():
    model = _llama(adapters=("a", "b"))
    ids = _ids()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\['zz'\], which the model does not have"):
            model(ids, adapter_names=["a", "zz", "b", "a"])
        with pytest.raises(ValueError, match="3 names for a batch of 4"):
            model(ids, adapter_names=["a", "b", "a"])
        with pytest.raises(ValueError, match="3 names for a batch of 4"):
            model.generate(ids, adapter_names=["a", "b", "a"], max_new_tokens=2)
        with pytest.raises(TypeError, match="list of adapter names"):
            model(ids, adapter_names="a")
        with ok.disable_adapters(model), pytest.raises(ValueError, match="disabled"):
            model(ids, adapter_names=["a"] * 4)
        model.train()
        with pytest.raises(ValueError, match="model.eval"):
            model(ids, adapter_names=["a"] * 4)
        model.eval()
        # After each refusal the model runs as before, with no batch left behind.
        assert all(m.sample_adapters is None for m in ok.omoe_layers(model).values())
        model(ids)
    for option, value in (("rank", 4), ("top_k", None), ("num_experts", 2)):
        other = _llama(adapters=("a",))
        settings = dict(num_experts=4, rank=2, top_k=2)
        settings[option] = value
        ok.inject(other, ["q_proj", "v_proj"], adapter_name="odd", **settings)
        with torch.no_grad(), pytest.raises(ValueError, match=f"different {option}"):
            other(ids, adapter_names=["a", "odd", "a", "a"])


def test_triton_stacks_lists_once_and_restacks_an_updated_tensor():
    """The triton path's stack of per-adapter parameters is kept across calls and made
    again when one changes in place (an optimizer step, a load)."""
    from omoe_kernels.mixed import _stacked

    parts = [torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(2, 3))]
    first = _stacked(parts)
    assert torch.equal(first, torch.stack(parts)) and _stacked(list(parts)) is first
    with torch.no_grad():
        parts[1].add_(1.0)
    again = _stacked(parts)
    assert again is not first and torch.equal(again, torch.stack(parts))
    stacked = torch.stack(parts)
    assert _stacked(stacked) is stacked, "a stacked tensor is read in place"
    casts = [p.detach().to(torch.float64) for p in parts]     # new tensors at every call
    assert _stacked(casts) is not _stacked(casts), "only parameters are kept"


# ---- the cpu backend's inference op (omoe::mixed_forward) ---------------------------------

class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops called from Python (an op's own inner calls are not seen)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("row", [r for r in ACCURACY_ROWS if "collapse" not in r
                                 and ACCURACY_ROWS[r][0] in (torch.float32, torch.bfloat16)])
def test_cpu_inference_is_one_op_call_and_matches_each_sample_alone(row, variant):
    """With nothing to differentiate, one omoe::mixed_forward call serves every adapter
    (no single-adapter call from Python), into freshly allocated memory poisoned with NaN."""
    from helpers import poison_allocator

    dtype, _, fwd_tol, _ = ACCURACY_ROWS[row]
    options, with_router_input = VARIANTS[variant]
    inputs = make_mixed_problem(SAMPLES, TOKENS, dtype, with_router_input)
    scaling = [0.75, 2.0, 1.5]
    y_ref, _ = _per_sample_oracle(inputs, random_grad((SAMPLES, TOKENS, D_OUT), dtype),
                                  scaling, **options)
    # Weights that live across calls, as a layer's: the first call sees each B for the
    # first time, the second forms G, the third finds it (the op's own pairs route).
    weights = {n: list(inputs[n]) for n in ("A", "B", "router_weight")}
    hits = torch.ops.omoe_cache.stats()[0]
    for call in range(3):
        poison_allocator("cpu", dtype)
        with torch.no_grad(), _OpLog() as log:
            y = ok.omoe_lora_mixed(inputs["x"], *weights.values(), torch.tensor(INDEX),
                                   scaling=scaling, base_out=inputs["base_out"],
                                   router_input=inputs["router_input"], backend="cpu",
                                   **options)
        assert log.ops.count("omoe.mixed_forward") == 1 and "omoe.forward" not in log.ops
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert_rel_close(y, y_ref, fwd_tol, f"cpu inference, call {call}")
        assert torch.equal(y[1], inputs["base_out"][1]), "a sample with no adapter: base_out"
    assert torch.ops.omoe_cache.stats()[0] >= hits + 2, "the last call found both Gs"
    # As the per-segment calls that autograd runs, to rounding.
    y_calls, _ = _mixed(inputs, "cpu", random_grad((SAMPLES, TOKENS, D_OUT), dtype), scaling,
                        **options)
    torch.testing.assert_close(y, y_calls, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_cpu_inference_propagates_nan_as_eager():
    """A NaN in a sample's x, in a used adapter's B and in the unused adapter's B:
    non-finite wherever the eager reference loop is (the Gram route may spread a NaN of B
    over more of a token's outputs, as the single-adapter op does), with the same entries
    as the per-segment calls, and finite in the samples eager keeps finite."""
    inputs = make_mixed_problem(SAMPLES, TOKENS, torch.float32, False)
    inputs["x"][0, 2, 5] = float("nan")
    inputs["x"][1, 0, 0] = float("nan")      # sample 1 takes no adapter: base_out there
    inputs["B"][0, 1, 3, 0] = float("nan")   # adapter 0 (sample 2)
    inputs["B"][1] = float("nan")            # adapter 1: in no sample
    with torch.no_grad():
        with _OpLog() as log:
            y, _ = _mixed(inputs, "cpu", None, [1.0, 1.0, 1.0], top_k=2)
        y_ref, _ = _mixed(inputs, "reference", None, [1.0, 1.0, 1.0], top_k=2)
    assert log.ops.count("omoe.mixed_forward") == 1, "through the inference op"
    y_calls, _ = _mixed(inputs, "cpu", torch.ones(SAMPLES, TOKENS, D_OUT), [1.0, 1.0, 1.0],
                        top_k=2)
    assert torch.isnan(y_ref[0]).any() and torch.isnan(y_ref[2]).any()
    assert not (torch.isfinite(y) & ~torch.isfinite(y_ref)).any()
    assert torch.equal(torch.isnan(y), torch.isnan(y_calls))
    assert torch.isfinite(y[1]).all() and torch.isfinite(y[3]).all()


def _op_args(dtype=torch.float32):
    inputs = make_mixed_problem(SAMPLES, TOKENS, dtype, False)
    x = inputs["x"].reshape(-1, inputs["x"].shape[-1])
    base = inputs["base_out"].reshape(-1, D_OUT)
    rows = torch.tensor([0, 5, 6, 9, 2, 3])   # adapter 0: 3 rows, adapter 1: none, 2: 3
    return dict(x=x, A=list(inputs["A"]), B=list(inputs["B"]),
                router_weight=list(inputs["router_weight"]), router_input=None, base_out=base,
                rows=rows, offsets=[0, 3, 3, 6], scaling=[1.0, 2.0, 0.5], top_k=2,
                orthogonalize=True, normalize=True, eps=1e-6)


def test_mixed_op_rows_offsets_and_unlisted_rows():
    """The raw op: each listed row runs its adapter alone; a row listed nowhere is base_out."""
    from omoe_kernels.ops import mixed_compiled

    args = _op_args(torch.float64)
    for _ in range(3):  # B new to the weight cache, then its G formed, then found
        y = mixed_compiled.MIXED_FORWARD(**args)
        _check_rows(args, y)


def test_few_row_segments_shrink_without_a_gemm():
    """Segments of a few rows (one per sample when decoding) form h and the router logits
    by dot products once each G is cached: the op's one GEMM per segment is its expand, and
    each row is still its adapter's output alone."""
    from torch.profiler import profile

    from omoe_kernels.ops import mixed_compiled

    args = _op_args(torch.float64) | dict(top_k=4)   # two segments of 3 rows, dense routing
    for _ in range(2):  # each B new to the weight cache, then its G formed
        mixed_compiled.MIXED_FORWARD(**args)
    with profile() as prof:
        y = mixed_compiled.MIXED_FORWARD(**args)
    names = [e.name for e in prof.events()]
    assert names.count("omoe::mixed_segment") == 2 and "omoe::forward" not in names
    assert names.count("aten::addmm") == 2 and "aten::mm" not in names, sorted(set(names))
    _check_rows(args, y)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decoding_segments_form_y_from_the_expert_outputs_in_the_op(dtype, variant):
    """One token per sample (decoding), each B new to the weight cache: each segment forms
    y from its expert outputs inside the op, as a one-token call of its adapter alone does,
    with no single-adapter kernel call and no GEMM, and each sample gets that output.
    (16-bit weights are not in the accumulate dtype: omoe::forward's kernel takes them.)"""
    from torch.profiler import profile

    from omoe_kernels.testing.shapes import RANDOM_TOLERANCE

    fwd_tol = RANDOM_TOLERANCE[dtype][0]
    options, with_router_input = VARIANTS[variant]
    inputs = make_mixed_problem(SAMPLES, 1, dtype, with_router_input)
    scaling = [0.75, 2.0, 1.5]
    index = [2, -1, 0, 1]  # a segment of one row per adapter
    y_ref, _ = _per_sample_oracle(inputs, random_grad((SAMPLES, 1, D_OUT), dtype), scaling,
                                  index, **options)
    weights = [list(inputs[n]) for n in ("A", "B", "router_weight")]
    with torch.no_grad(), profile() as prof:
        y = ok.omoe_lora_mixed(inputs["x"], *weights, torch.tensor(index), scaling=scaling,
                               base_out=inputs["base_out"], router_input=inputs["router_input"],
                               backend="cpu", **options)
    names = [e.name for e in prof.events()]
    assert names.count("omoe::direct") == 3, sorted(set(names))
    assert "omoe::shrink" not in names and "aten::mm" not in names, sorted(set(names))
    assert_rel_close(y, y_ref, fwd_tol, "decoding segments")
    assert torch.equal(y[1], inputs["base_out"][1]), "a sample with no adapter: base_out"


def _check_rows(args, y):
    for n, (start, end) in enumerate(zip(args["offsets"], args["offsets"][1:])):
        for row in args["rows"][start:end].tolist():
            want = ok.omoe_lora(args["x"][row:row + 1], args["A"][n], args["B"][n],
                                args["router_weight"][n], scaling=args["scaling"][n],
                                top_k=args["top_k"],
                                base_out=args["base_out"][row:row + 1], backend="reference")
            torch.testing.assert_close(y[row:row + 1], want, rtol=1e-12, atol=1e-12)
    unlisted = sorted(set(range(y.shape[0])) - set(args["rows"].tolist()))
    assert torch.equal(y[unlisted], args["base_out"][unlisted])


BAD_OP_CALLS = {
    "offsets out of range": (dict(offsets=[0, 3, 3, 7]), "offsets must start at 0 and end at"),
    "offsets decrease": (dict(offsets=[0, 4, 3, 6]), "offsets must not decrease"),
    "offsets count": (dict(offsets=[0, 6]), r"offsets must hold N \+ 1 = 4 entries"),
    "scaling count": (dict(scaling=[1.0, 2.0]), "one entry per adapter"),
    "different E": (dict(A=lambda a: [a[0], a[1][:2], a[2]]), "adapter 1 has A"),
    "different r": (dict(B=lambda b: [b[0], b[1], b[2][:, :, :2]]), "adapter 2 has A"),
    "rows dtype": (dict(rows=lambda r: r.int()), "rows must be a 1-D int64 tensor"),
}
BAD_ROW_VALUES = {
    "row out of range": (torch.tensor([0, 5, 6, 24, 2, 3]), r"rows must hold row indices of x "
                                                            r"in \[0, 24\), got 24"),
    "negative row": (torch.tensor([0, 5, -1, 9, 2, 3]), r"got -1 at position 2"),
    "row twice": (torch.tensor([0, 5, 6, 9, 2, 5]), "rows lists row 5 twice"),
}


def _bad(case):
    args = _op_args()
    change, message = BAD_OP_CALLS[case]
    for name, value in change.items():
        args[name] = value(args[name]) if callable(value) else value
    return args, message


@pytest.mark.parametrize("case", list(BAD_OP_CALLS))
def test_mixed_op_bad_input_raises_in_the_real_and_the_fake_kernel(case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from omoe_kernels.ops import mixed_compiled

    args, message = _bad(case)
    with pytest.raises(RuntimeError, match=message):
        mixed_compiled.MIXED_FORWARD(**args)
    with FakeTensorMode() as mode, pytest.raises(RuntimeError, match=message):
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor)
                else [mode.from_tensor(t) for t in v]
                if isinstance(v, list) and v and isinstance(v[0], torch.Tensor) else v
                for k, v in args.items()}
        mixed_compiled.MIXED_FORWARD(**fake)


@pytest.mark.parametrize("case", list(BAD_ROW_VALUES))
def test_mixed_op_bad_rows_raise(case):
    from omoe_kernels.ops import mixed_compiled

    rows, message = BAD_ROW_VALUES[case]
    with pytest.raises(RuntimeError, match=message):
        mixed_compiled.MIXED_FORWARD(**(_op_args() | dict(rows=rows)))


def test_mixed_op_fake_kernel_gives_the_shape_and_backward_refuses():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from omoe_kernels.ops import mixed_compiled

    args = _op_args()
    with FakeTensorMode() as mode:
        fake = args | dict(x=mode.from_tensor(args["x"]), base_out=mode.from_tensor(
            args["base_out"]), rows=mode.from_tensor(args["rows"]),
            A=[mode.from_tensor(t) for t in args["A"]], B=[mode.from_tensor(t) for t in args["B"]],
            router_weight=[mode.from_tensor(t) for t in args["router_weight"]])
        assert mixed_compiled.MIXED_FORWARD(**fake).shape == (SAMPLES * TOKENS, D_OUT)
    x = args["x"].clone().requires_grad_(True)
    y = mixed_compiled.MIXED_FORWARD(**(args | dict(x=x)))
    with pytest.raises(RuntimeError, match="mixed_forward is forward only"):
        y.sum().backward()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("row", [r for r in ACCURACY_ROWS if "collapse" not in r])
def test_repeated_mixed_calls_on_short_segments(empty_weight_cache, row):
    """A first no-grad call whose segments have a few tokens leaves each B in the weight
    cache without its packed B_cat (few tokens expand on B's blocks); the next calls must
    still give each sample its adapter's output (they once raised on the missing B_cat)."""
    # Wide enough that one token takes the route through G once G is cached.
    dtype, _, fwd_tol, _ = ACCURACY_ROWS[row]
    inputs = make_mixed_problem(SAMPLES, 1, dtype, False, d_in=256, d_out=256, rank=8)
    want, _ = _per_sample_oracle(inputs, random_grad((SAMPLES, 1, 256), dtype), [1.0, 1.0, 1.0])
    index = torch.tensor(INDEX)
    # Tensors that live across calls, as a layer's weights do (the cache keys on them).
    A, B, W = ([t.clone() for t in inputs[n]] for n in ("A", "B", "router_weight"))
    with torch.no_grad():
        for _ in range(3):
            got = ok.omoe_lora_mixed(inputs["x"], A, B, W, index, base_out=inputs["base_out"],
                                     backend="cpu")
            assert got.dtype == dtype
            assert_rel_close(got, want, fwd_tol, f"cpu mixed {row}, repeated")
