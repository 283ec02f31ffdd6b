"""Packing: every sample lands in exactly one row, rows respect capacity, FFD matches a plain reference."""

from __future__ import annotations

import numpy as np

from dolphin_forge.data.packing import first_fit_decreasing, pack_sequences, packing_efficiency


def reference_ffd(lengths: list[int], capacity: int) -> list[list[int]]:
    """The textbook O(n * rows) first-fit decreasing, for comparison."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if room >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def test_ffd_equals_the_textbook_algorithm():
    rng = np.random.default_rng(1)
    for _ in range(20):
        lengths = rng.integers(1, 300, size=rng.integers(1, 400)).tolist()
        assert first_fit_decreasing(lengths, 512) == reference_ffd(lengths, 512)


def test_pack_sequences_keeps_every_sample_whole_with_restarting_positions():
    rng = np.random.default_rng(2)
    samples = [rng.integers(0, 1000, size=n) for n in rng.integers(1, 200, size=300)]
    labels = [np.where(rng.random(len(s)) < 0.5, -100, s) for s in samples]
    lengths = np.array([len(s) for s in samples])
    packed = pack_sequences(np.concatenate(samples), np.concatenate(labels), lengths, capacity=256)

    seen = []
    for r in range(packed.num_rows):
        ids = packed.input_ids[packed.offsets[r] : packed.offsets[r + 1]]
        labs = packed.labels[packed.offsets[r] : packed.offsets[r + 1]]
        pos = packed.position_ids[packed.offsets[r] : packed.offsets[r + 1]]
        lens = packed.seq_lens[packed.seq_offsets[r] : packed.seq_offsets[r + 1]]
        assert len(ids) <= 256 and lens.sum() == len(ids)
        start = 0
        for n in lens:
            assert pos[start : start + n].tolist() == list(range(n))
            seen.append((tuple(ids[start : start + n]), tuple(labs[start : start + n])))
            start += n
    expected = sorted((tuple(s), tuple(lab)) for s, lab in zip(samples, labels, strict=True))
    assert sorted(seen) == expected


def test_no_packing_gives_one_row_per_sample_in_order():
    packed = pack_sequences(np.arange(6), np.arange(6), np.array([2, 1, 3]), capacity=None)
    assert packed.offsets.tolist() == [0, 2, 3, 6]
    assert packed.position_ids.tolist() == [0, 1, 0, 0, 1, 2]


def test_packing_efficiency_counts_real_tokens_over_capacity():
    packed = pack_sequences(np.arange(10), np.arange(10), np.array([6, 4]), capacity=8)
    assert packed.num_rows == 2
    assert packing_efficiency(packed, 8) == 10 / 16
