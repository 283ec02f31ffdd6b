"""Function calling: every tool call in one ChatML convention, with its JSON checked.

The convention (defined in `dolphin_forge.data.conversation`, whose helpers build every block here):

- the callable tools are listed in the system message, after ``TOOLS_PREAMBLE``, as a JSON array inside
  ``<tools>`` ... ``</tools>``;
- a call is an assistant turn holding one ``<tool_call>`` block per call, each block a JSON object
  ``{"name": <function name>, "arguments": <object>}`` (text before the blocks is allowed);
- a result is a ``tool`` turn holding a ``<tool_response>`` block, right after the call.

The reader already maps the source conventions onto these blocks: ShareGPT ``function_call``/``function-call``
turns become calls, ``observation``/``function_response``/``function-response``/``tool`` turns become results,
OpenAI ``tool_calls`` on an assistant message become calls and ``tool`` messages results, and a row's ``tools``
field becomes the system block. This filter then validates and canonicalises: each call body must parse as JSON
(with ``lenient: true`` a Python-literal body such as ``{'name': 'f', 'arguments': {'x': 1}}`` is accepted and
rewritten as JSON, and OpenAI-style ``arguments`` given as a JSON *string* are decoded into an object); the call
must have a non-empty string ``name`` and an object ``arguments``; the ``<tools>`` list must parse too. A row with
a bad call is dropped with the turn and what was wrong. An empty ``<tools>`` list is removed.

In the curated ShareGPT file a call stays inside its ``gpt`` turn in block form; a result is stored bare under
``from: tool`` because the reader wraps ``tool`` turns in ``<tool_response>`` when `preprocess` reads the file.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import replace
from typing import Any

from dolphin_forge.config import CurateFunctionCallingConfig
from dolphin_forge.curate.filters import Edits, Rejection
from dolphin_forge.data.conversation import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOLS_PREAMBLE,
    Conversation,
    Message,
    format_tool_call,
    format_tools,
)

_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_TOOLS_BLOCK = re.compile(re.escape(TOOLS_PREAMBLE) + r"<tools>\s*(.*?)\s*</tools>", re.DOTALL)


class BadCall(ValueError):
    """A tool call or tool list that cannot be read as the convention requires."""


def parse_json_lenient(text: str, lenient: bool) -> tuple[Any, bool]:
    """The JSON value of `text` and whether it needed the lenient (Python-literal) parse."""
    try:
        return json.loads(text), False
    except json.JSONDecodeError as exc:
        if not lenient:
            raise BadCall(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        error = f"not valid JSON ({exc.msg} at column {exc.colno})"
    try:
        value = ast.literal_eval(text.strip())
        json.dumps(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise BadCall(f"{error}, nor a Python literal") from None
    return value, True


def canonical_call(body: str, lenient: bool) -> tuple[dict[str, Any], bool]:
    """``{"name", "arguments"}`` from a call body; raises BadCall saying what is wrong."""
    call, repaired = parse_json_lenient(body, lenient)
    if not isinstance(call, dict):
        raise BadCall(f"expected a JSON object, got {type(call).__name__}")
    name = call.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadCall("the call has no 'name' string")
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        if arguments.strip():
            arguments, decoded_lenient = parse_json_lenient(arguments, lenient)
            repaired = repaired or decoded_lenient
        else:
            arguments = {}
    if not isinstance(arguments, dict):
        raise BadCall(f"'arguments' should be an object, got {type(arguments).__name__}")
    return {"name": name, "arguments": arguments}, repaired


class FunctionCallChecker:
    """The ``function_calling`` filter."""

    name = "function_calling"

    def __init__(self, config: CurateFunctionCallingConfig) -> None:
        self.lenient = config.lenient

    def _calls(self, content: str, edits: Edits) -> str:
        def rewrite(match: re.Match[str]) -> str:
            call, repaired = canonical_call(match.group(1), self.lenient)
            edits.add("function_calling.calls")
            if repaired:
                edits.add("function_calling.calls_repaired")
            return format_tool_call(call)

        rewritten, blocks = _CALL_BLOCK.subn(rewrite, content)
        if blocks != content.count(TOOL_CALL_OPEN):
            raise BadCall(f"a {TOOL_CALL_OPEN} block is not closed by {TOOL_CALL_CLOSE}")
        return rewritten

    def _tools(self, content: str) -> str:
        def rewrite(match: re.Match[str]) -> str:
            tools, _ = parse_json_lenient(match.group(1), self.lenient)
            if not isinstance(tools, (list, dict)):
                raise BadCall(f"the <tools> block should hold a JSON array, got {type(tools).__name__}")
            return format_tools(tools if isinstance(tools, list) else [tools]) if tools else ""

        return _TOOLS_BLOCK.sub(rewrite, content).strip()

    def __call__(self, conversation: Conversation, edits: Edits) -> Conversation | Rejection:
        if not any("<tool" in m.content for m in conversation.messages):  # one scan finds both kinds of block
            return conversation
        messages = []
        for number, message in enumerate(conversation.messages, start=1):
            content = message.content
            try:
                if message.role == "assistant" and TOOL_CALL_OPEN in content:
                    content = self._calls(content, edits)
                elif message.role == "system" and TOOLS_PREAMBLE in content:
                    content = self._tools(content)
            except BadCall as exc:
                return Rejection(self.name, "bad_tool_json", f"turn {number} ({message.role}): {exc}", number - 1)
            if content:  # a system message that only listed an empty tool list is removed
                messages.append(Message(message.role, content) if content != message.content else message)
        edits.add("function_calling.conversations_checked")
        return replace(conversation, messages=messages)
