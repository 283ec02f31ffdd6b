"""Text and structure cleaning: the "cleaned" half of the Dolphin cards' "deduped, cleaned".

Text: Unicode is normalised (NFC by default), invisible characters (zero-width spaces, byte-order marks, soft
hyphens) removed, Unicode spaces (no-break, em, ideographic ...) made plain spaces, line endings unified, trailing
spaces stripped from lines and runs of blank lines collapsed; indentation inside a line is left alone because code
depends on it.

Structure: a conversation must read system? (user assistant (tool-call tool* assistant)*)+ - an optional system
message first, then user and assistant turns alternating, tool results only right after an assistant turn. A
trailing unanswered user turn is trimmed (it teaches nothing); anything else out of order drops the row.

Rows are dropped for: an empty turn (after cleaning), broken role order, no assistant turn, too many non-printable
characters, a character repeated more than ``max_repeated_chars`` times in a row (degenerate generations), an
answer shorter or longer than the limits, or a first user turn not in ``languages``. Role aliases ("human", "gpt",
"function_call", ...) are mapped by the reader (`dolphin_forge.config.ROLE_ALIASES`, plus a source's
``roles:``) before any of this runs.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import replace

from dolphin_forge.config import CurateCleanConfig
from dolphin_forge.curate.filters import Edits, Rejection
from dolphin_forge.curate.language import LANGUAGE_CODES, detect_language
from dolphin_forge.data.conversation import Conversation, Message
from dolphin_forge.errors import ForgeError

_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_UNICODE_SPACE = re.compile("[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_LINE_END = re.compile(r"\r\n?")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_NON_PRINTABLE = re.compile(r"[^\x20-\x7e\n\t]")
_ADJACENT_EQUAL = re.compile(r"(.)(?=\1)", re.DOTALL)
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F)) + b"\n\t"


def normalise_text(text: str, unicode_form: str = "NFC") -> str:
    if unicode_form != "none" and not text.isascii():
        text = unicodedata.normalize(unicode_form, text)
        text = _UNICODE_SPACE.sub(" ", _INVISIBLE.sub("", text))
    # each regex runs only when a (C-speed) substring test says it has something to do
    if "\r" in text:
        text = _LINE_END.sub("\n", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def non_printable_ratio(text: str) -> float:
    """Share of characters that are neither printable nor newline/tab (control codes, unassigned code points)."""
    if not text:
        return 0.0
    if text.isascii():  # the common case, counted in C: delete every printable byte, count what is left
        return len(text.encode("ascii").translate(None, _PRINTABLE_ASCII)) / len(text)
    suspects = _NON_PRINTABLE.findall(text)
    bad = sum(1 for ch in suspects if not ch.isprintable() and not ch.isspace())
    return bad / len(text)


def longest_run_over(text: str, limit: int) -> str | None:
    """A character repeated more than `limit` times in a row, if there is one.

    Why not just ``re.search(r"(.)\\1{limit}")``: that tries every position of every text. A run of more than
    `limit` characters holds two consecutive samples of ``text[::step]`` (step = (limit + 1) // 2), so only the
    places where two consecutive samples are equal are checked (with C-speed slicing and counting).
    """
    if len(text) <= limit:
        return None
    step = (limit + 1) // 2
    samples = text[::step]
    for found in _ADJACENT_EQUAL.finditer(samples):
        start = found.start() * step
        char = samples[found.start()]
        if text.count(char, start, start + step + 1) == step + 1:  # the stretch between the samples is uniform too
            window = text[max(0, start - limit) : start + step + limit + 1]
            if char * (limit + 1) in window:
                return char
    return None


def role_order_problem(messages: list[Message]) -> str | None:
    """None when the roles follow the ChatML conversation grammar, else what is wrong."""
    previous = None
    for number, message in enumerate(messages, start=1):
        role = message.role
        if role == "system":
            if number != 1:
                return f"turn {number} is a system message after the start"
        elif role == "user":
            if previous == "user":
                return f"turns {number - 1} and {number} are both user turns"
            if previous == "tool":
                return f"turn {number} (user) follows a tool result instead of an assistant turn"
        elif role == "assistant":
            if previous in (None, "system"):
                return f"turn {number} (assistant) comes before any user turn"
            if previous == "assistant" and "<tool_call>" not in messages[number - 2].content:
                return f"turns {number - 1} and {number} are both assistant turns"
        elif role == "tool":
            if previous not in ("assistant", "tool"):
                return f"turn {number} (tool) does not follow an assistant tool call"
        previous = role
    return None


class Cleaner:
    """The ``clean`` filter."""

    name = "clean"

    def __init__(self, config: CurateCleanConfig) -> None:
        self.config = config
        self._languages = {code.lower() for code in config.languages} if config.languages else None
        unknown = sorted((self._languages or set()) - set(LANGUAGE_CODES))
        if unknown:  # an unknown code would reject every row as "language" and look like a data problem
            raise ForgeError(
                f"curate.clean.languages: {unknown[0]!r} is not a language code this filter detects; expected one of "
                f"{', '.join(LANGUAGE_CODES)}"
            )

    def __call__(self, conversation: Conversation, edits: Edits) -> Conversation | Rejection:
        cfg = self.config
        messages = [Message(m.role, normalise_text(m.content, cfg.unicode_form)) for m in conversation.messages]
        for number, message in enumerate(messages, start=1):
            if not message.content:
                return Rejection(
                    self.name, "empty_turn", f"turn {number} ({message.role}) is empty after cleaning", number - 1
                )
        while messages and messages[-1].role == "user":
            messages.pop()
            edits.add("clean.trailing_user_turns_trimmed")
        if not any(m.role == "assistant" for m in messages):
            return Rejection(self.name, "no_assistant", "the conversation has no assistant turn")
        problem = role_order_problem(messages)
        if problem:
            return Rejection(self.name, "role_order", problem)
        for number, message in enumerate(messages, start=1):
            ratio = non_printable_ratio(message.content)
            if ratio > cfg.max_nonprintable_ratio:
                return Rejection(
                    self.name, "non_printable", f"turn {number}: {ratio:.0%} non-printable characters", number - 1
                )
            if cfg.max_repeated_chars is not None:
                char = longest_run_over(message.content, cfg.max_repeated_chars)
                if char is not None:
                    return Rejection(
                        self.name,
                        "repeated_chars",
                        f"turn {number}: {char!r} repeated more than {cfg.max_repeated_chars} times",
                        number - 1,
                    )
            if message.role == "assistant" and "<tool_call>" not in message.content:
                size = len(message.content)
                if size < cfg.min_answer_chars:
                    return Rejection(self.name, "answer_too_short", f"turn {number}: {size} characters", number - 1)
                if cfg.max_answer_chars is not None and size > cfg.max_answer_chars:
                    return Rejection(self.name, "answer_too_long", f"turn {number}: {size} characters", number - 1)
        if self._languages is not None:
            prompt = next(m.content for m in messages if m.role == "user")
            language = detect_language(prompt)
            if language not in self._languages:
                return Rejection(self.name, "language", f"first user turn looks like {language!r}")
        return replace(conversation, messages=messages)
