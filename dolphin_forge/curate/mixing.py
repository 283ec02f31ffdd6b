"""Mixing the curated sources: per-source weights and caps, then one seeded shuffle, in bounded memory.

Each source's kept rows sit in a shard file (written by the pipeline in input order). A source contributes
``round(weight * kept)`` rows, at most ``max_rows``: a weight below 1 samples that share of its rows, a weight above
1 repeats them (every row ``floor(weight)`` times plus a sampled share once more). The sample is drawn with
selection sampling (Knuth's algorithm S), which picks exactly k of n rows in one pass without holding the rows.

The shuffle is the two-pass external shuffle: every row goes to one of B temporary bucket files chosen uniformly at
random, then each bucket (about ``bucket_bytes`` large) is shuffled in memory and appended to the output. A
uniform bucket choice followed by a uniform shuffle inside each bucket is a uniform permutation of all rows, and
memory stays near one bucket whatever the input size. Everything is drawn from one ``random.Random(seed)``, so
the same seed gives the same file.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUCKET_BYTES = 64 * 2**20
MAX_BUCKETS = 256


@dataclass
class Shard:
    """One source's kept rows: ShareGPT JSON lines in input order."""

    name: str
    path: Path
    rows: int
    weight: float = 1.0
    max_rows: int | None = None

    @property
    def target(self) -> int:
        wanted = round(self.weight * self.rows)
        return wanted if self.max_rows is None else min(wanted, self.max_rows)


def copies_per_row(rows: int, target: int, rng: random.Random) -> Iterator[int]:
    """How many times each of `rows` rows is used so that `target` are used in all (selection sampling)."""
    if rows == 0:
        return
    whole, extra = divmod(target, rows)
    remaining = rows
    for _ in range(rows):
        chosen = extra > 0 and rng.random() * remaining < extra
        if chosen:
            extra -= 1
        remaining -= 1
        yield whole + chosen


def _mixed_lines(shard: Shard, rng: random.Random) -> Iterator[str]:
    with shard.path.open("r", encoding="utf-8") as handle:
        for line, copies in zip(handle, copies_per_row(shard.rows, shard.target, rng)):
            for _ in range(copies):
                yield line


def write_mix(shards: list[Shard], output: Path, seed: int, shuffle: bool, bucket_bytes: int = BUCKET_BYTES) -> int:
    """Write the mixed (and shuffled) rows of all shards to `output`; returns the number of rows written."""
    rng = random.Random(seed)
    written = 0
    if not shuffle:
        with output.open("w", encoding="utf-8") as out:
            for shard in shards:
                for line in _mixed_lines(shard, rng):
                    out.write(line)
                    written += 1
        return written

    expected = sum(shard.path.stat().st_size * shard.target / max(shard.rows, 1) for shard in shards)
    count = min(MAX_BUCKETS, max(1, math.ceil(expected / bucket_bytes)))
    buckets = [output.with_name(f"{output.name}.bucket{i}") for i in range(count)]
    handles = [path.open("w", encoding="utf-8") for path in buckets]
    try:
        for shard in shards:
            for line in _mixed_lines(shard, rng):
                handles[rng.randrange(count)].write(line)
    finally:
        for handle in handles:
            handle.close()
    with output.open("w", encoding="utf-8") as out:
        for path in buckets:
            with path.open("r", encoding="utf-8") as handle:
                lines = handle.readlines()
            rng.shuffle(lines)
            out.writelines(lines)
            written += len(lines)
            path.unlink()
    return written
