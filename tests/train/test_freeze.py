"""Selective fine-tuning with Axolotl's `unfrozen_parameters` semantics, including the seed's own list."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.freeze import apply_unfrozen_parameters, match_unfrozen
from dolphin_forge.train.sft import train
from tests.tiny import build_tiny_model
from tests.train.rows import random_rows

NEMO_SEED = "dolphin-2.9.3-mistral-nemo-12b.md"


def seed_unfrozen_list(shared_data) -> list[str]:
    card = shared_data.parent / "seeds" / NEMO_SEED
    if not card.is_file():
        pytest.skip(f"seed card {card} not found")
    block = re.search(r"```yaml\n(.*?)```", card.read_text(), re.S)[1]
    return yaml.safe_load(block)["unfrozen_parameters"]


def test_axolotl_matching_rules():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(12)] + ["model.norm.weight", "lm_head.weight"]
    assert set(match_unfrozen(names, ["model.layers.1.mlp"])) == {"model.layers.1.mlp.up_proj.weight"}  # `.` literal
    # a trailing `.` is literal too: as a regex wildcard it would also match the `0` and `1` of layers 10 and 11
    assert set(match_unfrozen(names, ["model.layers.1."])) == {"model.layers.1.mlp.up_proj.weight"}
    prefixed = {f"model.layers.{i}.mlp.up_proj.weight" for i in (1, 10, 11)}
    assert set(match_unfrozen(names, ["model.layers.1"])) == prefixed
    with pytest.raises(ForgeError, match="no parameter name matches any of the 2 patterns"):
        match_unfrozen(names, ["norm", "up_proj"])  # anchored at the start: neither matches
    assert set(match_unfrozen(names, ["^lm_head.weight$", "model.norm"])) == {"lm_head.weight", "model.norm.weight"}
    assert match_unfrozen(names, ["lm_head.weight[2:5]"]) == {"lm_head.weight": [(2, 5)]}
    assert match_unfrozen(names, ["lm_head.weight[7]"]) == {"lm_head.weight": [(7, 8)]}
    assert match_unfrozen(names, ["lm_head.weight[:3]"]) == {"lm_head.weight": [(None, 3)]}


def test_seed_list_on_tiny_mistral(tokenizer, shared_data):
    patterns = seed_unfrozen_list(shared_data)
    assert len(patterns) > 100
    model = build_tiny_model(tokenizer, arch="mistral")
    summary = apply_unfrozen_parameters(model, patterns)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # worked out by hand from the list: 'input_layernorm' etc. are anchored at the start and match nothing
    assert trainable == {
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    }
    params = dict(model.named_parameters())
    assert summary.trainable == sum(params[n].numel() for n in trainable)
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert "input_layernorm" in summary.unmatched and "model.layers.37.mlp.down_proj" in summary.unmatched


def test_selective_training_moves_only_unfrozen_weights_and_new_token_rows(tokenizer, tmp_path):
    folder = tmp_path / "mistral"
    build_tiny_model(tokenizer, arch="mistral").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = ForgeConfig(
        base_model=str(folder), output_dir=str(tmp_path / "out"), sequence_len=64, max_steps=3, learning_rate=1e-2,
        weight_decay=0.1, tokens=["<|new_token|>"],
        unfrozen_parameters=["model.layers.1.mlp.down_proj", "lm_head.weight[0:100]"],
    )
    rows = random_rows(4, 49152, seed=2)
    rows[0]["input_ids"][3] = len(tokenizer)  # the added token's id, so its embedding row gets a gradient
    train(config, train_rows=rows)
    from transformers import AutoModelForCausalLM

    before = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    vocab = before["model.embed_tokens.weight"].shape[0]
    assert after["model.embed_tokens.weight"].shape[0] == vocab + 1
    for name, old in before.items():
        new = after[name]
        if name == "model.layers.1.mlp.down_proj.weight":
            assert not torch.equal(new, old)
        elif name == "lm_head.weight":
            assert not torch.equal(new[:100], old[:100])
            torch.testing.assert_close(new[100:vocab], old[100:], rtol=0, atol=0)  # weight decay did not touch them
        elif name == "model.embed_tokens.weight":
            torch.testing.assert_close(new[:vocab], old, rtol=0, atol=0)
        else:
            torch.testing.assert_close(new, old, rtol=0, atol=0, msg=name)


def _selective_recipe_with_a_new_token(tokenizer, tmp_path, model):
    """A set-up selective recipe (only one MLP matrix unfrozen) whose config adds a token that a row uses and
    predicts, so both its embedding and head rows get gradients; returns the recipe and the new token's id."""
    from dolphin_forge.train.sft import SFTRecipe

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = ForgeConfig(base_model=str(folder), output_dir=str(tmp_path / "out"), sequence_len=64,
                         tokens=["<|new_token|>"], unfrozen_parameters=["model.layers.1.mlp.down_proj"])
    rows = random_rows(2, 49152, seed=4)
    new_id = len(tokenizer)
    rows[0]["input_ids"][3] = new_id
    rows[0]["labels"][4] = new_id  # predicted too, so the head row gets a gradient
    recipe = SFTRecipe(config)
    recipe.setup(rows, None)
    return recipe, new_id


def test_added_token_rows_get_gradients_when_embeddings_are_frozen(tokenizer, tmp_path):
    mistral = build_tiny_model(tokenizer, arch="mistral")
    recipe, new_id = _selective_recipe_with_a_new_token(tokenizer, tmp_path, mistral)
    recipe.accumulate_gradients(0)
    params = dict(recipe.model.named_parameters())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grad = params[name].grad
        assert grad.shape[0] == new_id + 1
        assert grad[new_id].abs().sum() > 0 and grad[:new_id].abs().sum() == 0, name
        assert recipe.freeze.partial[name].rows == [(new_id, new_id + 1)]


def test_added_tokens_landing_in_padding_rows_are_initialised_and_trained(tokenizer, tmp_path):
    """Models often pad the embedding matrix past the tokenizer: new ids then need no resize, but still train."""
    padded = build_tiny_model(tokenizer, vocab_size=len(tokenizer) + 64)
    recipe, new_id = _selective_recipe_with_a_new_token(tokenizer, tmp_path, padded)
    params = dict(recipe.model.named_parameters())
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weight = params[name]
        assert weight.shape[0] == new_id + 64  # no resize was needed
        torch.testing.assert_close(weight[new_id], weight[:new_id].mean(dim=0))
        assert recipe.freeze.partial[name].rows == [(new_id, new_id + 1)], name
    recipe.accumulate_gradients(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert params[name].grad[new_id].abs().sum() > 0, name


def test_invalid_row_ranges_are_refused(tokenizer):
    names = ["lm_head.weight"]
    for entry in ("lm_head.weight[5:2]", "lm_head.weight[3:3]", "lm_head.weight[:0]"):
        with pytest.raises(ForgeError, match=re.escape(f"unfrozen_parameters: {entry!r}: a row range")):
            match_unfrozen(names, [entry])
    model = build_tiny_model(tokenizer)
    rows = model.lm_head.weight.shape[0]
    for entry in (f"lm_head.weight[0:{rows + 1}]", f"lm_head.weight[{rows}:]", f"lm_head.weight[{rows}]"):
        with pytest.raises(ForgeError, match=re.escape(f"{entry!r} selects rows beyond the end of lm_head.weight")):
            apply_unfrozen_parameters(model, [entry])
    summary = apply_unfrozen_parameters(model, [f"lm_head.weight[{rows - 1}:{rows}]"])  # the last row is in range
    assert summary.partial["lm_head.weight"].rows == [(rows - 1, rows)]
