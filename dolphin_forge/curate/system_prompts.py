"""System messages: Orca-style system-prompt augmentation and the SystemConversations check.

Orca (and Dolphin after it) paired each task with a system prompt drawn from a small list, each prompt asking for a
different manner of answering, so that the model learns to follow the system message. `SystemPromptAssigner` draws
a prompt by weight for every conversation that has none (``mode: missing``) or for all of them (``mode: always``,
keeping a ``<tools>`` block that was there). The draw is seeded by (seed, source, row), so it is the same whatever
process handles the row and however the run is split. Each source may name its own list (``system_prompts:`` on
the source); the default list (``system_prompts.yaml``) was written for this project in the Orca style.

The Dolphin 2.9 card reports a bug in its SystemConversations data that made the model talk about its "SYSTEM
MESSAGE" unprompted. `SystemConversationCheck` flags or drops assistant turns that mention the system
message/prompt/instructions when no user turn asked about the system prompt or the assistant's instructions.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from dataclasses import replace
from importlib import resources
from itertools import accumulate
from pathlib import Path
from typing import Any

import yaml

from dolphin_forge.config import CurateSystemPromptsConfig
from dolphin_forge.curate.filters import Edits, Rejection, drop_turn_pairs, has_assistant
from dolphin_forge.data.conversation import TOOLS_PREAMBLE, Conversation, Message
from dolphin_forge.errors import ForgeError, missing_file, read_text_file

DEFAULT_PROMPTS_FILE = "system_prompts.yaml"

WeightedPrompts = tuple[list[str], list[float]]  # prompts and their cumulative weights


def parse_prompt_list(data: Any, where: str) -> WeightedPrompts:
    """A YAML/JSON list whose entries are strings or ``{prompt, weight}`` mappings."""
    if not isinstance(data, list) or not data:
        raise ForgeError(f"{where}: expected a non-empty list of prompts (strings or {{prompt, weight}} mappings)")
    prompts, weights = [], []
    for number, entry in enumerate(data, start=1):
        if isinstance(entry, str):
            prompt, weight = entry, 1.0
        elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            prompt, weight = entry["prompt"], entry.get("weight", 1.0)
        else:
            raise ForgeError(f"{where}: entry {number} should be a string or a mapping with a 'prompt' string")
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ForgeError(f"{where}: entry {number} weight = {weight!r}: expected a number >= 0")
        prompts.append(prompt.strip())
        weights.append(float(weight))
    if sum(weights) <= 0:
        raise ForgeError(f"{where}: every weight is 0, no prompt can be drawn")
    return prompts, list(accumulate(weights))


def load_prompt_file(name: str | None, config_path: Path | None, key: str) -> WeightedPrompts:
    """The default list when `name` is None, else the YAML/JSON file it names."""
    from dolphin_forge.config import resolve_path, yaml_error_line

    if name is None:
        text = resources.files(__package__).joinpath(DEFAULT_PROMPTS_FILE).read_text("utf-8")
        return parse_prompt_list(yaml.safe_load(text), DEFAULT_PROMPTS_FILE)
    file = resolve_path(name, config_path)
    if not file.is_file():
        raise ForgeError(f"{key}: {file} {missing_file(file)} (expected a YAML or JSON list of system prompts)")
    try:
        data = yaml.safe_load(read_text_file(file, "a YAML or JSON list of system prompts"))
    except yaml.YAMLError as exc:
        raise ForgeError(yaml_error_line(file, exc)) from None
    return parse_prompt_list(data, str(file))


def seeded_fraction(seed: int, *parts: object) -> float:
    """A number in [0, 1) that depends only on the seed and the parts (not on the process or the hash seed)."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class SystemPromptAssigner:
    """The ``system_prompts`` step: it never drops a row, and the pipeline runs it after taking the dedup keys."""

    name = "system_prompts"

    def __init__(self, config: CurateSystemPromptsConfig, default: WeightedPrompts,
                 per_source: dict[str, WeightedPrompts], seed: int) -> None:
        self.config, self.default, self.per_source, self.seed = config, default, per_source, seed

    def draw(self, source: str, row_id: str) -> str:
        prompts, cumulative = self.per_source.get(source, self.default)
        point = seeded_fraction(self.seed, source, row_id) * cumulative[-1]
        return prompts[min(bisect.bisect_right(cumulative, point), len(prompts) - 1)]

    def __call__(self, conversation: Conversation, edits: Edits) -> Conversation:
        messages = conversation.messages
        has_system = bool(messages) and messages[0].role == "system"
        if has_system and self.config.mode == "missing":
            return conversation
        prompt = self.draw(conversation.meta.get("source", ""), str(conversation.meta.get("id", conversation.row)))
        tools_block = ""
        if has_system and TOOLS_PREAMBLE in messages[0].content:
            tools_block = messages[0].content[messages[0].content.index(TOOLS_PREAMBLE):]
        content = "\n\n".join(part for part in (prompt, tools_block) if part)
        rest = messages[1:] if has_system else messages
        if not content:
            return replace(conversation, messages=list(rest)) if has_system else conversation
        edits.add("system_prompts.assigned")
        return replace(conversation, messages=[Message("system", content), *rest])


_MENTIONS_SYSTEM = re.compile(r"\bsystem[ _-]*(?:message|prompt|instruction)s?\b", re.IGNORECASE)
_USER_ASKS_SYSTEM = re.compile(
    r"\bsystem[ _-]*(?:message|prompt|instruction)s?\b|\byour (?:instructions|rules|prompt)\b", re.IGNORECASE
)


class SystemConversationCheck:
    """The ``system_conversations`` filter: unprompted talk about the system message."""

    name = "system_conversations"

    def __init__(self, action: str) -> None:
        self.action = action

    def __call__(self, conversation: Conversation, edits: Edits) -> Conversation | Rejection:
        messages = conversation.messages
        # "system" in lower-cased text is a C-speed test that lets almost every row skip the regexes
        suspects = [i for i, m in enumerate(messages) if m.role == "assistant" and "system" in m.content.lower()]
        if not suspects or any(m.role == "user" and _USER_ASKS_SYSTEM.search(m.content) for m in messages):
            return conversation
        offending = [i for i in suspects if _MENTIONS_SYSTEM.search(messages[i].content)]
        if not offending:
            return conversation
        if self.action == "flag":
            edits.flags.append(self.name)
            edits.add("system_conversations.flagged")
            return conversation
        if self.action == "drop_turn":
            trimmed = drop_turn_pairs(conversation, offending)
            if has_assistant(trimmed):
                edits.add("system_conversations.turns_dropped", len(offending))
                return trimmed
        found = _MENTIONS_SYSTEM.search(messages[offending[0]].content)
        return Rejection(self.name, "system_talk",
                         f"turn {offending[0] + 1} mentions {found.group(0)!r} though the user never asked",
                         turn=offending[0])
