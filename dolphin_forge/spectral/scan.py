"""Spectrum: rank every layer matrix by its signal-to-noise ratio and pick the top share of each module type.

The public Spectrum tool loads the whole model in fp32 and runs `svdvals` module after module. Here each matrix is
read in blocks from safetensors (`checkpoint`), its singular values come from a float64 Gram matrix accumulated
block by block and one symmetric eigensolve (`snr`). By default one matrix is in flight and every core works inside
its matrix multiply and eigensolve, so peak memory is one block, one Gram matrix and the eigensolver's workspace
whatever the model's size. `workers: N` scans N matrices at once on a thread pool (torch releases the GIL inside
its kernels): faster when matrices are too small to keep every core busy, for N times the per-matrix memory (on
this project's 2-core CPU and SmolLM2-135M, 2 workers take 3.3 s instead of 4.5 s and peak 20-25 MB higher).
The SNR and the top-share selection follow the reference tool exactly: per module type, sort by SNR descending
and keep ``int(count * top_percent / 100)``.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dolphin_forge.spectral.checkpoint import Checkpoint, LayerMatrix
from dolphin_forge.spectral.snr import GRAM_BLOCK, gram, is_tall, singular_values_of_gram, snr_of_spectrum
from dolphin_forge.spectral.thresholds import ThresholdMode, signal_rank


@dataclass(frozen=True)
class MatrixSpectrum:
    """One matrix's scan result."""

    module: str
    module_type: str
    layer: int
    shape: tuple[int, int]
    snr: float
    sigma_max: float
    threshold: float
    signal_rank: int  # singular values above the threshold


@dataclass
class SpectrumScan:
    """Every scanned matrix plus what is needed to write names that exist in this checkpoint."""

    model: str
    threshold: str
    matrices: list[MatrixSpectrum]
    embedding_tensors: list[str] = field(default_factory=list)
    layer_types: list[str] = field(default_factory=list)  # every stored type, scanned or not: for suggestions
    seconds: float = 0.0

    def by_type(self) -> dict[str, list[MatrixSpectrum]]:
        """Matrices grouped by module type (types sorted), each group sorted by SNR, highest first."""
        groups: dict[str, list[MatrixSpectrum]] = {}
        for matrix in self.matrices:
            groups.setdefault(matrix.module_type, []).append(matrix)
        return {t: sorted(groups[t], key=lambda m: -m.snr) for t in sorted(groups)}

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "threshold": self.threshold,
            "seconds": round(self.seconds, 3),
            "embedding_tensors": self.embedding_tensors,
            "matrices": [asdict(m) for m in self.matrices],
        }


@contextmanager
def _threads_per_worker(workers: int) -> Iterator[None]:
    """Split torch's threads (physical cores, or OMP_NUM_THREADS) between concurrent workers: no oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _scan_one(checkpoint: Checkpoint, matrix: LayerMatrix, mode: ThresholdMode, device: torch.device) -> MatrixSpectrum:
    tall = is_tall(matrix.shape)
    blocks = checkpoint.read_blocks(matrix.tensor, GRAM_BLOCK, dim=0 if tall else 1)
    s = singular_values_of_gram(gram(blocks, tall, device))
    snr, threshold = snr_of_spectrum(s, matrix.shape, mode)
    return MatrixSpectrum(
        module=matrix.module,
        module_type=matrix.module_type,
        layer=matrix.layer,
        shape=matrix.shape,
        snr=snr,
        sigma_max=float(s[0]),
        threshold=threshold,
        signal_rank=signal_rank(s, threshold),
    )


def scan_model(
    model_dir: str | Path,
    module_types: list[str],
    mode: ThresholdMode = "marchenko_pastur",
    workers: int = 1,
    layers: list[int] | None = None,
    progress: bool = False,
    section: str = "spectrum",
    key: str = "model",
) -> SpectrumScan:
    """Scan every matching layer matrix of a safetensors model folder, one tensor at a time.

    Error messages name the config section (`spectrum` or `laser`) and the `key` the folder came from.
    """
    checkpoint = Checkpoint(model_dir, key)
    matrices = checkpoint.layer_matrices(module_types, layers, section=section)
    return scan_matrices(checkpoint, matrices, mode, workers, progress)


def scan_matrices(
    checkpoint: Checkpoint,
    matrices: list[LayerMatrix],
    mode: ThresholdMode = "marchenko_pastur",
    workers: int = 1,
    progress: bool = False,
) -> SpectrumScan:
    """Scan matrices already chosen: the stages check their choice first, since a scan can take an hour."""
    start = time.perf_counter()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    workers = 1 if device.type == "cuda" else workers
    results: list[MatrixSpectrum] = []
    bar = Progress(
        TextColumn("spectrum"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
        transient=True,
    )
    with bar, _threads_per_worker(workers), ThreadPoolExecutor(max_workers=workers) as pool:
        task = bar.add_task("scan", total=len(matrices))
        for result in pool.map(lambda mx: _scan_one(checkpoint, mx, mode, device), matrices):
            results.append(result)
            bar.advance(task)
    return SpectrumScan(
        model=str(checkpoint.folder),
        threshold=mode,
        matrices=results,
        embedding_tensors=checkpoint.embedding_tensors(),
        layer_types=checkpoint.layer_types(),
        seconds=time.perf_counter() - start,
    )


def selected_count(total: int, top_percent: float) -> int:
    """How many of a type's `total` matrices are kept: the reference tool's floor, so a small share can keep none."""
    return int(total * top_percent / 100)


def select_top(scan: SpectrumScan, top_percent: float) -> dict[str, list[MatrixSpectrum]]:
    """Per module type, the highest-SNR `top_percent` of its matrices (reference rounding: floor)."""
    return {t: group[: selected_count(len(group), top_percent)] for t, group in scan.by_type().items()}


def write_scan_json(scan: SpectrumScan, path: Path) -> None:
    path.write_text(json.dumps(scan.to_json(), indent=1))
