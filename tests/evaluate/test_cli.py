"""`dolphin-forge eval` end to end on a tiny model: perplexity + a local harness task, JSON and both tables."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dolphin_forge.cli import app
from dolphin_forge.config import load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.evaluate.perplexity import perplexity_of_ids, tokenize_text
from dolphin_forge.evaluate.report import ModelEvaluation, harness_tables
from dolphin_forge.evaluate.run import eval_settings


def test_eval_command_writes_results_and_tables(tmp_path, tiny_model_dir, tokenizer, shared_data):
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 30 + "\n\nA second document follows here.", encoding="utf-8")
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\neval:\n  max_length: 32\n")
    result = CliRunner().invoke(
        app,
        ["eval", str(config), "--tasks", "winogrande", "--limit", "2", "--data-dir", str(shared_data / "eval"),
         "--perplexity", str(text), "--batch-size", "2", "--num-fewshot", "2"],
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "eval"
    payload = json.loads((folder / "results.json").read_text())["models"][0]

    from dolphin_forge.models.load import load_model

    ids = tokenize_text(tokenizer, text.read_text())
    expected = perplexity_of_ids(load_model(tiny_model_dir), ids, max_length=32, stride=16)
    assert payload["perplexity"]["text.txt"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-9)
    assert payload["perplexity"]["text.txt"]["tokens"] == expected.tokens
    assert payload["harness"]["results"]["winogrande_local"]["alias"] == "winogrande"
    assert payload["harness"]["n-samples"]["winogrande_local"]["effective"] == 2
    assert payload["harness"]["n-shot"]["winogrande_local"] == 2 and payload["settings"]["num_fewshot"] == 2
    report = (folder / "report.md").read_text()
    tables = harness_tables(ModelEvaluation(**payload))
    assert tables.splitlines()[0].replace(" ", "") == "|Tasks|Version|Filter|n-shot|Metric||Value||Stderr|"
    assert tables in report
    assert "|dataset|tiny-llama|" in report and "|text.txt (ppl)|" in report
    assert report in result.output  # printed as well


def test_command_line_values_are_validated_like_the_config(tmp_path):
    config = load_config(data={"eval": {"tasks": ["mmlu"], "limit": 5}}).config
    settings = eval_settings(config, limit=2, tasks=None, batch_size="auto")
    assert settings.limit == 2 and settings.tasks == ["mmlu"]
    with pytest.raises(ForgeError, match=r"eval.limit = -1"):
        eval_settings(config, limit=-1)


def test_batch_size_and_stride_are_checked_with_their_keys():
    config = load_config(data={"eval": {"max_length": 64}}).config
    with pytest.raises(ForgeError, match=r"eval.batch_size = 0: .*whole number >= 1, or auto"):
        eval_settings(config, batch_size=0)
    with pytest.raises(ForgeError, match=r"eval.stride = 65: .*at most max_length \(64\)"):
        eval_settings(config, stride=65)


def test_a_typo_is_reported_before_any_model_is_loaded(tmp_path):
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tmp_path / 'no-such-model'}\noutput_dir: {tmp_path}\n")
    result = CliRunner().invoke(app, ["eval", str(config), "--tasks", "winogrand", "--data-dir", str(tmp_path)])
    assert isinstance(result.exception, ForgeError)
    assert "'winogrand' has no local copy" in str(result.exception)


def test_two_perplexity_files_of_one_name_are_refused_before_any_model_is_loaded(tmp_path):
    """Results are kept by file name: wiki/test.txt's score would silently be replaced by ptb/test.txt's."""
    for folder in ("wiki", "ptb"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "test.txt").write_text("Some text to score.")
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tmp_path / 'no-such-model'}\noutput_dir: {tmp_path}\n")
    files = [str(tmp_path / "wiki" / "test.txt"), str(tmp_path / "ptb" / "test.txt")]
    result = CliRunner().invoke(app, ["eval", str(config), "--perplexity", files[0], "--perplexity", files[1]])
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception) == (
        f"eval.perplexity_files: {files[0]} and {files[1]} share the name 'test.txt', under which results are kept; "
        "rename one, or list a file once"
    )


def test_too_short_perplexity_file_names_the_file(tmp_path, tiny_model_dir):
    text = tmp_path / "short.txt"
    text.write_text("", encoding="utf-8")
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path}\n")
    result = CliRunner().invoke(app, ["eval", str(config), "--perplexity", str(text)])
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception).startswith(f"eval.perplexity_files: {text}: perplexity needs at least 2 tokens")


def test_a_perplexity_file_that_is_not_utf8_is_named_not_scored(tmp_path, tiny_model_dir):
    text = tmp_path / "latin1.txt"
    text.write_bytes("Caf\u00e9 au lait. ".encode("latin-1") * 40)
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path}\n")
    result = CliRunner().invoke(app, ["eval", str(config), "--perplexity", str(text)])
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception).startswith(f"eval.perplexity_files: {text}: not UTF-8 text (byte 3: ")
    assert not (tmp_path / "eval" / "results.json").exists()


def test_nothing_to_evaluate_is_a_clear_error(tmp_path, tiny_model_dir):
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path}\n")
    result = CliRunner().invoke(app, ["eval", str(config)])
    assert isinstance(result.exception, ForgeError)
    assert "nothing to evaluate" in str(result.exception)


def test_missing_local_data_is_a_one_line_error(tmp_path, tiny_model_dir):
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path}\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["eval", str(config), "--tasks", "winogrande", "--data-dir", str(empty)])
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception).startswith("winogrande: cannot load its data:")
    assert "dev.jsonl" in str(result.exception) and "\n" not in str(result.exception)


@pytest.mark.parametrize("data_dir", [False, True])
def test_tasks_that_all_need_the_hub_say_so_instead_of_nothing_to_evaluate(tmp_path, data_dir):
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tmp_path / 'no-such-model'}\noutput_dir: {tmp_path}\n")
    args = ["eval", str(config), "--tasks", "hellaswag"] + (["--data-dir", str(tmp_path)] if data_dir else [])
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception) == (
        "eval.tasks: hellaswag has no local copy and eval.hub is false, so nothing is left to run "
        "(set eval.hub: true where the dataset hub is reachable)"
    )


def test_a_missing_model_names_eval_models_before_any_model_is_loaded(tmp_path, tiny_model_dir):
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 30, encoding="utf-8")
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\n")
    args = ["eval", str(config), "--model", str(tiny_model_dir), "--model", "nonexist", "--perplexity", str(text)]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception).startswith("eval.models: 'nonexist' is not a local folder")
    assert not (tmp_path / "out").exists()  # the first model was not evaluated first


def test_eval_output_dir_is_relative_to_the_working_directory_like_every_output_folder(tmp_path, tiny_model_dir,
                                                                                        monkeypatch):
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 30, encoding="utf-8")
    (tmp_path / "project" / "results").mkdir(parents=True)  # a folder of that name beside the config is not used
    config = tmp_path / "project" / "eval.yml"
    config.write_text(f"base_model: {tiny_model_dir}\neval:\n  output_dir: results\n  max_length: 32\n")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    result = CliRunner().invoke(app, ["eval", str(config), "--perplexity", str(text)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "work" / "results" / "results.json").is_file()
    assert not any((tmp_path / "project" / "results").iterdir())
    result = CliRunner().invoke(app, ["eval", str(config), "--perplexity", str(text), "--output", "chosen"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "work" / "chosen" / "results.json").is_file()


def test_an_output_that_is_a_file_names_the_option_or_the_key(tmp_path):
    taken = tmp_path / "taken.txt"
    taken.write_text("")
    config = tmp_path / "eval.yml"
    config.write_text("eval:\n  tasks: [mmlu]\n")
    result = CliRunner().invoke(app, ["eval", str(config), "--output", str(taken)])
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception) == f"--output {taken}: is a file; expected a folder (it is created if missing)"
    with pytest.raises(ForgeError, match=r"^eval.output_dir = '.*taken.txt': is a file; expected a folder"):
        eval_settings(load_config(config).config, output_dir=str(taken))  # a library caller typed no option


@pytest.mark.parametrize("source", ["base_model", "eval.models"])
def test_a_model_folder_without_a_tokenizer_names_the_key_it_came_from(tmp_path, tiny_model_dir,
                                                                       untokenized_model_dir, source):
    bare = untokenized_model_dir
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 30, encoding="utf-8")
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {bare if source == 'base_model' else tiny_model_dir}\noutput_dir: {tmp_path}\n")
    models = ["--model", str(bare)] if source == "eval.models" else []
    result = CliRunner().invoke(app, ["eval", str(config), "--perplexity", str(text), *models])
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception).startswith(f"{source}: {bare} has no tokenizer (none of tokenizer.json, ")



@pytest.mark.parametrize(("tasks", "missing"), [
    ("winogrande", "winogrande/dev.jsonl does not exist"),
    ("mmlu_stem", "mmlu/test/abstract_algebra_test.csv does not exist (and 37 more of its files)"),
])
def test_a_data_dir_without_the_task_files_is_refused_before_the_model_is_loaded(tmp_path, monkeypatch, tasks,
                                                                                 missing):
    """The harness opens the files only after the model has loaded: minutes lost on a large model."""
    from dolphin_forge.evaluate import run

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data folder was checked")

    monkeypatch.setattr(run, "load_for_eval", no_load)
    (tmp_path / "model").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "eval.yml"
    config.write_text(f"base_model: {tmp_path / 'model'}\noutput_dir: {tmp_path}\neval:\n  data_dir: {empty}\n")
    expected = (f"{tasks}: cannot load its data: {empty}/{missing}; expected eval.data_dir (or --data-dir) to hold "
                "the release files, laid out as ../shared/data/eval")
    for args in (["--data-dir", str(empty)], []):  # the option, and the config key it mirrors
        result = CliRunner().invoke(app, ["eval", str(config), "--tasks", tasks, *args])
        assert isinstance(result.exception, ForgeError), result.exception
        assert str(result.exception) == expected
