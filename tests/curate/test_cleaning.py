"""The cleaning filter: text normalisation and every structural reason to drop a row."""

from __future__ import annotations

import random
import re

import pytest

from dolphin_forge.config import CurateCleanConfig
from dolphin_forge.curate.cleaning import Cleaner, longest_run_over, non_printable_ratio, normalise_text
from dolphin_forge.curate.filters import Edits, Rejection
from dolphin_forge.curate.language import detect_language
from dolphin_forge.data.conversation import Conversation, Message
from dolphin_forge.errors import ForgeError


def chat(*turns: tuple[str, str]) -> Conversation:
    return Conversation([Message(role, content) for role, content in turns])


def clean(conversation: Conversation, **options) -> Conversation | Rejection:
    return Cleaner(CurateCleanConfig(**options))(conversation, Edits())


def test_text_is_normalised() -> None:
    raw = "  Cafe\u0301\u200b is\u00a0open.  \r\n\r\n\r\n\r\nLine two\t\n    indented code\n"
    assert normalise_text(raw) == "Café is open.\n\nLine two\n    indented code"
    assert normalise_text("ﬁne", "NFKC") == "fine"
    assert normalise_text("ﬁne", "NFC") == "ﬁne"


def test_a_clean_conversation_is_kept_with_normalised_text() -> None:
    result = clean(chat(("system", "Be nice. "), ("user", " Hi\r\n"), ("assistant", "Hello!  \n")))
    assert isinstance(result, Conversation)
    expected = [("system", "Be nice."), ("user", "Hi"), ("assistant", "Hello!")]
    assert [(m.role, m.content) for m in result.messages] == expected


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ((("user", "Hi"), ("assistant", "\u200b \u200b")), "empty_turn"),
        ((("user", "Hi"),), "no_assistant"),
        ((("system", "s"),), "no_assistant"),
        ((("user", "a"), ("user", "b"), ("assistant", "c")), "role_order"),
        ((("assistant", "a"), ("user", "b"), ("assistant", "c")), "role_order"),
        ((("user", "a"), ("assistant", "b"), ("system", "late"), ("user", "c"), ("assistant", "d")), "role_order"),
        ((("user", "a"), ("tool", "r"), ("assistant", "c")), "role_order"),
        ((("user", "a"), ("assistant", "b"), ("assistant", "c")), "role_order"),
        ((("user", "a"), ("assistant", "ok \x00\x01\x02\x03\x04\x05")), "non_printable"),
        ((("user", "a"), ("assistant", "ha" + "!" * 250)), "repeated_chars"),
        ((("user", "a"), ("assistant", "")), "empty_turn"),
    ],
)
def test_broken_rows_are_dropped_with_a_reason(turns, reason: str) -> None:
    result = clean(chat(*turns))
    assert isinstance(result, Rejection) and result.filter == "clean"
    assert result.reason == reason


def test_answer_length_limits() -> None:
    short = chat(("user", "q"), ("assistant", "ok"))
    assert isinstance(clean(short, min_answer_chars=3), Rejection)
    assert isinstance(clean(short, min_answer_chars=2), Conversation)
    long = chat(("user", "q"), ("assistant", "x y " * 50))
    assert clean(long, max_answer_chars=100).reason == "answer_too_long"
    assert isinstance(clean(long, max_answer_chars=1000), Conversation)


def test_trailing_user_turn_is_trimmed_and_tool_turns_are_in_order() -> None:
    edits = Edits()
    result = Cleaner(CurateCleanConfig())(chat(("user", "a"), ("assistant", "b"), ("user", "unanswered")), edits)
    assert [m.content for m in result.messages] == ["a", "b"]
    assert edits.counts == {"clean.trailing_user_turns_trimmed": 1}
    tools = chat(
        ("user", "weather?"),
        ("assistant", "<tool_call>\n{}\n</tool_call>"),
        ("tool", "<tool_response>\n{}\n</tool_response>"),
        ("assistant", "Sunny."),
    )
    assert isinstance(clean(tools), Conversation)


def test_limits_can_be_switched_off() -> None:
    repeated = chat(("user", "q"), ("assistant", "=" * 1000))
    assert isinstance(clean(repeated), Rejection)
    assert isinstance(clean(repeated, max_repeated_chars=None), Conversation)


def test_non_printable_ratio() -> None:
    assert non_printable_ratio("plain text\n\twith tabs") == 0.0
    assert non_printable_ratio("ab\x00\x01") == 0.5
    assert non_printable_ratio("é\u00a0\x07x") == 0.25  # no-break space is whitespace, BEL is not printable


def test_longest_run_agrees_with_a_regex() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        limit = rng.randint(2, 30)
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(0, 200)))
        if rng.random() < 0.5:
            at = rng.randint(0, len(text))
            text = text[:at] + rng.choice("abc") * rng.randint(limit - 2, limit + 3) + text[at:]
        expected = re.search(r"(.)\1{%d}" % limit, text, re.DOTALL)
        found = longest_run_over(text, limit)
        assert (found is None) == (expected is None), (text, limit)
        if found is not None:
            assert found * (limit + 1) in text


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("What is the capital of France and why is it famous?", "en"),
        ("Quelle est la capitale de la France et pourquoi est-elle célèbre ?", "fr"),
        ("Was ist die Hauptstadt von Deutschland und wie groß ist sie?", "de"),
        ("¿Cuál es la capital de España y por qué es famosa?", "es"),
        ("Какая столица России?", "ru"),
        ("中国的首都是哪里？", "zh"),
        ("12345 !!!", "unknown"),
    ],
)
def test_language_guess(text: str, language: str) -> None:
    assert detect_language(text) == language


def test_language_filter_uses_the_first_user_turn() -> None:
    french = chat(("user", "Quelle est la capitale de la France ?"), ("assistant", "Paris."))
    english = chat(("user", "What is the capital of France?"), ("assistant", "Paris."))
    assert clean(french, languages=["en"]).reason == "language"
    assert isinstance(clean(english, languages=["en"]), Conversation)


def test_a_language_the_filter_cannot_detect_is_refused():
    message = "curate.clean.languages: 'english' is not a language code .*expected one of en, de"
    with pytest.raises(ForgeError, match=message):
        Cleaner(CurateCleanConfig(languages=["en", "english"]))
    assert Cleaner(CurateCleanConfig(languages=["EN", "zh", "unknown"]))
