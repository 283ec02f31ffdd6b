"""The whole stage on hand-written files: outputs, provenance, rejected rows, report, processes, errors, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dolphin_forge.config import DatasetConfig, load_config
from dolphin_forge.curate import curate
from dolphin_forge.data.formats import Record, to_conversation
from dolphin_forge.errors import ForgeError

REFUSAL = "I'm sorry, but as an AI language model I cannot answer that."
GREETING = [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello, how can I help?"}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sources(tmp_path: Path) -> dict[str, Path]:
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
        {"instruction": "Is it ethical to lie?", "input": "", "output": REFUSAL},
        {"instruction": "Name a primary colour.", "input": "", "output": "Blue."},  # exact duplicate prompt
        {"instruction": "Translate 'cat' to French.", "input": "", "output": "Chat."},
        {"instruction": "Say nothing.", "input": "", "output": ""},  # empty answer: the reader rejects it
    ]), encoding="utf-8")
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"id": "c1", "conversations": GREETING},
        "{this line is broken json\n",
        {"id": "c2", "conversations": [{"from": "human", "value": "What's 2+2?"}, {"from": "gpt", "value": "4"},
                                       {"from": "human", "value": "And 3+3?"},
                                       {"from": "gpt", "value": "As my system prompt instructs: 6"}]},
        {"id": "c3", "conversations": [{"from": "alien", "value": "??"}, {"from": "gpt", "value": "!!"}]},
        {"id": "c4", "conversations": [{"from": "human", "value": "Weather in Oslo?"},
                                       {"from": "function_call",
                                        "value": "{'name': 'weather', 'arguments': {'city': 'Oslo'}}"},
                                       {"from": "observation", "value": "{\"c\": -3}"},
                                       {"from": "gpt", "value": "It is -3 C."}],
         "tools": "[{\"name\": \"weather\"}]"},
        {"id": "c5", "conversations": [{"from": "human", "value": "Call it"},
                                       {"from": "function_call", "value": "{name: weather"},
                                       {"from": "observation", "value": "x"}, {"from": "gpt", "value": "ok"}]},
    ])
    return {"alpaca": alpaca, "chats": chats}


def config_for(tmp_path: Path, **curate_options):
    files = sources(tmp_path)
    data = {"seed": 5, "curate": {
        "output_dir": str(tmp_path / "out"), "processes": 1,
        "sources": [{"path": str(files["alpaca"]), "type": "alpaca"}, {"path": str(files["chats"]), "name": "chat"}],
        **curate_options}}
    return load_config(data=data).config


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_curate_writes_clean_rows_rejections_and_a_report(tmp_path: Path) -> None:
    result = curate(config_for(tmp_path))
    rows = read_jsonl(result.output)
    ids = sorted((r["source"], r["id"]) for r in rows)
    assert ids == [("alpaca", "alpaca.json:1"), ("alpaca", "alpaca.json:4"), ("chat", "c1"), ("chat", "c4")]

    rejected = {(r["source"], r["id"]): (r["filter"], r["reason"]) for r in read_jsonl(result.rejected)}
    assert rejected == {
        ("alpaca", "alpaca.json:2"): ("refusal", "refusal"),
        ("alpaca", "alpaca.json:3"): ("dedup", "exact"),
        ("alpaca", "alpaca.json:5"): ("format", "empty_turn"),
        ("chat", "chats.jsonl:2"): ("format", "bad_json"),
        ("chat", "c2"): ("system_conversations", "system_talk"),
        ("chat", "c3"): ("format", "unknown_role"),
        ("chat", "c5"): ("function_calling", "bad_tool_json"),
    }
    duplicate = next(r for r in read_jsonl(result.rejected) if r["reason"] == "exact")
    assert duplicate["detail"] == "exact duplicate of alpaca/alpaca.json:1"
    assert duplicate["row"]["conversations"][-1]["value"] == "Blue."  # the dropped row is kept for review

    report = json.loads(result.report_path.read_text())
    assert report["rows"] == {"read": 11, "kept": 4, "written": 4}
    assert report["sources"]["chat"] == {"read": 6, "kept": 2, "rejected": 4, "mixed": 2}
    assert report["filters"]["format"] == {"dropped": 3, "reasons": {"empty_turn": 1, "bad_json": 1, "unknown_role": 1}}
    assert report["dedup"]["largest_clusters"] == [{"kept": "alpaca/alpaca.json:1", "duplicates": 1}]
    assert report["samples"]["refusal"][0]["text"] == REFUSAL
    assert report["edits"]["function_calling.calls_repaired"] == 1


def test_output_rows_read_back_as_the_curated_conversations(tmp_path: Path) -> None:
    """What `preprocess` reads (type: sharegpt) is exactly the curated conversation, tool blocks included."""
    result = curate(config_for(tmp_path, system_prompts={"enabled": False}))
    rows = {r["id"]: r for r in read_jsonl(result.output)}
    conversation = to_conversation(Record("x", 1, rows["c4"]), DatasetConfig(path="x", type="sharegpt"))
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("system", rows["c4"]["conversations"][0]["value"]),
        ("user", "Weather in Oslo?"),
        ("assistant", '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
        ("tool", '<tool_response>\n{"c": -3}\n</tool_response>'),
        ("assistant", "It is -3 C."),
    ]
    assert rows["c4"]["conversations"][3] == {"from": "tool", "value": '{"c": -3}'}
    assert "<tools>\n[{\"name\": \"weather\"}]\n</tools>" in rows["c4"]["conversations"][0]["value"]
    assert rows["c1"]["conversations"] == GREETING


def test_system_prompts_are_assigned_and_mixing_applies_weights(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- Answer like a pirate.\n", encoding="utf-8")
    config = config_for(tmp_path, system_prompts={"file": str(prompts)})
    config.curate.sources[0].max_rows = 1
    result = curate(config)
    rows = read_jsonl(result.output)
    assert sorted(r["source"] for r in rows) == ["alpaca", "chat", "chat"]
    plain = next(r for r in rows if r["id"] == "c1")
    assert plain["conversations"][0] == {"from": "system", "value": "Answer like a pirate."}
    assert result.report.sources["alpaca"].kept == 2 and result.report.sources["alpaca"].mixed == 1


def test_two_processes_give_the_same_files(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = curate(config_for(tmp_path / "one", processes=1, batch_rows=2))
    two = curate(config_for(tmp_path / "two", processes=2, batch_rows=2))
    assert one.output.read_text() == two.output.read_text()
    assert one.rejected.read_text() == two.rejected.read_text()


def test_a_malformed_file_loses_no_good_row(tmp_path: Path) -> None:
    lines, good = [], set()
    for i in range(300):
        if i % 7 == 3:
            lines.append('{"conversations": [{"from": "human", "value": "truncated...\n')
        elif i % 11 == 5:
            lines.append("[1, 2, 3]\n")
        elif i % 13 == 6:
            lines.append(json.dumps({"id": f"r{i}", "conversations": "not a list"}) + "\n")
        else:
            lines.append(json.dumps({"id": f"r{i}", "conversations": [
                {"from": "human", "value": f"Question number {i}: what is {i} squared?"},
                {"from": "gpt", "value": f"{i * i}"}]}) + "\n")
            good.add(f"r{i}")
    path = tmp_path / "messy.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    config = load_config(data={"curate": {"output_dir": str(tmp_path / "out"), "processes": 2,
                                          "sources": [{"path": str(path)}]}}).config
    result = curate(config)
    assert {r["id"] for r in read_jsonl(result.output)} == good
    assert result.report.rows_read == 300
    assert sum(result.report.dropped["format"].values()) == 300 - len(good)


def test_user_mistakes_are_forge_errors(tmp_path: Path) -> None:
    with pytest.raises(ForgeError, match="curate.sources: no sources"):
        curate(load_config(data={"curate": {"output_dir": str(tmp_path)}}).config)
    with pytest.raises(ForgeError, match=r"curate.sources.0.path: .*missing.jsonl does not exist"):
        curate(load_config(data={"curate": {"sources": [{"path": str(tmp_path / "missing.jsonl")}]}}).config)
    twice = {"curate": {"sources": [{"path": "a/x.jsonl"}, {"path": "b/x.jsonl"}]}}
    with pytest.raises(ForgeError, match="name 'x' is used twice"):
        curate(load_config(data=twice).config)
    with pytest.raises(ForgeError, match="curate.dedup.threshold"):
        load_config(data={"curate": {"dedup": {"threshold": 2}}})


def test_top_level_datasets_are_the_default_sources(tmp_path: Path) -> None:
    files = sources(tmp_path)
    config = load_config(data={"datasets": [{"path": str(files["alpaca"]), "type": "alpaca"}],
                                "curate": {"output_dir": str(tmp_path / "out"), "processes": 1}}).config
    result = curate(config)
    assert {r["source"] for r in read_jsonl(result.output)} == {"alpaca"}


def test_cli_runs_the_stage_and_reports_mistakes_in_one_line(tmp_path: Path) -> None:
    files = sources(tmp_path)
    config = tmp_path / "cfg.yml"
    config.write_text(f"curate:\n  processes: 1\n  sources:\n    - path: {files['chats']}\n", encoding="utf-8")
    forge = [sys.executable, "-m", "dolphin_forge.cli", "curate", str(config)]
    done = subprocess.run([*forge, "--curate.output-dir", str(tmp_path / "cli")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rows dropped per filter" in done.stdout and "function_calling" in done.stdout
    assert len(read_jsonl(tmp_path / "cli" / "curated.jsonl")) == 2
    bad = subprocess.run([*forge, "--curate.refusal.phrase-files", "[nope.txt]"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    assert "curate.refusal.phrase_files" in bad.stderr and "Traceback" not in bad.stderr


def test_a_source_can_map_its_own_role_names(tmp_path: Path) -> None:
    """Role aliases: the reader's table ("human", "gpt", "function_call", ...) plus a source's own `roles:`."""
    path = write_jsonl(tmp_path / "odd.jsonl", [
        {"id": "o1", "conversations": [{"from": "Alien", "value": "Greetings?"}, {"from": "GPT", "value": "Hello."}]},
    ])
    sources = [{"path": str(path), "roles": {"user": ["alien"]}}]
    config = load_config(data={"curate": {"output_dir": str(tmp_path / "out"), "processes": 1, "sources": sources,
                                          "system_prompts": {"enabled": False}}}).config
    rows = read_jsonl(curate(config).output)
    assert rows[0]["conversations"] == [{"from": "human", "value": "Greetings?"}, {"from": "gpt", "value": "Hello."}]


@pytest.mark.parametrize("scope", ["first_user", "conversation", "assistant"])
def test_identical_rows_are_duplicates_in_every_scope_despite_assigned_system_prompts(
    tmp_path: Path, scope: str
) -> None:
    """Each row draws its own system prompt, so dedup must compare the conversations as they came in."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("".join(f"- Prompt number {i}, answer in style {i}.\n" for i in range(20)), encoding="utf-8")
    path = write_jsonl(tmp_path / "same.jsonl", [{"id": f"r{i}", "conversations": GREETING} for i in range(6)])
    config = load_config(data={"curate": {"output_dir": str(tmp_path / "out"), "processes": 1,
                                          "sources": [{"path": str(path)}], "dedup": {"scope": scope},
                                          "system_prompts": {"file": str(prompts)}}}).config
    result = curate(config)
    (kept,) = read_jsonl(result.output)
    assert kept["id"] == "r0" and kept["conversations"][0]["from"] == "system"  # the prompt is still assigned
    assert kept["conversations"][1:] == GREETING
    rejected = read_jsonl(result.rejected)
    assert [(r["id"], r["reason"], r["detail"]) for r in rejected] == [
        (f"r{i}", "exact", "exact duplicate of same/r0") for i in range(1, 6)
    ]


def test_a_roles_mapping_onto_a_non_chatml_role_is_a_one_line_config_error() -> None:
    """Such a mapping is the only way a role outside ChatML could reach the curated row (unknown data roles are
    `unknown_role` rejections), so it must stop at the config, not as a KeyError mid-run."""
    with pytest.raises(ForgeError, match=r"curate\.sources\.0\.roles.*asistant") as error:
        load_config(data={"curate": {"sources": [{"path": "x.jsonl", "roles": {"asistant": ["bot"]}}]}})
    assert "\n" not in str(error.value)


def test_cli_fails_in_one_line_when_every_row_is_rejected_but_writes_the_report(tmp_path: Path) -> None:
    """An empty curated.jsonl with status 0 would let a script go on to train on nothing."""
    data = write_jsonl(tmp_path / "bad.jsonl", [
        "{broken\n", {"id": "r1", "conversations": "not a list"}, {"id": "r2", "conversations": "nor this"},
        {"id": "r3", "conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": REFUSAL}]},
    ])
    config = tmp_path / "cfg.yml"
    config.write_text(f"curate:\n  processes: 1\n  output_dir: {tmp_path / 'out'}\n  sources:\n    - path: {data}\n",
                      encoding="utf-8")
    forge = [sys.executable, "-m", "dolphin_forge.cli", "curate", str(config), "--no-samples"]
    done = subprocess.run(forge, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    report = tmp_path / "out" / "report.json"
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: curate: every one of 4 rows was rejected (most often format: bad_field (2), "
                      f"format: bad_json (1), refusal: refusal (1)); see {report}"], done.stderr
    assert "Traceback" not in done.stderr and "rows dropped per filter" in done.stdout
    assert json.loads(report.read_text(encoding="utf-8"))["rows"] == {"read": 4, "kept": 0, "written": 0}
    write_jsonl(data, [{"id": "ok", "conversations": GREETING}, "{broken\n"])
    partly = subprocess.run(forge, capture_output=True, text=True, timeout=120)
    assert partly.returncode == 0, partly.stderr


@pytest.mark.parametrize("counts, expected", [
    ({"read": 3, "kept": 3, "mixed": 0}, "curate: 3 rows were kept but the mix wrote none (a source's weight or "
                                         "max_rows rounds its share down to 0); see report.json"),
    ({"read": 0, "kept": 0, "mixed": 0}, "curate: the sources hold no rows, so nothing was written; see report.json"),
    ({"read": 3, "kept": 1, "mixed": 1}, None),
])
def test_an_empty_output_is_an_error_however_the_rows_were_lost(counts, expected) -> None:
    from dolphin_forge.curate.report import CurateReport, SourceCounts, empty_output_error

    report = CurateReport(sources={"a": SourceCounts(**counts)})
    assert empty_output_error(report, Path("report.json")) == expected
