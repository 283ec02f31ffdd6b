"""`preprocess`: datasets in, tokenised, masked, split, packed Arrow out, cached by a hash of every input.

Flow: read each dataset's rows -> normalise to conversations (bad rows counted by reason, good rows kept) ->
ChatML ids and labels -> drop/truncate/raise over-long samples -> seeded shuffle and `val_set_size` split ->
first-fit-decreasing packing -> Arrow (`datasets.save_to_disk`) under
``{dataset_prepared_path}/{hash}/{train,val}`` with ``report.json`` beside it.

The hash covers the dataset files (path, size, mtime), their settings, the tokenizer (vocabulary, added tokens,
template), the sequence length, masking and packing options and this module's format version, so a second run
with the same inputs is a cache hit and any change rebuilds. The folder is written under a temporary name and
renamed, so a crash never leaves a half-written cache that a later run would trust.

Large inputs are encoded by a pool of processes, in chunks; small ones in this process (a pool's start-up costs
more than it saves there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from dolphin_forge.config import DatasetConfig, ForgeConfig, resolve_path
from dolphin_forge.data.chatml import IGNORE, ChatMLEncoder
from dolphin_forge.data.formats import Record, RowProblem, list_data_files, read_records, to_conversation, trained_roles
from dolphin_forge.data.packing import PackedRows, pack_sequences, packing_efficiency
from dolphin_forge.errors import ForgeError

# 2: ChatML markers always special when encoding contents; rows_truncated counts kept rows. 3: no <tools> block for
# rows whose tools are an empty list written as text ("[]")
FORMAT_VERSION = 3
CHUNK_ROWS = 4096
POOL_MIN_BYTES = 64 << 20
EXAMPLES_PER_REASON = 5


@dataclass
class PreparedData:
    path: Path
    train: Any  # datasets.Dataset
    val: Any | None
    report: dict[str, Any]
    cached: bool = False


@dataclass
class _Tally:
    """Counts for the report: what was read, kept and dropped (with the first few examples of each reason)."""

    rows_read: int = 0
    rows_kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < EXAMPLES_PER_REASON:
            bucket.append(where)


# --- cache key --------------------------------------------------------------------------------------------------


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _tokenizer_fingerprint(config: ForgeConfig, config_path: Path | None) -> str:
    """Hash the tokenizer's files and the config's token settings, without loading the tokenizer (slow)."""
    from dolphin_forge.models.load import tokenizer_folder

    folder = Path(tokenizer_folder(config, config_path)[0])
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    settings = [config.special_tokens.model_dump(), config.tokens, config.chat_template]
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def _dataset_paths(config: ForgeConfig, config_path: Path | None) -> list[Path]:
    return [resolve_path(d.path, config_path) for d in config.datasets]


def _dataset_files(config: ForgeConfig, config_path: Path | None) -> list[tuple[DatasetConfig, Path]]:
    """Every input file with the dataset entry it belongs to."""
    paths = _dataset_paths(config, config_path)
    return [(d, f) for d, path in zip(config.datasets, paths, strict=True) for f in list_data_files(path, d.data_files)]


def cache_key(config: ForgeConfig, config_path: Path | None) -> str:
    files = []
    for dataset, file in _dataset_files(config, config_path):
        stat = file.stat()
        files.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns, dataset.model_dump(mode="json")])
    inputs = {
        "version": FORMAT_VERSION,
        "files": files,
        "tokenizer": _tokenizer_fingerprint(config, config_path),
        "sequence_len": config.sequence_len,
        "train_on_inputs": config.train_on_inputs,
        "excess_length_strategy": config.excess_length_strategy,
        "sample_packing": config.sample_packing,
        "eval_sample_packing": config.eval_sample_packing,
        "val_set_size": config.val_set_size,
        "shuffle": config.shuffle_merged_datasets,
        "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def prepared_root(config: ForgeConfig) -> Path:
    return Path(config.dataset_prepared_path or "last_run_prepared").expanduser()


# --- encoding ---------------------------------------------------------------------------------------------------


def _encoder_for(tokenizer: Any, config: ForgeConfig, dataset: DatasetConfig) -> ChatMLEncoder:
    return ChatMLEncoder(
        tokenizer,
        train_on_inputs=config.train_on_inputs,
        roles_to_train=trained_roles(dataset),
        train_on_eos=dataset.train_on_eos or "turn",
    )


@dataclass
class _Samples:
    """Encoded samples back to back in flat int32 arrays (4 bytes a token, not a Python int each)."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    @classmethod
    def join(cls, parts: list[_Samples]) -> _Samples:
        if not parts:
            empty = np.zeros(0, dtype=np.int32)
            return cls(empty, empty, np.zeros(0, dtype=np.int64))
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("input_ids", "labels", "lengths")))

    def select(self, indices: np.ndarray) -> _Samples:
        """The given samples, in the given order (one vectorised gather)."""
        starts = np.concatenate([[0], np.cumsum(self.lengths)])[:-1][indices]
        lengths = self.lengths[indices]
        within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        gather = np.repeat(starts, lengths) + within
        return _Samples(self.input_ids[gather], self.labels[gather], lengths)


@dataclass
class _ChunkResult:
    samples: _Samples
    problems: list[tuple[str, str]]  # (reason, where)
    truncated: int


def _encode_chunk(
    encoder: ChatMLEncoder, dataset: DatasetConfig, items: list[Record | RowProblem], config: ForgeConfig
) -> _ChunkResult:
    conversations, problems = [], []
    for item in items:
        if isinstance(item, RowProblem):
            problems.append((item.reason, f"{item}"))
            continue
        try:
            conversations.append(to_conversation(item, dataset))
        except RowProblem as problem:
            problems.append((problem.reason, f"{problem}"))
    kept, truncated = [], 0
    for conversation, sample in zip(conversations, encoder.encode(conversations), strict=True):
        where = f"{conversation.source}:{conversation.row}"
        too_long = len(sample.input_ids) > config.sequence_len
        if too_long:
            if config.excess_length_strategy == "raise":
                raise ForgeError(
                    f"{where}: {len(sample.input_ids)} tokens exceed sequence_len {config.sequence_len} "
                    "(excess_length_strategy: raise)"
                )
            if config.excess_length_strategy == "drop":
                problems.append(("too_long", f"{where}: {len(sample.input_ids)} tokens > {config.sequence_len}"))
                continue
            sample.input_ids = sample.input_ids[: config.sequence_len]
            sample.labels = sample.labels[: config.sequence_len]
        if sample.trainable == 0:
            problems.append(("no_trainable_tokens", f"{where}: no token of this row is trained"))
            continue
        truncated += too_long  # only rows that are kept count as truncated
        kept.append(sample)
    lengths = np.fromiter((len(s.input_ids) for s in kept), dtype=np.int64, count=len(kept))
    total = int(lengths.sum())
    ids = np.fromiter((t for s in kept for t in s.input_ids), dtype=np.int32, count=total)
    labels = np.fromiter((t for s in kept for t in s.labels), dtype=np.int32, count=total)
    return _ChunkResult(_Samples(ids, labels, lengths), problems, truncated)


_WORKER: dict[str, Any] = {}


def _worker_init(tokenizer: Any, config: ForgeConfig) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"], _WORKER["config"], _WORKER["encoders"] = tokenizer, config, {}


def _worker_encode(index: int, items: list[Record | RowProblem]) -> _ChunkResult:
    config: ForgeConfig = _WORKER["config"]
    dataset = config.datasets[index]
    encoders = _WORKER["encoders"]
    if index not in encoders:
        encoders[index] = _encoder_for(_WORKER["tokenizer"], config, dataset)
    return _encode_chunk(encoders[index], dataset, items, config)


def _chunks(iterable: Iterator[Record | RowProblem], size: int) -> Iterator[list[Record | RowProblem]]:
    while chunk := list(islice(iterable, size)):
        yield chunk


def _count_rows(files: list[Path]) -> int | None:
    """A cheap row estimate for the progress bar (JSONL line count); None when unknown."""
    total = 0
    for file in files:
        if not file.name.endswith(".jsonl"):
            return None
        with file.open("rb") as handle:
            total += sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return total


def _input_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size if f.is_file() else 0 for f in files)


def _encode_all(
    config: ForgeConfig, config_path: Path | None, tokenizer: Any, processes: int, progress: Any, files: list[Path]
) -> tuple[_Samples, _Tally]:
    tally = _Tally()
    parts: list[_Samples] = []
    paths = _dataset_paths(config, config_path)
    task = progress.add_task("tokenising", total=_count_rows(files)) if progress else None

    def absorb(result: _ChunkResult, rows: int) -> None:
        tally.rows_read += rows
        parts.append(result.samples)
        tally.truncated += result.truncated
        for reason, where in result.problems:
            tally.drop(reason, where)
        if progress:
            progress.advance(task, rows)

    pool = (
        ProcessPoolExecutor(processes, initializer=_worker_init, initargs=(tokenizer, config))
        if processes > 1
        else None
    )
    try:
        for index, (dataset, path) in enumerate(zip(config.datasets, paths, strict=True)):
            records = read_records(path, dataset.split, dataset.data_files, dataset.ds_type)
            if pool is None:
                encoder = _encoder_for(tokenizer, config, dataset)
                for chunk in _chunks(records, CHUNK_ROWS):
                    absorb(_encode_chunk(encoder, dataset, chunk, config), len(chunk))
                continue
            pending = []
            for chunk in _chunks(records, CHUNK_ROWS):
                pending.append((pool.submit(_worker_encode, index, chunk), len(chunk)))
                if len(pending) >= 2 * processes:
                    future, rows = pending.pop(0)
                    absorb(future.result(), rows)
            for future, rows in pending:
                absorb(future.result(), rows)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    samples = _Samples.join(parts)
    tally.rows_kept = int(samples.lengths.size)
    return samples, tally


# --- split, pack, write -----------------------------------------------------------------------------------------


def _split(n: int, config: ForgeConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(n) if config.shuffle_merged_datasets else np.arange(n)
    size = config.val_set_size
    n_val = int(size) if size >= 1 else int(np.ceil(size * n)) if size > 0 else 0
    if n_val >= n and n > 0:
        raise ForgeError(f"val_set_size: {size} leaves no training rows out of {n}")
    return order[n_val:], order[:n_val]


def _to_dataset(packed: PackedRows) -> Any:
    import pyarrow as pa
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()

    offsets = pa.array(packed.offsets.astype(np.int64))
    seq_offsets = pa.array(packed.seq_offsets.astype(np.int64))
    table = pa.table(
        {
            "input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(packed.input_ids)),
            "labels": pa.LargeListArray.from_arrays(offsets, pa.array(packed.labels)),
            "position_ids": pa.LargeListArray.from_arrays(offsets, pa.array(packed.position_ids)),
            "seq_lens": pa.LargeListArray.from_arrays(seq_offsets, pa.array(packed.seq_lens)),
        }
    )
    return Dataset(table)


def _pack(samples: _Samples, indices: np.ndarray, capacity: int | None) -> PackedRows:
    chosen = samples.select(indices)
    return pack_sequences(chosen.input_ids, chosen.labels, chosen.lengths, capacity)


def _load_cached(folder: Path) -> PreparedData:
    from datasets import load_from_disk

    report = json.loads((folder / "report.json").read_text())
    val = load_from_disk(str(folder / "val")) if (folder / "val").is_dir() else None
    return PreparedData(folder, load_from_disk(str(folder / "train")), val, report, cached=True)


def _no_rows_message(tally: _Tally, files: list[Path]) -> str:
    """Why nothing is left, with a row of the commonest reason in its own words: the counts alone hide the fix (e.g.
    the hint `set type: alpaca` for rows without `conversations`), and empty files name themselves."""
    if not tally.rows_read:
        named = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
        return f"datasets: no rows in {named}; expected JSON or JSONL rows"
    reasons = tally.dropped.most_common()
    counts = ", ".join(f"{reason} {count}" for reason, count in reasons)
    example = (tally.examples.get(reasons[0][0]) or [None])[0] if reasons else None
    return f"datasets: none of the {tally.rows_read} rows read is usable (dropped: {counts})" + (
        f"; e.g. {example}" if example else ""
    )


def preprocess(
    config: ForgeConfig,
    config_path: Path | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    tokenizer: Any = None,
    processes: int | None = None,
) -> PreparedData:
    """Prepare (or load from cache) the training and validation rows of `config`."""
    if not config.datasets:
        raise ForgeError("datasets: the config lists no datasets to preprocess")
    folder = prepared_root(config) / cache_key(config, config_path)
    if (folder / "report.json").is_file() and not force:
        return _load_cached(folder)
    if tokenizer is None:
        from dolphin_forge.models.load import load_tokenizer

        tokenizer = load_tokenizer(config, config_path)

    started = time.perf_counter()
    processes = processes or config.dataset_processes or (os.cpu_count() or 1)
    with _progress(progress) as bar:
        files = [file for _, file in _dataset_files(config, config_path)]  # listed once: folders may be big
        use_pool = processes > 1 and _input_bytes(files) >= POOL_MIN_BYTES
        samples, tally = _encode_all(config, config_path, tokenizer, processes if use_pool else 1, bar, files)
    if not samples.lengths.size:
        raise ForgeError(_no_rows_message(tally, files))
    train_idx, val_idx = _split(int(samples.lengths.size), config)
    capacity = config.sequence_len if config.sample_packing else None
    eval_packing = config.sample_packing if config.eval_sample_packing is None else config.eval_sample_packing
    train = _pack(samples, train_idx, capacity)
    val = _pack(samples, val_idx, config.sequence_len if eval_packing else None) if len(val_idx) else None

    report = _report(config, tally, train, val, time.perf_counter() - started)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _to_dataset(train).save_to_disk(str(tmp / "train"))
        if val is not None:
            _to_dataset(val).save_to_disk(str(tmp / "val"))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = _load_cached(folder)
    prepared.cached = False
    return prepared


def cached_report(config: ForgeConfig, config_path: Path | None) -> dict[str, Any] | None:
    """The report of an existing prepared cache for this config, or None.

    Read-only and never fails, because `validate` calls it: with the default model not converted yet there can be
    no cache for it, so it is not fetched (that may pip-install); unreadable inputs or a damaged report mean None.
    """
    from dolphin_forge.models.default import DEFAULT_MODEL, default_model_ready

    if (config.tokenizer_config or config.base_model) == DEFAULT_MODEL and not default_model_ready():
        return None
    try:
        report = prepared_root(config) / cache_key(config, config_path) / "report.json"
        return json.loads(report.read_text()) if report.is_file() else None
    except (ForgeError, OSError, ValueError):
        return None


def _report(
    config: ForgeConfig, tally: _Tally, train: PackedRows, val: PackedRows | None, seconds: float
) -> dict[str, Any]:
    trainable = int((train.labels != IGNORE).sum()) + (int((val.labels != IGNORE).sum()) if val else 0)
    total = train.num_tokens + (val.num_tokens if val else 0)
    return {
        "rows_read": tally.rows_read,
        "rows_kept": tally.rows_kept,
        "rows_dropped": dict(sorted(tally.dropped.items())),
        "dropped_examples": tally.examples,
        "rows_truncated": tally.truncated,
        "train_samples": int(train.seq_lens.size),
        "val_samples": int(val.seq_lens.size) if val else 0,
        "total_tokens": total,
        "trainable_tokens": trainable,
        "train_rows": train.num_rows,
        "val_rows": val.num_rows if val else 0,
        "sequence_len": config.sequence_len,
        "sample_packing": config.sample_packing,
        "packing_efficiency": round(packing_efficiency(train, config.sequence_len), 6),
        "seconds": round(seconds, 3),
    }


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _progress(enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
    )
