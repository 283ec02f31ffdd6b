"""Where the noise ends in a weight matrix's singular values: two random-matrix thresholds.

A weight matrix is read as signal plus i.i.d. noise. The singular values of pure noise fill a bulk whose edge is
known from random matrix theory, so values above a threshold near that edge are signal.

* ``marchenko_pastur`` is the **reference definition** used by the public Spectrum tool (Hartford et al. 2024,
  arXiv 2406.06623) and by laserRMT: the noise level is estimated as ``sigma = IQR(S) / 1.349`` (the interquartile
  range of the singular values, quantiles by linear interpolation, as ``numpy.quantile``/``torch.quantile``) and
  the threshold is the Marchenko-Pastur bulk edge ``sigma * (1 + sqrt(beta))`` with ``beta = min(n, m) / max(n, m)``.
  It is kept exactly, so that rankings reproduce published `unfrozen_parameters` lists.
* ``gavish_donoho`` is the optimal hard threshold for an unknown noise level (Gavish & Donoho 2014, "The Optimal
  Hard Threshold for Singular Values is 4/sqrt(3)"): ``omega(beta) * median(S)`` with
  ``omega(beta) = lambda*(beta) / sqrt(mu_beta)``, where ``mu_beta`` is the median of the Marchenko-Pastur
  distribution. We compute ``mu_beta`` by numerical integration rather than using the paper's cubic fit, so the
  threshold is the exact one (the fit is off by up to ~0.02 in omega).

Everything works on float64 singular values sorted in descending order.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import get_args

import numpy as np
import torch

from dolphin_forge.config import NoiseThreshold as ThresholdMode  # the one list of modes, validated in the config

#: IQR of a standard normal distribution: IQR / 1.349 estimates its standard deviation.
NORMAL_IQR = 1.349


def aspect_ratio(n: int, m: int) -> float:
    """beta = min(n, m) / max(n, m), in (0, 1]."""
    return min(n, m) / max(n, m)


def iqr_sigma(singular_values: torch.Tensor) -> float:
    """Spectrum's noise estimate: the interquartile range of the singular values divided by 1.349."""
    s = singular_values.to(torch.float64)
    q75, q25 = torch.quantile(s, 0.75), torch.quantile(s, 0.25)
    return float(q75 - q25) / NORMAL_IQR


def marchenko_pastur_threshold(singular_values: torch.Tensor, n: int, m: int) -> float:
    """Reference threshold: IQR sigma times the Marchenko-Pastur edge factor 1 + sqrt(beta)."""
    return iqr_sigma(singular_values) * (1.0 + math.sqrt(aspect_ratio(n, m)))


@lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float) -> float:
    """Median of the Marchenko-Pastur law with ratio beta <= 1 and unit variance.

    The density sqrt((b - x)(x - a)) / (2 pi beta x) on [a, b] is integrated after the substitution
    x = a + (b - a)(1 - cos t) / 2, which removes the square-root singularities at both edges.
    """
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    t = np.linspace(0.0, math.pi, 200_001)
    x = a + (b - a) * (1 - np.cos(t)) / 2
    half = (b - a) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        density = np.where(x > 0, (half * np.sin(t)) ** 2 / (2 * math.pi * beta * x), 0.0)
    if beta == 1.0:  # x ~ t^2 and sin(t)^2 ~ t^2 near 0: the integrand tends to 1 / (2 pi)
        density[0] = 1.0 / (2 * math.pi)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2 * np.diff(t))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, x))


def gavish_donoho_omega(beta: float) -> float:
    """omega(beta): the optimal hard threshold over the median singular value, noise level unknown."""
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta * beta + 14 * beta + 1)))
    return lam / math.sqrt(marchenko_pastur_median(beta))


def gavish_donoho_threshold(singular_values: torch.Tensor, n: int, m: int) -> float:
    """Gavish-Donoho optimal hard threshold omega(beta) * median(S) for an n x m matrix."""
    beta = round(aspect_ratio(n, m), 12)
    median = float(torch.quantile(singular_values.to(torch.float64), 0.5))
    return gavish_donoho_omega(beta) * median


def noise_threshold(singular_values: torch.Tensor, n: int, m: int, mode: ThresholdMode) -> float:
    """The threshold of the named mode; singular values strictly above it are signal."""
    if mode == "marchenko_pastur":
        return marchenko_pastur_threshold(singular_values, n, m)
    if mode == "gavish_donoho":
        return gavish_donoho_threshold(singular_values, n, m)
    raise ValueError(f"unknown threshold mode {mode!r}; expected one of {get_args(ThresholdMode)}")


def signal_rank(singular_values: torch.Tensor, threshold: float) -> int:
    """How many singular values lie strictly above the threshold."""
    return int((singular_values > threshold).sum())
