"""Prepared rows built by hand in the prepared-data contract's exact format, for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

IGNORE = -100


def sample(length: int, prompt: int, vocab: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """One sample: random ids, the first `prompt` tokens untrained (the first token always untrained)."""
    ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
    labels = [IGNORE] * max(1, prompt) + ids[max(1, prompt):]
    return ids, labels


def pack(samples: list[tuple[list[int], list[int]]]) -> dict[str, list[int]]:
    """One prepared row holding the given samples back to back."""
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for ids, labels in samples:
        row["input_ids"] += ids
        row["labels"] += labels
        row["position_ids"] += list(range(len(ids)))
        row["seq_lens"].append(len(ids))
    return row


def random_rows(
    count: int, vocab: int, seed: int = 0, per_row: int = 2, max_len: int = 24
) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        samples = []
        for _ in range(per_row):
            length = int(torch.randint(4, max_len, (1,), generator=generator))
            prompt = int(torch.randint(1, length - 1, (1,), generator=generator))
            samples.append(sample(length, prompt, vocab, generator))
        rows.append(pack(samples))
    return rows


def write_chat_jsonl(path: Path, count: int = 40) -> None:
    """A small ShareGPT JSONL file of made-up counting conversations (for runs that go through `preprocess`)."""
    with path.open("w") as handle:
        for i in range(count):
            answer = " ".join(str(i + k) for k in range(1, 2 + i % 7))
            turns = [{"from": "human", "value": f"What comes after {i}?"}, {"from": "gpt", "value": answer}]
            handle.write(json.dumps({"conversations": turns}) + "\n")
