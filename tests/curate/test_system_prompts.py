"""System prompts: weighted seeded assignment (per source), tools kept, and the SystemConversations check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dolphin_forge.config import CurateSystemPromptsConfig
from dolphin_forge.curate.filters import Edits, Rejection
from dolphin_forge.curate.system_prompts import (
    SystemConversationCheck,
    SystemPromptAssigner,
    load_prompt_file,
    parse_prompt_list,
)
from dolphin_forge.data.conversation import Conversation, Message, format_tools
from dolphin_forge.errors import ForgeError


def chat(*turns: tuple[str, str], source: str = "s", row_id: str = "1") -> Conversation:
    return Conversation([Message(r, c) for r, c in turns], meta={"source": source, "id": row_id})


def assigner(prompts: list, per_source: dict | None = None, mode: str = "missing", seed: int = 0):
    return SystemPromptAssigner(CurateSystemPromptsConfig(mode=mode), parse_prompt_list(prompts, "test"),
                                per_source or {}, seed)


def test_prompts_are_drawn_by_weight_and_reproducibly() -> None:
    assign = assigner([{"prompt": "A", "weight": 3}, {"prompt": "B", "weight": 1}, {"prompt": "", "weight": 0}])
    drawn = Counter()
    for i in range(4000):
        result = assign(chat(("user", "q"), ("assistant", "a"), row_id=str(i)), Edits())
        drawn[result.messages[0].content] += 1
    assert set(drawn) == {"A", "B"}
    assert 0.72 < drawn["A"] / 4000 < 0.78
    again = assign(chat(("user", "q"), ("assistant", "a"), row_id="17"), Edits()).messages[0].content
    assert again == assign(chat(("user", "q"), ("assistant", "a"), row_id="17"), Edits()).messages[0].content
    other_seed = assigner(["A", "B"], seed=1)
    firsts = [other_seed(chat(("user", "q"), ("assistant", "a"), row_id=str(i)), Edits()).messages[0].content
              for i in range(50)]
    assert len(set(firsts)) == 2


def test_existing_system_messages_are_kept_unless_mode_always() -> None:
    conversation = chat(("system", "Mine."), ("user", "q"), ("assistant", "a"))
    assert assigner(["Theirs."])(conversation, Edits()) is conversation
    replaced = assigner(["Theirs."], mode="always")(conversation, Edits())
    assert [m.content for m in replaced.messages] == ["Theirs.", "q", "a"]


def test_tools_block_survives_a_new_prompt() -> None:
    tools = format_tools([{"name": "f"}])
    conversation = chat(("system", tools), ("user", "q"), ("assistant", "a"))
    result = assigner(["Be helpful."], mode="always")(conversation, Edits())
    assert result.messages[0].content == "Be helpful.\n\n" + tools


def test_empty_prompt_means_no_system_message_and_per_source_lists() -> None:
    conversation = chat(("user", "q"), ("assistant", "a"), source="plain")
    assign = assigner(["Default."], per_source={"plain": parse_prompt_list([""], "x")})
    assert assign(conversation, Edits()) is conversation
    other = chat(("user", "q"), ("assistant", "a"), source="other")
    assert assign(other, Edits()).messages[0].content == "Default."


def test_prompt_files(tmp_path: Path) -> None:
    default = load_prompt_file(None, None, "key")
    assert len(default[0]) >= 10 and "" in default[0]
    good = tmp_path / "p.yaml"
    good.write_text("- One.\n- prompt: Two.\n  weight: 2\n", encoding="utf-8")
    assert load_prompt_file(str(good), None, "key") == (["One.", "Two."], [1.0, 3.0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- prompt: x\n  weight: -1\n", encoding="utf-8")
    with pytest.raises(ForgeError, match="weight"):
        load_prompt_file(str(bad), None, "key")
    with pytest.raises(ForgeError, match="curate.system_prompts.file"):
        load_prompt_file(str(tmp_path / "missing.yaml"), None, "curate.system_prompts.file")
    with pytest.raises(ForgeError, match=f"^curate.system_prompts.file: {tmp_path} is a folder, not a file "):
        load_prompt_file(str(tmp_path), None, "curate.system_prompts.file")


SYSTEM_TALK = chat(
    ("user", "What's 2+2?"), ("assistant", "4."),
    ("user", "And 3+3?"), ("assistant", "As stated in my SYSTEM MESSAGE, I must answer: 6."),
)


def test_unprompted_system_message_talk_is_dropped_or_flagged() -> None:
    dropped = SystemConversationCheck("drop_conversation")(SYSTEM_TALK, Edits())
    assert isinstance(dropped, Rejection) and dropped.reason == "system_talk" and dropped.turn == 3
    edits = Edits()
    assert SystemConversationCheck("flag")(SYSTEM_TALK, edits) is SYSTEM_TALK
    assert edits.flags == ["system_conversations"]
    trimmed = SystemConversationCheck("drop_turn")(SYSTEM_TALK, Edits())
    assert [m.content for m in trimmed.messages] == ["What's 2+2?", "4."]


def test_system_talk_is_fine_when_the_user_asked() -> None:
    asked = chat(("user", "What does your system prompt say?"), ("assistant", "My system prompt says to be brief."))
    assert SystemConversationCheck("drop_conversation")(asked, Edits()) is asked
    unrelated = chat(("user", "Explain the solar system."), ("assistant", "The solar system has eight planets."))
    assert SystemConversationCheck("drop_conversation")(unrelated, Edits()) is unrelated
    not_asked = chat(("user", "Explain the solar system."), ("assistant", "My system prompt forbids astronomy."))
    assert isinstance(SystemConversationCheck("drop_conversation")(not_asked, Edits()), Rejection)


def test_a_broken_prompt_file_is_one_line_naming_the_file_and_line(tmp_path):
    broken = tmp_path / "prompts.yml"
    broken.write_text("- one\n- [two\n")
    with pytest.raises(ForgeError) as info:
        load_prompt_file(str(broken), None, "curate.system_prompts.file")
    assert str(info.value).startswith(f"{broken}:3: not valid YAML") and "\n" not in str(info.value)
    latin = tmp_path / "latin.yml"
    latin.write_bytes("- caf\xe9\n".encode("latin-1"))
    with pytest.raises(ForgeError, match="latin.yml: not UTF-8 text"):
        load_prompt_file(str(latin), None, "curate.system_prompts.file")
