"""The one conversation type every format is normalised into, and the ChatML tool-call convention.

Roles are exactly the four ChatML roles the Dolphin recipe renders: system, user, assistant, tool. Function calls
follow the Hermes-style convention used by function-calling ChatML datasets: an assistant turn whose content is a
``<tool_call>`` block holding ``{"name": ..., "arguments": {...}}`` JSON, answered by a ``tool`` turn whose content
is a ``<tool_response>`` block; the available tools are listed in the system message inside ``<tools>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_PREAMBLE = (
    "You can call the following functions. To call one, reply with a <tool_call> block holding JSON "
    'of the form {"name": <function name>, "arguments": <arguments object>}.\n'
)


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class Conversation:
    """Messages in order, plus where the row came from (kept for reports and provenance)."""

    messages: list[Message]
    source: str = ""
    row: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


def _wrap(body: Any, opening: str, closing: str) -> str:
    """Wrap once: text that is already a block (e.g. a curated file read back) is left as it is."""
    text = (body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)).strip()
    if text.startswith(opening) and text.endswith(closing):
        return text
    return f"{opening}\n{text}\n{closing}"


def format_tool_call(call: str | dict[str, Any]) -> str:
    return _wrap(call, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)


def format_tool_result(result: str | dict[str, Any] | list[Any]) -> str:
    return _wrap(result, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)


def format_tools(tools: str | list[Any]) -> str:
    """The system-prompt block that lists the callable functions."""
    body = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
    return f"{TOOLS_PREAMBLE}<tools>\n{body.strip()}\n</tools>"
