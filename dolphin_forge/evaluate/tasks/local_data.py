"""Loaders and scoring helpers for the harness tasks we run from local files (see the YAMLs beside this file).

lm-evaluation-harness fetches its datasets from the Hugging Face hub, which these machines cannot reach. Each YAML
here names one of these loaders as `custom_dataset`; the harness calls it with the task's metadata, which carries
`data_dir` (the folder holding `arc/`, `mmlu/`, `truthfulqa/`, ... as in `../shared/data/eval`), plus the task's
`dataset_kwargs`. Each loader turns the original release files into the field layout of the hub copy the harness'
own task uses, so that the prompts render exactly as in the harness.

Where the local copy lacks the split the harness samples few-shot examples from (ARC, Winogrande and GSM8K have no
train split here), the YAML samples them from the dev or test split instead; the harness never uses a document as
its own example.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import datasets

from dolphin_forge.errors import ForgeError, read_json_file, read_text_file


#: Where each release file lives in the data folder. The loaders open these, and `harness.check_local_data`
#: checks them before any model is loaded, so the two cannot drift apart.
ARC_FILE = "arc/ARC-{subset}-{split}.jsonl"
MMLU_FILE = "mmlu/{split}/{subject}_{split}.csv"
TRUTHFULQA_FILE = "truthfulqa/mc_task.json"
WINOGRANDE_FILE = "winogrande/dev.jsonl"
GSM8K_FILE = "gsm8k_test.jsonl"
IFEVAL_FILE = "ifeval/input_data.jsonl"
ARC_SPLITS = {"test": "Test", "validation": "Dev"}
MMLU_SPLITS = ("test", "dev")


def _root(data_dir: str | None) -> Path:
    if not data_dir:
        raise ValueError("local harness tasks need `data_dir` in the task metadata (eval.data_dir or --data-dir)")
    return Path(data_dir)


#: The fields each release file's rows must hold (`a.b`: b inside object a; `a[].b`: b in every item of list a).
ARC_FIELDS = ("id", "question.stem", "question.choices[].text", "question.choices[].label", "answerKey")
TRUTHFULQA_FIELDS = ("question", "mc1_targets", "mc2_targets")
WINOGRANDE_FIELDS = ("sentence", "option1", "option2", "answer")
GSM8K_FIELDS = ("question", "answer")
IFEVAL_FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")


def _has(value: Any, parts: list[str]) -> bool:
    """Whether `value` holds the field path `parts` (see the `*_FIELDS` notation); null counts as missing, since
    the harness reads a null field no better than an absent one."""
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if head.endswith("[]"):
        items = value.get(head[:-2]) if isinstance(value, dict) else None
        return isinstance(items, list) and all(_has(item, rest) for item in items)
    return isinstance(value, dict) and value.get(head) is not None and _has(value[head], rest)


def _check_row(where: str, row: Any, fields: tuple[str, ...]) -> None:
    """A row without a field the task reads stops the task, named, rather than as a KeyError (or a None scored)
    somewhere inside the harness, after the model has loaded."""
    if not isinstance(row, dict):
        raise ForgeError(f"{where}: expected a JSON object with the fields {', '.join(fields)}")
    missing = [name for name in fields if not _has(row, name.split("."))]
    if missing:
        field_word = "field" if len(missing) == 1 else "fields"
        raise ForgeError(f"{where}: missing {field_word} {', '.join(missing)}; expected {', '.join(fields)}")


def _jsonl(path: Path, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """Every row of a release JSONL file, each holding `fields`. A damaged line stops the task, named: unlike
    training data, a benchmark scored on the rows that happen to parse would be comparable with no one's score."""
    records = []
    for number, line in enumerate(read_text_file(path, "the release's JSON Lines file").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            detail = f"not valid JSON ({exc.msg} at column {exc.colno}); every row of a task's file is scored"
            raise ForgeError(f"{path}:{number}: {detail}") from None
        _check_row(f"{path}:{number}", records[-1], fields)
    return records


def load_arc(data_dir: str | None = None, subset: str = "Challenge", **_: Any) -> datasets.DatasetDict:
    """ARC from the original release JSONL, as `{id, question, choices: {text, label}, answerKey}`."""

    def rows(split: str) -> datasets.Dataset:
        records = _jsonl(_root(data_dir) / ARC_FILE.format(subset=subset, split=split), ARC_FIELDS)
        return datasets.Dataset.from_list(
            [
                {
                    "id": r["id"],
                    "question": r["question"]["stem"],
                    "choices": {
                        "text": [c["text"] for c in r["question"]["choices"]],
                        "label": [c["label"] for c in r["question"]["choices"]],
                    },
                    "answerKey": r["answerKey"],
                }
                for r in records
            ]
        )

    return datasets.DatasetDict({name: rows(split) for name, split in ARC_SPLITS.items()})


def load_mmlu(data_dir: str | None = None, subject: str = "", **_: Any) -> datasets.DatasetDict:
    """One MMLU subject from the headerless release CSVs, as `{question, subject, choices, answer (index)}`."""

    def rows(split: str) -> datasets.Dataset:
        path = _root(data_dir) / MMLU_FILE.format(split=split, subject=subject)
        records = _mmlu_rows(path)
        return datasets.Dataset.from_list(
            [
                {"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(letter.strip())}
                for q, a, b, c, d, letter in records
            ]
        )

    return datasets.DatasetDict({split: rows(split) for split in MMLU_SPLITS})


def _mmlu_rows(path: Path) -> list[list[str]]:
    """A release CSV's rows, each checked: a damaged one stops the task, named, as in `_jsonl`."""
    rows = list(csv.reader(io.StringIO(read_text_file(path, "an MMLU release CSV file"), newline="")))
    for number, row in enumerate(rows, start=1):
        if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
            raise ForgeError(f"{path}: row {number}: expected a question, four choices and an answer letter A-D")
    return rows


def load_truthfulqa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """TruthfulQA multiple choice from `mc_task.json` (answer -> label maps) as `{choices, labels}` lists."""
    path = _root(data_dir) / TRUTHFULQA_FILE
    records = read_json_file(path, "TruthfulQA's mc_task.json", "; expected the release file")
    if not isinstance(records, list):
        raise ForgeError(f"{path}: expected a JSON list of questions (the release file)")
    for number, record in enumerate(records, start=1):  # rows of a JSON list: numbered, as the file has no lines
        _check_row(f"{path}: row {number}", record, TRUTHFULQA_FIELDS)

    def targets(mapping: dict[str, int]) -> dict[str, list]:
        return {"choices": list(mapping), "labels": [int(v) for v in mapping.values()]}

    return datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_list(
                [
                    {
                        "question": r["question"],
                        "mc1_targets": targets(r["mc1_targets"]),
                        "mc2_targets": targets(r["mc2_targets"]),
                    }
                    for r in records
                ]
            )
        }
    )


def load_winogrande(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """WinoGrande dev (`answer` is "1" or "2"; the test labels are not public)."""
    records = _jsonl(_root(data_dir) / WINOGRANDE_FILE, WINOGRANDE_FIELDS)
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(records)})


def load_gsm8k(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """GSM8K test, `{question, answer}` with the answer ending in `#### n`."""
    records = _jsonl(_root(data_dir) / GSM8K_FILE, GSM8K_FIELDS)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def load_ifeval(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """IFEval prompts with their instruction ids and keyword arguments (a single split, as on the hub)."""
    records = _jsonl(_root(data_dir) / IFEVAL_FILE, IFEVAL_FIELDS)
    # Arrow needs one type per field: every kwargs dict gets every key, missing ones as None (as on the hub).
    keys = sorted({k for r in records for kwargs in r["kwargs"] for k in kwargs})
    for r in records:
        r["kwargs"] = [{k: kwargs.get(k) for k in keys} for kwargs in r["kwargs"]]
    return datasets.DatasetDict({"train": datasets.Dataset.from_list(records)})


# --- scoring -------------------------------------------------------------------------------------------------------


def winogrande_context_index(doc: dict[str, Any]) -> int:
    """Partial scoring: the prompt is the correct option substituted into the sentence up to the blank."""
    return int(doc["answer"]) - 1


def winogrande_contexts(doc: dict[str, Any]) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc: dict[str, Any]) -> str:
    """What follows the blank, scored after each candidate context."""
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def truthfulqa_mc2(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """MC2: the normalised probability mass the model puts on the true answers among all answers."""
    log_likelihoods = [ll for ll, _ in results]
    labels = doc["mc2_targets"]["labels"]
    top = max(log_likelihoods)  # shift before exp so long answers do not underflow to 0/0
    true_mass = sum(math.exp(ll - top) for ll, label in zip(log_likelihoods, labels) if label == 1)
    total_mass = sum(math.exp(ll - top) for ll in log_likelihoods)
    return {"acc": true_mass / total_mass}


def ifeval_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """IFEval's rule-based checks are the harness' own (imported lazily: importing them may reach for NLTK data)."""
    from lm_eval.tasks.ifeval.utils import process_results

    return process_results(doc, results)


def ifeval_instruction_accuracy(items: list[list[bool]]) -> float:
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc

    return agg_inst_level_acc(items)
