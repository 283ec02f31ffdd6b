"""Direct numpy transcriptions of the published formulas, written independently of dolphin_forge for comparison."""

from __future__ import annotations

import numpy as np


def spectrum_reference(weight: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(snr, threshold, singular values) exactly as the issue states Spectrum's definition, in float64 numpy."""
    s = np.linalg.svd(weight.astype(np.float64), compute_uv=False)
    n, m = weight.shape
    sigma = (np.quantile(s, 0.75) - np.quantile(s, 0.25)) / 1.349
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1 + np.sqrt(beta))
    signal = s[s > threshold].sum()
    below = s[s <= threshold]
    noise = below.sum() if below.size else 1.0
    return float(signal / noise / s.max()), float(threshold), s


def planted(
    n: int, m: int, rank: int, seed: int, noise: float = 1.0, low: float = 4.0, high: float = 8.0
) -> np.ndarray:
    """A rank-`rank` signal (singular values low..high times the noise bulk edge) plus i.i.d. Gaussian noise."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    edge = noise * (np.sqrt(n) + np.sqrt(m))
    s = np.linspace(low, high, rank) * edge
    return (u * s) @ v.T + noise * rng.standard_normal((n, m))
