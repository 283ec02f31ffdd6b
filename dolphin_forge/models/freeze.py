"""Selective fine-tuning: `unfrozen_parameters` with Axolotl's matching rules.

Spectrum-style configs (dolphin-2.9.3-mistral-nemo-12b) train only the parameters named by a list of patterns and
freeze everything else. The list must mean here exactly what it means in Axolotl, because the seed configs were
written for it:

* each pattern is a regular expression matched with `re.match`, i.e. anchored at the start of the parameter name
  but not at the end (``model.layers.1.mlp`` matches ``model.layers.1.mlp.up_proj.weight``);
* every ``.`` in a pattern is a literal dot (``model.layers.1.`` does not match ``model.layers.10.``);
* a pattern may end in a row range, ``name[start:end]`` or ``name[index]``: only those rows (first dimension) of
  the matched parameters train; the other rows get a zero gradient. An empty range, or one past a matched
  parameter's last row, is an error (as in Axolotl) rather than a silently frozen parameter.

Row ranges also make the embedding rows of newly added special tokens trainable when the embedding matrix itself
is frozen (`unfreeze_rows`). A zero gradient alone does not keep a row still under AdamW, whose decoupled weight
decay shrinks every element of a parameter; `PartialParameter.decay_` applies that decay to the trainable rows only,
and the optimizer gives such parameters a weight decay of zero.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from dolphin_forge.errors import ForgeError

_RANGE = re.compile(r"^(?P<base>.+)\[(?P<start>[0-9]*)(?::(?P<end>[0-9]*))?\]$")

RowRange = tuple[int | None, int | None]


@dataclass(frozen=True)
class UnfrozenPattern:
    """One entry of `unfrozen_parameters`: a start-anchored name regex with literal dots and an optional row range."""

    raw: str
    regex: re.Pattern[str]
    rows: RowRange | None

    @classmethod
    def parse(cls, raw: str) -> UnfrozenPattern:
        base, rows = raw, None
        found = _RANGE.match(raw)
        if found:
            base = found["base"]
            start, end = found["start"], found["end"]
            if end is None:  # `name[i]` is row i; `name[]` is every row
                rows = (int(start), int(start) + 1) if start else None
            else:
                rows = (int(start) if start else None, int(end) if end else None)
                if rows[1] is not None and rows[1] <= (rows[0] or 0):
                    raise ForgeError(f"unfrozen_parameters: {raw!r}: a row range [start:end] must end after it starts")
        try:
            regex = re.compile(base.replace(".", "\\."))
        except re.error as exc:
            raise ForgeError(f"unfrozen_parameters: {raw!r} is not a valid regular expression ({exc})") from None
        return cls(raw=raw, regex=regex, rows=rows)

    def matches(self, name: str) -> bool:
        return self.regex.match(name) is not None

    def check_rows(self, name: str, length: int) -> None:
        """A range past the parameter's last row would quietly train fewer rows or none: Axolotl refuses it too."""
        if self.rows is None:
            return
        start, end = self.rows
        if (start or 0) >= length or (end is not None and end > length):
            raise ForgeError(
                f"unfrozen_parameters: {self.raw!r} selects rows beyond the end of {name}, which has {length} rows"
            )


def match_unfrozen(
    names: Iterable[str], patterns: list[str], row_counts: Mapping[str, int] | None = None
) -> dict[str, list[RowRange | None]]:
    """Map each parameter name matched by any pattern to the row ranges it unfreezes (None = all rows).

    With `row_counts` (parameter name -> first dimension), row ranges past a matched parameter's end are refused.

    Raises ForgeError when the list matches no name at all; patterns that match nothing by themselves are fine
    (a config written for a 40-layer model names layers a smaller model lacks) and are reported by
    `unmatched_patterns`.
    """
    parsed = [UnfrozenPattern.parse(p) for p in patterns]
    matched: dict[str, list[RowRange | None]] = {}
    for name in names:
        for pattern in parsed:
            if pattern.matches(name):
                if row_counts is not None:
                    pattern.check_rows(name, row_counts[name])
                matched.setdefault(name, []).append(pattern.rows)
    if patterns and not matched:
        shown = ", ".join(repr(p) for p in patterns[:3]) + (" ..." if len(patterns) > 3 else "")
        raise ForgeError(
            f"unfrozen_parameters: no parameter name matches any of the {len(patterns)} patterns ({shown}); "
            "patterns are regexes anchored at the start of names like 'model.layers.0.mlp.up_proj.weight'"
        )
    return matched


def unmatched_patterns(names: Iterable[str], patterns: list[str]) -> list[str]:
    """The patterns that match no parameter name."""
    names = list(names)
    parsed = [UnfrozenPattern.parse(p) for p in patterns]
    return [p.raw for p in parsed if not any(p.matches(n) for n in names)]


def _merge_rows(ranges: list[RowRange | None], length: int) -> list[tuple[int, int]]:
    """Union of row ranges as sorted, disjoint, clipped (start, end) pairs; None means every row."""
    spans = []
    for rows in ranges:
        if rows is None:
            return [(0, length)]
        start, end = rows
        start = 0 if start is None else min(start, length)
        end = length if end is None else min(end, length)
        if start < end:
            spans.append((start, end))
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass
class PartialParameter:
    """A parameter of which only some rows train: its gradient is masked and its weight decay applied by row."""

    name: str
    param: torch.nn.Parameter
    rows: list[tuple[int, int]]
    mask: torch.Tensor = field(repr=False)

    @classmethod
    def create(cls, name: str, param: torch.nn.Parameter, rows: list[tuple[int, int]]) -> PartialParameter:
        mask = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
        for start, end in rows:
            mask[start:end] = True
        shape = (-1,) + (1,) * (param.dim() - 1)
        part = cls(name=name, param=param, rows=rows, mask=mask.view(shape))
        param.register_hook(part._mask_grad)
        return part

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask.to(grad.dtype)

    @property
    def trainable(self) -> int:
        per_row = self.param[0].numel() if self.param.dim() > 1 else 1
        return sum(end - start for start, end in self.rows) * per_row

    @torch.no_grad()
    def decay_(self, lr: float, weight_decay: float) -> None:
        """AdamW's decoupled weight decay, on the trainable rows only."""
        if weight_decay:
            for start, end in self.rows:
                self.param[start:end].mul_(1.0 - lr * weight_decay)


@dataclass
class FreezeSummary:
    """What `apply_unfrozen_parameters` did: counts for the table and the partially trained parameters."""

    trainable: int
    frozen: int
    rows: list[dict[str, Any]]
    unmatched: list[str]
    partial: dict[str, PartialParameter]

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def apply_unfrozen_parameters(model: torch.nn.Module, patterns: list[str]) -> FreezeSummary:
    """Freeze every parameter of `model` except those `patterns` select (Axolotl semantics, see module doc)."""
    named = dict(model.named_parameters())
    matched = match_unfrozen(named, patterns, {n: p.shape[0] if p.dim() else 1 for n, p in named.items()})
    partial: dict[str, PartialParameter] = {}
    for name, param in named.items():
        ranges = matched.get(name)
        param.requires_grad_(ranges is not None)
        if ranges is None:
            continue
        rows = _merge_rows(ranges, param.shape[0])
        if rows != [(0, param.shape[0])]:
            partial[name] = PartialParameter.create(name, param, rows)
    return summarize(model, partial, unmatched_patterns(named, patterns))


def unfreeze_rows(model: torch.nn.Module, name: str, start: int, end: int, summary: FreezeSummary) -> FreezeSummary:
    """Make rows [start, end) of parameter `name` trainable (new token embeddings), keeping other rows as they were."""
    param = dict(model.named_parameters())[name]
    if param.requires_grad and name not in summary.partial:
        return summary  # already fully trainable
    partial = dict(summary.partial)
    if name in partial:
        old = partial.pop(name)
        rows = _merge_rows([*old.rows, (start, end)], param.shape[0])
        old.mask.view(-1)[start:end] = True  # the hook registered earlier reads this mask
        partial[name] = PartialParameter(name, param, rows, old.mask)
    else:
        param.requires_grad_(True)
        partial[name] = PartialParameter.create(name, param, [(start, end)])
    return summarize(model, partial, summary.unmatched)


def summarize(model: torch.nn.Module, partial: dict[str, PartialParameter], unmatched: list[str]) -> FreezeSummary:
    """Trainable and frozen counts per top-level group (embeddings, each layer kind, head) for the summary table."""
    groups: dict[str, list[int]] = {}
    trainable = frozen = 0
    for name, param in model.named_parameters():
        n = param.numel()
        t = partial[name].trainable if name in partial else (n if param.requires_grad else 0)
        trainable += t
        frozen += n - t
        key = re.sub(r"\.\d+\.", ".*.", name)
        counts = groups.setdefault(key, [0, 0])
        counts[0] += t
        counts[1] += n - t
    rows = [{"parameter": k, "trainable": v[0], "frozen": v[1]} for k, v in groups.items()]
    return FreezeSummary(trainable=trainable, frozen=frozen, rows=rows, unmatched=unmatched, partial=partial)
