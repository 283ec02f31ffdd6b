"""Pieces of one model's evaluation joined into one: the same tables as a single grouped run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dolphin_forge.cli import app
from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.combine import add_group_scores, combine_evaluations, local_groups
from dolphin_forge.evaluate.harness import MMLU_SUBJECTS, RESULT_SECTIONS, TASKS_DIR, harness_model, merge_results
from dolphin_forge.evaluate.report import ModelEvaluation, harness_tables, write_results

SUBJECTS = ("mmlu_local_anatomy", "mmlu_local_virology", "mmlu_local_marketing")


def _evaluate(lm, tasks: list[str], manager) -> dict:
    from lm_eval import simple_evaluate

    out = simple_evaluate(model=lm, tasks=tasks, num_fewshot=1, limit=2, task_manager=manager, log_samples=False,
                          verbosity="ERROR")
    return {k: out[k] for k in RESULT_SECTIONS if k in out}


def test_subjects_run_one_by_one_and_joined_equal_one_grouped_run(tmp_path, tiny_model_dir, shared_data):
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from dolphin_forge.models.load import load_model

    def group(name: str, tasks: list[str]) -> str:
        return (f"group: {name}\ngroup_alias: {name.removeprefix('trio_')}\ntask:\n"
                + "".join(f"  - {t}\n" for t in tasks)
                + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 3\n")

    # nested like the harness' mmlu: a group of two category groups of subjects
    (tmp_path / "trio.yaml").write_text(group("mmlu_trio", ["trio_stem", "trio_other"]))
    (tmp_path / "trio_stem.yaml").write_text(group("trio_stem", list(SUBJECTS[:1])))
    (tmp_path / "trio_other.yaml").write_text(group("trio_other", list(SUBJECTS[1:])))
    manager = TaskManager(include_path=[str(TASKS_DIR), str(tmp_path)], include_defaults=False,
                          metadata={"data_dir": str(shared_data / "eval")})
    lm = harness_model(load_model(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir), batch_size=2)
    grouped = _evaluate(lm, ["mmlu_trio"], manager)

    joined: dict = {}
    for subject in SUBJECTS:
        merge_results(joined, _evaluate(lm, [subject], manager))
    assert "mmlu_trio" not in joined["results"]
    added = add_group_scores(joined, local_groups(tmp_path))
    assert [g.name for g in added] == ["trio_other", "trio_stem", "mmlu_trio"]
    for section in ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples"):
        assert joined[section] == grouped[section], section
    table = harness_tables(ModelEvaluation(name="m", harness=joined))
    assert table == harness_tables(ModelEvaluation(name="m", harness=grouped)) and "trio" in table


def test_local_mmlu_groups_are_the_harness_categories():
    import lm_eval
    import yaml

    harness_dir = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    groups = {g.name: g for g in local_groups()}
    assert groups["mmlu_local"].children == (
        "mmlu_local_stem", "mmlu_local_other", "mmlu_local_social_sciences", "mmlu_local_humanities",
    )
    assert sorted(groups["mmlu_local"].leaves) == [f"mmlu_local_{s}" for s in MMLU_SUBJECTS]
    for category in ("stem", "other", "social_sciences", "humanities"):
        theirs = {
            path.stem.removeprefix("mmlu_")
            for path in harness_dir.glob("mmlu_*.yaml")
            if yaml.safe_load(path.read_text())["tag"] == f"mmlu_{category}_tasks"
        }
        assert {t.removeprefix("mmlu_local_") for t in groups[f"mmlu_local_{category}"].leaves} == theirs, category


def _piece(folder: Path, subjects: list[str], limit: int = 200, acc: float = 0.25) -> Path:
    harness = {"results": {}, "n-shot": {}, "versions": {}, "higher_is_better": {}, "group_subtasks": {}}
    for i, subject in enumerate(subjects):
        task = f"mmlu_local_{subject}"
        harness["results"][task] = {"alias": subject, "acc,none": acc, "acc_stderr,none": 0.03, "sample_len": 100 + i}
        harness["n-shot"][task], harness["versions"][task] = 5, 1.0
        harness["higher_is_better"][task] = {"acc": True}
    evaluation = ModelEvaluation(
        name="SmolLM2", path="default", harness=harness,
        task_names={f"mmlu_{s}": f"mmlu_local_{s}" for s in subjects}, settings={"limit": limit},
    )
    write_results([evaluation], folder)
    return folder


def test_eval_combine_command_reports_mmlu_as_one_row(tmp_path):
    half = len(MMLU_SUBJECTS) // 2
    a = _piece(tmp_path / "a", list(MMLU_SUBJECTS[:half]), acc=0.2)
    b = _piece(tmp_path / "b", list(MMLU_SUBJECTS[half:]), acc=0.3)
    args = ["eval-combine", str(a), str(b / "results.json"), "--output", str(tmp_path / "all")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = json.loads((tmp_path / "all" / "results.json").read_text())["models"][0]
    sizes = [100 + i for i in range(half)] + [100 + i for i in range(len(MMLU_SUBJECTS) - half)]
    accs = [0.2] * half + [0.3] * (len(MMLU_SUBJECTS) - half)
    expected = sum(s * a for s, a in zip(sizes, accs)) / sum(sizes)
    assert model["harness"]["groups"]["mmlu_local"]["acc,none"] == pytest.approx(expected, rel=1e-12)
    assert model["task_names"] == {"mmlu": "mmlu_local"}
    assert {g: model["harness"]["n-shot"].get(g) for g in ("mmlu_local", "mmlu_local_stem")} == {
        "mmlu_local": None, "mmlu_local_stem": 5,  # as the harness: shots reach the categories, not the top row
    }
    assert f"|mmlu|{100 * expected:.2f}|" in (tmp_path / "all" / "report.md").read_text()


def test_pieces_must_share_model_and_settings_and_not_overlap(tmp_path):
    a = ModelEvaluation(name="m", path="x", harness={"results": {"t1": {"acc,none": 1.0}}}, settings={"limit": 200})
    b = ModelEvaluation(name="m", path="x", harness={"results": {"t2": {"acc,none": 1.0}}}, settings={"limit": 100})
    with pytest.raises(ForgeError, match=r"^b.json: limit = 100, but a.json has 200"):
        combine_evaluations([a, b], ["a.json", "b.json"])
    c = ModelEvaluation(name="m", path="x", harness={"results": {"t1": {"acc,none": 0.0}}}, settings={"limit": 200})
    with pytest.raises(ForgeError, match=r"^c.json: t1 is also in a.json"):
        combine_evaluations([a, c], ["a.json", "c.json"])
    d = ModelEvaluation(name="m", path="y", harness={"results": {"t3": {"acc,none": 0.0}}}, settings={"limit": 200})
    with pytest.raises(ForgeError, match=r"^d.json: model y"):
        combine_evaluations([a, d], ["a.json", "d.json"])


def test_eval_combine_says_why_a_group_score_is_missing(tmp_path):
    """Two subjects short of MMLU: the categories that are whole get their scores, the top row cannot, and says so."""
    a = _piece(tmp_path / "a", list(MMLU_SUBJECTS[:-2]))
    result = CliRunner().invoke(app, ["eval-combine", str(a), "--output", str(tmp_path / "all")],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: mmlu: 55 of 57 tasks present, so no group score")
    assert all(f"mmlu_{subject}" in warnings[0] for subject in MMLU_SUBJECTS[-2:]) and "_local_" not in warnings[0]
