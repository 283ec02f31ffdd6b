"""LoRA through peft: only adapter weights train, the adapter is saved, and merge-lora reproduces its outputs."""

from __future__ import annotations

import re

import pytest
import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.lora import merge_lora
from dolphin_forge.train.sft import train
from tests.train.rows import random_rows


def test_lora_train_then_merge(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    config = ForgeConfig(
        base_model=str(tiny_model_dir), output_dir=str(out), sequence_len=64, max_steps=4, learning_rate=5e-3,
        adapter="lora", lora_r=4, lora_alpha=8, lora_target_linear=True,
    )
    result = train(config, train_rows=random_rows(4, 49152, seed=3))
    assert result.summary["mode"] == "lora"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainable = result.summary["trainable_parameters"]
    assert 0 < trainable < sum(p.numel() for p in base.parameters()) / 10

    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
        adapter_logits = adapted(input_ids=ids).logits
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-4)  # the adapter learned something

    merged_dir = merge_lora(out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "targets, named",
    [
        (["q_proj", "v_prj"], "lora_target_modules: 'v_prj' names no module of this model; its linear layers are "),
        (["v_prj"], "lora_target_modules: 'v_prj' names no module"),
        (["mlp"], "lora_target_modules: peft cannot adapt ['mlp']: Target module LlamaMLP is not supported"),
    ],
)
def test_lora_target_mistakes_name_the_key(tiny_model_dir, tmp_path, targets, named):
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64, max_steps=1,
                         adapter="lora", lora_target_modules=targets)
    with pytest.raises(ForgeError, match=re.escape(named)):
        train(config, train_rows=random_rows(2, 49152, seed=3))
