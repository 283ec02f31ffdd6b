"""The curated row: a `Conversation` written back as the ShareGPT JSON line that `preprocess` reads.

``{"conversations": [{"from": "system"|"human"|"gpt"|"tool", "value": ...}], "source": <source name>,
"id": <original id>}`` plus ``"flags"`` when a filter flagged the row. The original id is the row's own ``id``
field when it has one, else ``<file name>:<line or index>``, so every output row can be traced to its input.
Tool results are written without their ``<tool_response>`` wrapper because the reader adds it back (see
`dolphin_forge.curate.function_calling` for the whole convention).
"""

from __future__ import annotations

import json
import os
from typing import Any

from dolphin_forge.data.conversation import TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, Conversation
from dolphin_forge.data.formats import Record

SHAREGPT_ROLE = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}


def original_id(record: Record) -> str:
    value = record.data.get("id")
    if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
        return str(value)
    return f"{os.path.basename(record.source)}:{record.row}"


def _bare_tool_result(content: str) -> str:
    if content.startswith(TOOL_RESPONSE_OPEN) and content.endswith(TOOL_RESPONSE_CLOSE):
        return content[len(TOOL_RESPONSE_OPEN) : -len(TOOL_RESPONSE_CLOSE)].strip()
    return content


def sharegpt_row(
    conversation: Conversation, source: str, row_id: str, flags: list[str] | None = None
) -> dict[str, Any]:
    turns = [
        {"from": SHAREGPT_ROLE[m.role], "value": _bare_tool_result(m.content) if m.role == "tool" else m.content}
        for m in conversation.messages
    ]
    row: dict[str, Any] = {"conversations": turns, "source": source, "id": row_id}
    if flags:
        row["flags"] = flags
    return row


def to_json_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"
