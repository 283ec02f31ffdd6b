"""Acceptance on the real shared datasets: alpaca (with real "As an AI language model" refusals), sharegpt and
function_calling curate into ShareGPT JSONL that `preprocess` accepts without dropping a row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dolphin_forge.config import load_config
from dolphin_forge.curate import curate


@pytest.fixture(scope="module")
def curated(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("curated")
    config = load_config(data={"curate": {"output_dir": str(out), "processes": 2, "samples": 50, "sources": [
        {"path": str(shared_data / "alpaca"), "type": "alpaca"},
        {"path": str(shared_data / "sharegpt"), "type": "sharegpt"},
        {"path": str(shared_data / "function_calling"), "type": "sharegpt"},
    ]}}).config
    return curate(config)


def test_report_counts_per_filter_and_source(curated) -> None:
    report = json.loads(curated.report_path.read_text())
    assert report["sources"]["alpaca"]["read"] == 5999  # 5,000 sample + 999 demo rows
    assert report["sources"]["sharegpt"]["read"] == 500 and report["sources"]["function_calling"]["read"] == 300
    filters = report["filters"]
    assert filters["refusal"]["dropped"] >= 60
    assert filters["dedup"]["dropped"] > 0 and filters["format"]["reasons"] == {"empty_turn": 2}
    rows = sum(1 for _ in curated.output.open())
    assert rows == report["rows"]["written"] == report["rows"]["read"] - sum(f["dropped"] for f in filters.values())
    assert report["edits"]["function_calling.calls"] > 100


def test_rejected_refusals_really_are_refusals(curated) -> None:
    """Every sampled refusal row speaks as an AI or refuses (hand-read precision is in the stage's report)."""
    samples = json.loads(curated.report_path.read_text())["samples"]["refusal"]
    assert len(samples) == 50
    markers = ("as an ai", "language model", "i'm sorry", "i am sorry", "i cannot", "i can't", "capability",
               "i don't have", "i do not have", "unable")
    assert all(any(m in s["text"].lower() for m in markers) for s in samples)


def test_no_refusal_phrase_survives_in_answers(curated) -> None:
    for line in curated.output.open():
        for turn in json.loads(line)["conversations"]:
            if turn["from"] == "gpt":
                assert "as an ai language model" not in turn["value"].lower()


def test_preprocess_accepts_the_curated_file(curated, tmp_path: Path, tokenizer) -> None:
    from dolphin_forge.data.preprocess import preprocess

    config = load_config(data={
        "datasets": [{"path": str(curated.output), "type": "sharegpt"}],
        "dataset_prepared_path": str(tmp_path / "prepared"), "sequence_len": 4096,
    }).config
    report = preprocess(config, tokenizer=tokenizer, processes=1).report
    assert report["rows_read"] == sum(1 for _ in curated.output.open())
    assert report["rows_dropped"] == {} and report["rows_kept"] == report["rows_read"]
