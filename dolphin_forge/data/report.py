"""What a person reads after `validate` and `preprocess`: the resolved config, the data report, coloured examples."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dolphin_forge.config import LoadedConfig
from dolphin_forge.data.chatml import IGNORE


def print_report(report: dict[str, Any], console: Console) -> None:
    table = Table(title="preprocess report", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("rows read", f"{report['rows_read']:,}")
    table.add_row("rows kept", f"{report['rows_kept']:,}")
    for reason, count in report["rows_dropped"].items():
        table.add_row(f"  dropped: {reason}", f"{count:,}")
    if report["rows_truncated"]:
        table.add_row("rows truncated", f"{report['rows_truncated']:,}")
    table.add_row("train / val samples", f"{report['train_samples']:,} / {report['val_samples']:,}")
    table.add_row("total tokens", f"{report['total_tokens']:,}")
    table.add_row("trainable tokens", f"{report['trainable_tokens']:,}")
    table.add_row("train rows" + (" (packed)" if report["sample_packing"] else ""), f"{report['train_rows']:,}")
    table.add_row("packing efficiency", f"{report['packing_efficiency']:.4f}")
    table.add_row("seconds", f"{report['seconds']:.2f}")
    console.print(table)
    for reason, examples in report["dropped_examples"].items():
        for example in examples:
            console.print(f"[dim]{reason}:[/] {example}", highlight=False)
        more = report["rows_dropped"].get(reason, 0) - len(examples)
        if more > 0:
            kept = len(examples)
            console.print(f"[dim]{reason}: ... and {more:,} more (only the first {kept} are kept as examples)[/]")


def print_debug_examples(prepared: Any, tokenizer: Any, count: int, console: Console) -> None:
    """Show rows token by token: trained tokens green, untrained ones dim, sample boundaries marked."""
    for index in range(min(count, len(prepared.train))):
        row = prepared.train[index]
        text = Text()
        for token, label, position in zip(row["input_ids"], row["labels"], row["position_ids"], strict=True):
            if position == 0 and text:
                text.append("\n── next sample ──\n", style="bold magenta")
            piece = tokenizer.decode([token])
            text.append(piece, style="bold green" if label != IGNORE else "dim")
        console.rule(f"row {index}: {len(row['input_ids'])} tokens, samples {row['seq_lens']}")
        console.print(text)
    console.print("[bold green]green[/] = trained (has a label), [dim]dim[/] = context only")


def print_resolved_config(loaded: LoadedConfig, console: Console, train_rows: int | None = None) -> list[str]:
    """Print the config, derived values and missing paths; returns the missing paths so `validate` can fail on them."""
    config = loaded.config
    console.print_json(json.dumps(config.model_dump(mode="json", exclude_none=True)))
    table = Table(title="derived values", show_header=False)
    table.add_row("total batch size (1 process)", str(config.total_batch_size()))
    table.add_row(
        "steps per epoch",
        str(config.steps_per_epoch(train_rows)) if train_rows else "known after `preprocess` (needs the row count)",
    )
    console.print(table)
    missing = config.missing_paths(loaded.path)
    for problem in missing:
        console.print(f"[yellow]not found:[/] {escape(problem)}")
    return missing
