"""LASER-RMT: replace chosen weight matrices by low-rank approximations, ranks from random matrix theory.

LASER (Sharma, Ash, Misra 2023, arXiv 2312.13558) found that replacing some weight matrices by a truncated SVD
improves a model; the dolphin-2.6 "laser" release chose each rank with the Marchenko-Pastur threshold instead of
a brute-force search over ranks. For each candidate matrix W (singular values and vectors in float64, from one
eigensolve of its Gram matrix per attempt):

    k = number of singular values above the threshold (`thresholds`: reference Marchenko-Pastur or Gavish-Donoho)
    W <- U[:, :k] diag(S[:k]) Vh[:k]

The change is scored by perplexity on the search part of a held-out text and kept only if that perplexity does not
get worse; otherwise the original weight, saved before the change, is copied back bit for bit. Candidates are
tried lowest SNR first (the noisiest matrices, per Spectrum's definition) or from the last layer down, until
`max_changes` are kept or the attempt or time budget is spent.

Speed: the search text is tokenised once and cut to a fixed token budget; perplexity runs batched under no_grad
(`evaluate.perplexity`), in non-overlapping windows; and the layers below a candidate are not recomputed
(`prefix_cache`). A separate held-out part of the same text, never seen by the search, measures the result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from dolphin_forge.config import LaserConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.perplexity import PerplexityResult, perplexity_of_ids
from dolphin_forge.spectral.checkpoint import LayerMatrix, is_module_type, layer_weight_type
from dolphin_forge.spectral.prefix_cache import PrefixCachedLM, decoder_layers
from dolphin_forge.spectral.scan import MatrixSpectrum
from dolphin_forge.spectral.snr import gram, is_tall
from dolphin_forge.spectral.thresholds import ThresholdMode, noise_threshold, signal_rank


@dataclass
class LaserAttempt:
    """One candidate: what was tried, what it did to search perplexity, and whether it was kept."""

    module: str
    layer: int
    snr: float
    rank_before: int
    rank_after: int
    perplexity_before: float
    perplexity_after: float | None  # None when nothing was tried (no singular value to cut)
    kept: bool
    reason: str
    seconds: float


@dataclass
class LaserResult:
    threshold: str
    search_tokens: int
    baseline: PerplexityResult
    final: PerplexityResult
    attempts: list[LaserAttempt] = field(default_factory=list)
    prefix_cache: bool = False
    stopped_by: str = "candidates exhausted"
    seconds: float = 0.0

    @property
    def kept(self) -> list[str]:
        return [a.module for a in self.attempts if a.kept]

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "search_tokens": self.search_tokens,
            "baseline": asdict(self.baseline),
            "final": asdict(self.final),
            "kept": self.kept,
            "stopped_by": self.stopped_by,
            "prefix_cache": self.prefix_cache,
            "seconds": round(self.seconds, 3),
            "attempts": [asdict(a) for a in self.attempts],
        }


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Rank of W as its float64 Gram matrix resolves it: numpy's `matrix_rank` rule applied to W^T W (or W W^T).

    The tolerance follows the precision the decomposition is computed in, not the weight's storage dtype: at bf16's
    eps (2^-7) that rule puts the tolerance above the largest singular value of any matrix with a side >= 128, so
    every candidate would look rank 0 and the search would never try one.
    """
    eigenvalues = singular_values.to(torch.float64).square()
    tolerance = min(shape) * torch.finfo(torch.float64).eps * float(eigenvalues[0])
    return int((eigenvalues > tolerance).sum())


@torch.no_grad()
def low_rank(
    weight: torch.Tensor, mode: ThresholdMode, storage_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, int, int]:
    """(W truncated to the signal rank, in W's dtype; rank before; rank after), from one float64 eigensolve.

    The truncated SVD U_k S_k V_k^T equals W V_k V_k^T (tall W) or U_k U_k^T W (wide W), and V (or U) with the
    squared singular values are the eigenpairs of the smaller Gram matrix: one matrix product and a symmetric
    eigensolve on a min(n, m)-square matrix, 3-7x faster than a float64 SVD on SmolLM2's matrices.
    With `storage_dtype` (the dtype the model will be saved in) the result is rounded through it, so the matrix
    that is scored is exactly the one that is saved.
    """
    w = weight.detach().to(torch.float64)
    n, m = w.shape
    tall = is_tall((n, m))
    eigenvalues, vectors = torch.linalg.eigh(gram([w], tall))
    s, vectors = eigenvalues.clamp_min(0).sqrt().flip(0), vectors.flip(1)
    k = signal_rank(s, noise_threshold(s, n, m, mode))
    basis = vectors[:, :k]
    reduced = (w @ basis) @ basis.T if tall else basis @ (basis.T @ w)
    return reduced.to(storage_dtype or weight.dtype).to(weight.dtype), numerical_rank(s, (n, m)), k


def order_candidates(matrices: list[MatrixSpectrum], order: str, module_types: list[str]) -> list[MatrixSpectrum]:
    """Lowest SNR first, or from the last layer down (module types in configured order within a layer)."""
    if order == "last_layer_first":

        def type_position(matrix: MatrixSpectrum) -> int:
            wanted = (i for i, t in enumerate(module_types) if is_module_type(matrix.module_type, t))
            return next(wanted, len(module_types))

        return sorted(matrices, key=lambda m: (-m.layer, type_position(m)))
    return sorted(matrices, key=lambda m: (m.snr, m.module))


def check_loaded_names(model: Any, candidates: list[LayerMatrix], stored_types: list[str]) -> None:
    """Every candidate must be a weight of the model as transformers loaded it, or the search stops on a KeyError.

    Candidates are named after the checkpoint's tensors, and transformers loads some under other names: it fuses a
    Mixtral layer's experts (`block_sparse_moe.experts.0.w1`, ...) into one 3-D `mlp.experts.gate_up_proj`. Run on
    the matrices chosen for the SNR scan, before it, so that such a model fails in seconds rather than after it.
    """
    params = dict(model.named_parameters())
    missing = [c.module for c in candidates if f"{c.module}.weight" not in params]
    if not missing:
        return
    loaded = {t for name, p in params.items() if p.dim() == 2 and (t := layer_weight_type(name))}
    usable = [t for t in stored_types if t in loaded]
    raise ForgeError(
        f"laser.module_types: {len(missing)} of {len(candidates)} matrices, e.g. {missing[0]}.weight, are not "
        "weights of the model as transformers loads it (it names them differently, e.g. fused MoE experts); "
        f"use module types it stores and loads alike: {', '.join(usable) or 'none'}"
    )


class Scorer:
    """Search perplexity of the current model, reusing unchanged layers through `PrefixCachedLM` when it is exact."""

    def __init__(self, model: Any, ids: torch.Tensor, max_length: int, batch_size: int, prefix_cache: bool = True):
        self.model, self.ids, self.max_length, self.batch_size = model, ids, max_length, batch_size
        self.cached: PrefixCachedLM | None = None
        if prefix_cache and decoder_layers(model) is not None:
            self.cached = PrefixCachedLM(model, tokens_per_pass=ids.numel())
        self.baseline = self._run(self.cached or model)
        if self.cached is not None:
            self.cached.commit()
            if not self._verified():
                self.cached = None

    def _run(self, model: Any) -> PerplexityResult:
        return perplexity_of_ids(
            model, self.ids, max_length=self.max_length, stride=self.max_length, batch_size=self.batch_size
        )

    def _verified(self) -> bool:
        """A pass from the last cached layer must reproduce the full pass exactly, or caching is not used."""
        assert self.cached is not None
        with self.cached.starting_at(len(self.cached.layers) - 1):
            again = self._run(self.cached)
        return again.nll == self.baseline.nll

    def score(self, layer: int) -> PerplexityResult:
        """Perplexity after a change to a matrix of decoder layer `layer` (only layers from there on are run)."""
        if self.cached is None:
            return self._run(self.model)
        with self.cached.starting_at(layer):
            return self._run(self.cached)

    def keep(self) -> None:
        if self.cached is not None:
            self.cached.commit()


def laser_search(
    model: Any,
    search_ids: torch.Tensor,
    candidates: list[MatrixSpectrum],
    settings: LaserConfig,
    on_attempt: Callable[[LaserAttempt, int], None] | None = None,
    prefix_cache: bool = True,
    storage_dtype: torch.dtype | None = None,
) -> LaserResult:
    """Try each candidate in order; keep a change only if search perplexity does not get worse.

    `storage_dtype` is the dtype the model will be saved in (see `low_rank`): the perplexities reported are then
    those of the saved model.
    """
    start = time.perf_counter()
    params = dict(model.named_parameters())
    scorer = Scorer(model, search_ids, settings.max_length, settings.batch_size, prefix_cache)
    current = scorer.baseline
    result = LaserResult(settings.threshold, int(search_ids.numel()), scorer.baseline, current)
    result.prefix_cache = scorer.cached is not None
    tried = 0
    for index, candidate in enumerate(candidates):
        if settings.time_budget_minutes is not None and time.perf_counter() - start > settings.time_budget_minutes * 60:
            result.stopped_by = f"time budget ({settings.time_budget_minutes:g} min) spent"
            break
        began = time.perf_counter()
        param = params[f"{candidate.module}.weight"]
        reduced, rank_before, rank_after = low_rank(param, settings.threshold, storage_dtype)
        attempt = LaserAttempt(
            candidate.module, candidate.layer, candidate.snr, rank_before, rank_after, current.perplexity,
            None, False, "", 0.0,
        )
        if rank_after >= rank_before:
            attempt.reason = "no singular value below threshold"
        else:
            tried += 1
            original = param.detach().clone()
            with torch.no_grad():
                param.copy_(reduced)
            scored = scorer.score(candidate.layer)
            attempt.perplexity_after = scored.perplexity
            if scored.nll <= current.nll:
                attempt.kept, current = True, scored
                scorer.keep()
            else:
                with torch.no_grad():
                    param.copy_(original)
                attempt.reason = "worse"
        attempt.seconds = time.perf_counter() - began
        result.attempts.append(attempt)
        if on_attempt is not None:
            on_attempt(attempt, index)
        # checked after the attempt, so that the change that reaches a limit is labelled by it, even when last
        if len(result.kept) >= settings.max_changes:
            result.stopped_by = f"max_changes ({settings.max_changes}) kept"
            break
        if settings.max_attempts is not None and tried >= settings.max_attempts:
            result.stopped_by = f"max_attempts ({settings.max_attempts}) spent"
            break
    result.final = current
    result.seconds = time.perf_counter() - start
    return result
