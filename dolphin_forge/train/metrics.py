"""Where training numbers go: `metrics.jsonl`, TensorBoard, W&B (when configured), and the progress bar.

Throughput is reported in two kinds of tokens, labelled as such: *real* tokens (every non-padding token the model
processed) and *trained* tokens (those whose label is not -100). MFU counts the matmul FLOPs of a forward and
backward pass (6 per linear weight per token, plus 12 * layers * hidden per token per token of its own sample for
attention, the PaLM convention) against the matmul peak measured on this device.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dolphin_forge.config import ForgeConfig


def matmul_parameters(model: torch.nn.Module) -> int:
    """Weights that take part in a matmul per token: every `nn.Linear` (the LM head included, embeddings not).

    Counted from the layer's shape, not its weight tensor: a ZeRO-3 partitioned weight holds no elements outside its
    forward, and a 4-bit one packs two values per byte."""
    return sum(
        linear_size(m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".original_module" not in name  # peft's unused copy (modules_to_save)
    )


def linear_size(module: torch.nn.Linear) -> int:
    return module.in_features * module.out_features


def training_flops(model_config: Any, linear_params: int, seq_lens: list[list[int]]) -> float:
    """Forward + backward matmul FLOPs of one micro-batch whose rows hold samples of the given lengths."""
    tokens = sum(sum(row) for row in seq_lens)
    squares = sum(n * n for row in seq_lens for n in row)
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    return 6.0 * linear_params * tokens + 12.0 * layers * hidden * squares


class MetricsSink:
    """Appends one JSON object per event to `metrics.jsonl` and mirrors scalars to TensorBoard and W&B."""

    def __init__(self, output_dir: Path, config: ForgeConfig, enabled: bool, resumed_step: int = 0) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self.warnings: list[str] = []
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step == 0:
            self.path.unlink(missing_ok=True)
        else:  # drop lines a killed run wrote after its last checkpoint
            kept = [line for line in self._lines() if json.loads(line).get("step", 0) <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides events at steps >= purge_step; those at the checkpoint's own step are valid
        purge = resumed_step + 1 if resumed_step else None
        self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=purge)
        if config.wandb_project:
            self._wandb = _start_wandb(config, output_dir, self.warnings)

    def _lines(self) -> list[str]:
        return [line for line in self.path.read_text().splitlines() if line.strip()] if self.path.is_file() else []

    def log(self, kind: str, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(config: ForgeConfig, output_dir: Path, warnings: list[str]) -> Any:
    try:
        import wandb
    except ImportError:
        warnings.append(
            "wandb_project is set but wandb is not installed (`pip install 'dolphin-forge[wandb]'`); not logging to W&B"
        )
        return None
    mode = config.wandb_mode or os.environ.get("WANDB_MODE") or "online"
    return wandb.init(
        project=config.wandb_project,
        entity=config.wandb_entity,
        name=config.wandb_name,
        id=config.wandb_run_id,
        mode=mode,
        dir=str(output_dir),
        config=config.model_dump(mode="json"),
        resume="allow" if config.wandb_run_id else None,
    )


def progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def describe_step(values: dict[str, float]) -> str:
    return (
        f"loss {values['loss']:.4f} lr {values['lr']:.2e} "
        f"tok/s real {values['real_tokens_per_s']:.0f} trained {values['trained_tokens_per_s']:.0f} "
        f"MFU {100 * values['mfu']:.1f}%"
    )
