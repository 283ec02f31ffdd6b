"""Reading dataset files and normalising ShareGPT, OpenAI-messages and Alpaca rows into `Conversation`s.

Reading never stops at a bad row: `read_records` yields either a record or a `RowProblem` naming the file, the
line (JSONL) or row index (JSON array, Parquet, Arrow) and what was wrong, so the caller can count and report it
while every good row is kept. Files are streamed where the format allows (JSONL, gzip JSONL, Parquet batches).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolphin_forge.config import DatasetConfig, role_aliases
from dolphin_forge.data.conversation import (
    Conversation,
    Message,
    format_tool_call,
    format_tool_result,
    format_tools,
)
from dolphin_forge.errors import ForgeError

DATA_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".arrow")


@dataclass
class Record:
    source: str
    row: int  # 1-based line for JSONL, 1-based index otherwise
    data: dict[str, Any]


@dataclass
class RowProblem(Exception):
    """A row that cannot be used; `reason` is a short machine key, `detail` says what was wrong."""

    reason: str
    detail: str
    source: str = ""
    row: int = 0

    def __str__(self) -> str:
        return f"{self.source}:{self.row}: {self.detail}"


# --- files ------------------------------------------------------------------------------------------------------


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (
        path / "dataset_dict.json"
    ).is_file()


def list_data_files(path: Path, data_files: str | list[str] | None = None) -> list[Path]:
    """A file, every data file below a folder (sorted, so the order is reproducible), or the folder's `data_files`."""
    if not path.exists():
        raise ForgeError(f"datasets: path {path} does not exist")
    if data_files is not None:
        return _named_files(path, data_files)
    if path.is_file():
        return [path]
    if _is_hf_dataset_dir(path):
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
    if not files:
        raise ForgeError(f"datasets: folder {path} holds no {', '.join(DATA_SUFFIXES)} files")
    return files


def _named_files(folder: Path, data_files: str | list[str]) -> list[Path]:
    """Axolotl's `data_files`: files inside the dataset folder `path`, read in the order given."""
    if not folder.is_dir():
        raise ForgeError(f"datasets: data_files names files inside path, but path {folder} is not a folder")
    files = [folder / name for name in ([data_files] if isinstance(data_files, str) else data_files)]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        raise ForgeError(f"datasets: data_files {', '.join(missing)} not found")
    return files


def _open_text(path: Path) -> Any:
    """utf-8-sig: files saved by Windows tools start with a byte-order mark that plain utf-8 would keep as text.

    surrogateescape: a byte that is not UTF-8 becomes a lone surrogate rather than a silent U+FFFD that would be
    trained on, so `_checked_record` can find the row holding it and drop just that row, counted.
    """
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="surrogateescape")
    return path.open("r", encoding="utf-8-sig", errors="surrogateescape")


# A surrogate code point is never text. Bytes that are not UTF-8 decode to U+DC80..U+DCFF (surrogateescape), and json
# joins a valid escaped pair into one character, so one left in a parsed string is either such a byte or an unpaired
# `\uD800`-style escape. Both count as invalid UTF-8: neither can be encoded, so neither can be trained on.
_NOT_TEXT = re.compile("[\ud800-\udfff]")


def _may_hold_non_text(raw: str) -> bool:
    """A cheap look at the raw JSON text, so only a rare suspect row pays for `_not_text_at`'s walk: strict encoding
    fails on any surrogate a bad byte decoded to, and JSON can only spell one as a `\\uD...` escape."""
    if "\\ud" in raw or "\\uD" in raw:
        return True
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _not_text_at(value: Any) -> list[str | int] | None:
    """The keys and indexes leading to the first string (or key) holding a surrogate; None when all is text."""
    if isinstance(value, str):
        return [] if _NOT_TEXT.search(value) else None
    if isinstance(value, dict):
        children: Iterator[tuple[str | int, Any]] = ((k, part) for k, item in value.items() for part in (k, item))
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for step, child in children:
        found = _not_text_at(child)
        if found is not None:
            return [step, *found]
    return None


def _checked_record(source: str, row: int, data: dict[str, Any], suspect: bool) -> Record | RowProblem:
    """The row, unless its text is not valid UTF-8: then a problem naming the field, so it is counted and dropped."""
    where = _not_text_at(data) if suspect else None
    if where is None:
        return Record(source, row, data)
    path = "".join(f"[{step!r}]" for step in where)  # repr: a bad key is shown escaped, never as a lone surrogate
    detail = f"field {path} is not valid UTF-8 text (undecodable bytes or an unpaired \\u escape)"
    return RowProblem("invalid_utf8", detail, source, row)


def _looks_like_jsonl(path: Path) -> bool:
    """JSON Lines, unless the file is one JSON document: an array, or a single (pretty-printed) object."""
    if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        return True
    with _open_text(path) as handle:
        first = next((line for line in handle if line.strip()), "")
        if not first or first.lstrip().startswith("["):
            return False
        try:
            json.loads(first)
            return True
        except json.JSONDecodeError:
            handle.seek(0)
        try:
            json.load(handle)
            return False
        except json.JSONDecodeError:
            return True  # JSON Lines with a broken first line: read on, so only that row is lost


def _read_jsonl(path: Path) -> Iterator[Record | RowProblem]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RowProblem("bad_json", f"not valid JSON ({exc.msg} at column {exc.colno})", str(path), number)
                continue
            if not isinstance(data, dict):
                yield RowProblem("bad_json", f"expected a JSON object, got {type(data).__name__}", str(path), number)
                continue
            yield _checked_record(str(path), number, data, _may_hold_non_text(line))


def _load_json_document(path: Path) -> tuple[Any, bool]:
    """The parsed document and whether its text may hold non-text; the raw text is not kept while rows are read."""
    with _open_text(path) as handle:
        text = handle.read()
    try:
        return json.loads(text), _may_hold_non_text(text)
    except json.JSONDecodeError as exc:
        raise ForgeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); no row of this file can be read")


def _read_json_array(path: Path) -> Iterator[Record | RowProblem]:
    data, suspect = _load_json_document(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ForgeError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for index, item in enumerate(data, start=1):
        if isinstance(item, dict):
            yield _checked_record(str(path), index, item, suspect)
        else:
            yield RowProblem("bad_json", f"expected a JSON object, got {type(item).__name__}", str(path), index)


def _read_parquet(path: Path) -> Iterator[Record | RowProblem]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for item in batch.to_pylist():
            index += 1
            yield Record(str(path), index, item)


def _read_hf_dataset(path: Path, split: str | None) -> Iterator[Record | RowProblem]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        name = split or ("train" if "train" in dataset else next(iter(dataset)))
        if name not in dataset:
            raise ForgeError(f"datasets: {path} has no split {name!r} (it has {', '.join(dataset)})")
        dataset = dataset[name]
    for index, item in enumerate(dataset, start=1):
        yield Record(str(path), index, item)


def read_records(
    path: Path, split: str | None = None, data_files: str | list[str] | None = None, ds_type: str | None = None
) -> Iterator[Record | RowProblem]:
    """Every row of a file, folder or saved HF dataset, as records or problems, in a stable order.

    Each file is read by its name's suffix, or as `ds_type` (Axolotl's key) says when given, so a JSON Lines file
    named ``.txt`` or a parquet file without a suffix can be named in `data_files` and read.
    """
    for file in list_data_files(path, data_files):
        yield from _unless_broken(file, _read_file(file, split, ds_type))


def _read_file(file: Path, split: str | None, ds_type: str | None) -> Iterator[Record | RowProblem]:
    name = file.name.lower()
    kind = ds_type or ("parquet" if name.endswith(".parquet") else "arrow" if name.endswith(".arrow") else "json")
    if file.is_dir():
        yield from _read_hf_dataset(file, split)
    elif kind == "parquet":
        yield from _read_parquet(file)
    elif kind == "arrow":
        from datasets import Dataset

        for index, item in enumerate(Dataset.from_file(str(file)), start=1):
            yield Record(str(file), index, item)
    elif kind == "jsonl" or _looks_like_jsonl(file):
        yield from _read_jsonl(file)
    else:
        yield from _read_json_array(file)


def _unless_broken(file: Path, rows: Iterator[Record | RowProblem]) -> Iterator[Record | RowProblem]:
    """A truncated gzip or a corrupt parquet file costs the rows after the break, not the ones before it or the run."""
    read = 0
    try:
        for item in rows:
            read += 1
            yield item
    except (EOFError, OSError, ValueError) as exc:  # gzip, pyarrow and datasets raise these for damaged files
        detail = f"the file cannot be read past row {read} ({type(exc).__name__}: {exc})"
        yield RowProblem("unreadable_file", detail, str(file), read + 1)


# --- rows into conversations ------------------------------------------------------------------------------------


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise RowProblem("missing_field", f"{what} is missing")
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    raise RowProblem("bad_field", f"{what} should be text, got {type(value).__name__}")


def _role(raw: Any, aliases: dict[str, str]) -> str:
    name = str(raw).strip().lower() if raw is not None else ""
    if name not in aliases:
        raise RowProblem("unknown_role", f"unknown role {raw!r} (known: {', '.join(sorted(set(aliases)))})")
    return aliases[name]


def _messages_from_turns(
    turns: Any, field_name: str, role_key: str, content_key: str, aliases: dict[str, str]
) -> list[Message]:
    if not isinstance(turns, list):
        if turns is None:
            raise RowProblem("missing_field", f"field {field_name!r} is missing")
        raise RowProblem("bad_field", f"field {field_name!r} should be a list of turns")
    messages: list[Message] = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise RowProblem("bad_field", f"turn {number} should be an object")
        role = _role(turn.get(role_key), aliases)
        if role == "assistant" and turn.get("tool_calls"):
            if not isinstance(turn["tool_calls"], list):
                raise RowProblem("bad_field", f"turn {number} field 'tool_calls' should be a list of calls")
            calls = [format_tool_call(c.get("function", c)) for c in turn["tool_calls"] if isinstance(c, dict)]
            prefix = _content(turn.get(content_key) or "", role, f"turn {number} {content_key!r}").strip()
            messages.append(Message("assistant", "\n".join(([prefix] if prefix else []) + calls)))
            continue
        content = _content(turn.get(content_key), role, f"turn {number} field {content_key!r}")
        if role == "tool_call":
            messages.append(Message("assistant", format_tool_call(content)))
        elif role == "tool":
            messages.append(Message("tool", format_tool_result(content)))
        else:
            messages.append(Message(role, content))
    return messages


def _content(value: Any, role: str, what: str) -> str:
    """A turn's text. OpenAI's content parts (`[{type: text, text: ...}]`) are joined, as chat templates render them:
    dumped as JSON they would be trained as brackets and keys. A part that is not text (an image) cannot be trained
    here, so its row is dropped, counted. A tool's result stays any JSON."""
    parts = role in ("system", "user", "assistant") and isinstance(value, list) and bool(value)
    if not parts or not all(isinstance(part, dict) and "type" in part for part in value):
        return _text(value, what)
    other = next((part["type"] for part in value if part["type"] != "text"), None)
    if other is not None:
        raise RowProblem("bad_field", f"{what} holds a {other!r} part; only text parts can be trained")
    return "".join(_text(part.get("text"), f"{what} text part") for part in value)


def _alpaca(data: dict[str, Any]) -> list[Message]:
    if data.get("instruction") is None or data.get("output") is None:
        missing = "instruction" if data.get("instruction") is None else "output"
        raise RowProblem("missing_field", f"field {missing!r} is missing (alpaca rows need instruction and output)")
    prompt = _text(data["instruction"], "instruction")
    extra = _text(data.get("input") or "", "input")
    if extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    messages = [Message("user", prompt), Message("assistant", _text(data["output"], "output"))]
    system = data.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, Message("system", system))
    return messages


def trained_roles(dataset: DatasetConfig) -> list[str]:
    """The ChatML roles `roles_to_train` names: Axolotl configs use ShareGPT names (`gpt`) and `roles:` names too."""
    aliases = role_aliases(dataset.roles)
    roles = {aliases[str(role).lower()] for role in dataset.roles_to_train or ["assistant"]}
    return sorted("assistant" if role == "tool_call" else role for role in roles)


def to_conversation(record: Record, dataset: DatasetConfig) -> Conversation:
    """Normalise one row; raises RowProblem for a row that cannot become a usable conversation."""
    data = record.data
    try:
        if dataset.type == "alpaca":
            messages = _alpaca(data)
        else:
            aliases = role_aliases(dataset.roles)
            if dataset.type == "sharegpt":
                field_name, role_key, content_key = dataset.field_messages or "conversations", "from", "value"
            else:  # chat_template / openai / messages
                mapping = dataset.message_property_mappings or {}
                field_name = dataset.field_messages or "messages"
                role_key = mapping.get("role") or dataset.message_field_role or "role"
                content_key = mapping.get("content") or dataset.message_field_content or "content"
            if field_name not in data:
                hint = " (looks like alpaca: set type: alpaca)" if "instruction" in data else ""
                raise RowProblem("missing_field", f"field {field_name!r} is missing{hint}")
            messages = _messages_from_turns(data[field_name], field_name, role_key, content_key, aliases)
            tools = _listed_tools(data.get("tools"))
            if tools is not None:
                block = format_tools(tools)
                if messages and messages[0].role == "system":
                    messages[0] = Message("system", f"{messages[0].content}\n\n{block}")
                else:
                    messages.insert(0, Message("system", block))
        messages = _drop_empty_system(messages)
        _check_turns(messages)
    except RowProblem as problem:
        problem.source, problem.row = record.source, record.row
        raise
    except (TypeError, AttributeError, ValueError) as exc:  # a shape no check above foresaw: lose the row, not the run
        raise RowProblem("bad_field", f"unexpected row structure ({exc})", record.source, record.row) from None
    return Conversation(messages=messages, source=record.source, row=record.row)


def _listed_tools(tools: Any) -> Any:
    """A row's tools, or None when it lists none: glaive-style rows write an empty list as the text "[]", which
    would otherwise train an empty <tools> block (109 of the 300 rows of glaive_toolcall_en_demo)."""
    if isinstance(tools, str):
        try:
            return tools if json.loads(tools) else None
        except json.JSONDecodeError:
            return tools if tools.strip() else None  # not JSON: listed as the text it is
    return tools or None


def _drop_empty_system(messages: list[Message]) -> list[Message]:
    """An empty system prompt is common in ShareGPT dumps and harmless: it is removed, not held against the row."""
    return [m for m in messages if not (m.role == "system" and not m.content.strip())]


def _check_turns(messages: list[Message]) -> None:
    if not messages:
        raise RowProblem("empty_conversation", "the conversation has no turns")
    for number, message in enumerate(messages, start=1):
        if not message.content.strip():
            raise RowProblem("empty_turn", f"turn {number} ({message.role}) is empty")
