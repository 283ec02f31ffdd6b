"""Join the results of one model measured piece by piece into one evaluation, group scores included.

On a CPU, MMLU at `--limit 200` takes hours. Run one subject per command (`--tasks mmlu_anatomy`) and every finished
subject survives an interruption; joining the pieces gives what one `--tasks mmlu` run would have written. Each
subtask's numbers do not depend on what else ran in the same call, so only the group rows are missing from the
pieces: they are recomputed here with the harness' own aggregation (`aggregate_subtask_metrics`, size-weighted
where the group says so, and `pooled_sample_stderr`) and its rules for a group's shots and higher-is-better, once
every subtask of a group is present. A test holds a joined result against a grouped run, table for table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.harness import TASKS_DIR, merge_results
from dolphin_forge.evaluate.report import ModelEvaluation

#: Settings that must agree for pieces to be one evaluation (the model is checked by its path).
SAME_SETTINGS = ("limit", "apply_chat_template", "data_dir", "dtype", "max_gen_toks")


@dataclass(frozen=True)
class TaskGroup:
    """A harness group from one of our task files: its children (tasks or groups), leaf tasks and aggregation."""

    name: str
    alias: str | None
    children: tuple[str, ...]
    leaves: tuple[str, ...]  # every task below it, through nested groups (what the harness aggregates over)
    metrics: tuple[tuple[str, bool], ...]  # (metric, weight_by_size)
    version: str


class _TaskFileLoader(yaml.SafeLoader):
    """Reads task files without importing anything: a `!function` tag stays the text naming the function."""


_TaskFileLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def local_groups(tasks_dir: Path = TASKS_DIR) -> list[TaskGroup]:
    """The groups defined by the task files under `tasks_dir` (ours: `mmlu_local` and its four categories).

    Children are resolved as the harness resolves them: a group's `task` entry names a task, a group, or a tag that
    task files carry. Inner groups come before the groups that contain them.
    """
    configs = []
    for path in sorted(tasks_dir.rglob("*.yaml")):
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskFileLoader)  # noqa: S506 (a SafeLoader)
        if isinstance(config, dict):
            configs.append(config)
    tagged: dict[str, list[str]] = {}
    for config in configs:
        if "task" in config and "group" not in config:
            for tag in [config["tag"]] if isinstance(config.get("tag"), str) else config.get("tag", []):
                tagged.setdefault(tag, []).append(config["task"])
    specs = {c["group"]: c for c in configs if "group" in c}

    def children(name: str) -> list[str]:
        return [task for entry in specs[name]["task"] for task in tagged.get(entry, [entry])]

    def leaves(name: str) -> list[str]:
        return [leaf for child in children(name) for leaf in (leaves(child) if child in specs else [child])]

    def depth(name: str) -> int:
        return 1 + max((depth(child) for child in children(name) if child in specs), default=0)

    groups = []
    for name in sorted(specs, key=depth):
        config = specs[name]
        aggregate = config.get("aggregate_metric_list", [])
        metrics = tuple((m["metric"], bool(m.get("weight_by_size", True))) for m in aggregate)
        version = str((config.get("metadata") or {}).get("version", "N/A"))  # the harness reports it as text
        alias = config.get("group_alias")
        groups.append(TaskGroup(name, alias, tuple(children(name)), tuple(leaves(name)), metrics, version))
    return groups


def _group_metrics(group: TaskGroup, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from lm_eval.api.metrics import aggregate_subtask_metrics, pooled_sample_stderr, unweighted_mean_stderr

    subtasks = [results[name] for name in group.leaves]
    entry: dict[str, Any] = {
        "alias": group.alias or group.name,
        "name": group.name,
        "sample_len": sum(r.get("sample_len", 0) for r in subtasks),
    }
    counts: dict[str, int] = {}
    for metric, weight_by_size in group.metrics:
        filters = sorted({k.split(",", 1)[1] for r in subtasks for k in r if k.startswith(f"{metric},")})
        for filter_name in filters:
            key, stderr_key = f"{metric},{filter_name}", f"{metric}_stderr,{filter_name}"
            having = [r for r in subtasks if key in r]
            sizes = [r.get("sample_len", 0) for r in having]
            entry[key] = aggregate_subtask_metrics([r[key] for r in having], sizes, weight_by_size)
            counts[key] = sum(sizes)
            stderrs = [r.get(stderr_key) for r in having]
            if any(s is None or s == "N/A" for s in stderrs):
                entry[stderr_key] = "N/A"
            elif weight_by_size:
                entry[stderr_key] = pooled_sample_stderr(stderrs, sizes)
            else:
                entry[stderr_key] = unweighted_mean_stderr(stderrs)
    if counts:
        entry["sample_count"] = counts
    return entry


def add_group_scores(harness: dict[str, Any], groups: list[TaskGroup]) -> list[TaskGroup]:
    """Add the rows of every group whose leaf tasks are all in `harness` and that is not there yet; returns them.

    `groups` must list inner groups first (as `local_groups` does): shots and higher-is-better pass up from children.
    """
    results = harness.get("results", {})
    added = []
    for group in groups:
        if group.name in results or not all(name in results for name in group.leaves):
            continue
        entry = _group_metrics(group, results)
        results[group.name] = entry
        if group.metrics:
            harness.setdefault("groups", {})[group.name] = dict(entry)
        subtask_lists = harness.setdefault("group_subtasks", {})
        for name in group.children:
            if name in group.leaves:
                subtask_lists.pop(name, None)  # a task run alone is listed as its own (empty) group
        subtask_lists[group.name] = list(group.children)
        harness.setdefault("versions", {})[group.name] = group.version
        added.append(group)
    # The harness passes shots and higher-is-better up outer group first, so an outer group does not see what its
    # inner groups get (its `mmlu` row has no n-shot): done in that order to give the same dicts.
    for group in reversed(added):
        shots = {harness.get("n-shot", {}).get(name) for name in group.children} - {None}
        if len(shots) == 1:
            harness.setdefault("n-shot", {})[group.name] = shots.pop()
        better: dict[str, bool | None] = {}
        for name in group.children:
            for metric, higher in harness.get("higher_is_better", {}).get(name, {}).items():
                better[metric] = higher if better.get(metric, higher) == higher else None
        if better:
            harness.setdefault("higher_is_better", {})[group.name] = better
    for section in ("versions", "n-shot", "higher_is_better"):
        if section in harness:
            harness[section] = dict(sorted(harness[section].items()))
    return added


def incomplete_groups(harness: dict[str, Any], groups: list[TaskGroup]) -> list[str]:
    """A line for each outermost group some but not all of whose tasks were run: its score is left out, and the
    user should know why (e.g. one MMLU subject missing from 57)."""
    results = harness.get("results", {})
    partial = {
        g.name: g for g in groups if g.name not in results and 0 < sum(t in results for t in g.leaves) < len(g.leaves)
    }
    inner = {child for g in partial.values() for child in g.children}
    lines = []
    for name, group in partial.items():
        if name in inner:
            continue
        missing = [t.replace("_local_", "_", 1) for t in group.leaves if t not in results]  # as `--tasks` takes them
        lines.append(f"{group.alias or name}: {len(group.leaves) - len(missing)} of {len(group.leaves)} tasks present, "
                     f"so no group score (missing e.g. {', '.join(missing[:3])}); run them with `eval --tasks` and "
                     "combine again")
    return lines


def combine_evaluations(evaluations: list[ModelEvaluation], sources: list[str] | None = None) -> ModelEvaluation:
    """One evaluation from pieces of the same model and settings (disjoint tasks), with group scores added.

    `sources` names each piece in errors (e.g. its results.json path).
    """
    if not evaluations:
        raise ForgeError("eval-combine: no results to combine")
    sources = sources or [e.name for e in evaluations]
    first = evaluations[0]
    # harness settings (limit, chat template, ...) must agree among the pieces that ran harness tasks
    tasked = [(e, src) for e, src in zip(evaluations, sources) if e.harness.get("results")]
    reference, reference_source = tasked[0] if tasked else (first, sources[0])
    combined = ModelEvaluation(name=first.name, path=first.path, settings=dict(reference.settings))
    owner: dict[str, str] = {}
    for evaluation, source in zip(evaluations, sources):
        if evaluation.path != first.path:
            raise ForgeError(f"{source}: model {evaluation.path}, but {sources[0]} has {first.path}; combine one model")
        for key in SAME_SETTINGS if evaluation.harness.get("results") else ():
            if evaluation.settings.get(key) != reference.settings.get(key):
                raise ForgeError(
                    f"{source}: {key} = {evaluation.settings.get(key)!r}, but {reference_source} has "
                    f"{reference.settings.get(key)!r}; pieces must share their settings"
                )
        for task in [*evaluation.harness.get("results", {}), *evaluation.perplexity]:
            if task in owner:
                raise ForgeError(f"{source}: {task} is also in {owner[task]}; each task may come from one piece only")
            owner[task] = source
        combined.perplexity.update(evaluation.perplexity)
        merge_results(combined.harness, evaluation.harness)
        combined.task_names.update(evaluation.task_names)
        combined.seconds.update(evaluation.seconds)
    added = add_group_scores(combined.harness, local_groups())
    inner = {child for group in added for child in group.children}
    for group in added:
        # the comparison table shows the outermost group (`mmlu`), not its categories and subjects
        combined.task_names = {k: v for k, v in combined.task_names.items() if v not in group.leaves}
        if group.name not in inner:
            combined.task_names[group.alias or group.name] = group.name
    return combined
