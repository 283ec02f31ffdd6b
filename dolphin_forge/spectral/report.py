"""Rich tables summarising the spectral stages for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dolphin_forge.spectral.scan import SpectrumScan, select_top

if TYPE_CHECKING:
    from dolphin_forge.spectral.laser import LaserResult
    from dolphin_forge.spectral.stages import LaserOutputs


def snr_table(scan: SpectrumScan, top_percent: float, limit: int | None = None) -> Table:
    """Every matrix sorted by SNR, highest first, with whether Spectrum selects it."""
    chosen = {m.module for group in select_top(scan, top_percent).values() for m in group}
    ranked = sorted(scan.matrices, key=lambda m: -m.snr)
    shown = ranked if limit is None else ranked[:limit]
    title = f"Spectrum SNR, {len(ranked)} matrices ({scan.threshold}, {scan.seconds:.1f} s)"
    if len(shown) < len(ranked):
        title += f"; top {len(shown)} shown, all in snr.json"
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("matrix", no_wrap=True)
    for column in ("shape", "SNR", "σ max", "signal rank", "unfrozen"):
        table.add_column(column, justify="right")
    for i, m in enumerate(shown, 1):
        table.add_row(
            str(i), m.module, f"{m.shape[0]}x{m.shape[1]}", f"{m.snr:.4g}", f"{m.sigma_max:.3f}",
            f"{m.signal_rank}/{min(m.shape)}", "yes" if m.module in chosen else "",
        )
    return table


def laser_table(result: LaserResult) -> Table:
    """One row per attempt: module, rank before/after, search perplexity before/after, kept or not."""
    table = Table(title=f"LASER-RMT search ({result.threshold}, {result.search_tokens} search tokens)")
    for column in ("#", "module", "SNR", "rank", "ppl before", "ppl after", "kept", "s"):
        table.add_column(column, justify="left" if column == "module" else "right", no_wrap=column == "module")
    for i, a in enumerate(result.attempts, 1):
        after = "-" if a.perplexity_after is None else f"{a.perplexity_after:.4f}"
        table.add_row(
            str(i), a.module, f"{a.snr:.4f}", f"{a.rank_before}->{a.rank_after}", f"{a.perplexity_before:.4f}",
            after, "yes" if a.kept else a.reason, f"{a.seconds:.1f}",
        )
    return table


def laser_summary(outputs: LaserOutputs) -> Group:
    """Search and held-out perplexity before and after, what was kept, and where the outputs are."""
    result = outputs.result
    table = Table(title=f"LASER-RMT result: {len(result.kept)} of {len(result.attempts)} changes kept")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row(
        f"search perplexity ({result.baseline.tokens} scored tokens)",
        f"{result.baseline.perplexity:.4f}", f"{result.final.perplexity:.4f}",
    )
    if outputs.heldout_before is not None:
        table.add_row(
            f"held-out perplexity ({outputs.heldout_before.tokens} scored tokens)",
            f"{outputs.heldout_before.perplexity:.4f}", f"{outputs.heldout_after.perplexity:.4f}",
        )
    else:
        table.add_row("held-out perplexity", "not measured (heldout_tokens: 0, or eval_file ends there)", "")
    unchanged = "" if result.kept else " (no change kept: the input's weights)"
    lines = [  # below the table, unwrapped: paths stay whole for copying
        f"stopped by {result.stopped_by} after {result.seconds:.1f} s; kept: {', '.join(result.kept) or 'none'}",
        f"model: {outputs.model_dir}{unchanged}",
        f"log: {outputs.log}; plot: {outputs.plot}",
    ]
    return Group(table, *(Text(line, no_wrap=True, overflow="ignore") for line in lines))
