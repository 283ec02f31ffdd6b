"""The one exception type for user mistakes.

A `ForgeError` carries a message that is already fit for the user: one line naming the file, line or config
key and what was expected. The CLI prints it without a traceback; anything else is a bug and keeps its traceback.
"""

import json
from pathlib import Path
from typing import Any


class ForgeError(Exception):
    """A user mistake (bad config, missing file, unsupported hardware), reported in one line."""


def missing_file(path: Path) -> str:
    """Why `path` is not a readable file, in words: a folder named by mistake exists, so "not found" would mislead."""
    return "is a folder, not a file" if path.is_dir() else "does not exist"


def read_text_file(path: Path, expected: str) -> str:
    """A text file the user gave us; a file in another encoding is named, with what was expected, in one line.

    utf-8-sig, because files saved by Windows tools start with a byte-order mark that plain utf-8 keeps as text.
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ForgeError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); expected {expected}") from None


def read_json_file(path: Path, expected: str, hint: str = "") -> Any:
    """A JSON file the user gave us; a syntax error is named by file and line (json's own names no file), with
    `hint` after it."""
    try:
        return json.loads(read_text_file(path, expected))
    except json.JSONDecodeError as exc:
        raise ForgeError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}){hint}") from None
