"""Mixing: exact per-source counts from weights and caps, a seeded uniform shuffle, bounded by buckets."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from dolphin_forge.curate.mixing import Shard, copies_per_row, write_mix


def shard(tmp_path: Path, name: str, rows: int, **options) -> Shard:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(f'{{"source": "{name}", "n": {i}}}\n' for i in range(rows)), encoding="utf-8")
    return Shard(name, path, rows, **options)


def test_selection_sampling_uses_exactly_the_target() -> None:
    rng = random.Random(0)
    for rows, target in [(10, 0), (10, 3), (10, 10), (10, 25), (1, 4), (0, 0)]:
        copies = list(copies_per_row(rows, target, rng))
        assert len(copies) == rows and sum(copies) == target
        if rows:
            assert max(copies) - min(copies) <= 1  # repeats are spread evenly


def test_sampling_is_uniform() -> None:
    rng = random.Random(1)
    picked = Counter()
    for _ in range(4000):
        for index, copies in enumerate(copies_per_row(5, 2, rng)):
            picked[index] += copies
    assert all(abs(picked[i] / 4000 - 0.4) < 0.03 for i in range(5))


def test_weights_and_caps(tmp_path: Path) -> None:
    shards = [
        shard(tmp_path, "a", 100, weight=0.5),
        shard(tmp_path, "b", 10, weight=2.5),
        shard(tmp_path, "c", 50, max_rows=7),
    ]
    assert [s.target for s in shards] == [50, 25, 7]
    out = tmp_path / "mix.jsonl"
    assert write_mix(shards, out, seed=3, shuffle=True, bucket_bytes=200) == 82
    lines = out.read_text(encoding="utf-8").splitlines()
    counts = Counter(line.split('"')[3] for line in lines)
    assert counts == {"a": 50, "b": 25, "c": 7}
    assert not list(tmp_path.glob("mix.jsonl.bucket*"))


def test_shuffle_is_seeded_and_keeps_every_row(tmp_path: Path) -> None:
    shards = [shard(tmp_path, "a", 300), shard(tmp_path, "b", 200)]
    first, second, other, ordered = (tmp_path / f"{n}.out" for n in ("1", "2", "3", "4"))
    write_mix(shards, first, seed=7, shuffle=True, bucket_bytes=1000)  # ~ a dozen buckets
    write_mix(shards, second, seed=7, shuffle=True, bucket_bytes=1000)
    write_mix(shards, other, seed=8, shuffle=True, bucket_bytes=1000)
    write_mix(shards, ordered, seed=7, shuffle=False)
    assert first.read_text() == second.read_text()
    assert first.read_text() != other.read_text()
    assert sorted(first.read_text().splitlines()) == sorted(ordered.read_text().splitlines())
    in_order = ordered.read_text().splitlines()
    assert in_order[0] == '{"source": "a", "n": 0}' and in_order[-1] == '{"source": "b", "n": 199}'
    shuffled = first.read_text().splitlines()
    assert sum(a == b for a, b in zip(shuffled, in_order)) < 20
