"""The harness bridge: suites, local task files, and results identical to `lm_eval.simple_evaluate` run directly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.harness import (
    CPU_AUTO_BATCH_SIZE,
    LOCAL_TASKS,
    TaskRequest,
    harness_model,
    resolve_batch_size,
    resolve_tasks,
    run_harness,
    task_manager,
)
from dolphin_forge.evaluate.tasks import local_data


def test_leaderboard_v1_suite_uses_local_copies_with_v1_shots_and_skips_hellaswag_offline(tmp_path):
    requests, skipped = resolve_tasks(["leaderboard-v1"], tmp_path)
    assert [(r.name, r.harness_task, r.num_fewshot) for r in requests] == [
        ("arc_challenge", "arc_challenge_local", 25),
        ("mmlu", "mmlu_local", 5),
        ("truthfulqa_mc2", "truthfulqa_mc2_local", 0),
        ("winogrande", "winogrande_local", 5),
        ("gsm8k", "gsm8k_local", 5),
    ]
    assert skipped == ["hellaswag"]


def test_leaderboard_v2_offline_runs_ifeval_from_the_local_copy_and_skips_the_rest(tmp_path):
    requests, skipped = resolve_tasks(["leaderboard-v2"], tmp_path)
    assert [(r.name, r.harness_task, r.num_fewshot) for r in requests] == [("leaderboard_ifeval", "ifeval_local", None)]
    assert len(skipped) == 5 and "leaderboard_ifeval" not in skipped


def test_num_fewshot_overrides_suite_and_task_shots(tmp_path):
    requests, _ = resolve_tasks(["arc_challenge"], tmp_path)
    assert requests[0].num_fewshot is None  # the task's own default, as the harness' arc_challenge (0-shot)
    requests, _ = resolve_tasks(["leaderboard-v1", "arc_easy"], tmp_path, num_fewshot=3)
    assert {r.num_fewshot for r in requests} == {3}


def test_auto_batch_size_is_a_fixed_size_on_cpu():
    assert resolve_batch_size("auto", torch.device("cpu")) == CPU_AUTO_BATCH_SIZE == 4
    assert resolve_batch_size(16, torch.device("cpu")) == 16


def test_hub_tasks_run_from_the_hub_when_allowed(tmp_path):
    requests, skipped = resolve_tasks(["leaderboard-v1", "leaderboard-v2"], None, hub=True)
    assert ("hellaswag", "hellaswag", 10) in [(r.name, r.harness_task, r.num_fewshot) for r in requests]
    assert ("leaderboard_musr", "leaderboard_musr", None) in [(r.name, r.harness_task, r.num_fewshot) for r in requests]
    assert not skipped


def test_single_mmlu_subjects_run_locally_under_the_harness_names(tmp_path):
    requests, _ = resolve_tasks(["mmlu_anatomy", "mmlu_high_school_us_history", "mmlu_social_sciences"], tmp_path)
    assert [(r.name, r.harness_task) for r in requests] == [
        ("mmlu_anatomy", "mmlu_local_anatomy"),
        ("mmlu_high_school_us_history", "mmlu_local_high_school_us_history"),
        ("mmlu_social_sciences", "mmlu_local_social_sciences"),
    ]
    with pytest.raises(ForgeError, match="'mmlu_anatomyy' has no local copy"):
        resolve_tasks(["mmlu_anatomyy"], tmp_path)


def test_unknown_or_unrunnable_tasks_are_one_line_errors(tmp_path):
    with pytest.raises(ForgeError, match="'arc_chalenge' has no local copy"):
        resolve_tasks(["arc_chalenge"], tmp_path)
    with pytest.raises(ForgeError, match="set eval.data_dir"):
        resolve_tasks(["mmlu"], None)


def test_a_damaged_local_eval_file_names_its_line_instead_of_a_traceback(tmp_path):
    """A task is scored on every row of its file, so a damaged line stops the task (named) rather than being skipped."""
    (tmp_path / "winogrande").mkdir()
    dev = tmp_path / "winogrande" / "dev.jsonl"
    dev.write_text('{"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "1"}\n{"sentence": "cut off\n')
    with pytest.raises(ForgeError) as info:
        local_data.load_winogrande(str(tmp_path))
    assert str(info.value) == f"{dev}:2: not valid JSON (Unterminated string starting at at column 14); every row " \
        "of a task's file is scored"
    dev.write_bytes(b'{"sentence": "caf\xe9"}\n')
    with pytest.raises(ForgeError, match=f"^{dev}: not UTF-8 text \\(byte 17"):
        local_data.load_winogrande(str(tmp_path))
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    csv = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    csv.write_text("Q1?,a,b,c,d,B\nQ2?,a,b,c\n")  # a row cut short
    with pytest.raises(ForgeError) as info:
        local_data.load_mmlu(str(tmp_path), subject="anatomy")
    assert str(info.value) == f"{csv}: row 2: expected a question, four choices and an answer letter A-D"
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "mc_task.json").write_text('[{"question": "Q?"},')
    with pytest.raises(ForgeError, match="mc_task.json:1: not valid JSON \\(Expecting value\\); expected the release"):
        local_data.load_truthfulqa(str(tmp_path))


def test_local_loaders_match_the_release_files(shared_data):
    eval_dir = shared_data / "eval"
    arc = local_data.load_arc(str(eval_dir), subset="Challenge")
    raw = json.loads((eval_dir / "arc" / "ARC-Challenge-Test.jsonl").read_text().splitlines()[0])
    first = arc["test"][0]
    assert first["question"] == raw["question"]["stem"] and first["answerKey"] == raw["answerKey"]
    assert first["choices"]["text"] == [c["text"] for c in raw["question"]["choices"]]
    assert len(arc["validation"]) == 299

    mmlu = local_data.load_mmlu(str(eval_dir), subject="anatomy")
    assert len(mmlu["dev"]) == 5 and mmlu["dev"][0]["answer"] == 3  # the release file's letter is D

    tqa = local_data.load_truthfulqa(str(eval_dir))["validation"]
    assert len(tqa) == 790
    assert tqa[0]["mc1_targets"]["labels"][0] == 1 and sum(tqa[0]["mc1_targets"]["labels"]) == 1

    ifeval = local_data.load_ifeval(str(eval_dir))["train"]
    assert len(ifeval) == 541 and ifeval[0]["kwargs"][1]["num_highlights"] == 3


def test_truthfulqa_mc2_is_the_true_share_of_probability_mass():
    doc = {"mc2_targets": {"labels": [1, 1, 0]}}
    lls = [-1.0, -2.0, -0.5]
    expected = (math.exp(-1) + math.exp(-2)) / (math.exp(-1) + math.exp(-2) + math.exp(-0.5))
    assert local_data.truthfulqa_mc2(doc, [(ll, False) for ll in lls])["acc"] == pytest.approx(expected, rel=1e-12)
    # Long answers have very low log-likelihoods: the score must not collapse to 0/0.
    tiny = local_data.truthfulqa_mc2(doc, [(-2000.0, False), (-2001.0, False), (-2000.5, False)])["acc"]
    assert tiny == pytest.approx((1 + math.exp(-1)) / (1 + math.exp(-1) + math.exp(-0.5)))


def test_winogrande_partial_scoring_fields():
    doc = {"sentence": "Anna gave Bea a book because _ was kind.", "option1": "Anna", "option2": "Bea", "answer": "2"}
    contexts = ["Anna gave Bea a book because Anna", "Anna gave Bea a book because Bea"]
    assert local_data.winogrande_contexts(doc) == contexts
    assert local_data.winogrande_continuation(doc) == "was kind."
    assert local_data.winogrande_context_index(doc) == 1


#: Random tiny models never stop generating: cap generation so the generative tasks stay fast.
SHORT = {"max_gen_toks": 12}


def _direct(folder: Path, eval_dir: Path, task: str, limit: int, shots: int | None = None, chat: bool = False) -> dict:
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(folder), "dtype": "float32", "device": "cpu"},
        tasks=[task],
        num_fewshot=shots,
        limit=limit,
        batch_size=2,
        task_manager=task_manager(eval_dir, with_harness_tasks=False),
        apply_chat_template=chat,
        gen_kwargs=SHORT,
        log_samples=False,
        verbosity="ERROR",
    )
    return {**out["results"], **out.get("groups", {})}


def test_bridge_equals_simple_evaluate_run_directly(tiny_model_dir, shared_data):
    """Same task files, same model: every metric and stderr identical, to the last digit."""
    from transformers import AutoTokenizer

    from dolphin_forge.evaluate.punkt import ensure_punkt
    from dolphin_forge.models.load import load_model

    eval_dir = shared_data / "eval"
    ensure_punkt(eval_dir)
    model = load_model(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = harness_model(model, tokenizer, batch_size=2)
    cases = [  # (name, our task, limit, shots: the v1 leaderboard's, fewer for ARC to keep the test short)
        ("arc_challenge", "arc_challenge_local", 2, 3),
        ("truthfulqa_mc2", "truthfulqa_mc2_local", 2, 0),
        ("winogrande", "winogrande_local", 3, 5),
        ("gsm8k", "gsm8k_local", 1, 5),
        ("ifeval", "ifeval_local", 1, None),
        ("mmlu_anatomy", "mmlu_local_anatomy", 2, 5),
    ]
    for name, harness_task, limit, shots in cases:
        request = TaskRequest(name, harness_task, shots)
        run = run_harness(lm, [request], data_dir=eval_dir, limit=limit, gen_kwargs=SHORT)
        ours = run.results["results"][harness_task]
        assert ours == _direct(tiny_model_dir, eval_dir, harness_task, limit, shots)[harness_task], name
        assert run.seconds[name] > 0
        assert run.results["n-shot"][harness_task] == (shots or 0), name

    chat = run_harness(lm, [TaskRequest("winogrande", "winogrande_local", None)], data_dir=eval_dir, limit=2,
                       apply_chat_template=True)
    direct = _direct(tiny_model_dir, eval_dir, "winogrande_local", 2, chat=True)
    assert chat.results["results"]["winogrande_local"] == direct["winogrande_local"]


def test_every_local_task_file_loads(shared_data):
    manager = task_manager(shared_data / "eval", with_harness_tasks=False)
    loaded = manager.load([t for t in LOCAL_TASKS.values() if t != "mmlu_local"] + ["mmlu_local_virology"])
    assert set(loaded["tasks"]) >= {t for t in LOCAL_TASKS.values() if t != "mmlu_local"}
    category = manager.load(["mmlu_local_social_sciences"])
    assert len(category["tasks"]) == 12 and "mmlu_local_econometrics" in category["tasks"]


ARC_ROW = {"id": "q1", "question": {"stem": "Why?", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"}
WINOGRANDE_ROW = {"sentence": "a _ b", "option1": "x", "option2": "y", "answer": "1"}
IFEVAL_ROW = {"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}


@pytest.mark.parametrize(("loader", "file", "rows", "message"), [
    (local_data.load_winogrande, "winogrande/dev.jsonl", [WINOGRANDE_ROW, {"sentence": "a _ b", "option1": "x"}],
     ":2: missing fields option2, answer; expected sentence, option1, option2, answer"),
    (local_data.load_gsm8k, "gsm8k_test.jsonl", [{"question": "1+1?"}],
     ":1: missing field answer; expected question, answer"),
    (local_data.load_ifeval, "ifeval/input_data.jsonl", [IFEVAL_ROW, {**IFEVAL_ROW, "key": 2, "kwargs": None}],
     ":2: missing field kwargs; expected key, prompt, instruction_id_list, kwargs"),  # null: no better than absent
    (local_data.load_arc, "arc/ARC-Challenge-Test.jsonl",
     [ARC_ROW, {**ARC_ROW, "question": {"stem": "?", "choices": [{"text": "a"}]}}],
     ":2: missing field question.choices[].label; expected id, question.stem, question.choices[].text, "
     "question.choices[].label, answerKey"),
    (local_data.load_arc, "arc/ARC-Challenge-Test.jsonl", [ARC_ROW, ["not", "an", "object"]],
     ":2: expected a JSON object with the fields id, question.stem, question.choices[].text, "
     "question.choices[].label, answerKey"),
])
def test_a_row_missing_a_field_names_file_line_and_fields(tmp_path, loader, file, rows, message):
    """Was a bare KeyError (ARC, IFEval), or a None scored inside the harness after the model had loaded."""
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ForgeError) as info:
        loader(str(tmp_path))
    assert str(info.value) == f"{path}{message}"


def test_a_truthfulqa_question_missing_a_field_names_its_row(tmp_path):
    path = tmp_path / "truthfulqa" / "mc_task.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{"question": "Q?", "mc1_targets": {"a": 1}, "mc2_targets": {"a": 1}},
                                {"question": "Q2?", "mc1_targets": {"a": 1}}], indent=1))
    with pytest.raises(ForgeError) as info:
        local_data.load_truthfulqa(str(tmp_path))
    assert str(info.value) == f"{path}: row 2: missing field mc2_targets; expected question, mc1_targets, mc2_targets"
    path.write_text('{"question": "Q?"}')
    with pytest.raises(ForgeError, match=r"mc_task.json: expected a JSON list of questions \(the release file\)$"):
        local_data.load_truthfulqa(str(tmp_path))
