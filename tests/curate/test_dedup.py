"""Deduplication: exact and MinHash near-duplicates, the three scopes, first occurrence kept, clusters."""

from __future__ import annotations

import random

from dolphin_forge.config import CurateDedupConfig
import numpy as np
from datasketch import MinHash

from dolphin_forge.curate.dedup import CHUNK_SHINGLES, DedupKeys, Deduplicator, MinHasher, scope_text, word_shingles
from dolphin_forge.data.conversation import Conversation, Message


def chat(user: str, answer: str) -> Conversation:
    return Conversation([Message("system", "sys"), Message("user", user), Message("assistant", answer)])


def run(config: CurateDedupConfig, rows: list[tuple[str, Conversation]]) -> dict[str, tuple[str, str] | None]:
    keys, dedup = DedupKeys(config), Deduplicator(config)
    computed = keys([conversation for _, conversation in rows])
    return {ref: dedup.check(ref, row_keys) for (ref, _), row_keys in zip(rows, computed)}


def random_text(rng: random.Random, words: int) -> str:
    vocabulary = [f"w{i}" for i in range(3000)]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def test_exact_duplicates_after_normalisation() -> None:
    rows = [
        ("a", chat("What is the capital of France?", "Paris")),
        ("b", chat("what is the   capital of france", "It is Paris.")),
        ("c", chat("What is the capital of Spain?", "Madrid")),
    ]
    result = run(CurateDedupConfig(near=False), rows)
    assert result == {"a": None, "b": ("exact", "a"), "c": None}


def test_planted_near_duplicates_are_found_and_distinct_rows_kept() -> None:
    rng = random.Random(0)
    originals = [random_text(rng, 120) for _ in range(60)]
    rows, planted = [], {}
    for i, text in enumerate(originals):
        rows.append((f"orig{i}", chat(text, "answer")))
    for i in range(0, 60, 3):  # every third original gets a copy with 1 of its 120 words changed (Jaccard ~0.92)
        words = originals[i].split()
        for position in rng.sample(range(len(words)), 1):
            words[position] = "changed"
        rows.append((f"copy{i}", chat(" ".join(words), "another answer")))
        planted[f"copy{i}"] = f"orig{i}"
    result = run(CurateDedupConfig(exact=True, near=True, threshold=0.7), rows)
    assert {ref: hit for ref, hit in result.items() if hit} == {ref: ("near", first) for ref, first in planted.items()}


def test_first_occurrence_is_kept_and_clusters_are_counted() -> None:
    rng = random.Random(1)
    base = random_text(rng, 80)
    rows = [("first", chat(base, "x")), ("other", chat(random_text(rng, 80), "y"))]
    rows += [(f"dup{i}", chat(base + f" extra{i}", "z")) for i in range(3)]
    config = CurateDedupConfig(threshold=0.8)
    keys, dedup = DedupKeys(config), Deduplicator(config)
    hits = [dedup.check(ref, k) for (ref, _), k in zip(rows, keys([c for _, c in rows]))]
    assert hits[:2] == [None, None]
    assert all(hit == ("near", "first") for hit in hits[2:])
    assert dedup.stats.near == 3 and dedup.stats.cluster_sizes == {"first": 3}


def test_scopes() -> None:
    same_question = [("a", chat("Tell me a joke about cats", "one")), ("b", chat("Tell me a joke about cats", "two"))]
    assert run(CurateDedupConfig(scope="first_user"), same_question)["b"] == ("exact", "a")
    assert run(CurateDedupConfig(scope="conversation"), same_question)["b"] is None
    same_answer = [("a", chat("q one", "The very same answer.")), ("b", chat("q two", "The very same answer."))]
    assert run(CurateDedupConfig(scope="assistant"), same_answer)["b"] == ("exact", "a")
    assert run(CurateDedupConfig(scope="first_user"), same_answer)["b"] is None
    conversation = chat("question", "answer")
    assert scope_text(conversation, "conversation") == "system: sys\nuser: question\nassistant: answer"


def test_word_shingles() -> None:
    assert word_shingles("A b, c!", 5) == [b"a b c"]
    assert word_shingles("one two three four", 2) == [b"one two", b"two three", b"three four"]
    assert word_shingles("  ", 5) == []


def test_signatures_equal_datasketch_for_the_same_shingle_hashes() -> None:
    """Batch signatures (several rows, one split across chunks, one empty) equal datasketch's MinHash values."""
    rng = random.Random(2)
    hasher = MinHasher(num_perm=64, threshold=0.8, ngram=5)
    texts = [random_text(rng, n) for n in (1, 3, 40, 200)] + [""] + [random_text(rng, CHUNK_SHINGLES + 500)]
    shingles = [hasher.shingle_hashes(t) for t in texts]
    signatures = hasher.signatures_of_hashes(shingles)
    for hashes, signature in zip(shingles, signatures):
        reference = MinHash(num_perm=64, seed=1, scheme="affine32", hashfunc=int)
        reference.update_batch([int(h) for h in hashes])
        assert np.array_equal(signature, reference.hashvalues)
    assert len(shingles[0]) == 1 and len(shingles[2]) == 36 and len(shingles[4]) == 0


def test_band_keys_follow_datasketch_banding() -> None:
    hasher = MinHasher(num_perm=128, threshold=0.8, ngram=5)
    assert (hasher.bands, hasher.band_rows) == (9, 13)
    rng = np.random.default_rng(0)
    signatures = rng.integers(0, 2**32, size=(2, 128), dtype=np.uint32)
    signatures[1, 13:26] = signatures[0, 13:26]  # only band 1 agrees
    keys = hasher.band_keys(signatures)
    assert keys.shape == (2, 9)
    assert [bool(a == b) for a, b in zip(keys[0], keys[1])] == [False, True] + [False] * 7


def test_rows_without_words_are_not_near_duplicates_of_each_other() -> None:
    result = run(CurateDedupConfig(exact=False), [("a", chat("???", "x")), ("b", chat("!!!", "y"))])
    assert result == {"a": None, "b": None}
