"""Router statistics never go quietly wrong (router_stats.py states the rule): reentrant
checkpointing, an eval forward before the loss, float64, a layer applied several times,
and steps that must not mix."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import omoe_kernels as ok

records = importlib.import_module("omoe_kernels.router_stats")  # `ok.router_stats` is the function

D, E = 12, 4
COEF = 0.5


def make_model(dtype=torch.float32, backend="reference") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)).to(dtype)
    ok.inject(model, ["0", "2"], num_experts=E, rank=3, top_k=2, backend=backend)
    with torch.no_grad():  # a non-zero B: the layers' outputs depend on their router
        for layer in ok.omoe_layers(model).values():
            layer.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    ok.track_router_stats(model)
    return model


def batch(seed: int = 0, tokens: int = 8, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(tokens, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_grads(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """task + COEF · balancing loss, in one plain forward with gradients."""
    model = make_model()
    loss = model(x).square().mean() + COEF * ok.load_balancing_loss(model)
    loss.backward()
    return grads(model)


def assert_grads_close(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpoint_gives_the_balancing_gradient():
    x = batch()
    expected = reference_grads(x)
    model = make_model()
    # The first pass of a reentrant checkpoint runs without gradients.
    y = checkpoint(model, x.requires_grad_(), use_reentrant=True)
    loss = y.square().mean() + COEF * ok.load_balancing_loss(model)
    loss.backward()
    assert_grads_close(grads(model), expected)
    # The balancing part is there: it is what separates these from the task's gradients.
    task_only = make_model()
    task_only(x).square().mean().backward()
    assert not torch.allclose(grads(task_only)["2.router_weight"], expected["2.router_weight"])


def test_reentrant_checkpoint_of_each_layer_with_a_loop():
    # Each layer in its own reentrant checkpoint, the second one applied twice.
    x = batch()

    def run(model, checkpointed):
        first, second = model[0], model[2]
        wrap = (lambda f, t: checkpoint(f, t, use_reentrant=True)) if checkpointed else (
            lambda f, t: f(t))
        h = torch.tanh(wrap(first, x.clone().requires_grad_()))
        h = wrap(second, h)
        h = wrap(second, torch.tanh(h))
        return h.square().mean() + COEF * ok.load_balancing_loss(model)

    plain, checkpointed = make_model(), make_model()
    run(plain, False).backward()
    run(checkpointed, True).backward()
    assert ok.router_stats(checkpointed)["2"].num_tokens == 16
    assert_grads_close(grads(checkpointed), grads(plain))


def test_eval_forward_between_training_forward_and_loss_keeps_the_gradient():
    x = batch()
    expected = reference_grads(x)
    model = make_model()
    y = model(x)
    with torch.no_grad():  # an eval batch before the loss is read
        model(batch(seed=5, tokens=3))
    stats = ok.router_stats(model)
    assert stats["0"].num_tokens == 8 and stats["0"].mean_prob.requires_grad
    loss = y.square().mean() + COEF * ok.load_balancing_loss(model)
    loss.backward()
    assert_grads_close(grads(model), expected)


def test_a_loss_from_forwards_without_gradients_raises_in_backward():
    model = make_model()
    with torch.no_grad():
        model(batch())
    loss = ok.load_balancing_loss(model)  # a value, but no training forward to give a gradient
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        loss.backward()
    # Read where gradients are off (logging), it is a plain value.
    with torch.no_grad():
        model(batch())
        assert not ok.load_balancing_loss(model).requires_grad


def test_float64_loss_is_float64_and_passes_gradcheck():
    model = make_model(torch.float64)
    x = batch(dtype=torch.float64)
    layer = model[2]
    weight = layer.router_weight.detach().clone().requires_grad_()

    def loss_of(router_weight):
        torch.func.functional_call(model, {"2.router_weight": router_weight}, (x,))
        return ok.load_balancing_loss(model)

    assert loss_of(weight).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_of, (weight,), eps=1e-6, atol=1e-8)


class Looped(nn.Module):
    """One layer applied three times in one forward (a shared or looped block)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Linear(D, D)

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.block(x))
        return x


def test_a_layer_applied_three_times_counts_every_application():
    model = ok.inject(Looped(), ["block"], num_experts=E, rank=3, top_k=2, backend="reference")
    with torch.no_grad():
        model.block.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    ok.track_router_stats(model)
    x = batch()
    model(x)
    stats = ok.router_stats(model)["block"]
    assert stats.num_tokens == 24
    # The same as the statistics of the three inputs the layer saw, concatenated.
    inputs, h = [], x
    with torch.no_grad():
        for _ in range(3):
            inputs.append(h)
            h = torch.tanh(model.block(h))
    expected = ok.RouterStats.from_logits(torch.cat(inputs) @ model.block.router_weight.t(), 2)
    torch.testing.assert_close(stats.load, expected.load)
    torch.testing.assert_close(stats.mean_prob, expected.mean_prob)
    # Read again in the same step: the same statistics; the next forward starts afresh.
    assert ok.router_stats(model)["block"].num_tokens == 24
    model(batch(tokens=5))
    assert ok.router_stats(model)["block"].num_tokens == 15


def test_steps_do_not_mix():
    model = make_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    # Two forwards with no read or backward between are one step (e.g. two micro-batches).
    (model(batch(tokens=3)).sum() + model(batch(tokens=4)).sum()).backward()
    assert ok.router_stats(model)["0"].num_tokens == 7
    optimizer.zero_grad()
    # Unread statistics end with the step's backward.
    model(batch()).square().mean().backward()
    optimizer.step()
    model(batch(seed=1, tokens=5))
    assert ok.router_stats(model)["0"].num_tokens == 5
    # After a backward without a read, an eval forward starts afresh too.
    model(batch(tokens=6)).square().mean().backward()
    with torch.no_grad():
        model(batch(tokens=2))
    assert ok.router_stats(model)["0"].num_tokens == 2
    # Eval forwards accumulate until read; a training forward drops them.
    with torch.no_grad():
        model(batch(tokens=3))
        model(batch(tokens=3))
    model(batch(tokens=4))
    assert ok.router_stats(model)["0"].num_tokens == 4
    # Non-reentrant checkpointing's rerun during backward is not recorded.
    y = checkpoint(model, batch(tokens=7), use_reentrant=False)
    (y.square().mean() + ok.load_balancing_loss(model)).backward()
    assert ok.router_stats(model)["0"].num_tokens == 7


def test_statistics_never_read_are_bounded_with_a_warning():
    model = make_model()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(records.MAX_RECORDS + 2):
            model(batch(tokens=1))
    assert any("oldest are dropped" in str(w.message) for w in caught)
    assert ok.router_stats(model)["0"].num_tokens == records.MAX_RECORDS


def test_hugging_face_reentrant_activation_checkpointing_keeps_the_balancing_gradient():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))

    def train_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        ok.inject(model, ok.OMoEConfig(["q_proj", "v_proj"], E, 2, top_k=2))
        with torch.no_grad():
            for layer in ok.omoe_layers(model).values():
                layer.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        ok.track_router_stats(model)
        if checkpointing:
            model.activation_checkpointing_enable(  # gradient_checkpointing_enable's new name
                activation_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()  # as peft does for reentrant checkpointing
        model.train()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        (loss + COEF * ok.load_balancing_loss(model)).backward()
        return grads(model)

    assert_grads_close(train_grads(True), train_grads(False))
