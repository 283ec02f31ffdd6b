"""The curation report: what each filter dropped and why, per-source counts, duplicate clusters, samples.

Written as ``report.json`` next to the output and printed as rich tables; the samples of rejected rows (a few per
filter, with the offending turn) are there so that a person can check that the filters drop what they should.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dolphin_forge.curate.filters import Rejection

TABLE_TEXT_CHARS = 240


@dataclass
class SourceCounts:
    read: int = 0
    kept: int = 0
    rejected: int = 0
    mixed: int = 0


@dataclass
class CurateReport:
    sources: dict[str, SourceCounts] = field(default_factory=dict)
    dropped: dict[str, Counter[str]] = field(default_factory=dict)  # filter -> reason -> rows
    edits: Counter[str] = field(default_factory=Counter)
    duplicate_clusters: int = 0
    largest_clusters: list[tuple[str, int]] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows_read(self) -> int:
        return sum(s.read for s in self.sources.values())

    @property
    def rows_kept(self) -> int:
        return sum(s.kept for s in self.sources.values())

    @property
    def rows_written(self) -> int:
        return sum(s.mixed for s in self.sources.values())

    def dropped_by(self, filter_name: str) -> int:
        return sum(self.dropped.get(filter_name, {}).values())

    def reject(self, source: str, rejection: Rejection, sample: dict[str, Any] | None, max_samples: int) -> None:
        self.sources[source].rejected += 1
        self.dropped.setdefault(rejection.filter, Counter())[rejection.reason] += 1
        kept_samples = self.samples.setdefault(rejection.filter, [])
        if sample is not None and len(kept_samples) < max_samples:
            kept_samples.append(sample)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": {"read": self.rows_read, "kept": self.rows_kept, "written": self.rows_written},
            "sources": {name: asdict(counts) for name, counts in self.sources.items()},
            "filters": {
                name: {"dropped": sum(reasons.values()), "reasons": dict(reasons)}
                for name, reasons in self.dropped.items()
            },
            "edits": dict(self.edits),
            "dedup": {
                "clusters": self.duplicate_clusters,
                "largest_clusters": [{"kept": ref, "duplicates": n} for ref, n in self.largest_clusters],
            },
            "samples": self.samples,
            "outputs": self.outputs,
            "seconds": round(self.seconds, 3),
            "rows_per_second": round(self.rows_read / self.seconds, 1) if self.seconds else None,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def top_reasons(self, count: int = 3) -> list[tuple[str, int]]:
        """The most frequent `filter: reason` pairs over all filters, most rows first."""
        pairs = Counter({f"{name}: {reason}": rows for name, reasons in self.dropped.items()
                         for reason, rows in reasons.items()})
        return pairs.most_common(count)


def empty_output_error(report: CurateReport, report_path: Path) -> str | None:
    """Why a run that wrote no row failed, in one line, or None if it wrote one.

    An empty curated.jsonl with exit status 0 would let a script go on to preprocess and train on nothing; the
    report is written first, so the message points at it for the per-filter reasons and samples. Rows can be lost
    three ways: none read, all rejected, or kept rows that the mix (`weight`, `max_rows`) rounds down to none.
    """
    if report.rows_written > 0:
        return None
    if report.rows_read == 0:
        return f"curate: the sources hold no rows, so nothing was written; see {report_path}"
    if report.rows_kept > 0:
        return (f"curate: {report.rows_kept} rows were kept but the mix wrote none (a source's weight or max_rows "
                f"rounds its share down to 0); see {report_path}")
    reasons = ", ".join(f"{reason} ({rows})" for reason, rows in report.top_reasons())
    return f"curate: every one of {report.rows_read} rows was rejected (most often {reasons}); see {report_path}"


def print_report(
    report: CurateReport, console: Console, show_samples: bool = True, samples_per_filter: int = 5
) -> None:
    sources = Table(title="curate: sources")
    for column in ("source", "read", "kept", "rejected", "written"):
        sources.add_column(column, justify="left" if column == "source" else "right")
    for name, counts in report.sources.items():
        sources.add_row(name, str(counts.read), str(counts.kept), str(counts.rejected), str(counts.mixed))
    sources.add_row("[bold]total", str(report.rows_read), str(report.rows_kept),
                    str(report.rows_read - report.rows_kept), str(report.rows_written))
    console.print(sources)

    filters = Table(title="curate: rows dropped per filter")
    filters.add_column("filter")
    filters.add_column("dropped", justify="right")
    filters.add_column("reasons")
    for name, reasons in report.dropped.items():
        filters.add_row(name, str(sum(reasons.values())), ", ".join(f"{r} {n}" for r, n in reasons.most_common()))
    console.print(filters)
    if report.edits:
        edits = Table(title="curate: changes made to kept rows")
        edits.add_column("change")
        edits.add_column("count", justify="right")
        for key, value in sorted(report.edits.items()):
            edits.add_row(key, str(value))
        console.print(edits)
    if report.largest_clusters:
        console.print(f"duplicate clusters: {report.duplicate_clusters}; largest: "
                      + ", ".join(f"{ref} (+{n})" for ref, n in report.largest_clusters[:5]))
    if show_samples:
        for name, samples in report.samples.items():
            if name == "dedup":  # the duplicates' clusters are listed above
                continue
            table = Table(title=f"curate: sample of rows dropped by {name}", show_lines=True)
            table.add_column("row", max_width=36, overflow="fold")
            table.add_column("why", max_width=40)
            table.add_column("offending turn (start)", ratio=1)
            for sample in samples[:samples_per_filter]:
                table.add_row(sample["ref"], sample["detail"], sample["text"][:TABLE_TEXT_CHARS])
            console.print(table)
    console.print(f"{report.rows_read} rows in {report.seconds:.1f} s; outputs: "
                  + ", ".join(f"{k} {v}" for k, v in report.outputs.items()))
