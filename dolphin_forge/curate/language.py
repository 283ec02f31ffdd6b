"""A small, dependency-free language guess for the optional language filter of `cleaning`.

Why our own: the allowed dependencies hold no language identifier, and the filter only needs to tell apart the
big languages of instruction data. Texts in a non-Latin script are named by script (``zh``, ``ja``, ``ko``, ``ru``
for Cyrillic, ``ar``, ``he``, ``el``, ``th``, ``hi`` for Devanagari); Latin-script texts by which language's common
function words they use most (en, de, fr, es, it, pt, nl). Texts with no clue at all are ``unknown``.
"""

from __future__ import annotations

import re
from collections import Counter

_FUNCTION_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset("the and of to is in that it for you with was are this be on what how can not have".split()),
    "de": frozenset("der die und das ist nicht ich sie es ein eine zu mit den auf für sich von wie was".split()),
    "fr": frozenset("le la les et est des une un que pour dans pas vous qui sur avec ce je il du".split()),
    "es": frozenset("el la los las y es que de en un una por para con no se del como qué su".split()),
    "it": frozenset("il lo la gli le e è che di un una per non con sono del della come cosa si".split()),
    "pt": frozenset("o a os as e é que de um uma para com não em do da se como mais você".split()),
    "nl": frozenset("de het een en is van niet dat ik je met op zijn voor er wat hoe ook".split()),
}

_SCRIPTS: list[tuple[str, re.Pattern[str]]] = [
    ("ja", re.compile("[\u3040-\u30ff]")),
    ("ko", re.compile("[\uac00-\ud7af]")),
    ("zh", re.compile("[\u4e00-\u9fff]")),
    ("ru", re.compile("[\u0400-\u04ff]")),
    ("ar", re.compile("[\u0600-\u06ff]")),
    ("he", re.compile("[\u0590-\u05ff]")),
    ("el", re.compile("[\u0370-\u03ff]")),
    ("th", re.compile("[\u0e00-\u0e7f]")),
    ("hi", re.compile("[\u0900-\u097f]")),
]
_WORD = re.compile(r"[^\W\d_]+")
#: What `detect_language` can answer: the codes a `languages` list may name.
LANGUAGE_CODES: tuple[str, ...] = (*_FUNCTION_WORDS, *(code for code, _ in _SCRIPTS), "unknown")


def detect_language(text: str, sample_chars: int = 2000) -> str:
    sample = text[:sample_chars]
    letters = sum(ch.isalpha() for ch in sample)
    if not letters:
        return "unknown"
    for code, pattern in _SCRIPTS:
        if len(pattern.findall(sample)) > 0.3 * letters:
            return code
    words = [w.lower() for w in _WORD.findall(sample)]
    votes: Counter[str] = Counter()
    for code, vocabulary in _FUNCTION_WORDS.items():
        votes[code] = sum(1 for w in words if w in vocabulary)
    best, count = votes.most_common(1)[0]
    return best if count else "unknown"
