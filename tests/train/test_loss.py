"""The fused LM head + cross-entropy gives the loss and gradients of the head followed by `F.cross_entropy`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dolphin_forge.train import loss as fused
from dolphin_forge.train.batches import collate
from dolphin_forge.train.sft import summed_token_loss
from tests.tiny import build_tiny_model
from tests.train.rows import pack, sample


def _inputs(vocab: int, positions: int, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(32, vocab, bias=bias)
    hidden = torch.randn(positions, 32, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,), generator=generator)
    targets[::4] = -100
    return head, hidden, targets


def _reference(head, hidden, targets, scale: float):
    loss = F.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), [t.grad.clone() for t in (hidden, head.weight, head.bias) if t is not None and t.requires_grad]


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_and_gradients_equal_head_then_cross_entropy(monkeypatch, bias):
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 3000 * 7)  # 7 positions a chunk: 6 chunks, the last one short
    head, hidden, targets = _inputs(3000, 40, bias)
    got = fused.linear_cross_entropy(hidden, head, targets)
    (got * 0.37).backward()
    got_grads = [t.grad.clone() for t in (hidden, head.weight, head.bias) if t is not None]
    for t in (hidden, head.weight, head.bias):
        if t is not None:
            t.grad = None
    want, want_grads = _reference(head, hidden, targets, 0.37)
    torch.testing.assert_close(got.detach(), want)
    assert len(got_grads) == len(want_grads) == (3 if bias else 2)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert hidden.grad[::4].abs().sum() == 0  # ignored positions get no gradient


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_do():
    head, hidden, targets = _inputs(500, 12, bias=False)
    head.weight.requires_grad_(False)
    fused.linear_cross_entropy(hidden, head, targets).backward()
    assert head.weight.grad is None
    got = hidden.grad.clone()
    hidden.grad = None
    _, (want,) = _reference(head, hidden, targets, 1.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_in_bf16_it_matches_the_head_under_autocast():
    head, hidden, targets = _inputs(800, 24, bias=False)
    got = fused.linear_cross_entropy(hidden, head, targets, compute_dtype=torch.bfloat16)
    got.backward()
    got_grads = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad = head.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = _reference(head, hidden, targets, 1.0)
    assert got.dtype == torch.float32 and got_grads[0].dtype == got_grads[1].dtype == torch.float32
    torch.testing.assert_close(got.detach(), want, atol=1e-2, rtol=2e-3)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)
    # in float32 the same inputs give visibly different numbers: the comparison above is a bf16 one
    assert not torch.allclose(fused.linear_cross_entropy(hidden, head, targets).detach(), want, atol=1e-3, rtol=0)


def test_the_head_dtype_under_the_models_own_autocast_is_recorded(tokenizer):
    """accelerate autocasts the model's forward only; the loss, computed after it, gets the dtype from inside."""
    model = build_tiny_model(tokenizer)
    ids = torch.randint(0, len(tokenizer), (1, 8))
    with fused.head_returns_hidden_states(model.lm_head) as seen:
        hidden = model(input_ids=ids, use_cache=False).logits
    assert seen["dtype"] is None and hidden.shape[-1] == 64  # hidden states, not logits
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # as accelerate's mixed precision
    with fused.head_returns_hidden_states(model.lm_head) as seen:
        model(input_ids=ids, use_cache=False)
    assert seen["dtype"] == torch.bfloat16 and not torch.is_autocast_enabled("cpu")


def test_a_second_backward_over_one_forward_is_refused():
    head, hidden, targets = _inputs(100, 6, bias=False)
    loss = fused.linear_cross_entropy(hidden, head, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("tied", [False, True])
def test_the_recipe_loss_with_the_fused_head_equals_transformers_head(tokenizer, tied):
    model = build_tiny_model(tokenizer, tie_word_embeddings=tied)
    generator = torch.Generator().manual_seed(3)
    rows = [pack([sample(n, 3, len(tokenizer), generator) for n in sizes]) for sizes in ((9, 6), (5, 8, 4))]
    batch = collate(rows, pad_id=0, pad_to=20)
    head = fused.fusable_head(model, sharded=False)
    assert head is model.lm_head
    results = []
    for use in (head, None):
        model.zero_grad(set_to_none=True)
        loss, positions = summed_token_loss(model, batch, head=use)
        loss.backward()
        results.append((loss.detach(), positions, {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert "forward" not in model.lm_head.__dict__  # the head is itself again after the fused forward
    (loss_a, pos_a, grads_a), (loss_b, pos_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-4, rtol=1e-5)
    assert pos_a == pos_b and len(grads_a) == len(grads_b) >= 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4, msg=name)


def test_the_fused_head_is_used_only_where_it_is_exact(tokenizer):
    model = build_tiny_model(tokenizer, arch="mistral")
    assert fused.fusable_head(model, sharded=False) is model.lm_head
    assert fused.fusable_head(model, sharded=True) is None  # FSDP / ZeRO-3 gather the weight in the head's forward
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    assert fused.fusable_head(model, sharded=False) is None
    model.config.model_type = "mistral"
    model.lm_head._hf_hook = object()  # accelerate's device_map offloading moves the weight in the head's forward
    assert fused.fusable_head(model, sharded=False) is None
    del model.lm_head._hf_hook

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA layer or peft's modules_to_save copy around the head
        pass

    model.lm_head = Wrapped(64, len(tokenizer), bias=False)
    assert fused.fusable_head(model, sharded=False) is None
