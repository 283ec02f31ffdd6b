"""merge-lora on incomplete or hand-edited adapter folders: one line naming the file, or a sensible fallback."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.lora import merge_lora
from tests.tiny import build_tiny_model


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir, tokenizer) -> Path:
    """A LoRA adapter on the tiny model, saved as `train` saves one (weights, config with base path, tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
    folder = tmp_path / "ad4"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_missing_weights_name_the_expected_file(adapter_dir, tmp_path):
    (adapter_dir / "adapter_model.safetensors").unlink()
    with pytest.raises(ForgeError) as info:
        merge_lora(adapter_dir, tmp_path / "out")
    assert one_line(info) == (
        f"{adapter_dir}: no adapter_model.safetensors (expected a LoRA adapter folder written by dolphin-forge train)"
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        ("{bad", ":1: not valid JSON (Expecting property name enclosed in double quotes)"),
        ("[1]", ": expected a JSON object"),
        ('{"base_model_name_or_path": 5}', ": base_model_name_or_path is empty or not a folder name; pass "
                                           "--base-model"),
    ],
)
def test_a_malformed_adapter_config_names_the_file(adapter_dir, tmp_path, text, expected):
    (adapter_dir / "adapter_config.json").write_text(text)
    with pytest.raises(ForgeError) as info:
        merge_lora(adapter_dir, tmp_path / "out")
    assert one_line(info) == f"{adapter_dir / 'adapter_config.json'}{expected}"


def test_a_truncated_adapter_weights_file_is_named(adapter_dir, tmp_path):
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    expected = f"{weights}: not a readable safetensors file (truncated or corrupt"
    with pytest.raises(ForgeError, match=re.escape(expected)):
        merge_lora(adapter_dir, tmp_path / "out")


def test_an_adapter_for_another_base_model_is_one_line(adapter_dir, tmp_path, tokenizer):
    other = tmp_path / "other"
    build_tiny_model(tokenizer, hidden_size=32).save_pretrained(other, safe_serialization=True)
    with pytest.raises(ForgeError, match=r"does not fit the base model .*other \(size mismatch for ") as info:
        merge_lora(adapter_dir, tmp_path / "out", base_model=str(other))
    one_line(info)
    with pytest.raises(ForgeError, match=r"^--base-model: 'nowhere' is not a local folder"):
        merge_lora(adapter_dir, tmp_path / "out", base_model="nowhere")


def test_without_its_own_tokenizer_the_adapter_merges_with_the_base_models(adapter_dir, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter_dir / name, bare / name)
    merged_dir = merge_lora(bare, tmp_path / "merged")
    assert len(AutoTokenizer.from_pretrained(merged_dir)) == len(AutoTokenizer.from_pretrained(tiny_model_dir))
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)(ids)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids)
    torch.testing.assert_close(merged.logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_the_merged_model_never_overwrites_a_model_or_a_file(adapter_dir, tmp_path, tiny_model_dir):
    """Checked before the base loads: save_pretrained would replace the base model's weights without asking."""
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (tmp_path / "a-file").write_text("x")
    cases = [
        (tiny_model_dir, f"{tiny_model_dir}: is the base model's folder; choose another folder for the merged model"),
        (adapter_dir, f"{adapter_dir}: is the adapter's folder; choose another folder for the merged model"),
        (tmp_path / "a-file", f"{tmp_path / 'a-file'}: is a file; expected a folder for the merged model"),
    ]
    for output, expected in cases:
        with pytest.raises(ForgeError) as info:
            merge_lora(adapter_dir, output)
        assert one_line(info).startswith(expected)
    merge_lora(adapter_dir, tmp_path / "merged")
    with pytest.raises(ForgeError, match="merged: already holds a model; choose another folder or remove it"):
        merge_lora(adapter_dir, tmp_path / "merged")
    assert (tiny_model_dir / "model.safetensors").read_bytes() == weights


def test_an_adapter_folder_without_config_json_still_loads_onto_its_base(adapter_dir):
    """`eval --model <LoRA output>` works through transformers' adapter loading; the config.json check allows it."""
    from dolphin_forge.models.load import load_model

    assert not (adapter_dir / "config.json").exists()
    assert load_model(adapter_dir).get_input_embeddings().weight.shape[1] == 64


@pytest.mark.parametrize("mixed, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("no", torch.float32)])
def test_4bit_layers_compute_in_the_runs_precision(mixed, dtype):
    """An fp16-only GPU (V100, T4) must not be handed bf16 matmuls by QLoRA."""
    from dolphin_forge.models.lora import quantization_config

    assert quantization_config(ForgeConfig(adapter="qlora"), mixed).bnb_4bit_compute_dtype == dtype


def test_each_process_puts_its_quantized_weights_on_its_own_gpu(monkeypatch):
    from dolphin_forge.models.lora import quantized_device_map

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert quantized_device_map() == {"": 3}
    monkeypatch.delenv("LOCAL_RANK")
    assert quantized_device_map() == {"": 0}


def test_merging_a_folder_that_does_not_exist_says_so(tmp_path):
    with pytest.raises(ForgeError, match=r"nope: does not exist; expected the output folder of a LoRA `train` run"):
        merge_lora(tmp_path / "nope", tmp_path / "out")
