"""Damaged weight folders are one-line errors naming the file, for `spectrum` and `laser` alike."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from dolphin_forge.config import load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.spectral.checkpoint import Checkpoint
from dolphin_forge.spectral.stages import run_laser, run_spectrum
from tests.tiny import build_tiny_model

SHARD = "model-00001-of-00001.safetensors"  # a shard name: the index is read only without a model.safetensors


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
    (tmp_path / SHARD).write_bytes(weights[:100])
    (tmp_path / "model.safetensors.index.json").write_text(f'{{"weight_map": {{"lm_head.weight": "{SHARD}"}}}}')
    with pytest.raises(ForgeError, match=re.escape(f"{tmp_path / SHARD}: not a readable safetensors")):
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
    (tmp_path / SHARD).write_bytes(weights)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ForgeError, match=re.escape(f"{tmp_path / 'model.safetensors.index.json'}: {expected}")):
        Checkpoint(tmp_path)


def test_a_single_model_file_wins_over_a_stale_index(tmp_path, weights):
    """transformers loads `model.safetensors` first; an index left over from a sharded save must not be read."""
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}'
    )
    checkpoint = Checkpoint(tmp_path)
    assert set(checkpoint.files.values()) == {tmp_path / "model.safetensors"}
    assert "model.layers.1.mlp.down_proj.weight" in checkpoint.shapes


@pytest.mark.parametrize("weights_file", ["model.safetensors", "weights.safetensors"])
def test_mistral_consolidated_weights_are_not_read(tmp_path, weights, weights_file):
    """Mistral folders ship `consolidated.safetensors` beside the HF files: the same weights under other names."""
    (tmp_path / weights_file).write_bytes(weights)
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, tmp_path / "consolidated.safetensors")
    checkpoint = Checkpoint(tmp_path)
    assert set(checkpoint.files.values()) == {tmp_path / weights_file}
    assert "attention.wq" not in checkpoint.layer_types() and "mlp.down_proj" in checkpoint.layer_types()


def test_a_folder_with_only_mistral_consolidated_weights_says_so(tmp_path):
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, tmp_path / "consolidated.safetensors")
    with pytest.raises(ForgeError, match=r"has no \.safetensors weights in Hugging Face layout \(found consolidated"):
        Checkpoint(tmp_path)


def test_a_lora_adapter_folder_is_named_as_one(tmp_path):
    """Its lora_A/lora_B weights would otherwise be listed as the model's types, matching no module type."""
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)},
              tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ForgeError, match=f"^spectrum.model: {tmp_path} is a LoRA adapter, not a model; merge it first"):
        Checkpoint(tmp_path, "spectrum.model")


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


def test_overlapping_module_types_each_count_as_matched(tmp_path, weights):
    (tmp_path / "model.safetensors").write_bytes(weights)
    checkpoint = Checkpoint(tmp_path)
    both = checkpoint.layer_matrices(["q_proj", "self_attn.q_proj"])
    assert [m.tensor for m in both] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    with pytest.raises(ForgeError, match=r"^spectrum\.module_types: mlp\.gate_prj match no 2-D layer weight"):
        checkpoint.layer_matrices(["q_proj", "self_attn.q_proj", "mlp.gate_prj"])


def test_layers_outside_the_model_are_refused(tmp_path, weights):
    (tmp_path / "model.safetensors").write_bytes(weights)
    expected = rf"^laser\.layers: 2, 99 outside the layers of {tmp_path} \(expected numbers in 0\.\.1\)$"
    with pytest.raises(ForgeError, match=expected):
        Checkpoint(tmp_path).layer_matrices(["q_proj"], [1, 2, 99], section="laser")
    with pytest.raises(ForgeError, match=r"laser\.layers = \[1, -1\]: expected layer numbers >= 0, .*got -1$"):
        load_config(data={"laser": {"layers": [1, -1]}})


def test_weight_folder_errors_name_the_key_the_folder_came_from(tmp_path, tiny_model_dir):
    (tiny_model_dir / "model.safetensors").unlink()
    (tiny_model_dir / "pytorch_model.bin").write_bytes(b"not read")
    out = {"output_dir": str(tmp_path / "out")}
    for data, key in [({"spectrum": {"model": str(tiny_model_dir)}}, "spectrum.model"),
                      ({"base_model": str(tiny_model_dir)}, "base_model")]:
        with pytest.raises(ForgeError, match=rf"^{re.escape(key)}: {tiny_model_dir} has no \.safetensors weights"):
            run_spectrum(load_config(data={**out, **data}).config)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 600)
    laser = {"model": str(tiny_model_dir), "eval_file": str(text)}
    with pytest.raises(ForgeError, match=rf"^laser\.model: {tiny_model_dir} has no \.safetensors weights"):
        run_laser(load_config(data={**out, "laser": laser}).config)
