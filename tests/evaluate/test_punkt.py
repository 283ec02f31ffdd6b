"""The offline Punkt substitute: trained with NLTK's own trainer, written in punkt_tab layout, loadable by NLTK."""

from __future__ import annotations

import pytest

from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate import punkt

TEXT = (
    "Dr. Smith met Mr. Jones at noon. They talked for hours. The meeting ended late. "
    "Prof. Brown arrived later. Mr. Jones left first. Dr. Smith stayed. "
) * 40


@pytest.fixture
def isolated_nltk(tmp_path, monkeypatch):
    """NLTK sees only our cache folder (under tmp_path), never an installed official model."""
    import nltk

    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("DOLPHIN_FORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_trained_model_loads_in_nltk_and_knows_abbreviations(isolated_nltk):
    import nltk
    from nltk.data import FileSystemPathPointer
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    nltk.data.path.append(str(isolated_nltk))  # NLTK reads data only below its data roots
    target = isolated_nltk / "english"
    punkt.train_punkt(TEXT, target)
    assert {p.name for p in target.iterdir()} == {
        "collocations.tab",
        "sent_starters.txt",
        "abbrev_types.txt",
        "ortho_context.tab",
    }
    params = load_punkt_params(FileSystemPathPointer(str(target)))
    assert {"dr", "mr"} <= params.abbrev_types
    sentences = PunktSentenceTokenizer(params).tokenize("Dr. Smith met Mr. Jones. They talked.")
    assert sentences == ["Dr. Smith met Mr. Jones.", "They talked."]


def test_ensure_punkt_trains_once_from_the_data_folder(isolated_nltk):
    import nltk

    data_dir = isolated_nltk / "eval"
    data_dir.mkdir()
    (data_dir / punkt.TRAINING_TEXT).write_text(TEXT, encoding="utf-8")
    note = punkt.ensure_punkt(data_dir)
    assert note is not None and "trained offline" in note
    assert str(nltk.data.find("tokenizers/punkt_tab/english/")).startswith(str(punkt.punkt_dir()))
    (data_dir / punkt.TRAINING_TEXT).unlink()
    assert punkt.ensure_punkt(data_dir) == note  # found in the cache: no retraining needed


def test_missing_model_and_training_text_is_one_line_error(isolated_nltk):
    with pytest.raises(ForgeError, match="punkt_tab model is not installed") as info:
        punkt.ensure_punkt(None)
    assert "\n" not in str(info.value)


def test_a_missing_punkt_model_is_refused_when_planning_before_any_model_is_loaded(isolated_nltk):
    """The eval stage plans (and so checks) before loading models; IFEval looked for Punkt only after the load."""
    from dolphin_forge.config import EvalConfig
    from dolphin_forge.evaluate.run import plan_evaluation

    data_dir = isolated_nltk / "eval"
    (data_dir / "ifeval").mkdir(parents=True)
    (data_dir / "ifeval" / "input_data.jsonl").write_text('{"key": 1, "prompt": "p", "kwargs": [{}]}\n')
    settings = EvalConfig(tasks=["ifeval"], data_dir=str(data_dir))
    message = f"^ifeval: NLTK's punkt_tab model is not installed .* put {punkt.TRAINING_TEXT}"
    with pytest.raises(ForgeError, match=message):
        plan_evaluation(settings)
    (data_dir / punkt.TRAINING_TEXT).write_text(TEXT, encoding="utf-8")
    assert [r.harness_task for r in plan_evaluation(settings).requests] == ["ifeval_local"]
