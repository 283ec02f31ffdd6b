"""Report formatting against a golden file, comparison rows, JSON round trip and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.report import (
    ModelEvaluation,
    comparison_table,
    headline_scores,
    load_results,
    render_report,
    write_results,
)

GOLDEN = Path(__file__).parent / "golden" / "report.md"


def _harness(arc_norm: float, mmlu: float) -> dict:
    """A results dict shaped like `simple_evaluate`'s, with a group (mmlu) of two subjects."""
    return {
        "results": {
            "arc_challenge_local": {
                "alias": "arc_challenge",
                "acc,none": 0.25,
                "acc_stderr,none": 0.0125,
                "acc_norm,none": arc_norm,
                "acc_norm_stderr,none": 0.013,
            },
            "mmlu_local": {"alias": "mmlu", "acc,none": mmlu, "acc_stderr,none": 0.02},
            "mmlu_local_anatomy": {"alias": "anatomy", "acc,none": 0.3, "acc_stderr,none": 0.04},
            "mmlu_local_virology": {"alias": "virology", "acc,none": 0.35, "acc_stderr,none": 0.05},
            "gsm8k_local": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.015,
                "exact_match_stderr,strict-match": 0.0033,
                "exact_match,flexible-extract": 0.0425,
                "exact_match_stderr,flexible-extract": 0.0056,
            },
        },
        "groups": {"mmlu_local": {"alias": "mmlu", "acc,none": mmlu, "acc_stderr,none": 0.02}},
        "group_subtasks": {
            "arc_challenge_local": [],
            "mmlu_local": ["mmlu_local_anatomy", "mmlu_local_virology"],
            "gsm8k_local": [],
        },
        "versions": {
            "arc_challenge_local": 1.0,
            "mmlu_local": 2,
            "mmlu_local_anatomy": 1.0,
            "mmlu_local_virology": 1.0,
            "gsm8k_local": 3.0,
        },
        "n-shot": {
            "arc_challenge_local": 25,
            "mmlu_local": 5,
            "mmlu_local_anatomy": 5,
            "mmlu_local_virology": 5,
            "gsm8k_local": 5,
        },
        "higher_is_better": {
            "arc_challenge_local": {"acc": True, "acc_norm": True},
            "mmlu_local": {"acc": True},
            "mmlu_local_anatomy": {"acc": True},
            "mmlu_local_virology": {"acc": True},
            "gsm8k_local": {"exact_match": True},
        },
    }


def _evaluations() -> list[ModelEvaluation]:
    names = {"arc_challenge": "arc_challenge_local", "mmlu": "mmlu_local", "gsm8k": "gsm8k_local"}
    before = ModelEvaluation(
        name="base",
        path="/models/base",
        perplexity={
            "wiki.txt": {"perplexity": 24.79071, "nll": 3.21046, "tokens": 8191, "max_length": 1024, "stride": 512}
        },
        harness=_harness(0.3012, 0.2875),
        task_names=names,
        seconds={"arc_challenge": 12.04, "mmlu": 30.5, "gsm8k": 61.0},
    )
    after = ModelEvaluation(
        name="laser",
        path="/models/laser",
        perplexity={"wiki.txt": {"perplexity": 23.5, "nll": 3.157, "tokens": 8191, "max_length": 1024, "stride": 512}},
        harness=_harness(0.3101, 0.29),
        task_names={"arc_challenge": "arc_challenge_local", "mmlu": "mmlu_local"},
    )
    return [before, after]


def test_report_matches_golden_file():
    assert render_report(_evaluations()) == GOLDEN.read_text(encoding="utf-8")


def test_comparison_rows_use_the_leaderboard_metrics():
    base, laser = _evaluations()
    scores = headline_scores(base)
    assert scores == pytest.approx(
        {"arc_challenge": 30.12, "mmlu": 28.75, "gsm8k": 1.5, "wiki.txt (ppl)": 24.79071}
    )
    table = comparison_table([base, laser]).splitlines()
    assert table[0] == "|dataset|base|laser|"
    assert "|arc_challenge|30.12|31.01|" in table
    assert "|gsm8k|1.50||" in table  # not measured for the second model: blank


def test_results_round_trip_and_plot(tmp_path):
    written = write_results(_evaluations(), tmp_path / "eval")
    assert load_results(written["results"]) == _evaluations()
    assert load_results(tmp_path / "eval")[1].name == "laser"
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["report"].read_text(encoding="utf-8") == GOLDEN.read_text(encoding="utf-8")


def test_results_with_perplexities_as_eval_writes_them_read_back(tmp_path):
    """`eval` records each perplexity's compute dtype by name: `--compare` and `eval-combine` must accept it."""
    entry = {"perplexity": 24.79, "nll": 3.21, "tokens": 511, "max_length": 256, "stride": 128, "dtype": "float32"}
    evaluations = [ModelEvaluation(name="base", perplexity={"wiki.txt": entry})]
    written = write_results(evaluations, tmp_path / "eval")
    assert load_results(written["results"]) == evaluations


def test_bad_results_file_is_a_forge_error(tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text("{}")
    with pytest.raises(ForgeError, match="not a dolphin-forge results.json"):
        load_results(bad)
    with pytest.raises(ForgeError, match="not found"):
        load_results(tmp_path / "missing.json")


@pytest.mark.parametrize(("models", "message"), [
    ([{"name": "m", "harness": "abc"}], "models.0.harness: Input should be a valid dictionary"),
    ([{"name": "m", "settings": 5}], "models.0.settings: Input should be a valid dictionary"),
    ([{"name": "m", "perplexity": {"w": 5}}], "models.0.perplexity.w: Input should be a valid dictionary"),
    ([{"name": "m", "harness": {"results": {"arc": 5}}}], "harness.results should map tasks to metrics"),
])
def test_a_hand_edited_results_file_is_refused_in_one_line(tmp_path, models, message):
    import json

    (tmp_path / "results.json").write_text(json.dumps({"models": models}))
    with pytest.raises(ForgeError, match="not a dolphin-forge results.json") as info:
        load_results(tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_results_are_not_written_over_a_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("{}")
    with pytest.raises(ForgeError, match="is a file; expected a folder"):
        write_results([ModelEvaluation(name="m")], target)
