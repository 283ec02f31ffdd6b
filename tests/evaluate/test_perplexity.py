"""Perplexity and validation loss against direct hand computations on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.perplexity import (
    DOCUMENT_SEPARATOR,
    perplexity,
    perplexity_of_ids,
    tokenize_text,
    validation_loss,
)
from tests.tiny import build_tiny_model


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=3).eval()


def _token_nll(model, context_and_target: torch.Tensor) -> float:
    """-log p(last token | all tokens before it), one unbatched forward pass."""
    with torch.no_grad():
        logits = model(input_ids=context_and_target[None]).logits[0, -2].double()
    return float(-torch.log_softmax(logits, -1)[context_and_target[-1]])


def test_tokenize_text_joins_documents_with_a_blank_line(tokenizer):
    docs = ["First document.", "Second one here."]
    ids = tokenize_text(tokenizer, docs)
    assert ids.dtype == torch.long and ids.dim() == 1
    joined = "First document." + DOCUMENT_SEPARATOR + "Second one here."
    assert ids.tolist() == tokenizer(joined, add_special_tokens=False)["input_ids"]
    assert tokenize_text(tokenizer, docs, max_tokens=3).tolist() == ids[:3].tolist()


@pytest.mark.parametrize("max_tokens", [2, 97, 512, 4096, 30000])
def test_max_tokens_equals_the_whole_texts_leading_ids(tokenizer, shared_data, max_tokens):
    """Only a prefix of the file is tokenised; its ids must be those of the whole file (CRLF and blank-free lines)."""
    text = (shared_data / "eval" / "wikitext2_test.raw").read_text(encoding="utf-8")
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenize_text(tokenizer, text, max_tokens=max_tokens).tolist() == whole[:max_tokens]


def test_max_tokens_on_text_with_whitespace_runs_and_without_line_breaks(tokenizer):
    lines = [f"Line {i}:  spaced   words\tand tabs" + "\n" * (1 + i % 3) for i in range(400)]
    text = "".join(lines)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    for n in (5, 150, 1200):
        assert tokenize_text(tokenizer, text, max_tokens=n).tolist() == whole[:n]
    one_line = " ".join(["word"] * 3000)
    leading = tokenizer(one_line, add_special_tokens=False)["input_ids"][:50]
    assert tokenize_text(tokenizer, one_line, max_tokens=50).tolist() == leading


def test_stride_one_gives_every_token_exactly_its_window_of_context(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (23,))
    k = 6
    expected = [_token_nll(model, ids[max(0, t - k + 1) : t + 1]) for t in range(1, len(ids))]
    result = perplexity_of_ids(model, ids, max_length=k, stride=1, batch_size=5)
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nll), rel=1e-12)


def test_sliding_window_matches_hand_computation_and_ignores_batch_size(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (50,))
    max_length, stride = 16, 6
    # Hand computation: token t is scored in the first window [b, b+16) with b = 0, 6, 12, ... that contains it
    # beyond the previous window's end, with context ids[b:t].
    expected, previous_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        for t in range(max(previous_end, begin + 1), end):
            expected.append(_token_nll(model, ids[begin : t + 1]))
        previous_end = end
        if end == len(ids):
            break
    assert len(expected) == len(ids) - 1
    one = perplexity_of_ids(model, ids, max_length=max_length, stride=stride, batch_size=1)
    many = perplexity_of_ids(model, ids, max_length=max_length, stride=stride, batch_size=3)
    assert one.nll == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert many.nll == pytest.approx(one.nll, rel=1e-6)
    assert one.tokens == many.tokens == 49


def test_stride_equal_to_window_is_chunked_perplexity(model):
    """Non-overlapping windows (laser's scoring): every window's first token goes unscored, the rest see their
    window."""
    ids = torch.arange(3, 23)  # 20 tokens, windows [0, 8), [8, 16), [16, 20)
    result = perplexity_of_ids(model, ids, max_length=8, stride=8, batch_size=2)
    assert result.tokens == 20 - math.ceil(20 / 8)
    expected = [
        _token_nll(model, ids[begin : i + 1]) for begin in (0, 8, 16) for i in range(begin + 1, min(begin + 8, 20))
    ]
    assert result.nll == pytest.approx(sum(expected) / len(expected), rel=1e-6)


def test_window_covering_the_text_equals_one_forward_pass(model, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = tokenize_text(tokenizer, text)
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    result = perplexity(model, tokenizer, text, max_length=len(ids) + 5)
    assert result.nll == pytest.approx(float(loss), rel=1e-5)
    assert result.tokens == len(ids) - 1


def test_model_training_mode_is_restored(tokenizer):
    model = build_tiny_model(tokenizer).train()
    perplexity_of_ids(model, torch.arange(10), max_length=4)
    assert model.training


def test_bad_arguments_are_forge_errors(model):
    with pytest.raises(ForgeError, match="stride"):
        perplexity_of_ids(model, torch.arange(10), max_length=4, stride=5)
    with pytest.raises(ForgeError, match="at least 2 tokens"):
        perplexity_of_ids(model, torch.arange(1), max_length=4)


def _sample(length: int, prompt: int, seed: int) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (length,), generator=g).tolist()
    labels = [-100] * prompt + ids[prompt:]
    return ids, labels


def _row(*samples: tuple[list[int], list[int]]) -> dict:
    return {
        "input_ids": [t for ids, _ in samples for t in ids],
        "labels": [t for _, labels in samples for t in labels],
        "position_ids": [p for ids, _ in samples for p in range(len(ids))],
        "seq_lens": [len(ids) for ids, _ in samples],
    }


def _hand_loss(model, samples) -> float:
    """Token-weighted mean NLL, each sample run on its own with HF's shifted cross-entropy."""
    total, count = 0.0, 0
    for ids, labels in samples:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        target = torch.tensor(labels[1:])
        keep = target != -100
        total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], target[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def test_packed_row_scores_like_its_samples_run_separately(model):
    samples = [_sample(12, 5, 0), _sample(9, 3, 1), _sample(15, 7, 2)]
    separate = validation_loss(model, [_row(s) for s in samples])
    packed = validation_loss(model, [_row(*samples)])
    assert separate == pytest.approx(_hand_loss(model, samples), rel=1e-5)
    assert packed == pytest.approx(separate, rel=1e-5)
    # Without position ids restarting, the samples would see each other and the loss would differ.
    leaky = _row(*samples)
    leaky["position_ids"] = list(range(len(leaky["input_ids"])))
    assert validation_loss(model, [leaky]) != pytest.approx(packed, rel=1e-4)


def test_batched_rows_of_different_lengths_match_hand_computation(model):
    samples = [_sample(12, 5, 3), _sample(4, 1, 4), _sample(20, 2, 5), _sample(7, 6, 6)]
    rows = [_row(samples[0], samples[1]), _row(samples[2]), _row(samples[3])]
    expected = _hand_loss(model, samples)
    assert validation_loss(model, rows, batch_size=1) == pytest.approx(expected, rel=1e-5)
    assert validation_loss(model, rows, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_validation_loss_without_labels_is_a_forge_error(model):
    ids, _ = _sample(5, 0, 0)
    with pytest.raises(ForgeError, match="no labelled"):
        validation_loss(model, [{"input_ids": ids, "labels": [-100] * 5, "position_ids": list(range(5))}])


def test_validation_loss_on_prepared_data_is_the_same_packed_or_not(tmp_path, model):
    """Through the real `preprocess`: packing the validation split changes the rows, not the loss."""
    import json

    from dolphin_forge.config import load_config
    from dolphin_forge.data.preprocess import preprocess

    rows = [
        {"conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                           {"from": "gpt", "value": f"It is {2 * i}."}]}
        for i in range(24)
    ]
    data_file = tmp_path / "chats.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    def prepared(packed: bool):
        config = load_config(data={
            "base_model": "default", "datasets": [{"path": str(data_file)}], "sequence_len": 128,
            "dataset_prepared_path": str(tmp_path / f"prepared-{packed}"), "val_set_size": 0.5,
            "sample_packing": True, "eval_sample_packing": packed,
        }).config
        return preprocess(config).val

    packed, unpacked = prepared(True), prepared(False)
    assert len(packed) < len(unpacked) == 12
    assert validation_loss(model, packed, batch_size=2) == pytest.approx(validation_loss(model, unpacked), rel=1e-5)
