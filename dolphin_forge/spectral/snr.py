"""Singular values of a weight matrix, fast, and Spectrum's signal-to-noise ratio.

`singular_values` does not call an SVD routine: it takes the eigenvalues of the smaller Gram matrix (W^T W or
W W^T) in float64. The Gram product is one matrix multiply, which uses every core at full speed, and the symmetric
eigensolver on a min(n, m)-sized matrix is several times cheaper than the bidiagonalisation inside `svdvals`
(about 10x on this project's CPU for SmolLM2's matrices). Squaring the spectrum loses precision only for values
below ~1e-8 of the largest, and float64 keeps every value at least as accurate as an fp32 `svdvals` would.

`spectrum_snr` is the reference definition of the public Spectrum tool (see `thresholds` for the threshold):
SNR = (sum of singular values above the threshold / sum of those at or below it) / largest singular value, the
noise sum taken as 1 when no value is at or below the threshold.
"""

from __future__ import annotations

import torch

from dolphin_forge.spectral.thresholds import ThresholdMode, noise_threshold


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All min(n, m) singular values of a 2-D weight, float64, descending."""
    w = weight.detach().to(torch.float64)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.clamp_min(0).sqrt().flip(0)


def spectrum_snr(singular_values: torch.Tensor, threshold: float) -> float:
    """Spectrum's SNR: signal sum over noise sum (1 if there is no noise), divided by the largest singular value."""
    s = singular_values.to(torch.float64)
    signal = float(s[s > threshold].sum())
    noise = float(s[s <= threshold].sum())
    if noise == 0.0:
        noise = 1.0
    return signal / noise / float(s.max())


def matrix_snr(weight: torch.Tensor, mode: ThresholdMode = "marchenko_pastur") -> tuple[float, float, torch.Tensor]:
    """(snr, threshold, singular values) of one weight matrix under the given threshold mode."""
    s = singular_values(weight)
    n, m = weight.shape
    threshold = noise_threshold(s, n, m, mode)
    return spectrum_snr(s, threshold), threshold, s
