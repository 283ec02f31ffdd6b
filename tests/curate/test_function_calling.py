"""Function calling: source conventions into the one ChatML tool convention, JSON validated."""

from __future__ import annotations

import json

import pytest

from dolphin_forge.config import CurateFunctionCallingConfig, DatasetConfig
from dolphin_forge.curate.filters import Edits, Rejection
from dolphin_forge.curate.function_calling import BadCall, FunctionCallChecker, canonical_call
from dolphin_forge.data.conversation import Conversation, Message, format_tool_call, format_tools
from dolphin_forge.data.formats import Record, to_conversation


def check(conversation: Conversation, lenient: bool = True) -> tuple[Conversation | Rejection, Edits]:
    edits = Edits()
    return FunctionCallChecker(CurateFunctionCallingConfig(lenient=lenient))(conversation, edits), edits


def call_body(content: str) -> dict:
    assert content.startswith("<tool_call>\n") and content.endswith("\n</tool_call>")
    return json.loads(content[len("<tool_call>\n") : -len("\n</tool_call>")])


@pytest.mark.parametrize(("call_role", "result_role"), [("function_call", "observation"),
                                                        ("function-call", "function-response")])
def test_sharegpt_function_call_rows_become_the_convention(call_role: str, result_role: str) -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": call_role, "value": "{'name': 'get_weather', 'arguments': {'city': 'Paris', 'metric': True}}"},
            {"from": result_role, "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 degrees."},
        ],
        "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]',
    }
    conversation = to_conversation(Record("f.json", 1, row), DatasetConfig(path="f.json", type="sharegpt"))
    result, edits = check(conversation)
    assert isinstance(result, Conversation)
    roles = [m.role for m in result.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    expected_call = {"name": "get_weather", "arguments": {"city": "Paris", "metric": True}}
    assert call_body(result.messages[2].content) == expected_call
    assert "<tools>\n[{\"name\": \"get_weather\"" in result.messages[0].content
    assert result.messages[3].content == "<tool_response>\n{\"temp\": 21}\n</tool_response>"
    assert edits.counts == {"function_calling.calls": 1, "function_calling.calls_repaired": 1,
                            "function_calling.conversations_checked": 1}


def test_openai_tool_calls_with_string_arguments_are_decoded() -> None:
    row = {
        "messages": [
            {"role": "user", "content": "Add 2 and 3, and 4 and 5"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}},
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": ""}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "5"},
            {"role": "assistant", "content": "5"},
        ]
    }
    conversation = to_conversation(Record("o.jsonl", 1, row), DatasetConfig(path="o.jsonl", type="openai"))
    result, edits = check(conversation)
    blocks = result.messages[1].content.split("\n<tool_call>")
    assert call_body(blocks[0]) == {"name": "add", "arguments": {"a": 2, "b": 3}}
    assert call_body("<tool_call>" + blocks[1]) == {"name": "add", "arguments": {}}
    assert edits.counts["function_calling.calls"] == 2 and "function_calling.calls_repaired" not in edits.counts


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('{"name": "f", "arguments": {"x": 1}', "not valid JSON"),
        ('["f", 1]', "expected a JSON object"),
        ('{"arguments": {}}', "no 'name'"),
        ('{"name": "f", "arguments": [1, 2]}', "'arguments' should be an object"),
        ('{"name": "f", "arguments": "{broken"}', "not valid JSON"),
    ],
)
def test_bad_calls_drop_the_row_and_say_why(body: str, problem: str) -> None:
    conversation = Conversation([
        Message("user", "go"),
        Message("assistant", format_tool_call(body)),
        Message("tool", "<tool_response>\nok\n</tool_response>"),
        Message("assistant", "done"),
    ])
    result, _ = check(conversation)
    assert isinstance(result, Rejection) and result.reason == "bad_tool_json"
    assert problem in result.detail and result.detail.startswith("turn 2 (assistant)")


def test_lenient_parse_can_be_switched_off() -> None:
    body = "{'name': 'f', 'arguments': {'x': None}}"
    assert canonical_call(body, lenient=True) == ({"name": "f", "arguments": {"x": None}}, True)
    with pytest.raises(BadCall):
        canonical_call(body, lenient=False)


def test_unclosed_block_and_empty_tool_list() -> None:
    unclosed = Conversation([Message("user", "go"), Message("assistant", '<tool_call>\n{"name": "f"}')])
    assert isinstance(check(unclosed)[0], Rejection)
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "tools": "[]"}
    conversation = to_conversation(Record("f.json", 1, row), DatasetConfig(path="f.json"))
    assert [m.role for m in conversation.messages] == ["user", "assistant"]  # the reader lists no empty tools ...
    listed = Conversation([Message("system", format_tools([])), *conversation.messages])  # ... another tool might
    result, _ = check(listed)
    assert [m.role for m in result.messages] == ["user", "assistant"]  # ... and the check removes its empty list


def test_rows_without_tools_are_untouched() -> None:
    conversation = Conversation([Message("user", "hi"), Message("assistant", "hello")])
    result, edits = check(conversation)
    assert result is conversation and not edits.counts
