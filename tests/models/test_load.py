"""Tokenizer loading: the ChatML markers always special, and relative model folders resolved like every path."""

from __future__ import annotations

import pytest

from dolphin_forge.config import load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.load import load_model, load_tokenizer, open_tokenizer
from tests.data.test_chatml import E, S, tokenizer_with_plain_markers


@pytest.fixture
def relative_model(tmp_path, tokenizer, monkeypatch):
    """A model folder named relatively in a config that sits beside it, run from another working directory."""
    (tmp_path / "project").mkdir()
    tokenizer_with_plain_markers(tokenizer).save_pretrained(tmp_path / "project" / "base")
    config_path = tmp_path / "project" / "run.yml"
    config_path.write_text("base_model: base\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    return load_config(config_path)


def test_plain_markers_become_special_with_unchanged_ids(relative_model):
    loaded = load_tokenizer(relative_model.config, relative_model.path)
    markers = {t.content: t.special for t in loaded.backend_tokenizer.get_added_tokens_decoder().values()}
    assert markers["<|im_start|>"] is True and markers["<|im_end|>"] is True
    assert loaded.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [S, E]
    assert loaded.decode([S, 26843, E], skip_special_tokens=True) == "Hi"


def test_a_relative_base_model_resolves_beside_the_config_for_validate_and_preprocess(relative_model, tokenizer):
    from dolphin_forge.data.preprocess import _tokenizer_fingerprint

    config, path = relative_model.config, relative_model.path
    absolute = config.model_copy(update={"base_model": str(path.parent / "base")})
    assert config.missing_paths(path) == []  # what `validate` checks
    assert _tokenizer_fingerprint(config, path) == _tokenizer_fingerprint(absolute, None)  # the preprocess cache key
    assert len(load_tokenizer(config, path)) == len(tokenizer)
    with pytest.raises(ForgeError, match="base_model: 'base' is not a local folder"):
        load_tokenizer(config)  # without the config's location only the working directory is searched


@pytest.mark.parametrize(("key", "named"), [("base_model", "base_model"), ("laser.model", "laser.model")])
def test_tokenizer_errors_name_the_key_the_folder_came_from(tmp_path, key, named):
    (tmp_path / "no-tokenizer").mkdir()
    config = load_config(data={"base_model": str(tmp_path / "no-tokenizer")}).config
    no_tokenizer = f"^{named}: {tmp_path / 'no-tokenizer'} has no tokenizer \\(none of tokenizer.json, "
    with pytest.raises(ForgeError, match=no_tokenizer):
        load_tokenizer(config, key=key)
    with pytest.raises(ForgeError, match="^tokenizer_config: 'nowhere' is not a local folder"):
        load_tokenizer(config.model_copy(update={"tokenizer_config": "nowhere"}), key=key)


@pytest.mark.parametrize(("name", "kind"), [("model.gguf", "a GGUF file"), ("weights.bin", "a file")])
def test_a_model_file_instead_of_a_folder_is_named_as_such(tmp_path, name, kind):
    """transformers would read the file as config.json and call it invalid JSON."""
    (tmp_path / name).write_bytes(b"GGUF\x03\x00")
    config = load_config(data={"base_model": str(tmp_path / name)}).config
    with pytest.raises(ForgeError) as info:
        load_tokenizer(config)
    expected = f"base_model: {str(tmp_path / name)!r} is {kind}; expected a Hugging Face model folder"
    assert str(info.value) == f"{expected} (config.json, safetensors)"


def test_a_folder_without_config_json_is_named(tiny_model_dir):
    (tiny_model_dir / "config.json").unlink()
    with pytest.raises(ForgeError, match=r"^cannot load a model from .*: no config.json \(expected a Hugging Face"):
        load_model(tiny_model_dir)


def test_a_truncated_weights_file_is_named_not_a_traceback(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ForgeError) as info:
        load_model(tiny_model_dir)
    assert str(info.value).startswith(f"{weights}: not a readable safetensors file (truncated or corrupt: ")
    assert "\n" not in str(info.value)


def test_a_damaged_tokenizer_file_is_named_in_one_line(tiny_model_dir):
    """A truncated copy names the file and line; valid JSON of another shape (transformers: a bare KeyError) says so."""
    text = (tiny_model_dir / "tokenizer.json").read_text()
    (tiny_model_dir / "tokenizer.json").write_text(text[:5000])
    with pytest.raises(ForgeError, match=r"^base_model: .*tokenizer\.json:\d+: not valid JSON \(Expecting"):
        open_tokenizer(tiny_model_dir, "base_model")
    (tiny_model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(ForgeError, match=r"^base_model: cannot load a tokenizer from .*: its files are damaged or of "
                                         r"another format \(KeyError: 'added_tokens'\)$"):
        open_tokenizer(tiny_model_dir, "base_model")
