"""Damaged weight folders are one-line errors naming the file, for `spectrum` and `laser` alike."""

from __future__ import annotations

import re

import pytest

from dolphin_forge.config import load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.spectral.checkpoint import Checkpoint
from dolphin_forge.spectral.stages import run_laser, run_spectrum
from tests.tiny import build_tiny_model


@pytest.fixture(scope="module")
def weights(tmp_path_factory, tokenizer) -> bytes:
    folder = tmp_path_factory.mktemp("w")
    build_tiny_model(tokenizer).save_pretrained(folder, safe_serialization=True)
    return (folder / "model.safetensors").read_bytes()


def test_a_truncated_safetensors_file_names_the_file(tmp_path, weights):
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ForgeError, match=re.escape(f"{tmp_path / 'model.safetensors'}: not a readable safetensors "
                                                   "file (truncated or corrupt: ")) as info:
        Checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def test_a_truncated_shard_listed_in_the_index_names_the_shard(tmp_path, weights):
    (tmp_path / "model.safetensors").write_bytes(weights[:100])
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "model.safetensors"}}')
    with pytest.raises(ForgeError, match=re.escape(f"{tmp_path / 'model.safetensors'}: not a readable safetensors")):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    "index, expected",
    [
        ('{"weight_map": 5}', "weight_map should map tensor names to files"),
        ('{"weight_map": {"lm_head.weight": 5}}', "weight_map should map tensor names to files"),
        ("[1]", "expected a JSON object with a `weight_map`"),
        ("{bad", "expected a JSON object with a `weight_map`"),
    ],
)
def test_a_malformed_index_names_the_index(tmp_path, weights, index, expected):
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ForgeError, match=re.escape(f"{tmp_path / 'model.safetensors.index.json'}: {expected}")):
        Checkpoint(tmp_path)


def test_the_stages_name_their_own_model_key(tmp_path):
    config = load_config(data={"output_dir": str(tmp_path), "spectrum": {"model": "nonexist"},
                                "laser": {"model": "nonexist"}}).config
    with pytest.raises(ForgeError, match=r"^spectrum\.model: 'nonexist' is not a local folder"):
        run_spectrum(config)
    with pytest.raises(ForgeError, match=r"^laser\.model: 'nonexist' is not a local folder"):
        run_laser(config)
    fallback = load_config(data={"output_dir": str(tmp_path), "base_model": str(tmp_path / "nope")}).config
    with pytest.raises(ForgeError, match=r"^base_model: '.*nope' is not a local folder"):
        run_spectrum(fallback)


def test_a_truncated_model_stops_laser_with_the_same_message(tmp_path, tiny_model_dir, weights):
    (tiny_model_dir / "model.safetensors").write_bytes(weights[:100])
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 600)
    config = load_config(data={"base_model": str(tiny_model_dir), "output_dir": str(tmp_path),
                               "laser": {"eval_file": str(text)}}).config
    with pytest.raises(ForgeError, match=r"model\.safetensors: not a readable safetensors file"):
        run_laser(config)
