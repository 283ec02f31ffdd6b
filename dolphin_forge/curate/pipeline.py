"""The streaming, multi-process curation pipeline: sources in, one clean ShareGPT JSONL out.

Flow, in bounded memory:

1. The parent streams each source with `read_records` and sends batches of rows to worker processes. At most
   two batches per worker are in flight (``Pool.imap`` would read the whole input ahead), so memory does not grow
   with the input.
2. A worker normalises each row with `to_conversation`, runs the row filters in order - ``clean``,
   ``function_calling``, ``system_conversations``, ``refusal`` - and, for a row that survives, computes its dedup
   keys (digest and MinHash signature), assigns its system prompt (``system_prompts``) and makes its output line.
   The keys come before the assignment because each row draws its own prompt: identical rows would differ.
3. The parent takes the results back in input order, runs deduplication (which must see rows in order so that
   the first occurrence wins), appends each kept row to its source's shard file and each dropped row, with the
   filter and reason, to ``rejected.jsonl``.
4. `mixing.write_mix` applies the per-source weights and caps and shuffles everything into ``curated.jsonl``;
   ``report.json`` says what happened.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolphin_forge.config import CurateConfig, CurateSource, ForgeConfig, resolve_path, slug
from dolphin_forge.curate.cleaning import Cleaner
from dolphin_forge.curate.dedup import DedupKeys, Deduplicator, RowKeys
from dolphin_forge.curate.filters import Edits, Rejection, RowFilter
from dolphin_forge.curate.function_calling import FunctionCallChecker
from dolphin_forge.curate.mixing import Shard, write_mix
from dolphin_forge.curate.refusal import RefusalFilter, phrase_list
from dolphin_forge.curate.report import CurateReport, SourceCounts
from dolphin_forge.curate.rows import original_id, sharegpt_row, to_json_line
from dolphin_forge.curate.system_prompts import (
    SystemConversationCheck,
    SystemPromptAssigner,
    WeightedPrompts,
    load_prompt_file,
)
from dolphin_forge.data.conversation import Conversation
from dolphin_forge.data.formats import Record, RowProblem, read_records, to_conversation
from dolphin_forge.errors import ForgeError

OUTPUT_NAME, REJECTED_NAME, REPORT_NAME = "curated.jsonl", "rejected.jsonl", "report.json"
SAMPLE_CHARS = 400
POOL_MIN_BYTES = 32 * 2**20


@dataclass
class FilterSetup:
    """Everything a worker needs to build the row filters, resolved (files read) in the parent."""

    config: CurateConfig
    sources: list[CurateSource]
    names: list[str]
    phrases: list[str]
    default_prompts: WeightedPrompts | None
    source_prompts: dict[str, WeightedPrompts]
    seed: int


@dataclass
class RowOutcome:
    source: int
    ref: str
    row_id: str
    rejection: Rejection | None = None
    line: str | None = None  # the ShareGPT JSON line (of the kept row, or of the rejected conversation)
    keys: RowKeys | None = None
    conversation: Conversation | None = None  # the kept conversation (before prompt assignment), until keyed
    sample_text: str = ""
    edits: Edits = field(default_factory=Edits)


class RowProcessor:
    """Normalises a record and runs the row filters (one instance per worker process)."""

    def __init__(self, setup: FilterSetup) -> None:
        cfg = setup.config
        self.setup = setup
        self.filters: list[RowFilter] = []
        if cfg.clean.enabled:
            self.filters.append(Cleaner(cfg.clean))
        if cfg.function_calling.enabled:
            self.filters.append(FunctionCallChecker(cfg.function_calling))
        if cfg.system_prompts.system_conversations != "off":
            self.filters.append(SystemConversationCheck(cfg.system_prompts.system_conversations))
        if cfg.refusal.enabled:
            self.filters.append(RefusalFilter(cfg.refusal, setup.phrases))
        self.assigner: SystemPromptAssigner | None = None
        if cfg.system_prompts.enabled and setup.default_prompts is not None:
            self.assigner = SystemPromptAssigner(
                cfg.system_prompts, setup.default_prompts, setup.source_prompts, setup.seed
            )
        self.keys = DedupKeys(cfg.dedup) if cfg.dedup.exact or cfg.dedup.near else None

    def __call__(self, source: int, record: Record | RowProblem) -> RowOutcome:
        name = self.setup.names[source]
        if isinstance(record, RowProblem):  # a line the reader could not parse: passed along to keep the order
            row_id = f"{Path(record.source).name}:{record.row}"
            return RowOutcome(source, f"{name}/{row_id}", row_id, Rejection("format", record.reason, record.detail))
        row_id = original_id(record)
        outcome = RowOutcome(source, f"{name}/{row_id}", row_id)
        try:
            conversation = to_conversation(record, self.setup.sources[source])
        except RowProblem as problem:
            outcome.rejection = Rejection("format", problem.reason, problem.detail)
            return outcome
        conversation.meta.update(source=name, id=row_id)
        for row_filter in self.filters:
            result = row_filter(conversation, outcome.edits)
            if isinstance(result, Rejection):
                outcome.rejection = result
                outcome.sample_text = _sample_text(conversation, result)
                break
            conversation = result
        if outcome.rejection is None:
            outcome.conversation = conversation  # keyed without the system prompt it is about to draw
            if self.assigner is not None:
                conversation = self.assigner(conversation, outcome.edits)
        outcome.line = to_json_line(sharegpt_row(conversation, name, row_id, outcome.edits.flags))
        return outcome

    def process_batch(self, batch: list[tuple[int, Record | RowProblem]]) -> list[RowOutcome]:
        """Filter every row, then compute the dedup keys of the survivors in one vectorised pass."""
        outcomes = [self(source, record) for source, record in batch]
        if self.keys is not None:
            kept = [o for o in outcomes if o.conversation is not None]
            for outcome, keys in zip(kept, self.keys([o.conversation for o in kept])):
                outcome.keys = keys
        for outcome in outcomes:
            outcome.conversation = None  # not sent back to the parent: the line holds it
        return outcomes


def _sample_text(conversation: Conversation, rejection: Rejection) -> str:
    messages = conversation.messages
    index = rejection.turn if rejection.turn is not None else len(messages) - 1
    return messages[index].content[:SAMPLE_CHARS] if messages else ""


# --- running the row filters in worker processes ----------------------------------------------------------------

_worker: RowProcessor | None = None


def _start_worker(setup: FilterSetup) -> None:
    global _worker
    _worker = RowProcessor(setup)


def _process_batch(batch: list[tuple[int, Record | RowProblem]]) -> list[RowOutcome]:
    assert _worker is not None
    return _worker.process_batch(batch)


def _batches(
    items: Iterator[tuple[int, Record | RowProblem]], size: int
) -> Iterator[list[tuple[int, Record | RowProblem]]]:
    batch: list[tuple[int, Record | RowProblem]] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_row_filters(
    items: Iterator[tuple[int, Record | RowProblem]], setup: FilterSetup, processes: int, batch_rows: int
) -> Iterator[RowOutcome]:
    """Row outcomes in input order; `processes` > 1 fans the batches out to a pool, at most 2 per worker ahead."""
    batches = _batches(items, batch_rows)
    if processes == 1:
        processor = RowProcessor(setup)
        for batch in batches:
            yield from processor.process_batch(batch)
        return
    with multiprocessing.get_context().Pool(processes, initializer=_start_worker, initargs=(setup,)) as pool:
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(pool.apply_async(_process_batch, (batch,)))
            if len(pending) >= 2 * processes:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# --- the whole stage --------------------------------------------------------------------------------------------


@dataclass
class CurateResult:
    output: Path
    rejected: Path
    report_path: Path
    report: CurateReport


def curate_sources(config: ForgeConfig) -> list[CurateSource]:
    """`curate.sources`, or the top-level `datasets` when none are listed."""
    sources = config.curate.sources or [CurateSource(**d.model_dump()) for d in config.datasets]
    if not sources:
        raise ForgeError("curate.sources: no sources to curate (list them under curate.sources or datasets)")
    return sources


def _source_names(sources: list[CurateSource]) -> list[str]:
    names = [s.name or slug(Path(s.path).name.split(".")[0]) for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ForgeError(f"curate.sources: name {repeated[0]!r} is used twice; give each source a distinct `name`")
    return names


def build_setup(config: ForgeConfig, config_path: Path | None) -> FilterSetup:
    cfg = config.curate
    sources = curate_sources(config)
    names = _source_names(sources)
    phrases = phrase_list(cfg.refusal, config_path) if cfg.refusal.enabled else []
    default_prompts, source_prompts = None, {}
    if cfg.system_prompts.enabled:
        default_prompts = load_prompt_file(cfg.system_prompts.file, config_path, "curate.system_prompts.file")
        for number, (source, name) in enumerate(zip(sources, names)):
            if source.system_prompts:
                key = f"curate.sources.{number}.system_prompts"
                source_prompts[name] = load_prompt_file(source.system_prompts, config_path, key)
    seed = cfg.seed if cfg.seed is not None else config.seed
    return FilterSetup(cfg, sources, names, phrases, default_prompts, source_prompts, seed)


def curate(
    config: ForgeConfig,
    config_path: Path | None = None,
    progress: bool = False,
) -> CurateResult:
    """Run the curation stage of `config` and write curated.jsonl, rejected.jsonl and report.json."""
    started = time.perf_counter()
    cfg = config.curate
    setup = build_setup(config, config_path)
    paths = [resolve_path(s.path, config_path) for s in setup.sources]
    for number, path in enumerate(paths):
        if not path.exists():
            raise ForgeError(f"curate.sources.{number}.path: {path} does not exist")
    out_dir = Path(cfg.output_dir).expanduser()  # relative to the working directory, like Axolotl's output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    shard_dir = out_dir / ".shards"
    shard_dir.mkdir(exist_ok=True)
    report = CurateReport(sources={name: SourceCounts() for name in setup.names})
    dedup = Deduplicator(cfg.dedup)
    shard_paths = [shard_dir / f"{i}-{slug(name)}.jsonl" for i, name in enumerate(setup.names)]
    rejected_path = out_dir / REJECTED_NAME
    ticker = _Ticker(progress)

    with ExitStack() as files, ticker:
        rejected = files.enter_context(rejected_path.open("w", encoding="utf-8"))
        shard_files = [files.enter_context(p.open("w", encoding="utf-8")) for p in shard_paths]

        def reject(source: int, row_id: str, rejection: Rejection, line: str | None, text: str) -> None:
            name = setup.names[source]
            report.reject(name, rejection, {"ref": f"{name}/{row_id}", "detail": rejection.detail, "text": text},
                          cfg.samples)
            rejected.write(_rejected_line(name, row_id, rejection, line))
            ticker.advance(kept=False)

        def records() -> Iterator[tuple[int, Record | RowProblem]]:
            for source, path in enumerate(paths):
                for item in read_records(path, setup.sources[source].split, ds_type=setup.sources[source].ds_type):
                    report.sources[setup.names[source]].read += 1
                    yield source, item

        processes = cfg.processes or _default_processes(paths)
        for outcome in run_row_filters(records(), setup, processes, cfg.batch_rows):
            rejection = outcome.rejection
            if rejection is None and outcome.keys is not None:
                duplicate = dedup.check(outcome.ref, outcome.keys)
                if duplicate is not None:
                    kind, first = duplicate
                    rejection = Rejection("dedup", kind, f"{kind} duplicate of {first}")
            if rejection is not None:
                reject(outcome.source, outcome.row_id, rejection, outcome.line, outcome.sample_text)
                continue
            report.edits.update(outcome.edits.counts)
            shard_files[outcome.source].write(outcome.line or "")
            report.sources[setup.names[outcome.source]].kept += 1
            ticker.advance(kept=True)

    shards = [
        Shard(name, path, report.sources[name].kept, source.weight, source.max_rows)
        for name, path, source in zip(setup.names, shard_paths, setup.sources)
    ]
    output = out_dir / OUTPUT_NAME
    write_mix(shards, output, setup.seed, cfg.shuffle)
    for shard in shards:
        report.sources[shard.name].mixed = shard.target
    shutil.rmtree(shard_dir)

    report.duplicate_clusters = len(dedup.stats.cluster_sizes)
    report.largest_clusters = dedup.stats.cluster_sizes.most_common(10)
    report.seconds = time.perf_counter() - started
    report_path = out_dir / REPORT_NAME
    report.outputs = {"curated": str(output), "rejected": str(rejected_path), "report": str(report_path)}
    report.write(report_path)
    return CurateResult(output, rejected_path, report_path, report)


def _default_processes(paths: list[Path]) -> int:
    """Workers pay off only on inputs big enough to hide the pool's start-up; small inputs run in this process."""
    size = sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    return 1 if size < POOL_MIN_BYTES else min(4, os.cpu_count() or 1)


def _rejected_line(source: str, row_id: str, rejection: Rejection, row_line: str | None) -> str:
    """One ``rejected.jsonl`` line: provenance, filter, reason, and the row as it stood when dropped (if parsed)."""
    entry = json.dumps({"source": source, "id": row_id, "filter": rejection.filter, "reason": rejection.reason,
                        "detail": rejection.detail}, ensure_ascii=False)
    if row_line is None:
        return entry + "\n"
    return f'{entry[:-1]}, "row": {row_line.rstrip()}}}\n'


class _Ticker:
    """A rich progress line (rows read, kept, dropped, rate) when asked for, else nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.kept = self.dropped = 0

    def __enter__(self) -> _Ticker:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                      console=Console(stderr=True))
            self._progress.start()
            self._task = self._progress.add_task("curating")
            self._last = time.perf_counter()
            self._started = self._last
        return self

    def advance(self, kept: bool) -> None:
        if kept:
            self.kept += 1
        else:
            self.dropped += 1
        if self.enabled:
            now = time.perf_counter()
            if now - self._last > 0.2:
                self._last = now
                self._update(now)

    def _update(self, now: float) -> None:
        rows = self.kept + self.dropped
        rate = rows / max(now - self._started, 1e-9)
        self._progress.update(self._task, description=f"curating: {rows} rows, {self.kept} kept, "
                              f"{self.dropped} dropped, {rate:,.0f} rows/s")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._update(time.perf_counter())
            self._progress.stop()
