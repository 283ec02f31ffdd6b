"""Packed rows: samples in one row never see each other (logits equal to running each sample alone)."""

from __future__ import annotations

import pytest
import torch

from dolphin_forge.models.packed import PACKED_SDPA, register_packed_attention, sample_bounds
from dolphin_forge.train.batches import collate
from dolphin_forge.train.sft import summed_token_loss
from tests.tiny import build_tiny_model
from tests.train.rows import pack, sample


@pytest.mark.parametrize("attention", ["sdpa", PACKED_SDPA])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_logits_equal_per_sample_logits(tokenizer, arch, attention):
    register_packed_attention()
    window = {"sliding_window": 5} if arch == "mistral" else {}  # shorter than two of the samples
    model = build_tiny_model(tokenizer, arch=arch, attn_implementation=attention, **window).eval()
    reference = build_tiny_model(tokenizer, arch=arch, attn_implementation="eager", **window).eval()
    generator = torch.Generator().manual_seed(1)
    samples = [sample(n, 3, len(tokenizer), generator) for n in (7, 12, 5)]
    batch = collate([pack(samples)], pad_id=0, pad_to=32)  # 8 padding tokens at the end
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        start = 0
        for ids, _ in samples:
            alone = reference(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start : start + len(ids)], alone, atol=1e-5, rtol=1e-4)
            start += len(ids)
        # the same row without restarting positions mixes the samples: the check above has teeth
        mixed = model(input_ids=batch.input_ids, use_cache=False).logits[0]
        assert not torch.allclose(mixed[7:19], packed[7:19], atol=1e-3)


def test_packed_loss_is_sum_of_sample_losses(tokenizer):
    model = build_tiny_model(tokenizer).eval()
    generator = torch.Generator().manual_seed(2)
    samples = [sample(n, 4, len(tokenizer), generator) for n in (9, 6, 11)]
    with torch.no_grad():
        packed, _ = summed_token_loss(model, collate([pack(samples)], pad_id=0, pad_to=40))
        alone = sum(summed_token_loss(model, collate([pack([s])], pad_id=0))[0] for s in samples)
        manual = 0.0
        for ids, labels in samples:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
            targets = torch.tensor(labels[1:])
            keep = targets != -100
            manual += torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed, manual, atol=1e-4, rtol=1e-5)


def test_sample_bounds_follow_restarting_positions():
    positions = torch.tensor([0, 1, 2, 0, 1, 0, 0, 1, 2, 3])
    assert sample_bounds(positions) == [(0, 3), (3, 5), (5, 6), (6, 10)]


def test_packed_attention_model_still_generates_like_sdpa(tokenizer):
    register_packed_attention()
    ids = torch.tensor([[5, 9, 100, 7, 3]])
    outputs = []
    for attention in ("sdpa", PACKED_SDPA):
        model = build_tiny_model(tokenizer, attn_implementation=attention).eval()
        outputs.append(model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None))
    assert torch.equal(outputs[0], outputs[1])


FAKE_VARLEN = "fake_varlen"


def fake_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attention's varlen contract on CPU: the batch flattened, attention within `cu_seq_lens_q` segments."""
    edges = kwargs["cu_seq_lens_q"].tolist()  # a KeyError here: the kwargs did not arrive
    assert kwargs["max_length_q"] == max(b - a for a, b in zip(edges[:-1], edges[1:]))
    heads, dim = query.shape[1], query.shape[-1]
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], dim).transpose(0, 1) for t in (query, key, value))
    k, v = (t.repeat_interleave(heads // t.shape[0], dim=0) for t in (k, v))
    parts = [torch.nn.functional.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True,
                                                              scale=scaling) for a, b in zip(edges[:-1], edges[1:])]
    return torch.cat(parts, dim=1).transpose(0, 1).reshape(query.shape[0], query.shape[2], heads, dim), None


def test_flash_attention_gets_the_sample_boundaries_of_a_batch_of_packed_rows(tokenizer, monkeypatch):
    """transformers' flash-attention finds packed samples from position ids only for a batch of one row: with two
    rows (micro_batch_size 2) the recipe must hand it the flattened batch's boundaries, or samples attend across."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dolphin_forge.models import packed

    AttentionInterface.register(FAKE_VARLEN, fake_varlen_attention)
    AttentionMaskInterface.register(FAKE_VARLEN, lambda *args, **kwargs: None)
    monkeypatch.setattr(packed, "VARLEN_IMPLEMENTATIONS", {FAKE_VARLEN})
    model = build_tiny_model(tokenizer, attn_implementation=FAKE_VARLEN).eval()
    reference = build_tiny_model(tokenizer, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(3)
    rows = [[sample(n, 2, len(tokenizer), generator) for n in lengths] for lengths in ((7, 12), (5, 9, 4))]
    batch = collate([pack(r) for r in rows], pad_id=0, pad_to=24)
    assert packed.varlen_kwargs(model, batch.position_ids)["cu_seq_lens_q"].tolist() == [0, 7, 19, 24, 29, 38, 42, 48]
    with torch.no_grad():
        got, _ = summed_token_loss(model, batch)
        want = sum(summed_token_loss(reference, collate([pack([s])], pad_id=0))[0] for r in rows for s in r)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert packed.varlen_kwargs(build_tiny_model(tokenizer, attn_implementation="sdpa"), batch.position_ids) == {}


def test_validation_batches_of_packed_rows_give_flash_attention_their_sample_boundaries(tokenizer, monkeypatch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dolphin_forge.evaluate.perplexity import validation_loss
    from dolphin_forge.models import packed

    AttentionInterface.register(FAKE_VARLEN, fake_varlen_attention)
    AttentionMaskInterface.register(FAKE_VARLEN, lambda *args, **kwargs: None)
    monkeypatch.setattr(packed, "VARLEN_IMPLEMENTATIONS", {FAKE_VARLEN})
    generator = torch.Generator().manual_seed(4)
    rows = [pack([sample(n, 2, len(tokenizer), generator) for n in lengths]) for lengths in ((7, 12), (5, 9, 4))]
    model = build_tiny_model(tokenizer, attn_implementation=FAKE_VARLEN).eval()
    reference = build_tiny_model(tokenizer, attn_implementation="eager").eval()
    alone = [pack([(row["input_ids"][a:b], row["labels"][a:b])])
             for row in rows for a, b in sample_bounds(torch.tensor(row["position_ids"]))]
    assert validation_loss(model, rows, batch_size=2) == pytest.approx(validation_loss(reference, alone), rel=1e-5)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_packed_gradients_equal_per_sample_gradients(tokenizer, arch):
    """The packed operator's own backward (flash kernel backward per sample) against autograd through eager
    attention run on each sample alone; a batch of two rows, the Mistral window shorter than some samples."""
    register_packed_attention()
    window = {"sliding_window": 5} if arch == "mistral" else {}
    model = build_tiny_model(tokenizer, arch=arch, attn_implementation=PACKED_SDPA, **window).train()
    reference = build_tiny_model(tokenizer, arch=arch, attn_implementation="eager", **window).train()
    generator = torch.Generator().manual_seed(5)
    rows = [[sample(n, 3, len(tokenizer), generator) for n in lengths] for lengths in ((7, 12), (5, 9, 4))]
    packed_loss, _ = summed_token_loss(model, collate([pack(r) for r in rows], pad_id=0, pad_to=24))
    packed_loss.backward()
    alone = sum(summed_token_loss(reference, collate([pack([s])], pad_id=0))[0] for r in rows for s in r)
    alone.backward()
    got, want = _grads(model), _grads(reference)
    assert got.keys() == want.keys() and len(got) == len(list(model.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("window, dtype", [(0, torch.float32), (3, torch.float32), (0, torch.bfloat16)])
def test_packed_attention_operator_passes_torch_opcheck(window, dtype):
    """Schema, fake (shape and dtype) kernels and autograd registration as `torch.compile` relies on them."""
    from dolphin_forge.models.packed import packed_attention

    generator = torch.Generator().manual_seed(6)
    query = torch.randn(2, 4, 9, 8, generator=generator).to(dtype).requires_grad_()
    key, value = (torch.randn(2, 2, 9, 8, generator=generator).to(dtype).requires_grad_() for _ in range(2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3, 4, 5, 6]])
    torch.library.opcheck(packed_attention, (query, key, value, positions, 0.35, window))


def test_packed_samples_stay_apart_with_attention_dropout(tokenizer):
    """Attention dropout takes the composite per-sample path (the flash kernel has no dropout on CPU): changing the
    first sample's tokens leaves the second's logits alone under the same dropout draws."""
    register_packed_attention()
    model = build_tiny_model(tokenizer, attn_implementation=PACKED_SDPA, attention_dropout=0.5).train()
    generator = torch.Generator().manual_seed(7)
    first, second = sample(8, 2, len(tokenizer), generator), sample(6, 2, len(tokenizer), generator)
    other = sample(8, 2, len(tokenizer), generator)
    logits = []
    for row in (pack([first, second]), pack([other, second])):
        batch = collate([row], pad_id=0)
        torch.manual_seed(0)
        logits.append(model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0])
    assert not torch.allclose(logits[0][:8], logits[1][:8])
    torch.testing.assert_close(logits[0][8:], logits[1][8:], atol=0, rtol=0)
    torch.manual_seed(0)
    again = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
    torch.manual_seed(1)
    redrawn = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
    assert torch.equal(again, logits[1]) and not torch.allclose(redrawn, again)  # dropout is on


def test_packed_attention_under_cpu_bf16_autocast_matches_sdpa(tokenizer):
    """Under autocast q and k leave the rotary embedding in float32 and v is bf16: the operator is cast as SDPA is."""
    register_packed_attention()
    generator = torch.Generator().manual_seed(8)
    batch = collate([pack([sample(n, 2, len(tokenizer), generator) for n in (7, 12, 5)])], pad_id=0)
    logits = {}
    for attention in ("sdpa", PACKED_SDPA):
        model = build_tiny_model(tokenizer, attn_implementation=attention).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        out.float().sum().backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad.dtype == torch.float32
        logits[attention] = out.float()
    torch.testing.assert_close(logits[PACKED_SDPA], logits["sdpa"], atol=2e-2, rtol=2e-2)


def test_value_heads_of_another_size_take_the_composite_path():
    """The CPU flash kernel needs equal head sizes (multi-head latent attention has a smaller value head)."""
    from dolphin_forge.models.packed import packed_sdpa_attention

    generator = torch.Generator().manual_seed(9)
    query, key = (torch.randn(1, 2, 7, 8, generator=generator) for _ in range(2))
    value = torch.randn(1, 2, 7, 4, generator=generator)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    got, _ = packed_sdpa_attention(torch.nn.Module(), query, key, value, None, position_ids=positions)
    want = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True) for a, b in ((0, 3), (3, 7))], dim=2)
    torch.testing.assert_close(got, want.transpose(1, 2))
