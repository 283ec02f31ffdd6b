"""Which rows go into which micro-batch, and how a micro-batch becomes tensors.

We do not use a `DataLoader` with a sampler: exact resume needs the data position to be a pure function of the
optimizer step, and equivalence between one process and several needs every process to know which rows the
others take. Both are simple with an explicit order:

* epoch `e` visits the rows in `randperm(n, seed + e)` order (the same on every process);
* global micro-batch `k` of an epoch is the slice ``order[k*B*W : (k+1)*B*W]`` (B = micro_batch_size,
  W = world size) and process `r` takes the `r`-th block of B rows of it; with several processes the order is
  padded by wrapping around so that every process gets the same number of micro-batches (as
  `DistributedSampler` does);
* an optimizer step consumes `gradient_accumulation_steps` consecutive micro-batches (the last window of an epoch
  may be shorter).

So 2 processes with G accumulation steps see exactly the rows 1 process sees with 2G steps, in the same windows.

Collation pads a micro-batch to its longest row (or to `sequence_len` with `pad_to_sequence_len`). Padding gets
label -100 and position ids restarting at 0, so the model treats it as a separate packed sample that no real token
attends to; no attention mask is passed (that is what lets transformers build per-sample masks from position ids).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch plus the token counts the loss and the throughput meter need."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    seq_lens: list[list[int]]
    real_tokens: int

    @property
    def trained_tokens(self) -> int:
        """Positions whose next token is trained: the loss's denominator (labels shifted by one)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> MicroBatch:
        return MicroBatch(
            self.input_ids.to(device), self.labels.to(device), self.position_ids.to(device), self.seq_lens,
            self.real_tokens,
        )


def collate(rows: Sequence[Mapping[str, Any]], pad_id: int, pad_to: int | None = None) -> MicroBatch:
    """Stack prepared rows into padded tensors (see the module docstring for how padding is made harmless)."""
    width = max(len(row["input_ids"]) for row in rows)
    if pad_to is not None:
        width = max(width, pad_to)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seq_lens, real = [], 0
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        positions = row.get("position_ids")
        position_ids[i, :n] = torch.as_tensor(positions, dtype=torch.long) if positions is not None else torch.arange(n)
        position_ids[i, n:] = torch.arange(width - n)
        seq_lens.append(list(row.get("seq_lens") or [n]))
        real += n
    return MicroBatch(input_ids, labels, position_ids, seq_lens, real)


@dataclass(frozen=True)
class BatchPlan:
    """The deterministic schedule of rows: see the module docstring."""

    num_rows: int
    micro_batch_size: int
    accumulation_steps: int
    world_size: int
    rank: int
    seed: int

    @property
    def micro_batches_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_rows / (self.micro_batch_size * self.world_size)))

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.micro_batches_per_epoch / self.accumulation_steps))

    @property
    def rows_per_epoch(self) -> int:
        """Rows visited per epoch: all of them, padded by wrapping around with several processes."""
        if self.world_size == 1:
            return self.num_rows
        return self.micro_batches_per_epoch * self.micro_batch_size * self.world_size

    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_rows, generator=generator).tolist()
        if self.world_size > 1:
            order = [order[i % self.num_rows] for i in range(self.rows_per_epoch)]
        return order

    def data_order(self) -> dict[str, int]:
        """What decides the rows of every step, as a checkpoint records it (see `checkpoint.check_same_data_order`)."""
        return {
            "rows": self.num_rows,
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.accumulation_steps,
            "processes": self.world_size,
            "rows_per_epoch": self.rows_per_epoch,
        }

    def window(self, step: int) -> list[list[int]]:
        """Row indices of this process's micro-batches for optimizer step `step` (0-based, counted over epochs)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        first = index * self.accumulation_steps
        last = min(first + self.accumulation_steps, self.micro_batches_per_epoch)
        span = self.micro_batch_size * self.world_size
        window = []
        for k in range(first, last):
            block = order[k * span : (k + 1) * span]
            mine = block[self.rank * self.micro_batch_size : (self.rank + 1) * self.micro_batch_size]
            if mine:
                window.append(mine)
        return window
