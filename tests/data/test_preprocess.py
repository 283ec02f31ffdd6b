"""`preprocess` end to end: bad rows reported and good rows kept, the cache, the split, the real datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dolphin_forge.config import load_config
from dolphin_forge.data.chatml import IGNORE
from dolphin_forge.data.preprocess import cached_report, preprocess
from dolphin_forge.errors import ForgeError


def good(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}


def make_config(tmp_path, datasets, **extra):
    data = {"base_model": "default", "datasets": datasets, "dataset_prepared_path": str(tmp_path / "prepared"),
            "sequence_len": 256, "sample_packing": True}
    data.update(extra)
    return load_config(data=data).config


def corrupted_file(tmp_path):
    lines = []
    for i in range(40):
        lines.append(json.dumps(good(i)))
    lines.insert(3, "{this is not json")
    lines.insert(7, json.dumps({"conversation": []}))  # missing field
    lines.insert(11, json.dumps({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}))
    lines.insert(15, json.dumps({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "y"}]}))
    lines.insert(19, json.dumps({"conversations": [{"from": "human", "value": "big"},
                                                   {"from": "gpt", "value": "word " * 200_000}]}))  # 1 MB
    lines.insert(23, json.dumps({"conversations": [{"from": "human", "value": "no answer"}]}))
    lines.insert(27, json.dumps({"conversations": []}))
    path = tmp_path / "corrupted.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_corrupted_file_loses_no_good_row_and_reports_every_bad_one(tmp_path, tokenizer):
    path = corrupted_file(tmp_path)
    config = make_config(tmp_path, [{"path": str(path), "type": "sharegpt"}])
    prepared = preprocess(config, tokenizer=tokenizer)
    report = prepared.report
    assert report["rows_read"] == 47
    assert report["rows_kept"] == 40
    assert report["rows_dropped"] == {
        "bad_json": 1, "missing_field": 1, "unknown_role": 1, "empty_turn": 1, "too_long": 1,
        "no_trainable_tokens": 1, "empty_conversation": 1}
    assert report["dropped_examples"]["bad_json"] == [f"{path}:4: not valid JSON (Expecting property name "
                                                       "enclosed in double quotes at column 2)"]
    kept = {tokenizer.decode(ids) for row in prepared.train for ids in _samples(row)}
    for i in range(40):
        assert any(f"Question {i}?" in text and f"Answer {i}." in text for text in kept)


def _samples(row):
    start = 0
    for n in row["seq_lens"]:
        yield row["input_ids"][start : start + n]
        start += n


def test_second_run_is_a_cache_hit_and_a_change_rebuilds(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(good(i)) for i in range(20)))
    config = make_config(tmp_path, [{"path": str(path)}])
    first = preprocess(config, tokenizer=tokenizer)
    assert not first.cached
    assert preprocess(config, tokenizer=tokenizer).cached
    config.sequence_len = 128
    assert not preprocess(config, tokenizer=tokenizer).cached
    path.write_text("\n".join(json.dumps(good(i)) for i in range(21)))
    rebuilt = preprocess(config, tokenizer=tokenizer)
    assert not rebuilt.cached and rebuilt.report["rows_kept"] == 21


def test_val_split_and_unpacked_val_rows(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(good(i)) for i in range(50)))
    config = make_config(tmp_path, [{"path": str(path)}], val_set_size=0.1, eval_sample_packing=False)
    prepared = preprocess(config, tokenizer=tokenizer)
    assert prepared.report["train_samples"] == 45 and prepared.report["val_samples"] == 5
    assert len(prepared.val) == 5 and all(len(r["seq_lens"]) == 1 for r in prepared.val)
    row = prepared.train[0]
    assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["seq_lens"])
    start = 0
    for n in row["seq_lens"]:  # every sample's first token is unlabelled, so packing never crosses documents
        assert row["labels"][start] == IGNORE and row["position_ids"][start] == 0
        start += n


def test_excess_length_strategies(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good(0)) + "\n" + json.dumps(
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "long " * 500}]}) + "\n")
    dropped = preprocess(make_config(tmp_path, [{"path": str(path)}]), tokenizer=tokenizer)
    assert dropped.report["rows_dropped"] == {"too_long": 1}
    truncated = preprocess(make_config(tmp_path, [{"path": str(path)}], excess_length_strategy="truncate"),
                           tokenizer=tokenizer)
    assert truncated.report["rows_truncated"] == 1 and truncated.report["rows_kept"] == 2
    assert max(len(r["input_ids"]) for r in truncated.train) <= 256
    with pytest.raises(ForgeError, match="exceed sequence_len 256"):
        preprocess(make_config(tmp_path, [{"path": str(path)}], excess_length_strategy="raise"), tokenizer=tokenizer)


def test_a_row_truncated_to_nothing_trainable_counts_as_dropped_not_truncated(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    rows = [good(0), {"conversations": [{"from": "human", "value": "long " * 500}, {"from": "gpt", "value": "a"}]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = preprocess(make_config(tmp_path, [{"path": str(path)}], excess_length_strategy="truncate"),
                        tokenizer=tokenizer).report
    assert report["rows_dropped"] == {"no_trainable_tokens": 1}
    assert report["rows_truncated"] == 0 and report["rows_kept"] == 1


def test_shared_alpaca_and_sharegpt_pack_at_least_99_5_percent(tmp_path, tokenizer, shared_data):
    config = make_config(
        tmp_path,
        [{"path": str(shared_data / "alpaca"), "type": "alpaca"},  # both files of the folder
         {"path": str(shared_data / "sharegpt"), "type": "sharegpt"}],
        sequence_len=2048,
    )
    report = preprocess(config, tokenizer=tokenizer).report
    assert report["rows_read"] == 5000 + 999 + 500
    assert report["rows_kept"] + sum(report["rows_dropped"].values()) == report["rows_read"]
    assert report["packing_efficiency"] >= 0.995
    assert report["trainable_tokens"] < report["total_tokens"]


def test_function_calling_data_trains_calls_but_not_tool_results(tmp_path, tokenizer, shared_data):
    config = make_config(tmp_path, [{"path": str(shared_data / "function_calling" / "glaive_toolcall_en_demo.json")}],
                         sequence_len=4096)
    prepared = preprocess(config, tokenizer=tokenizer)
    # one row has 11.7k tokens
    assert prepared.report["rows_kept"] == 299 and prepared.report["rows_dropped"] == {"too_long": 1}
    text_trained = []
    for row in prepared.train.select(range(20)):
        labels = np.array(row["labels"])
        text_trained.append(tokenizer.decode(np.array(row["input_ids"])[labels != IGNORE]))
    joined = "".join(text_trained)
    assert "<tool_call>" in joined and "<tool_response>" not in joined


def test_process_pool_gives_the_same_rows_as_one_process(tmp_path, tokenizer, monkeypatch):
    import dolphin_forge.data.preprocess as module

    path = corrupted_file(tmp_path)
    single = preprocess(make_config(tmp_path / "a", [{"path": str(path)}]), tokenizer=tokenizer, processes=1)
    monkeypatch.setattr(module, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(module, "CHUNK_ROWS", 7)
    pooled = preprocess(make_config(tmp_path / "b", [{"path": str(path)}]), tokenizer=tokenizer, processes=2)
    assert pooled.report["rows_dropped"] == single.report["rows_dropped"]
    assert pooled.train.to_dict() == single.train.to_dict()


def test_a_seed_config_verbatim_drives_preprocess_with_paths_overridden(tmp_path, tokenizer, shared_data):
    from tests.test_config import seed_yaml

    path = tmp_path / "seed.yml"
    path.write_text(seed_yaml("dolphin-2.9-llama3-8b"))
    data = str(shared_data / "sharegpt" / "fastchat_dummy_conversation.json")
    loaded = load_config(path, overrides={
        "base_model": "default", "datasets": f"[{{path: {data}, type: sharegpt, conversation: chatml}}]",
        "dataset_prepared_path": str(tmp_path / "prepared")})
    prepared = preprocess(loaded.config, loaded.path, tokenizer=tokenizer)
    assert prepared.report["rows_kept"] == 500 and prepared.report["sequence_len"] == 4096
    assert prepared.report["val_samples"] == 1  # val_set_size 0.0002 of 500 rows, rounded up


def test_cached_report_for_validate_is_read_only_and_never_fails(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good(0)) + "\n")
    config = make_config(tmp_path, [{"path": str(path)}])
    prepared = preprocess(config, tokenizer=tokenizer)
    assert cached_report(config, None) == prepared.report
    (prepared.path / "report.json").write_text("{")
    assert cached_report(config, None) is None
    monkeypatch.setenv("DOLPHIN_FORGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("dolphin_forge.models.default.fetch_default_model",
                        lambda *args, **kwargs: pytest.fail("validate must not install or convert the default model"))
    assert cached_report(config, None) is None


def test_data_files_choose_the_files_inside_a_dataset_folder(tmp_path, tokenizer):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        (folder / f"part{i}.jsonl").write_text(json.dumps(good(i)) + "\n")
    config = make_config(tmp_path, [{"path": str(folder), "data_files": ["part2.jsonl", "part0.jsonl"]}])
    report = preprocess(config, tokenizer=tokenizer).report
    assert report["rows_read"] == 2 and report["rows_kept"] == 2
    with pytest.raises(ForgeError, match="data_files .*part9.jsonl not found"):
        preprocess(make_config(tmp_path, [{"path": str(folder), "data_files": "part9.jsonl"}]), tokenizer=tokenizer)


def test_with_no_usable_row_the_error_names_the_empty_file_or_a_rows_own_reason(tmp_path, tokenizer):
    """The counts alone hide the fix: a row of the commonest reason carries it in its own words (set type: alpaca)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ForgeError) as info:
        preprocess(make_config(tmp_path, [{"path": str(empty)}]), tokenizer=tokenizer)
    assert str(info.value) == f"datasets: no rows in {empty}; expected JSON or JSONL rows"
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}] * 2))
    with pytest.raises(ForgeError) as info:
        preprocess(make_config(tmp_path, [{"path": str(alpaca)}]), tokenizer=tokenizer)
    assert str(info.value) == (
        "datasets: none of the 2 rows read is usable (dropped: missing_field 2); "
        f"e.g. {alpaca}:1: field 'conversations' is missing (looks like alpaca: set type: alpaca)"
    )
