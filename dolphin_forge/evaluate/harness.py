"""The bridge to lm-evaluation-harness: named suites, local task files, and no drift from the harness itself.

We do not re-implement any benchmark. Every task runs through `lm_eval.simple_evaluate` on an `HFLM` that wraps a
model already in memory (so `train` and `laser` can evaluate without saving first). What we add:

* suites: `leaderboard-v1` (ARC 25-shot, HellaSwag 10-shot, MMLU 5-shot, TruthfulQA-mc2 0-shot, Winogrande 5-shot,
  GSM8K 5-shot, the Open LLM Leaderboard v1) and `leaderboard-v2` (the harness' leaderboard BBH, GPQA, IFEval,
  MATH-hard, MMLU-Pro, MuSR with their own shots);
* local task files (`tasks/*.yaml`) that run ARC, MMLU, TruthfulQA, Winogrande, GSM8K and IFEval from the original
  release files in a data folder, since the dataset hub is unreachable here. With a data folder, a task that has a
  local copy runs from it; a task without one (HellaSwag, the v2 suite) needs the hub and is skipped otherwise;
* one `simple_evaluate` call per task, so each task gets its own shot count and wall time; the calls' results are
  merged into one harness-shaped results dict, which is exactly what the harness would have produced per task.

The harness run directly (`simple_evaluate` with `include_path=TASKS_DIR`, the same metadata, model, batch size and
limit) gives the same numbers to the last digit; `tests/evaluate` checks this on a tiny model.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dolphin_forge.errors import ForgeError, missing_file

TASKS_DIR = Path(__file__).parent / "tasks"

#: Tasks we can run from local files: the name a user writes -> our task in `tasks/`.
LOCAL_TASKS: dict[str, str] = {
    "arc_challenge": "arc_challenge_local",
    "arc_easy": "arc_easy_local",
    "mmlu": "mmlu_local",
    "truthfulqa_mc1": "truthfulqa_mc1_local",
    "truthfulqa_mc2": "truthfulqa_mc2_local",
    "winogrande": "winogrande_local",
    "gsm8k": "gsm8k_local",
    "ifeval": "ifeval_local",
    "leaderboard_ifeval": "ifeval_local",  # the same task under the v2 leaderboard's name (another hub copy)
}

#: One MMLU subject, named as the harness names it (`mmlu_anatomy`); the local subject tasks live in `tasks/mmlu/`.
MMLU_SUBJECTS: tuple[str, ...] = tuple(
    sorted(path.stem.removeprefix("mmlu_local_") for path in (TASKS_DIR / "mmlu").glob("*.yaml"))
)


#: MMLU's categories as the harness groups them (`mmlu_stem`, ...); `tasks/mmlu_local_<category>.yaml`.
MMLU_CATEGORIES: tuple[str, ...] = ("stem", "other", "social_sciences", "humanities")


def _mmlu_category(subject: str) -> str:
    """A subject's category, from the `tag:` of its task file (`mmlu_local_stem_tasks` -> `stem`)."""
    text = (TASKS_DIR / "mmlu" / f"mmlu_local_{subject}.yaml").read_text(encoding="utf-8")
    return re.search(r"^tag: mmlu_local_(\w+)_tasks$", text, re.M).group(1)


def _mmlu_subjects_of(harness_task: str) -> list[str]:
    """The subjects a local MMLU task (the group, a category or one subject) reads."""
    part = harness_task.removeprefix("mmlu_local").removeprefix("_")
    if part in MMLU_SUBJECTS:
        return [part]
    return [subject for subject in MMLU_SUBJECTS if part in ("", _mmlu_category(subject))]


def local_data_files(harness_task: str) -> list[str]:
    """The release files a local task reads, relative to the data folder."""
    from dolphin_forge.evaluate.tasks import local_data as data

    if harness_task.startswith("mmlu_local"):
        subjects = _mmlu_subjects_of(harness_task)
        return [data.MMLU_FILE.format(split=split, subject=s) for s in subjects for split in data.MMLU_SPLITS]
    if harness_task.startswith("arc_"):
        subset = "Challenge" if harness_task == "arc_challenge_local" else "Easy"
        return [data.ARC_FILE.format(subset=subset, split=split) for split in data.ARC_SPLITS.values()]
    fixed = {"truthfulqa_mc1_local": data.TRUTHFULQA_FILE, "truthfulqa_mc2_local": data.TRUTHFULQA_FILE,
             "winogrande_local": data.WINOGRANDE_FILE, "gsm8k_local": data.GSM8K_FILE,
             "ifeval_local": data.IFEVAL_FILE}
    return [fixed[harness_task]]


def check_local_data(requests: Sequence[TaskRequest], data_dir: Path | None) -> None:
    """Every file the local tasks read is there; checked before a model is loaded, since the harness would only
    open them after the load (minutes for a large model) and then fail on the first missing one."""
    for request in requests:
        if data_dir is None or "_local" not in request.harness_task:
            continue
        missing = [data_dir / name for name in local_data_files(request.harness_task)
                   if not (data_dir / name).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more of its files)" if len(missing) > 1 else ""
            raise ForgeError(
                f"{request.name}: cannot load its data: {missing[0]} {missing_file(missing[0])}{more}; expected "
                "eval.data_dir (or --data-dir) to hold the release files, laid out as ../shared/data/eval"
            )


def local_task(name: str) -> str | None:
    """Our local task for a name a user writes (`mmlu`, `mmlu_stem`, `mmlu_anatomy`, `gsm8k`, ...), or None."""
    if name in LOCAL_TASKS:
        return LOCAL_TASKS[name]
    part = name.removeprefix("mmlu_")
    return f"mmlu_local_{part}" if name.startswith("mmlu_") and part in (*MMLU_SUBJECTS, *MMLU_CATEGORIES) else None


#: Named suites: (task, shots); None keeps the task's own shot count.
SUITES: dict[str, tuple[tuple[str, int | None], ...]] = {
    "leaderboard-v1": (
        ("arc_challenge", 25),
        ("hellaswag", 10),
        ("mmlu", 5),
        ("truthfulqa_mc2", 0),
        ("winogrande", 5),
        ("gsm8k", 5),
    ),
    "leaderboard-v2": tuple(
        (name, None)
        for name in (
            "leaderboard_bbh",
            "leaderboard_gpqa",
            "leaderboard_ifeval",
            "leaderboard_math_hard",
            "leaderboard_mmlu_pro",
            "leaderboard_musr",
        )
    ),
}

#: On CPU, batch size "auto" means this: the harness' own search runs full-context forward passes until memory
#: runs out, which takes minutes on a CPU and can exhaust the machine's RAM.
CPU_AUTO_BATCH_SIZE = 4


@dataclass(frozen=True)
class TaskRequest:
    """One harness run: `name` as the user wrote it, `harness_task` as the harness knows it, and its shots."""

    name: str
    harness_task: str
    num_fewshot: int | None


@dataclass
class HarnessRun:
    """Merged harness results (the dict `simple_evaluate` returns, without samples) plus wall time per task."""

    results: dict[str, Any]
    seconds: dict[str, float]


def resolve_tasks(
    names: Sequence[str], data_dir: Path | None, hub: bool = False, num_fewshot: int | None = None
) -> tuple[list[TaskRequest], list[str]]:
    """Expand suites and choose local copies; returns the runs and the suite tasks skipped for lack of data.

    Shots: `num_fewshot` when given, else the suite's, else the task's own (as in the harness: a local copy has the
    same default as the harness task it stands for, so `arc_challenge` alone is 0-shot wherever its data comes from).
    """
    wanted: list[tuple[str, int | None]] = []
    for name in names:
        wanted.extend(
            (task, shots if num_fewshot is None else num_fewshot) for task, shots in SUITES.get(name, ((name, None),))
        )
    requests, skipped, seen = [], [], set()
    for name, shots in wanted:
        if name in seen:
            continue
        seen.add(name)
        local = local_task(name)
        if data_dir is not None and local is not None:
            requests.append(TaskRequest(name, local, shots))
        elif hub:
            requests.append(TaskRequest(name, name, shots))
        elif local is not None:
            raise ForgeError(f"eval.tasks: {name} runs from local files here; set eval.data_dir (or --data-dir)")
        elif any(name in (task for task, _ in suite) for suite in SUITES.values()):
            skipped.append(name)
        else:
            known = ", ".join([*SUITES, *LOCAL_TASKS, "mmlu_<subject>"])
            raise ForgeError(
                f"eval.tasks: {name!r} has no local copy (known: {known}); set eval.hub: true to run harness "
                "tasks from the dataset hub"
            )
    return requests, skipped


def task_manager(data_dir: Path | None, with_harness_tasks: bool = True) -> Any:
    """The task index with our local task files, `data_dir` passed to their loaders.

    `with_harness_tasks=False` leaves out the harness' own few thousand task files, which take seconds to index.
    """
    from lm_eval.tasks import TaskManager

    metadata = {"data_dir": str(data_dir)} if data_dir is not None else None
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_harness_tasks, metadata=metadata)


def resolve_batch_size(batch_size: int | str, device: torch.device) -> int | str:
    if batch_size == "auto" and device.type != "cuda":
        return CPU_AUTO_BATCH_SIZE
    return batch_size


def harness_model(model: Any, tokenizer: Any, batch_size: int | str = "auto", max_length: int | None = None) -> Any:
    """An `HFLM` around a model already loaded in memory (no second copy, no reload from disk)."""
    from lm_eval.models.huggingface import HFLM

    device = next(model.parameters()).device
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=resolve_batch_size(batch_size, device),
        max_length=max_length,
    )


def _quiet_harness() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.api.task", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run_harness(
    lm: Any,
    requests: Sequence[TaskRequest],
    *,
    data_dir: Path | None,
    limit: int | float | None = None,
    apply_chat_template: bool = False,
    gen_kwargs: dict[str, Any] | None = None,
    on_task: Callable[[TaskRequest, HarnessRun], None] | None = None,
) -> HarnessRun:
    """Run each request with `simple_evaluate` on the harness model `lm` and merge the results.

    `gen_kwargs` overrides generation settings of generative tasks (e.g. `{"max_gen_toks": 256}`). `on_task` sees
    the merged run after each task (to save partial results: a long suite keeps every finished task).
    """
    from lm_eval import simple_evaluate

    _quiet_harness()
    # Our task files all carry "_local" in their names; anything else is one of the harness' own tasks.
    manager = task_manager(data_dir, with_harness_tasks=any("_local" not in r.harness_task for r in requests))
    run = HarnessRun(results={}, seconds={})
    for request in requests:
        start = time.perf_counter()
        try:
            out = simple_evaluate(
                model=lm,
                tasks=[request.harness_task],
                num_fewshot=request.num_fewshot,
                limit=limit,
                task_manager=manager,
                apply_chat_template=apply_chat_template,
                gen_kwargs=gen_kwargs,
                log_samples=False,
                verbosity="ERROR",
            )
        except (FileNotFoundError, ConnectionError) as exc:
            raise ForgeError(f"{request.name}: cannot load its data: {str(exc).splitlines()[0]}") from None
        run.seconds[request.name] = time.perf_counter() - start
        merge_results(run.results, out)
        if on_task is not None:
            on_task(request, run)
    return run


#: The parts of a `simple_evaluate` result that tables and comparisons need; everything else is run metadata.
RESULT_SECTIONS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")


def merge_results(into: dict[str, Any], out: dict[str, Any]) -> None:
    """Add one `simple_evaluate` result's per-task sections to `into` (tasks are disjoint across calls)."""
    for section in RESULT_SECTIONS:
        if section in out:
            into.setdefault(section, {}).update(out[section])
