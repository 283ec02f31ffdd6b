"""The loss trains exactly the tokens `preprocess` labelled: the assistant replies, nothing else."""

from __future__ import annotations

import pytest
import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.data.preprocess import preprocess
from dolphin_forge.evaluate.perplexity import validation_loss
from dolphin_forge.train.batches import collate
from dolphin_forge.train.sft import summed_token_loss
from tests.tiny import build_tiny_model
from tests.train.rows import write_chat_jsonl


def test_loss_uses_exactly_the_preprocessed_labels(tokenizer, tiny_model_dir, tmp_path):
    write_chat_jsonl(tmp_path / "chat.jsonl", count=12)
    config = ForgeConfig(
        base_model=str(tiny_model_dir),
        datasets=[{"path": str(tmp_path / "chat.jsonl"), "type": "sharegpt"}],
        dataset_prepared_path=str(tmp_path / "prepared"),
        sequence_len=128,
        sample_packing=True,
    )
    rows = list(preprocess(config).train)
    assert any(len(r["seq_lens"]) > 1 for r in rows)  # packed
    batch = collate(rows, pad_id=tokenizer.pad_token_id or 0, pad_to=128)

    # the tokens the loss trains on are the assistant replies, each closed by <|im_end|>
    trained = [tid for row in rows for tid, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    text = tokenizer.decode(trained)
    assert "What comes after" not in text and "user" not in text and "assistant" not in text
    assert text.count("<|im_end|>") == 12 and text.startswith(tuple("0123456789"))
    assert batch.trained_tokens == len(trained)

    model = build_tiny_model(tokenizer).eval()
    with torch.no_grad():
        summed, _ = summed_token_loss(model, batch)
    mean = float(summed) / batch.trained_tokens
    assert mean == pytest.approx(validation_loss(model, rows, batch_size=2), rel=1e-4)
