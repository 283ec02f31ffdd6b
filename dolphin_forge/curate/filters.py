"""What every curation filter shares: the verdict it returns and the one way turns are removed.

A filter is a callable ``Conversation -> Conversation | Rejection``. Returning a conversation keeps the row (maybe
changed: cleaned text, a system prompt added, an offending turn pair removed); returning a `Rejection` drops it and
says which filter and why, so the pipeline can write it to ``rejected.jsonl`` and count it in the report. Filters
are pure functions of the row (plus their configuration), which is what lets the pipeline run them in worker
processes; only deduplication, which needs to remember earlier rows, runs in the parent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from dolphin_forge.data.conversation import Conversation


@dataclass(frozen=True)
class Rejection:
    """Why a row was dropped: the filter's name, a short reason key for counting, and a human-readable detail."""

    filter: str
    reason: str
    detail: str = ""
    turn: int | None = None  # 0-based index of the offending message, when there is one


@dataclass
class Edits:
    """Changes a filter made to a kept row, counted in the report (e.g. ``{"refusal.turns_dropped": 1}``)."""

    counts: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def add(self, key: str, amount: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + amount


RowFilter = Callable[[Conversation, Edits], "Conversation | Rejection"]


def drop_turn_pairs(conversation: Conversation, assistant_indices: Iterable[int]) -> Conversation:
    """Remove each given assistant turn together with the exchange that led to it.

    The exchange starts at the closest user turn before the assistant turn, so tool calls and tool results in
    between go too; a system message is never removed.
    """
    messages = conversation.messages
    doomed: set[int] = set()
    for index in assistant_indices:
        start = index
        while start > 0 and messages[start].role != "user" and messages[start - 1].role != "system":
            start -= 1
        doomed.update(range(start, index + 1))
    kept = [m for i, m in enumerate(messages) if i not in doomed]
    return replace(conversation, messages=kept)


def has_assistant(conversation: Conversation) -> bool:
    return any(m.role == "assistant" for m in conversation.messages)
