"""PNG figures a person would rather look at than a table: the SNR heat map and the LASER search trace."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dolphin_forge.plotting import pyplot, save_png
from dolphin_forge.spectral.scan import SpectrumScan, select_top

if TYPE_CHECKING:
    from dolphin_forge.spectral.laser import LaserAttempt


def snr_heatmap(scan: SpectrumScan, top_percent: float, path: Path) -> Path:
    """Layer x module type grid of log10 SNR; the selected (unfrozen) matrices are marked with a dot."""
    types = sorted({m.module_type for m in scan.matrices})
    layers = sorted({m.layer for m in scan.matrices})
    grid = np.full((len(layers), len(types)), np.nan)
    row, col = {l: i for i, l in enumerate(layers)}, {t: j for j, t in enumerate(types)}
    for m in scan.matrices:
        grid[row[m.layer], col[m.module_type]] = math.log10(max(m.snr, 1e-12))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(types) + 2.5, 0.25 * len(layers) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    for group in select_top(scan, top_percent).values():
        for m in group:
            ax.plot(col[m.module_type], row[m.layer], "o", color="white", markersize=3)
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(l) for l in layers], fontsize=7)
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(f"Spectrum SNR ({scan.threshold}); dots: top {top_percent:g}% per type")
    fig.colorbar(image, ax=ax, label="log10 SNR")
    return save_png(fig, path)


def laser_trace(attempts: list[LaserAttempt], baseline: float, path: Path) -> Path:
    """Search perplexity after each attempt: kept changes in green, rejected in red, the kept model as a line.

    The y axis stops at 1.15 x the baseline so that small differences stay visible; attempts that ruined the model
    are drawn as triangles on the top edge.
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.12 * len(attempts) + 4)), 4))
    kept_line = [baseline] + [a.perplexity_after if a.kept else a.perplexity_before for a in attempts]
    ax.step(np.arange(0, len(attempts) + 1), kept_line, where="post", color="black", label="kept model")
    top = 1.15 * baseline
    for kept, color, label in ((True, "tab:green", "kept"), (False, "tab:red", "rejected")):
        points = [(i, a.perplexity_after) for i, a in enumerate(attempts, 1) if a.kept == kept and a.perplexity_after]
        inside = [(x, y) for x, y in points if y <= top]
        above = [x for x, y in points if y > top]
        if inside:
            ax.scatter(*zip(*inside), color=color, s=14, label=label, zorder=3)
        if above:
            ax.scatter(above, [top] * len(above), color=color, marker="^", s=30, zorder=3, clip_on=False)
    ax.set_ylim(top=top)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("attempt")
    ax.set_ylabel("search perplexity")
    ax.set_title("LASER-RMT search")
    ax.legend()
    return save_png(fig, path)
