"""The refusal and alignment filter: the "alignment and bias" the Dolphin cards say was removed.

A response that refuses, moralises, announces itself as an AI language model or disclaims a knowledge cutoff
teaches the model to do the same, so by default any assistant turn containing one of the phrases drops the
conversation (``action: drop_turn`` drops only that exchange). The default phrases are package data
(``refusal_phrases.txt``), written for this project; ``phrases``/``phrase_files`` add to them, ``remove`` takes
some out and ``replace_defaults`` starts from an empty list.

Matching is one compiled regular expression, not a loop over phrases: the phrases are merged into a character trie
and the trie is written out as nested alternations, so at each text position the engine follows a single path
and a position that starts no phrase is skipped by the regex engine's first-character check. Matching is
case-insensitive on whole words; whitespace inside a phrase matches any run of whitespace and an apostrophe
matches both ' and ’.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from dolphin_forge.config import CurateRefusalConfig
from dolphin_forge.curate.filters import Edits, Rejection, drop_turn_pairs, has_assistant
from dolphin_forge.data.conversation import Conversation
from dolphin_forge.errors import ForgeError, missing_file, read_text_file

DEFAULT_PHRASES_FILE = "refusal_phrases.txt"


def read_phrase_lines(text: str) -> list[str]:
    """Phrases from a file's text: one a line, blank lines and ``#`` comments skipped, case and spaces normalised."""
    phrases = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            phrases.append(normalise_phrase(line))
    return phrases


def normalise_phrase(phrase: str) -> str:
    return " ".join(phrase.lower().replace("’", "'").split())


def default_phrases() -> list[str]:
    return read_phrase_lines(resources.files(__package__).joinpath(DEFAULT_PHRASES_FILE).read_text("utf-8"))


def phrase_list(config: CurateRefusalConfig, config_path: Path | None = None) -> list[str]:
    """The phrases in effect for a config: defaults (unless replaced) + added ones + files, minus removed ones."""
    from dolphin_forge.config import resolve_path

    phrases = [] if config.replace_defaults else default_phrases()
    phrases += [normalise_phrase(p) for p in config.phrases]
    for name in config.phrase_files:
        file = resolve_path(name, config_path)
        if not file.is_file():
            raise ForgeError(
                f"curate.refusal.phrase_files: {file} {missing_file(file)} (expected a text file, one phrase a line)"
            )
        phrases += read_phrase_lines(read_text_file(file, "a text file, one phrase a line"))
    removed = {normalise_phrase(p) for p in config.remove}
    unknown = removed - set(phrases)
    if unknown:
        raise ForgeError(f"curate.refusal.remove: {sorted(unknown)} not in the phrase list, nothing to remove")
    kept = list(dict.fromkeys(p for p in phrases if p and p not in removed))
    if not kept:
        raise ForgeError(
            "curate.refusal: the phrase list is empty (set curate.refusal.enabled: false to skip the filter)"
        )
    return kept


# --- one regex from many phrases --------------------------------------------------------------------------------


def _atom(char: str) -> str:
    if char == " ":
        return r"\s+"
    if char == "'":
        return "['’]"
    return re.escape(char)


def _trie_pattern(node: dict[str, dict]) -> str:
    """Nested alternation of a trie; the key "" marks the end of a phrase."""
    ends_here = "" in node
    branches = [_atom(char) + _trie_pattern(child) for char, child in sorted(node.items()) if char]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    if ends_here:
        body = f"(?:{body})?"
    return body


def compile_phrases(phrases: list[str]) -> re.Pattern[str]:
    """One whole-word regex matching any of the (lower-case) phrases in lower-cased text.

    Lower-casing the text once and matching case-sensitively is faster than ``re.IGNORECASE``, which folds case
    at every position the engine tries.
    """
    trie: dict[str, dict] = {}
    for phrase in phrases:
        node = trie
        for char in phrase:
            node = node.setdefault(char, {})
        node[""] = {}
    pattern = _trie_pattern(trie)
    return re.compile(r"(?<!\w)(?:" + pattern + r")(?!(?<=\w)\w)")


class RefusalFilter:
    """The ``refusal`` filter."""

    name = "refusal"

    def __init__(self, config: CurateRefusalConfig, phrases: list[str]) -> None:
        self.config = config
        self.pattern = compile_phrases(phrases)

    def find(self, text: str) -> str | None:
        found = self.pattern.search(text.lower())
        return " ".join(found.group(0).lower().split()) if found else None

    def __call__(self, conversation: Conversation, edits: Edits) -> Conversation | Rejection:
        roles = ("assistant",) if self.config.scope == "assistant" else ("system", "user", "assistant", "tool")
        hits: list[tuple[int, str]] = []
        for index, message in enumerate(conversation.messages):
            if message.role in roles:
                phrase = self.find(message.content)
                if phrase:
                    hits.append((index, phrase))
        if not hits:
            return conversation
        index, phrase = hits[0]
        detail = f"turn {index + 1} ({conversation.messages[index].role}) says {phrase!r}"
        offending_answers = [i for i, _ in hits if conversation.messages[i].role == "assistant"]
        if self.config.action == "drop_turn" and len(offending_answers) == len(hits):
            trimmed = drop_turn_pairs(conversation, offending_answers)
            if has_assistant(trimmed):
                edits.add("refusal.turns_dropped", len(offending_answers))
                return trimmed
        return Rejection(self.name, "refusal", detail, turn=index)
