"""The command line's own checks: exit statuses scripts rely on, and options refused in one line before any work."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dolphin_forge.cli import app
from dolphin_forge.errors import ForgeError


def test_validate_prints_everything_then_exits_1_when_a_path_is_missing(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(f"datasets:\n  - path: {tmp_path / 'missing.jsonl'}\n    type: alpaca\n")
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 1, result.output
    assert "derived values" in result.output  # the whole report is printed first
    assert result.output.rstrip().endswith(f"not found: datasets.0.path '{tmp_path / 'missing.jsonl'}' does not exist")
    (tmp_path / "missing.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    assert CliRunner().invoke(app, ["validate", str(config)]).exit_code == 0


@pytest.mark.parametrize("count", ["-1", "-5"])
def test_a_negative_debug_count_is_refused_before_preprocessing(tmp_path, count):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    config = tmp_path / "c.yml"
    config.write_text(f"datasets:\n  - path: {data}\n    type: alpaca\ndataset_prepared_path: {tmp_path / 'prep'}\n")
    result = CliRunner().invoke(app, ["preprocess", str(config), "--debug", count])
    assert isinstance(result.exception, ForgeError)
    assert str(result.exception) == f"--debug {count}: expected a number of examples >= 0"
    assert not (tmp_path / "prep").exists()


def test_errors_are_printed_as_text_so_bracketed_words_survive(monkeypatch, capsys):
    from dolphin_forge import cli

    def failing(**kwargs) -> None:
        raise ForgeError(
            "deepspeed: `pip install 'dolphin-forge[gpu]'`; a row range [start:end] must end after it starts"
        )

    monkeypatch.setattr(cli, "app", failing)
    monkeypatch.setattr(cli.console, "width", 300)
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    printed = capsys.readouterr().err.replace("\n", "")
    assert "dolphin-forge[gpu]" in printed and "[start:end]" in printed


def test_tables_are_not_cut_at_80_columns_when_output_is_piped(tmp_path):
    """rich falls back to 80 columns without a terminal, which wraps or cuts table cells in a CI log."""
    import os
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    config = tmp_path / "c.yml"
    config.write_text(f"datasets:\n  - path: {data}\n    type: alpaca\n")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([sys.executable, "-m", "dolphin_forge.cli", "validate", str(config)],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "known after `preprocess` (needs the row count)" in result.stdout  # one table cell, on one line


@pytest.mark.parametrize(("args", "expected"), [
    (["preprocess", "c.yml", "--debug", "abc"], "Invalid value for '--debug'"),
    (["no-such-stage"], "No such command 'no-such-stage'."),
    (["validate"], "Missing argument 'config'."),
    (["spectrum", "c.yml", "--show", "-1"], "Invalid value for '--show'"),  # -1 hid the last row, after the scan
])
def test_command_line_mistakes_are_one_line(tmp_path, args, expected):
    import subprocess
    import sys

    (tmp_path / "c.yml").write_text("base_model: default\n")
    result = subprocess.run([sys.executable, "-m", "dolphin_forge.cli", *args], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr


def test_preprocess_says_when_it_reuses_prepared_data_and_how_many_drops_it_did_not_show(tmp_path, tiny_model_dir):
    rows = [{"instruction": "word " * 200, "input": "", "output": "b"} for _ in range(8)]
    rows.append({"instruction": "a", "input": "", "output": "b"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = tmp_path / "c.yml"
    config.write_text(f"base_model: {tiny_model_dir}\ndatasets:\n  - path: {data}\n    type: alpaca\n"
                      f"dataset_prepared_path: {tmp_path / 'prep'}\nsequence_len: 64\n")
    first = CliRunner().invoke(app, ["preprocess", str(config)], env={"COLUMNS": "300"})
    assert first.exit_code == 0, first.output
    assert "reusing" not in first.output and "too_long: ... and 3 more" in first.output
    again = CliRunner().invoke(app, ["preprocess", str(config)], env={"COLUMNS": "300"})
    assert "unchanged inputs: reusing" in again.output


def test_version():
    from dolphin_forge import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dolphin-forge {__version__}"
