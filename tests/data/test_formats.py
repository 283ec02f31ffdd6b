"""Normalising ShareGPT, OpenAI messages and Alpaca rows; every bad row becomes a named problem."""

from __future__ import annotations

import json

import pytest

from dolphin_forge.config import DatasetConfig
from dolphin_forge.data.conversation import Message
from dolphin_forge.data.formats import Record, RowProblem, read_records, to_conversation, trained_roles
from dolphin_forge.errors import ForgeError


def normalise(data: dict, **dataset) -> list[Message]:
    return to_conversation(Record("f.jsonl", 1, data), DatasetConfig(path="f", **dataset)).messages


def test_sharegpt_roles_map_to_chatml_roles():
    messages = normalise(
        {"conversations": [
            {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
        ]}
    )
    assert messages == [Message("system", "S"), Message("user", "Q"), Message("assistant", "A")]


def test_function_call_roles_become_tool_call_and_tool_turns():
    messages = normalise(
        {"conversations": [
            {"from": "human", "value": "Q"},
            {"from": "function-call", "value": '{"name": "f", "arguments": {}}'},
            {"from": "function-response", "value": '{"ok": true}'},
            {"from": "gpt", "value": "A"},
        ], "tools": '[{"name": "f"}]'}
    )
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert messages[0].content.endswith('<tools>\n[{"name": "f"}]\n</tools>')
    assert messages[2].content == '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert messages[3].content == '<tool_response>\n{"ok": true}\n</tool_response>'


@pytest.mark.parametrize("tools", ["[]", " [] ", [], "", None])
def test_a_row_that_lists_no_tools_gets_no_tools_block(tools):
    """glaive-style rows write an empty tool list as the text "[]": no empty <tools> block may be trained."""
    messages = normalise({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                          "tools": tools})
    assert [m.role for m in messages] == ["user", "assistant"]


def test_tool_blocks_are_wrapped_once():
    wrapped = normalise({"conversations": [
        {"from": "human", "value": "Q"},
        {"from": "function_call", "value": '<tool_call>\n{"name": "f"}\n</tool_call>'},
        {"from": "tool", "value": "<tool_response>\n1\n</tool_response>"}]})
    assert wrapped[1].content == '<tool_call>\n{"name": "f"}\n</tool_call>'
    assert wrapped[2].content == "<tool_response>\n1\n</tool_response>"


def test_openai_messages_with_tool_calls():
    messages = normalise(
        {"messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42"},
        ]},
        type="chat_template",
    )
    assert messages[1] == Message("assistant", '<tool_call>\n{"name": "f", "arguments": "{}"}\n</tool_call>')
    assert messages[2] == Message("tool", "<tool_response>\n42\n</tool_response>")


def test_chat_template_with_property_mappings_and_custom_roles():
    messages = normalise(
        {"dialog": [{"speaker": "asker", "text": "Q"}, {"speaker": "bot", "text": "A"}]},
        type="chat_template",
        field_messages="dialog",
        message_property_mappings={"role": "speaker", "content": "text"},
        roles={"user": ["asker"], "assistant": ["bot"]},
    )
    assert messages == [Message("user", "Q"), Message("assistant", "A")]


def test_alpaca_joins_instruction_and_input():
    messages = normalise({"instruction": "Sum", "input": "2, 2", "output": "4"}, type="alpaca")
    assert messages == [Message("user", "Sum\n\n2, 2"), Message("assistant", "4")]


def test_empty_system_prompt_is_dropped_not_the_row():
    messages = normalise({"conversations": [
        {"from": "system", "value": ""}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})
    assert [m.role for m in messages] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("data", "dataset", "reason"),
    [
        ({"conversations": [{"from": "narrator", "value": "x"}]}, {}, "unknown_role"),
        ({"conversations": []}, {}, "empty_conversation"),
        ({"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "A"}]}, {}, "empty_turn"),
        ({"instruction": "x", "output": "y"}, {}, "missing_field"),
        ({"instruction": "x"}, {"type": "alpaca"}, "missing_field"),
        ({"conversations": "hello"}, {}, "bad_field"),
        ({"conversations": [{"from": "human", "value": 3}]}, {}, "bad_field"),
    ],
)
def test_bad_rows_raise_a_named_problem(data, dataset, reason):
    with pytest.raises(RowProblem) as info:
        normalise(data, **dataset)
    assert info.value.reason == reason
    assert str(info.value).startswith("f.jsonl:1: ")


def test_jsonl_bad_lines_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{broken\n\n[1, 2]\n{"b": 2}\n')
    items = list(read_records(path))
    assert [(type(i).__name__, i.row) for i in items] == [
        ("Record", 1), ("RowProblem", 2), ("RowProblem", 4), ("Record", 5)]
    assert items[1].reason == "bad_json"


def test_folders_json_arrays_and_parquet_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.json").write_text(json.dumps([{"x": 1}, {"x": 2}]))
    pq.write_table(pa.table({"x": [3]}), tmp_path / "b.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.data["x"] for r in read_records(tmp_path)] == [1, 2, 3]


def test_saved_hf_dataset_is_read(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"x": 7}, {"x": 8}]).save_to_disk(str(tmp_path / "ds"))
    assert [r.data["x"] for r in read_records(tmp_path / "ds")] == [7, 8]


def test_a_json_file_is_one_object_an_array_or_json_lines(tmp_path):
    single = tmp_path / "one.json"
    single.write_text(json.dumps({"x": 1, "y": [1, 2]}, indent=2))
    assert [(type(i).__name__, i.row, i.data) for i in read_records(single)] == [("Record", 1, {"x": 1, "y": [1, 2]})]
    lines = tmp_path / "lines.json"
    lines.write_text('{"x": 1}\n{"x": 2}\n')
    assert [r.data["x"] for r in read_records(lines)] == [1, 2]
    broken_first = tmp_path / "broken.json"
    broken_first.write_text('{"x": \n{"x": 2}\n')
    assert [(type(i).__name__, i.row) for i in read_records(broken_first)] == [("RowProblem", 1), ("Record", 2)]


def test_data_files_reads_the_named_files_inside_path_in_order(tmp_path):
    for name, x in (("a.jsonl", 1), ("b.jsonl", 2), ("c.jsonl", 3)):
        (tmp_path / name).write_text(json.dumps({"x": x}) + "\n")
    assert [r.data["x"] for r in read_records(tmp_path, data_files=["c.jsonl", "a.jsonl"])] == [3, 1]
    assert [r.data["x"] for r in read_records(tmp_path, data_files="b.jsonl")] == [2]
    with pytest.raises(ForgeError, match="data_files .*nope.jsonl not found"):
        list(read_records(tmp_path, data_files=["a.jsonl", "nope.jsonl"]))
    with pytest.raises(ForgeError, match="is not a folder"):
        list(read_records(tmp_path / "a.jsonl", data_files="b.jsonl"))


def test_ds_type_chooses_the_reader_over_the_suffix(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "rows.txt").write_text('{"x": 1}\n{"x": 2}\n')
    pq.write_table(pa.table({"x": [3]}), tmp_path / "table.bin")
    assert [r.data["x"] for r in read_records(tmp_path, data_files="rows.txt", ds_type="json")] == [1, 2]
    assert [r.data["x"] for r in read_records(tmp_path, data_files="table.bin", ds_type="parquet")] == [3]
    # `jsonl` reads line by line even where the first line alone would look like one JSON document's start
    (tmp_path / "one.json").write_text('[1]\n{"x": 4}\n')
    items = list(read_records(tmp_path / "one.json", ds_type="jsonl"))
    assert [(type(i).__name__, i.row) for i in items] == [("RowProblem", 1), ("Record", 2)]


@pytest.mark.parametrize(("dataset", "roles"), [
    ({}, ["assistant"]),
    ({"roles_to_train": ["gpt"]}, ["assistant"]),
    ({"roles_to_train": ["human", "assistant"]}, ["assistant", "user"]),
    ({"roles": {"assistant": ["bot"]}, "roles_to_train": ["BOT"]}, ["assistant"]),
    ({"roles_to_train": ["function_call", "observation"]}, ["assistant", "tool"]),
])
def test_roles_to_train_names_become_chatml_roles(dataset, roles):
    assert trained_roles(DatasetConfig(path="a", **dataset)) == roles


def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"x": 1}, {"x": 2}], indent=2), encoding="utf-8-sig")
    lines = tmp_path / "lines.jsonl"
    lines.write_text('{"x": 3}\n{"x": 4}\n', encoding="utf-8-sig")
    assert [r.data["x"] for r in read_records(array)] == [1, 2]
    assert [r.data["x"] for r in read_records(lines)] == [3, 4]


def test_damaged_files_cost_only_the_rows_after_the_damage(tmp_path):
    import gzip
    import random

    whole = "".join(json.dumps({"x": i, "pad": random.Random(i).randbytes(100).hex()}) + "\n" for i in range(200))
    whole = whole.encode()
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(whole)[:3000])
    items = list(read_records(truncated))
    kept = [i for i in items if isinstance(i, Record)]
    assert kept and [r.data["x"] for r in kept] == list(range(len(kept)))
    assert isinstance(items[-1], RowProblem) and items[-1].reason == "unreadable_file"
    assert f"cannot be read past row {len(kept)}" in items[-1].detail
    (tmp_path / "fake.jsonl.gz").write_text('{"x": 1}\n')
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    for name in ("fake.jsonl.gz", "bad.parquet"):
        (problem,) = list(read_records(tmp_path / name))
        assert problem.reason == "unreadable_file" and problem.source.endswith(name)


def test_a_row_of_an_unforeseen_shape_is_a_problem_not_a_crash():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok", "tool_calls": 5}]}
    with pytest.raises(RowProblem) as info:
        to_conversation(Record("f.jsonl", 1, row), DatasetConfig(path="f.jsonl"))
    assert info.value.reason == "bad_field" and "tool_calls' should be a list" in str(info.value)
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}], "tools": [b"\x00"]}
    with pytest.raises(RowProblem) as info:
        to_conversation(Record("f.jsonl", 2, row), DatasetConfig(path="f.jsonl"))
    assert str(info.value).startswith("f.jsonl:2: unexpected row structure")


def test_openai_content_parts_are_trained_as_their_text_not_as_json():
    """Dumped as JSON, `[{"type": "text", ...}]` would be trained as brackets and keys, silently."""
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
    messages = normalise({"messages": [{"role": "user", "content": parts},
                                       {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]},
                         type="chat_template")
    assert messages == [Message("user", "Hi there"), Message("assistant", "Hello")]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "A cat"}]}
    with pytest.raises(RowProblem) as info:
        normalise(image, type="chat_template")
    assert (info.value.reason, str(info.value)) == (
        "bad_field", "f.jsonl:1: turn 1 field 'content' holds a 'image_url' part; only text parts can be trained")
    tool = [{"type": "restaurant", "name": "Roma"}]  # a tool's result is any JSON and stays JSON
    messages = normalise({"messages": [{"role": "user", "content": "Q"}, {"role": "tool", "content": tool},
                                       {"role": "assistant", "content": "A"}]}, type="chat_template")
    assert json.dumps(tool) in messages[1].content
