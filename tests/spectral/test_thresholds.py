"""Thresholds and SNR against direct numpy transcriptions of the formulas, and planted-rank recovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dolphin_forge.spectral.laser import low_rank
from dolphin_forge.spectral.snr import gram, is_tall, singular_values_of_gram, snr_of_spectrum, spectrum_snr
from dolphin_forge.spectral.thresholds import (
    gavish_donoho_omega,
    gavish_donoho_threshold,
    marchenko_pastur_threshold,
    noise_threshold,
    signal_rank,
)
from tests.spectral.reference import planted, spectrum_reference

SHAPES = [(96, 160), (160, 96), (128, 128), (300, 40)]


def singular_values(weight: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The scan's path: Gram matrix summed over row (tall) or column (wide) blocks, then one eigensolve."""
    tall = is_tall(tuple(weight.shape))
    return singular_values_of_gram(gram(weight.split(block, dim=0 if tall else 1), tall))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_threshold_and_snr_match_numpy_transcription(shape, seed):
    rng = np.random.default_rng(seed)
    weight = planted(*shape, rank=5, seed=seed) * 0.02 + 0.01 * rng.standard_normal(shape)
    s = singular_values(torch.from_numpy(weight).float())
    snr, threshold = snr_of_spectrum(s, shape, "marchenko_pastur")
    ref_snr, ref_threshold, _ = spectrum_reference(weight.astype(np.float32))
    assert threshold == pytest.approx(ref_threshold, rel=1e-6)
    assert snr == pytest.approx(ref_snr, rel=1e-6)
    # same formulas on identical singular values agree to rounding
    ref_s = np.linalg.svd(weight.astype(np.float32).astype(np.float64), compute_uv=False)
    exact_threshold = marchenko_pastur_threshold(torch.from_numpy(ref_s), *shape)
    assert exact_threshold == pytest.approx(ref_threshold, rel=1e-12)
    assert spectrum_snr(torch.from_numpy(ref_s), exact_threshold) == pytest.approx(ref_snr, rel=1e-12)


@pytest.mark.parametrize("shape", [(200, 70), (70, 200)])
@pytest.mark.parametrize("block", [16, 1024])
def test_singular_values_match_lapack(shape, block):
    """Whether the Gram matrix is built in one product or summed over 16-row (or -column) blocks."""
    weight = torch.from_numpy(np.random.default_rng(3).standard_normal(shape))
    ours = singular_values(weight, block)
    ref = np.linalg.svd(weight.numpy(), compute_uv=False)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-9 * ref[0])
    assert torch.all(ours[:-1] >= ours[1:])  # descending


def test_noise_sum_is_one_when_nothing_is_below_threshold():
    s = torch.tensor([10.0, 10.0, 10.0, 10.0], dtype=torch.float64)  # IQR 0 -> threshold 0 -> all signal
    threshold = marchenko_pastur_threshold(s, 4, 8)
    assert threshold == 0.0
    assert spectrum_snr(s, threshold) == pytest.approx(40.0 / 1.0 / 10.0)


@pytest.mark.parametrize("mode", ["marchenko_pastur", "gavish_donoho"])
def test_an_all_zero_matrix_has_snr_zero_and_nothing_to_truncate(mode):
    zeros = torch.zeros(48, 80)
    s = singular_values(zeros)
    assert snr_of_spectrum(s, (48, 80), mode) == (0.0, 0.0)  # no ZeroDivisionError on sigma_max == 0
    reduced, before, after = low_rank(zeros, mode)
    assert (before, after) == (0, 0) and torch.equal(reduced, zeros)


@pytest.mark.parametrize("shape,rank", [((400, 200), 7), ((200, 400), 3), ((250, 250), 10), ((500, 60), 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gavish_donoho_recovers_planted_rank(shape, rank, seed):
    weight = planted(*shape, rank=rank, seed=seed, low=1.2, high=3.0)
    s = torch.from_numpy(np.linalg.svd(weight, compute_uv=False))
    assert signal_rank(s, gavish_donoho_threshold(s, *shape)) == rank
    assert signal_rank(s, noise_threshold(s, *shape, "gavish_donoho")) == rank


def test_gavish_donoho_omega_matches_published_values():
    # Gavish & Donoho (2014): omega(1) = 2.858; their cubic fit is accurate to ~0.02 over (0, 1].
    assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=2e-3)
    for beta in np.linspace(0.05, 1.0, 20):
        fit = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert gavish_donoho_omega(float(beta)) == pytest.approx(fit, abs=0.02)


def test_gavish_donoho_threshold_sits_at_the_noise_edge_for_pure_noise():
    n, m = 600, 300
    noise = np.random.default_rng(5).standard_normal((n, m))
    s = torch.from_numpy(np.linalg.svd(noise, compute_uv=False))
    threshold = gavish_donoho_threshold(s, n, m)
    beta = m / n
    known_sigma = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1))) * math.sqrt(n)
    assert threshold == pytest.approx(known_sigma, rel=0.03)  # the unknown-noise threshold estimates the known one
    assert signal_rank(s, threshold) == 0
