"""`gradient_checkpointing_layers`: only the first N layers recompute; the gradients are those of checkpointing all."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.train.recompute import after_kept_layers_backward, checkpoint_first_layers, decoder_layers
from tests.tiny import build_tiny_model, enable_checkpointing
from tests.train.rows import random_rows
from tests.train.test_compile import needs_compiler
from tests.train.test_recipe import window_gradients

CHECKPOINTING = dict(micro_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False})


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) >= 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=needs_compiler)])
def test_checkpointing_the_first_layer_only_gives_the_gradients_of_checkpointing_all(
    tiny_model_dir, tmp_path, monkeypatch, compiled
):
    rows = random_rows(4, 49152, seed=11, per_row=3)
    import transformers.modeling_utils as modeling

    recomputed = []
    original = modeling.checkpoint  # what transformers' gradient_checkpointing_enable wraps
    monkeypatch.setattr(modeling, "checkpoint", lambda fn, *a, **kw: recomputed.append(fn) or original(fn, *a, **kw))
    everything = window_gradients(tiny_model_dir, tmp_path / "a", rows, **CHECKPOINTING)
    calls_all, recomputed[:] = len(recomputed), []
    if compiled:
        torch._dynamo.reset()
    first_only = window_gradients(tiny_model_dir, tmp_path / "b", rows, gradient_checkpointing_layers=1,
                                  torch_compile=compiled, **CHECKPOINTING)
    # 2 layers x 2 micro-batches checkpointed before, 1 x 2 now: the second layer kept its activations
    assert (calls_all, len(recomputed)) == (4, 2)
    _assert_same(everything, first_only)


def test_only_the_last_layers_stop_checkpointing_and_compiling_keeps_their_down_projection(tokenizer):
    from dolphin_forge.train import compile as compiling

    model = build_tiny_model(tokenizer, num_hidden_layers=3)
    enable_checkpointing(model)
    checkpoint_first_layers(model, 1)
    layers = decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, False]
    compiling.compile_decoder_layers(model)
    # a checkpointed layer keeps its down projection eager (so the recomputation stops before it); the others compile
    assert ["forward" in layer.mlp.down_proj.__dict__ for layer in layers] == [True, False, False]


def test_more_layers_than_the_model_has_is_a_clear_error(tokenizer):
    model = build_tiny_model(tokenizer)
    with pytest.raises(ForgeError, match="gradient_checkpointing_layers: 3, but the model has 2 decoder layers"):
        checkpoint_first_layers(model, 3)


def test_the_key_without_gradient_checkpointing_is_refused():
    with pytest.raises(ValidationError, match="gradient_checkpointing_layers: set, but gradient_checkpointing is off"):
        ForgeConfig(base_model="m", gradient_checkpointing_layers=4)
    assert ForgeConfig(base_model="m", gradient_checkpointing=True, gradient_checkpointing_layers=0)


def test_the_callback_runs_once_per_backward_between_the_kept_and_the_checkpointed_layers(tokenizer):
    model = build_tiny_model(tokenizer, num_hidden_layers=3)
    enable_checkpointing(model)
    model.train()
    checkpoint_first_layers(model, 1)
    events = []
    after_kept_layers_backward(model, 1, lambda: events.append("callback"))
    for index, layer in enumerate(decoder_layers(model)):
        layer.mlp.up_proj.weight.register_post_accumulate_grad_hook(lambda p, i=index: events.append(f"layer {i}"))
    ids = torch.randint(0, len(tokenizer), (1, 12))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert events == ["layer 2", "layer 1", "callback", "layer 0"]
    after_kept_layers_backward(model, 3, lambda: events.append("never"))  # nothing kept: nothing to hook
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert events.count("callback") == 2 and "never" not in events


@needs_compiler
def test_kept_and_checkpointed_layers_compile_graphs_of_their_own(tokenizer):
    """dynamo does not guard on a replaced down-projection forward: kept layers must not reuse the checkpointed
    layers' graph, which breaks at that (eager) projection."""
    from torch._dynamo.utils import counters

    from dolphin_forge.train import compile as compiling

    def unique_graphs(checkpointed: int | None) -> int:
        torch._dynamo.reset()
        counters.clear()
        model = build_tiny_model(tokenizer, num_hidden_layers=4).train()
        enable_checkpointing(model)
        if checkpointed is not None:
            checkpoint_first_layers(model, checkpointed)
        compiling.compile_decoder_layers(model)
        ids = torch.randint(0, len(tokenizer), (1, 16))
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return counters["stats"]["unique_graphs"]

    every_layer, no_layer, first_two = unique_graphs(None), unique_graphs(0), unique_graphs(2)
    assert no_layer == 1 and every_layer > 1  # whole, and broken at the down projection
    assert first_two == every_layer + no_layer
