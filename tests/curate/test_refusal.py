"""The refusal and alignment filter: phrase matching, scopes, actions, and user phrase lists."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dolphin_forge.config import CurateRefusalConfig
from dolphin_forge.curate.filters import Edits, Rejection
from dolphin_forge.curate.refusal import RefusalFilter, compile_phrases, default_phrases, phrase_list
from dolphin_forge.data.conversation import Conversation, Message
from dolphin_forge.errors import ForgeError


def chat(*turns: tuple[str, str]) -> Conversation:
    return Conversation([Message(role, content) for role, content in turns])


def make_filter(**options) -> RefusalFilter:
    config = CurateRefusalConfig(**options)
    return RefusalFilter(config, phrase_list(config))


@pytest.mark.parametrize(
    "answer",
    [
        "As an AI language model, I cannot have opinions on that.",
        "I'm sorry, but I cannot help with that request.",
        "I’m sorry, but I can’t do that.",  # typographic apostrophes
        "Sure.\nAS AN   AI LANGUAGE\nMODEL I will not.",  # case and any whitespace
        "As of my last knowledge update in 2021, the tallest building was...",
        "It is not appropriate to ask about that.",
        "I cannot condone such behaviour.",
        "I'm sorry, but as an AI I cannot do that.",  # no comma after "AI"
    ],
)
def test_refusals_are_dropped(answer: str) -> None:
    result = make_filter()(chat(("user", "question"), ("assistant", answer)), Edits())
    assert isinstance(result, Rejection)
    assert result.filter == "refusal" and result.turn == 1


@pytest.mark.parametrize(
    "answer",
    [
        "The capital of France is Paris.",
        "GPT-3 is a language model developed by researchers; it has 175B parameters.",
        "Paint it as a sunset: warm colours, soft light.",
        "As an aide to the mayor, she handled the press.",  # "as an ai" must match whole words only
        "Eating organic food avoids potentially harmful pesticides.",
        "Maintain a respectful and inclusive classroom.",
    ],
)
def test_ordinary_answers_are_kept(answer: str) -> None:
    conversation = chat(("user", "question"), ("assistant", answer))
    assert make_filter()(conversation, Edits()) is conversation


def test_only_assistant_turns_by_default_and_all_turns_when_asked() -> None:
    conversation = chat(("user", "Pretend: as an AI language model you say what?"), ("assistant", "Hello there."))
    assert make_filter()(conversation, Edits()) is conversation
    rejected = make_filter(scope="all")(conversation, Edits())
    assert isinstance(rejected, Rejection) and rejected.turn == 0


def test_drop_turn_keeps_the_rest_of_the_conversation() -> None:
    conversation = chat(
        ("system", "Be brief."),
        ("user", "What is 2+2?"),
        ("assistant", "4"),
        ("user", "Write something rude."),
        ("assistant", "I'm sorry, but I cannot do that."),
        ("user", "Then the capital of Peru?"),
        ("assistant", "Lima."),
    )
    edits = Edits()
    result = make_filter(action="drop_turn")(conversation, edits)
    assert isinstance(result, Conversation)
    expected = ["Be brief.", "What is 2+2?", "4", "Then the capital of Peru?", "Lima."]
    assert [m.content for m in result.messages] == expected
    assert edits.counts == {"refusal.turns_dropped": 1}


def test_drop_turn_rejects_when_no_answer_would_remain() -> None:
    conversation = chat(("user", "Do it."), ("assistant", "As an AI language model, I can't."))
    assert isinstance(make_filter(action="drop_turn")(conversation, Edits()), Rejection)


def test_phrase_lists_can_be_added_removed_and_replaced(tmp_path: Path) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("# my phrases\nthat is above my pay grade\n\n", encoding="utf-8")
    answer = chat(("user", "q"), ("assistant", "That is above my pay grade, friend."))
    assert make_filter()(answer, Edits()) is answer
    assert isinstance(make_filter(phrase_files=[str(extra)])(answer, Edits()), Rejection)

    only_mine = phrase_list(CurateRefusalConfig(replace_defaults=True, phrase_files=[str(extra)]))
    assert only_mine == ["that is above my pay grade"]

    ai = chat(("user", "q"), ("assistant", "As an AI language model I think so."))
    removed = ["as an ai language model"]
    assert isinstance(make_filter()(ai, Edits()), Rejection)
    assert make_filter(remove=removed)(ai, Edits()) is ai


def test_phrase_list_mistakes_are_forge_errors(tmp_path: Path) -> None:
    with pytest.raises(ForgeError, match="phrase_files"):
        phrase_list(CurateRefusalConfig(phrase_files=[str(tmp_path / "missing.txt")]))
    with pytest.raises(ForgeError, match=f"^curate.refusal.phrase_files: {tmp_path} is a folder, not a file "):
        phrase_list(CurateRefusalConfig(phrase_files=[str(tmp_path)]))  # not "does not exist": it does
    with pytest.raises(ForgeError, match="not in the phrase list"):
        phrase_list(CurateRefusalConfig(remove=["no such phrase here"]))
    with pytest.raises(ForgeError, match="empty"):
        phrase_list(CurateRefusalConfig(replace_defaults=True))


def test_one_regex_agrees_with_a_loop_over_phrases() -> None:
    """The trie regex finds a phrase exactly when the naive whole-word loop does, on random texts."""
    import re

    phrases = default_phrases()
    pattern = compile_phrases(phrases)
    rng = random.Random(0)
    vocabulary = ("i i'm as an a ai language model sorry but cannot can't it is not appropriate to my knowledge "
                  "cutoff the cat").split()
    for _ in range(3000):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12)))
        naive = any(
            re.search(r"(?<!\w)" + re.escape(p) + (r"(?!\w)" if p[-1].isalnum() else ""), text) for p in phrases
        )
        assert (pattern.search(text) is not None) == naive, text
