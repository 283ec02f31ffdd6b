"""Our local task files ask the model exactly what the harness' own tasks ask, from the same documents.

The bridge test proves our task files give the same numbers through us and through `simple_evaluate`; this proves
the task files themselves are faithful. Each harness task config (from the installed lm-eval) is pointed at our local
documents, and the requests both tasks build (contexts, continuations, generation settings) must be identical, at
0 shots and at the leaderboard's shots. Shot counts left at the defaults must agree too, so that a name such as
`arc_challenge` means the same run whether its data comes from local files or from the hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dolphin_forge.evaluate.harness import TASKS_DIR
from dolphin_forge.evaluate.tasks import local_data

#: (our task file, the harness' task file it stands for, the shots its leaderboard run uses)
PAIRS = [
    ("arc_challenge_local.yaml", "arc/arc_challenge.yaml", 25),
    ("arc_easy_local.yaml", "arc/arc_easy.yaml", 25),
    ("mmlu/mmlu_local_anatomy.yaml", "mmlu/default/mmlu_anatomy.yaml", 5),
    ("mmlu/mmlu_local_high_school_us_history.yaml", "mmlu/default/mmlu_high_school_us_history.yaml", 5),
    ("truthfulqa_mc1_local.yaml", "truthfulqa/truthfulqa_mc1.yaml", 0),
    ("truthfulqa_mc2_local.yaml", "truthfulqa/truthfulqa_mc2.yaml", 0),
    ("winogrande_local.yaml", "winogrande/default.yaml", 5),
    ("gsm8k_local.yaml", "gsm8k/gsm8k.yaml", 5),
    ("ifeval_local.yaml", "ifeval/ifeval.yaml", 0),
    ("ifeval_local.yaml", "leaderboard/ifeval/ifeval.yaml", 0),
]

#: Where documents come from: ours replace the harness' (hub) values so both tasks see the same documents.
DATA_KEYS = (
    "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset",
    "training_split", "validation_split", "test_split", "fewshot_split",
)


def _harness_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def _configs(ours: str, theirs: str) -> tuple[dict, dict]:
    from lm_eval.tasks._yaml_loader import load_yaml

    mine, harness = load_yaml(TASKS_DIR / ours), load_yaml(_harness_tasks_dir() / theirs)
    for key in DATA_KEYS:
        harness.pop(key, None)
        if key in mine:
            harness[key] = mine[key]
    return mine, harness


def _requests(config: dict, data_dir: Path, shots: int) -> list:
    from lm_eval.api.task import ConfigurableTask

    config = {**config, "num_fewshot": shots, "metadata": {**(config.get("metadata") or {}), "data_dir": str(data_dir)}}
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)  # what simple_evaluate does
    task.build_all_requests(limit=3, rank=0, world_size=1)
    return [(i.doc_id, i.idx, i.arguments) for i in task.instances]


@pytest.mark.parametrize("ours,theirs,leaderboard_shots", PAIRS)
def test_local_task_builds_the_harness_tasks_requests(ours, theirs, leaderboard_shots, shared_data):
    mine, harness = _configs(ours, theirs)
    assert mine.get("num_fewshot") == harness.get("num_fewshot"), "default shots differ from the harness task"
    for shots in sorted({0, leaderboard_shots}):
        expected = _requests(harness, shared_data / "eval", shots)
        assert expected, "no requests built"
        assert _requests(mine, shared_data / "eval", shots) == expected, f"requests differ at {shots} shots"


def test_no_local_task_can_show_a_question_among_its_own_examples():
    """The harness leaves the scored item out of its examples only when the examples come from `test_split`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for path in [*TASKS_DIR.glob("*_local.yaml"), TASKS_DIR / "mmlu" / "mmlu_local_anatomy.yaml"]:
        config = load_yaml(path)
        if "task" not in config:
            continue  # a group
        scored = config.get("test_split") or config.get("validation_split")
        if config.get("fewshot_split") == scored:
            assert config.get("test_split") == scored, f"{path.name}: examples drawn from the scored split"


def test_truthfulqa_mc2_scores_as_the_harness_does():
    from lm_eval.tasks._yaml_loader import load_yaml

    harness = load_yaml(_harness_tasks_dir() / "truthfulqa" / "truthfulqa_mc2.yaml")["process_results"]
    doc = {"mc2_targets": {"labels": [1, 1, 0, 0]}}
    for lls in ([-1.0, -2.5, -0.7, -3.0], [-40.0, -41.0, -39.5, -45.0], [-0.1, -0.2, -0.3, -0.4]):
        results = [(ll, False) for ll in lls]
        assert local_data.truthfulqa_mc2(doc, results)["acc"] == pytest.approx(harness(doc, results)["acc"], rel=1e-12)
