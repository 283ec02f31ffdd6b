"""The SFT recipe on a tiny random Llama: loss normalisation, an end-to-end run, the output folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.train import checkpoint as ckpt
from dolphin_forge.train.sft import SFTRecipe, train
from tests.train.rows import random_rows


def tiny_config(model_dir: Path, out: Path, **overrides) -> ForgeConfig:
    values = dict(
        base_model=str(model_dir),
        output_dir=str(out),
        sequence_len=64,
        learning_rate=1e-3,
        lr_scheduler="constant",
        max_grad_norm=None,
        seed=3,
    )
    values.update(overrides)
    return ForgeConfig(**values)


def window_gradients(model_dir: Path, out: Path, rows, **overrides) -> tuple[float, dict[str, torch.Tensor]]:
    recipe = SFTRecipe(tiny_config(model_dir, out, **overrides))
    recipe.setup(rows, None)
    model = recipe._unwrapped
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x; older name below
    if checkpointing is None:
        checkpointing = model.is_gradient_checkpointing
    assert checkpointing == bool(overrides.get("gradient_checkpointing"))
    values = recipe.accumulate_gradients(0)
    grads = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
    return values["loss"], grads


def test_one_batch_of_8_equals_8_batches_of_1(tiny_model_dir, tmp_path):
    rows = random_rows(8, 49152, seed=5)  # rows of different lengths and trained-token counts
    loss_a, grads_a = window_gradients(tiny_model_dir, tmp_path / "a", rows, micro_batch_size=8)
    loss_b, grads_b = window_gradients(
        tiny_model_dir, tmp_path / "b", rows, micro_batch_size=1, gradient_accumulation_steps=8
    )
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4, msg=name)
    # a mean of per-micro-batch means would differ: the rows have unequal trained-token counts
    counts = [sum(1 for t in r["labels"][1:] if t != -100) for r in rows]
    assert len(set(counts)) > 1


def test_sync_flag_marks_only_the_last_micro_batch_and_accelerate_loss_scaling_is_undone(tiny_model_dir, tmp_path,
                                                                                            monkeypatch):
    """Under DeepSpeed the flag decides when the engine steps, and the engine divides the loss by its accumulation
    steps (accelerate does the same elsewhere); the window-mean gradient must come out unchanged."""
    rows = random_rows(6, 49152, seed=5)
    _, expected = window_gradients(tiny_model_dir, tmp_path / "a", rows, micro_batch_size=2,
                                   gradient_accumulation_steps=3)
    recipe = SFTRecipe(tiny_config(tiny_model_dir, tmp_path / "b", micro_batch_size=2, gradient_accumulation_steps=3))
    recipe.setup(rows, None)
    acc = recipe.accelerator
    flags = []
    backward = acc.backward
    monkeypatch.setattr(acc, "backward", lambda loss, **kw: flags.append(acc.sync_gradients) or backward(loss, **kw))
    monkeypatch.setitem(acc.gradient_state.plugin_kwargs, "num_steps", 3)  # what accelerate copies from DeepSpeed
    assert acc.gradient_accumulation_steps == 3
    recipe.accumulate_gradients(0)
    assert flags == [False, False, True]
    grads = {n: p.grad for n, p in recipe.model.named_parameters() if p.grad is not None}
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_config_and_batch_plan_agree_on_steps_per_epoch():
    """`validate` / `preprocess` report the config's count; training runs the plan's."""
    from dolphin_forge.train.batches import BatchPlan

    for rows, micro, accumulation, world in [(100, 3, 4, 1), (100, 3, 4, 8), (1, 4, 2, 2), (37, 1, 1, 3), (8, 2, 8, 1)]:
        config = ForgeConfig(micro_batch_size=micro, gradient_accumulation_steps=accumulation)
        plan = BatchPlan(num_rows=rows, micro_batch_size=micro, accumulation_steps=accumulation, world_size=world,
                         rank=0, seed=0)
        assert config.steps_per_epoch(rows, world) == plan.steps_per_epoch


def test_gradient_checkpointing_gives_the_same_gradients_on_packed_rows(tiny_model_dir, tmp_path):
    """The seed configs train with `gradient_checkpointing`; recomputation must not change the packed-row maths."""
    rows = random_rows(4, 49152, seed=7, per_row=3)  # several samples per row: position ids restart inside rows
    assert any(len(r["seq_lens"]) > 1 for r in rows)
    loss_a, grads_a = window_gradients(
        tiny_model_dir, tmp_path / "a", rows, micro_batch_size=2, gradient_accumulation_steps=2
    )
    loss_b, grads_b = window_gradients(
        tiny_model_dir, tmp_path / "b", rows, micro_batch_size=2, gradient_accumulation_steps=2,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_train_lowers_loss_and_writes_a_chat_ready_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = random_rows(6, 200, seed=1, per_row=2, max_len=16)  # small id range: learnable in a few steps
    val = rows[:2]
    out = tmp_path / "out"
    config = tiny_config(tiny_model_dir, out, max_steps=12, micro_batch_size=2, learning_rate=3e-3,
                         lr_scheduler="cosine", warmup_steps=2, max_grad_norm=1.0, eval_steps=4)
    result = train(config, train_rows=rows, val_rows=val)
    assert result.steps == 12
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.5
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == list(range(1, 13))
    assert all(m["real_tokens_per_s"] > 0 and 0 < m["mfu"] for m in train_lines)
    assert train_lines[0]["lr"] == 0.0 and train_lines[2]["lr"] == pytest.approx(3e-3)  # warmup then peak
    assert [m["step"] for m in metrics if m["kind"] == "eval"] == [0, 4, 8, 12]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 12 and summary["mode"] == "full"
    assert any((out / "tensorboard").iterdir())

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == im_end
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    trained = dict(model.named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_output_keeps_the_base_sampling_defaults_and_names_the_tokenizer_eos(tiny_model_dir, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "eos_token_id": 0}))
    model_config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**model_config, "eos_token_id": 0}))
    out = tmp_path / "out"
    train(tiny_config(base, out, max_steps=1), train_rows=random_rows(2, 200, seed=1))
    generation = json.loads((out / "generation_config.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    tokenizer_eos = json.loads((out / "tokenizer_config.json").read_text())["eos_token"]
    from transformers import AutoTokenizer

    im_end = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")
    assert generation["do_sample"] is True and generation["temperature"] == 0.6
    assert generation["eos_token_id"] == im_end
    assert saved["use_cache"] is True  # off only while training
    assert saved["eos_token_id"] == AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(tokenizer_eos)


def test_early_stopping_after_patience_evals_without_improvement(tiny_model_dir, tmp_path, monkeypatch):
    import dolphin_forge.evaluate.perplexity as perplexity

    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])
    monkeypatch.setattr(perplexity, "validation_loss", lambda model, rows, batch_size: next(losses))
    rows = random_rows(4, 49152, seed=1)
    config = tiny_config(tiny_model_dir, tmp_path / "out", max_steps=10, eval_steps=1, early_stopping_patience=2)
    result = train(config, train_rows=rows, val_rows=rows[:1])
    assert result.stopped == "early_stopping" and result.steps == 4
    assert [loss for _, loss in result.val_losses] == [5.0, 4.0, 3.0, 3.5, 3.6]


@pytest.mark.parametrize(
    ("steps_per_epoch", "total_steps", "per_epoch", "every"),
    [(7, 14, 4, 2), (8, 16, 4, 2), (3, 6, 2, 2), (40, 8, 2, 4), (40, 80, 2, 20), (1, 5, 4, 1)],
)
def test_per_epoch_intervals_never_run_more_often_than_asked(steps_per_epoch, total_steps, per_epoch, every):
    from types import SimpleNamespace

    from dolphin_forge.train.sft import SFTRecipe

    recipe = SimpleNamespace(plan=SimpleNamespace(steps_per_epoch=steps_per_epoch), total_steps=total_steps)
    assert SFTRecipe._every(recipe, None, per_epoch) == every
    assert SFTRecipe._every(recipe, 5, per_epoch) == 5  # eval_steps / save_steps win
    assert SFTRecipe._every(recipe, None, None) is None


def _output_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("keep_best", [None, False])
def test_early_stopping_ends_with_the_best_weights_unless_told_not_to(tiny_model_dir, tmp_path, monkeypatch, keep_best):
    """As Axolotl (HF's load_best_model_at_end, which it turns on with early stopping): the output is step 2's."""
    import dolphin_forge.evaluate.perplexity as perplexity

    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6])
    monkeypatch.setattr(perplexity, "validation_loss", lambda model, rows, batch_size: next(losses))
    rows = random_rows(4, 49152, seed=1)
    config = tiny_config(tiny_model_dir, tmp_path / "out", max_steps=10, eval_steps=1, early_stopping_patience=2,
                         load_best_model_at_end=keep_best)
    result = train(config, train_rows=rows, val_rows=rows[:1])
    assert result.steps == 4 and result.summary["best_step"] == 2
    # kept: a resume from a checkpoint of this run needs them
    assert (result.output_dir / "best-weights").is_dir() == (keep_best is None)
    expected_step = 2 if keep_best is None else 4
    assert result.summary["weights_from_step"] == expected_step
    reference = train(tiny_config(tiny_model_dir, tmp_path / "ref", max_steps=expected_step), train_rows=rows)
    other = train(tiny_config(tiny_model_dir, tmp_path / "other", max_steps=6 - expected_step), train_rows=rows)
    got, want, not_want = (_output_weights(r) for r in (result.output_dir, reference.output_dir, other.output_dir))
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert any(not torch.equal(got[name], not_want[name]) for name in want)


def test_damaged_best_weights_leave_the_last_weights_and_a_warning(tiny_model_dir, tmp_path, monkeypatch):
    """A run must not end without output because best-weights/ was damaged after it was written (a full disk)."""
    from rich.console import Console

    import dolphin_forge.evaluate.perplexity as perplexity

    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6])
    monkeypatch.setattr(perplexity, "validation_loss", lambda model, rows, batch_size: next(losses))
    save = ckpt.save_best_weights

    def save_then_damage(output_dir, *args):
        save(output_dir, *args)
        weights = output_dir / ckpt.BEST / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])

    monkeypatch.setattr(ckpt, "save_best_weights", save_then_damage)
    console = Console(record=True, width=300)
    rows = random_rows(4, 49152, seed=1)
    config = tiny_config(tiny_model_dir, tmp_path / "out", max_steps=10, eval_steps=1, early_stopping_patience=2)
    result = train(config, train_rows=rows, val_rows=rows[:1], console=console)
    assert (result.steps, result.summary["best_step"], result.summary["weights_from_step"]) == (4, 2, 4)
    assert (result.output_dir / "model.safetensors").is_file()
    assert re.search(r"warning: load_best_model_at_end: the best validation loss was at step 2 but .*best-weights is "
                     r"damaged \(SafetensorError: .*\); the output holds the weights of step 4", console.export_text())


def test_best_weights_of_another_step_or_run_are_not_used(tiny_model_dir, tmp_path):
    """A resumed run may find best-weights/ written after its checkpoint by the killed run, or an unrelated run's
    in its output_dir: never load those. A resumed run's own may lie beside the checkpoint it came from."""
    from dolphin_forge.models.load import load_model

    model = load_model(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    ours, earlier = tmp_path / "out", tmp_path / "earlier"
    ckpt.save_best_weights(ours, 7, 1.0, changed, "run-a")
    assert ckpt.load_best_weights([ours], model, 5, "run-a") is None
    assert ckpt.load_best_weights([ours], model, 7, "run-b") is None
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    (earlier / ".tmp-best-weights.old").mkdir(parents=True)  # a replace killed half way leaves this behind
    (earlier / ".tmp-best-weights.old" / "trainable.safetensors").write_bytes(b"")
    ckpt.save_best_weights(earlier, 7, 1.0, changed, "run-b")
    assert ckpt.load_best_weights([ours, earlier], model, 7, "run-b") == earlier / ckpt.BEST
    assert all(torch.equal(p, changed[n]) for n, p in model.named_parameters())


def test_load_best_model_at_end_needs_evaluations(tiny_model_dir, tmp_path):
    from dolphin_forge.errors import ForgeError

    rows = random_rows(4, 49152, seed=1)
    config = tiny_config(tiny_model_dir, tmp_path / "out", max_steps=2, load_best_model_at_end=True)
    with pytest.raises(ForgeError, match="^load_best_model_at_end: needs evaluations during the run; set eval_steps"):
        train(config, train_rows=rows, val_rows=rows[:1])


@pytest.mark.parametrize(("keys", "saved"), [({}, ["checkpoint-2", "checkpoint-4"]), ({"save_strategy": "no"}, [])])
def test_a_checkpoint_ends_every_epoch_unless_saving_is_off(tiny_model_dir, tmp_path, keys, saved):
    rows = random_rows(4, 49152, seed=1)
    config = tiny_config(tiny_model_dir, tmp_path / "out", num_epochs=3, micro_batch_size=2, **keys)
    result = train(config, train_rows=rows)
    assert result.steps == 6
    assert sorted(p.name for p in result.output_dir.glob("checkpoint-*")) == saved
