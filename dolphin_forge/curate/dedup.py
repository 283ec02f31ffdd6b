"""Deduplication: exact (normalised-text hash) and near-duplicate (MinHash LSH over word n-grams).

What is compared is the dedup ``scope``: the first user turn (default; Orca-style data repeats prompts with
different completions), the whole conversation, or the assistant answers. The text is normalised (lower case,
punctuation dropped, whitespace collapsed) before the exact hash, so trivial differences do not hide a duplicate.

The work is split for the multi-process pipeline. Workers compute each row's keys (`DedupKeys`): the exact digest
and the LSH band keys of its MinHash signature. The parent (`Deduplicator`) decides in input order, so the first
occurrence is the one kept whatever the number of processes; a row is a near duplicate of the earliest kept row
it shares a band with, which is the candidate rule of datasketch's MinHashLSH.

The MinHash maths is datasketch's, evaluated differently. The permutations are those of
``datasketch.MinHash(num_perm, seed, scheme="affine32")`` (32-bit shingle hash, MurmurHash3 finaliser, affine map
mod 2^32, minimum) and the number of bands and rows per band are the ones ``datasketch.MinHashLSH`` picks for the
threshold; a test checks that the signatures equal datasketch's for the same shingle hashes. Why not call
datasketch per row: ``MinHash.update_batch`` hashes each shingle with a Python-level SHA-1 call and pays numpy's
fixed cost once per row, and ``MinHashLSH.query``/``insert`` each re-serialise every band; that is most of the
time of a naive curation run. Here the shingle hashes of a whole batch of rows go through the permutations as one
numpy array (a segmented minimum gives each row's signature), each band is reduced to one 64-bit key in the
worker, and the parent's index is one dict per band from key to kept-row number. Memory grows with the number of
kept rows (16 bytes of digest and one dict entry per band per row), never with the size of the input.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from datasketch import MinHash, MinHashLSH

from dolphin_forge.config import CurateDedupConfig
from dolphin_forge.data.conversation import Conversation

_PUNCTUATION = re.compile(r"[^\w\s]+")
_WORD = re.compile(r"\w+")
MINHASH_SEED = 1
MAX_HASH = np.uint32(0xFFFFFFFF)
CHUNK_SHINGLES = 1 << 16  # shingles pushed through the permutations at once (bounds a batch's temporary memory)
_NGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_BAND_MULTIPLIER = np.uint64(0xC2B2AE3D27D4EB4F)
_WORD_CACHE_LIMIT = 1 << 20


def scope_text(conversation: Conversation, scope: str) -> str:
    messages = conversation.messages
    if scope == "first_user":
        return next((m.content for m in messages if m.role == "user"), "")
    if scope == "assistant":
        return "\n".join(m.content for m in messages if m.role == "assistant")
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def normalise_for_dedup(text: str) -> str:
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def word_shingles(text: str, n: int) -> list[bytes]:
    """Word n-grams of lower-cased text (a text shorter than n words is one shingle), as datasketch would take them."""
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)]


def fmix32(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (datasketch applies it before the affine permutations)."""
    values = values ^ (values >> np.uint32(16))
    values = values * np.uint32(0x85EBCA6B)
    values = values ^ (values >> np.uint32(13))
    values = values * np.uint32(0xC2B2AE35)
    return values ^ (values >> np.uint32(16))


class MinHasher:
    """Batch MinHash signatures and LSH band keys, with datasketch's permutations and banding."""

    def __init__(self, num_perm: int, threshold: float, ngram: int) -> None:
        template = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme="affine32")
        self.a, self.b = (np.asarray(p, dtype=np.uint32) for p in template.permutations)
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.bands, self.band_rows = lsh.b, lsh.r
        self.num_perm, self.ngram = num_perm, ngram
        self._words: dict[str, int] = {}

    def _word_hash(self, word: str) -> int:
        value = self._words.get(word)
        if value is None:
            if len(self._words) >= _WORD_CACHE_LIMIT:
                self._words.clear()
            value = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
            self._words[word] = value
        return value

    def shingle_hashes(self, text: str) -> np.ndarray:
        """One 32-bit hash per word n-gram: a polynomial over 64-bit word hashes, top 32 bits kept."""
        words = _WORD.findall(text.lower())
        if not words:
            return np.empty(0, dtype=np.uint32)
        word_hashes = np.fromiter(map(self._word_hash, words), dtype=np.uint64, count=len(words))
        width = min(self.ngram, len(words))
        count = len(words) - width + 1
        hashes = np.zeros(count, dtype=np.uint64)
        for k in range(width):
            hashes = hashes * _NGRAM_MULTIPLIER + word_hashes[k : k + count]
        return (hashes >> np.uint64(32)).astype(np.uint32)

    def signatures_of_hashes(self, per_row: list[np.ndarray]) -> np.ndarray:
        """MinHash signatures (rows x num_perm, uint32) of rows given as arrays of shingle hashes."""
        signatures = np.full((len(per_row), self.num_perm), MAX_HASH, dtype=np.uint32)
        start = 0
        while start < len(per_row):  # group rows into chunks of about CHUNK_SHINGLES shingles
            stop, total = start, 0
            while stop < len(per_row) and (stop == start or total + len(per_row[stop]) <= CHUNK_SHINGLES):
                total += len(per_row[stop])
                stop += 1
            self._fill(signatures, per_row, start, stop)
            start = stop
        return signatures

    def _fill(self, signatures: np.ndarray, per_row: list[np.ndarray], start: int, stop: int) -> None:
        rows = [i for i in range(start, stop) if len(per_row[i])]
        if not rows:
            return
        hashes = fmix32(np.concatenate([per_row[i] for i in rows]))
        lengths = np.array([len(per_row[i]) for i in rows])
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        minima = np.empty((len(rows), self.num_perm), dtype=np.uint32)
        minima.fill(MAX_HASH)
        for begin in range(0, len(hashes), CHUNK_SHINGLES):  # one huge row is taken in slices
            piece = hashes[begin : begin + CHUNK_SHINGLES]
            permuted = piece[:, None] * self.a[None, :] + self.b[None, :]
            owners = np.searchsorted(offsets, np.arange(begin, begin + len(piece)), side="right") - 1
            first = np.flatnonzero(np.diff(owners, prepend=-1))
            np.minimum.at(minima, owners[first], np.minimum.reduceat(permuted, first, axis=0))
        signatures[rows] = minima

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """One 64-bit key per band per row (rows x bands): equal bands give equal keys."""
        keys = np.zeros((len(signatures), self.bands), dtype=np.uint64)
        for k in range(self.band_rows):
            column = signatures[:, k : self.bands * self.band_rows : self.band_rows].astype(np.uint64)
            keys = keys * _BAND_MULTIPLIER + column + np.uint64(k + 1)
        return keys


@dataclass(frozen=True)
class RowKeys:
    digest: bytes | None
    bands: tuple[int, ...] | None  # LSH band keys, None when near dedup is off


class DedupKeys:
    """Computes the dedup keys of a batch of kept rows (runs in workers)."""

    def __init__(self, config: CurateDedupConfig) -> None:
        self.config = config
        self.hasher = MinHasher(config.num_perm, config.threshold, config.ngram) if config.near else None

    def __call__(self, conversations: list[Conversation]) -> list[RowKeys]:
        texts = [scope_text(c, self.config.scope) for c in conversations]
        digests: list[bytes | None] = [None] * len(texts)
        if self.config.exact:
            digests = [hashlib.blake2b(normalise_for_dedup(t).encode(), digest_size=16).digest() for t in texts]
        bands: list[tuple[int, ...] | None] = [None] * len(texts)
        if self.hasher is not None and texts:
            shingles = [self.hasher.shingle_hashes(t) for t in texts]
            signatures = self.hasher.signatures_of_hashes(shingles)
            keys = self.hasher.band_keys(signatures).tolist()
            # a text without words has no shingles and takes no part in near dedup (the exact hash covers it)
            bands = [tuple(row) if len(s) else None for row, s in zip(keys, shingles)]
        return [RowKeys(d, b) for d, b in zip(digests, bands)]


@dataclass
class DedupStats:
    exact: int = 0
    near: int = 0
    cluster_sizes: Counter[str] = field(default_factory=Counter)  # kept row -> duplicates found of it


class Deduplicator:
    """Decides, in input order, whether a row repeats an earlier kept row (runs in the parent)."""

    def __init__(self, config: CurateDedupConfig) -> None:
        self.config = config
        self._kept: list[str] = []  # kept row number -> its "source/id" reference
        self._digests: dict[bytes, int] = {}
        self._bands: list[dict[int, int]] = []
        self.stats = DedupStats()

    def check(self, ref: str, keys: RowKeys) -> tuple[str, str] | None:
        """None for a new row (now remembered), else (``exact``/``near``, reference of the kept row it repeats)."""
        first = self._digests.get(keys.digest) if keys.digest is not None else None
        kind = "exact"
        if first is None and keys.bands is not None:
            if not self._bands:
                self._bands = [{} for _ in keys.bands]
            candidates = [n for table, key in zip(self._bands, keys.bands) if (n := table.get(key)) is not None]
            if candidates:
                first, kind = min(candidates), "near"
        if first is not None:
            setattr(self.stats, kind, getattr(self.stats, kind) + 1)
            self.stats.cluster_sizes[self._kept[first]] += 1
            return kind, self._kept[first]
        number = len(self._kept)
        self._kept.append(ref)
        if keys.digest is not None:
            self._digests[keys.digest] = number
        if keys.bands is not None:
            for table, key in zip(self._bands, keys.bands):
                table.setdefault(key, number)
        return None
