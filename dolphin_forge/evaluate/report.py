"""Evaluation results as JSON and as the two markdown tables the Dolphin cards print.

* The harness table (Tasks | Version | Filter | n-shot | Metric | | Value | | Stderr), as in the dolphin-2.9 cards,
  is rendered by the harness' own `make_table`, so ours is character-for-character what `lm_eval` prints.
* The compact comparison (one row per dataset, one column per model, scores in percent), as in the
  dolphin-2.6 card, puts several models side by side, e.g. before and after a stage. Each task is represented by
  the metric the Open LLM Leaderboard reported for it (`HEADLINE_METRICS`); perplexities are shown as they are.

A bar chart (PNG) of the comparison is written next to the tables when matplotlib can draw one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dolphin_forge.errors import ForgeError, read_text_file
from dolphin_forge.plotting import pyplot, save_png

#: The metric (and harness filter) that stands for a task in the comparison table.
HEADLINE_METRICS: dict[str, tuple[str, str]] = {
    "arc_challenge": ("acc_norm", "none"),
    "arc_easy": ("acc_norm", "none"),
    "hellaswag": ("acc_norm", "none"),
    "mmlu": ("acc", "none"),
    "truthfulqa_mc1": ("acc", "none"),
    "truthfulqa_mc2": ("acc", "none"),
    "winogrande": ("acc", "none"),
    "gsm8k": ("exact_match", "strict-match"),
    "ifeval": ("prompt_level_strict_acc", "none"),
    "leaderboard_bbh": ("acc_norm", "none"),
    "leaderboard_gpqa": ("acc_norm", "none"),
    "leaderboard_ifeval": ("prompt_level_strict_acc", "none"),
    "leaderboard_math_hard": ("exact_match", "none"),
    "leaderboard_mmlu_pro": ("acc", "none"),
    "leaderboard_musr": ("acc_norm", "none"),
}

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
PLOT_FILE = "comparison.png"


@dataclass
class ModelEvaluation:
    """Everything measured for one model: perplexities per text file and harness results per task."""

    name: str
    path: str | None = None
    perplexity: dict[str, dict[str, float | int | str]] = field(default_factory=dict)  # "dtype" is a name
    harness: dict[str, Any] = field(default_factory=dict)
    task_names: dict[str, str] = field(default_factory=dict)  # task as written by the user -> harness task
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def harness_tables(evaluation: ModelEvaluation) -> str:
    """The harness' Tasks table (and its Groups table when groups were run), exactly as `lm_eval` prints them."""
    from lm_eval.utils import make_table

    if not evaluation.harness.get("results"):
        return ""
    tables = [make_table(evaluation.harness)]
    if evaluation.harness.get("groups"):
        tables.append(make_table(evaluation.harness, "groups"))
    return "\n".join(tables)


def perplexity_table(evaluation: ModelEvaluation) -> str:
    if not evaluation.perplexity:
        return ""
    lines = ["|File|Tokens|Max length|Stride|NLL|Perplexity|", "|----|-----:|---------:|-----:|--:|---------:|"]
    for name, r in evaluation.perplexity.items():
        lines.append(
            f"|{name}|{r['tokens']}|{r['max_length']}|{r['stride']}|{r['nll']:.4f}|{r['perplexity']:.4f}|"
        )
    return "\n".join(lines) + "\n"


def headline_scores(evaluation: ModelEvaluation) -> dict[str, float]:
    """Row label -> value for the comparison table: tasks in percent, perplexities as they are."""
    scores: dict[str, float] = {}
    results = {**evaluation.harness.get("results", {}), **evaluation.harness.get("groups", {})}
    for task, harness_task in evaluation.task_names.items():
        metrics = results.get(harness_task)
        if metrics is None:
            continue
        metric, filter_name = HEADLINE_METRICS.get(task, _first_metric(metrics))
        value = metrics.get(f"{metric},{filter_name}")
        if isinstance(value, (int, float)):
            scores[task] = 100 * value
    for name, r in evaluation.perplexity.items():
        scores[f"{name} (ppl)"] = float(r["perplexity"])
    return scores


def _first_metric(metrics: dict[str, Any]) -> tuple[str, str]:
    for key in sorted(metrics):
        metric, _, filter_name = key.partition(",")
        if filter_name and "_stderr" not in metric and isinstance(metrics[key], (int, float)):
            return metric, filter_name
    return "", ""


def comparison_table(evaluations: list[ModelEvaluation]) -> str:
    """The dolphin-2.6 card's compact table: `dataset` then one column per model, blank where not measured."""
    per_model = [headline_scores(e) for e in evaluations]
    rows: list[str] = []
    for scores in per_model:
        rows.extend(row for row in scores if row not in rows)
    lines = ["|dataset|" + "|".join(e.name for e in evaluations) + "|"]
    lines.append("|-------|" + "|".join("-" * max(3, len(e.name)) + ":" for e in evaluations) + "|")
    for row in rows:
        cells = [f"{scores[row]:.2f}" if row in scores else "" for scores in per_model]
        lines.append(f"|{row}|" + "|".join(cells) + "|")
    return "\n".join(lines) + "\n"


def render_report(evaluations: list[ModelEvaluation]) -> str:
    """The whole markdown report: per model its perplexities and harness tables, then the comparison."""
    parts = []
    for evaluation in evaluations:
        parts.append(f"## {evaluation.name}\n")
        if evaluation.path:
            parts.append(f"Model: `{evaluation.path}`\n")
        for table in (perplexity_table(evaluation), harness_tables(evaluation)):
            if table:
                parts.append(table)
        if evaluation.seconds:
            timing = ", ".join(f"{task} {seconds:.1f} s" for task, seconds in evaluation.seconds.items())
            parts.append(f"Wall time: {timing}\n")
    parts.append("## Comparison\n")
    parts.append(comparison_table(evaluations))
    return "\n".join(parts)


def plot_comparison(evaluations: list[ModelEvaluation], path: Path) -> Path | None:
    """Grouped bars of the headline task scores (perplexities left out: another scale); None if nothing to plot."""
    plt = pyplot()
    per_model = [{k: v for k, v in headline_scores(e).items() if not k.endswith("(ppl)")} for e in evaluations]
    tasks = sorted({task for scores in per_model for task in scores})
    if not tasks:
        return None
    width = 0.8 / len(evaluations)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
    for i, (evaluation, scores) in enumerate(zip(evaluations, per_model)):
        xs = [t + i * width for t in range(len(tasks))]
        ax.bar(xs, [scores.get(task, 0.0) for task in tasks], width, label=evaluation.name)
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20, ha="right")
    ax.set_ylabel("score (%)")
    ax.legend()
    return save_png(fig, path)


def write_results(evaluations: list[ModelEvaluation], folder: Path) -> dict[str, Path]:
    """Write results.json, report.md and (when there are task scores) comparison.png into `folder`."""
    if folder.is_file():
        raise ForgeError(f"{folder}: is a file; expected a folder for {RESULTS_FILE} and {REPORT_FILE}")
    folder.mkdir(parents=True, exist_ok=True)
    written = {"results": folder / RESULTS_FILE, "report": folder / REPORT_FILE}
    payload = {"models": [asdict(e) for e in evaluations]}
    written["results"].write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    written["report"].write_text(render_report(evaluations), encoding="utf-8")
    plot = plot_comparison(evaluations, folder / PLOT_FILE)
    if plot is not None:
        written["plot"] = plot
    return written


def load_results(path: Path) -> list[ModelEvaluation]:
    """Model evaluations from a results.json written earlier (or the folder holding it), for comparisons."""
    from pydantic import TypeAdapter, ValidationError

    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ForgeError(f"{file}: results file not found")
    try:
        payload = json.loads(read_text_file(file, "a dolphin-forge results.json"))
        evaluations = TypeAdapter(list[ModelEvaluation]).validate_python(payload["models"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ForgeError(f"{file}: not a dolphin-forge results.json ({exc})") from None
    except ValidationError as exc:  # hand-edited or foreign: name the first wrong field, not a traceback later
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise ForgeError(f"{file}: not a dolphin-forge results.json (models.{where}: {error['msg']})") from None
    for evaluation in evaluations:
        results = evaluation.harness.get("results", {})
        if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
            raise ForgeError(f"{file}: not a dolphin-forge results.json (harness.results should map tasks to metrics)")
    return evaluations
