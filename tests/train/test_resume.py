"""Kill -9 at any point and resume: the final weights equal those of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dolphin_forge.config import ForgeConfig, load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.train import checkpoint as ckpt
from dolphin_forge.train.sft import SFTRecipe, train
from tests.tiny import build_tiny_model
from tests.train.rows import random_rows, write_chat_jsonl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_config(tmp_path, tokenizer) -> Path:
    model_dir = tmp_path / "tiny"
    build_tiny_model(tokenizer, attention_dropout=0.1).save_pretrained(model_dir)  # dropout: RNG state matters
    tokenizer.save_pretrained(model_dir)
    write_chat_jsonl(tmp_path / "chat.jsonl")
    config = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(tmp_path / "chat.jsonl"), "type": "sharegpt", "conversation": "chatml"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "sequence_len": 64,
        "sample_packing": True,
        "val_set_size": 4,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_epochs": 6,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 2,
        "weight_decay": 0.1,
        "save_steps": 2,
        "save_total_limit": 2,
        "evals_per_epoch": 1,
        "seed": 11,
    }
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_sigkill_then_resume_gives_the_same_weights(run_config, tmp_path, monkeypatch):
    reference = load_config(run_config, {"output_dir": str(tmp_path / "ref")}).config
    expected = train(reference, run_config)
    assert expected.steps >= 12

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dolphin_forge.cli", "train", str(run_config), "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint-4" / "state.json").is_file() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "training_summary.json").exists(), "the run finished before it could be killed"
    killed_at = ckpt.latest_checkpoint(out)
    assert killed_at is not None

    ran = []  # the optimizer steps the resumed process itself takes: a fresh restart would give the same weights
    step_once = SFTRecipe._optimizer_step
    monkeypatch.setattr(SFTRecipe, "_optimizer_step",
                        lambda self, step, state: ran.append(step) or step_once(self, step, state))
    resumed = load_config(run_config, {"output_dir": str(out), "resume_from_checkpoint": "auto"}).config
    result = train(resumed, run_config)
    assert result.steps == expected.steps
    assert ran == list(range(int(killed_at.name.removeprefix("checkpoint-")), expected.steps))
    want, got = final_weights(tmp_path / "ref"), final_weights(out)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, expected.steps + 1))  # lines a killed run wrote past its checkpoint are gone
    assert len(ckpt.checkpoints(out)) <= 2  # save_total_limit


def test_auto_resume_ignores_half_written_checkpoints(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "state.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-4").mkdir()  # a save killed half way
    (tmp_path / "checkpoint-6").mkdir()  # no state.json: not complete
    assert ckpt.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint-2"
    assert ckpt.resolve_resume("auto", tmp_path / "nothing-here") is None
    with pytest.raises(ForgeError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-6"), tmp_path)


def test_an_explicit_checkpoint_outside_output_dir_needs_an_unused_output_dir(tmp_path):
    old_run, new_run = tmp_path / "old", tmp_path / "new"
    (old_run / "checkpoint-4").mkdir(parents=True)
    (old_run / "checkpoint-4" / "state.json").write_text("{}")
    new_run.mkdir()
    assert ckpt.resolve_resume(str(old_run / "checkpoint-4"), new_run) == old_run / "checkpoint-4"
    assert ckpt.resolve_resume(str(old_run / "checkpoint-4"), old_run) == old_run / "checkpoint-4"
    (new_run / "checkpoint-8").mkdir()  # another run's, even half written
    another_run = r"outside output_dir .*new, which holds checkpoints of another run \(checkpoint-8\)"
    with pytest.raises(ForgeError, match=another_run):
        ckpt.resolve_resume(str(old_run / "checkpoint-4"), new_run)


class Killed(Exception):
    """Stands for SIGKILL arriving while a folder is being deleted."""


def killed_while_deleting(path, ignore_errors=False):
    """`shutil.rmtree` that dies after removing one file of the folder (the weights), as a kill can."""
    if Path(path).exists():
        (Path(path) / "trainable.safetensors").unlink(missing_ok=True)
        raise Killed(path)


def save(out: Path, step: int, value: float, keep: int | None = None) -> Path:
    weight = torch.nn.Parameter(torch.full((2, 2), value))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    return ckpt.save_checkpoint(out, step, trainable={"w": weight}, optimizer=optimizer, state={"value": value},
                                rank=0, is_main=True, barrier=lambda: None, keep=keep)


def assert_complete(out: Path) -> None:
    for folder in ckpt.checkpoints(out):
        files = {p.name for p in folder.iterdir()}
        assert {"trainable.safetensors", "optimizer.safetensors", "rng-0.safetensors"} <= files, folder


def test_replacing_a_checkpoint_never_leaves_a_broken_one(tmp_path, monkeypatch):
    save(tmp_path, 2, 1.0)
    save(tmp_path, 2, 2.0)  # the same step again: the new one replaces the old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))["w"][0, 0] != 1.0
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(Killed):
        save(tmp_path, 2, 3.0)  # killed while the old checkpoint-2 is being deleted
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert json.loads((tmp_path / "checkpoint-2" / "state.json").read_text())["value"] == 3.0
    assert_complete(tmp_path)


def test_pruning_removes_the_validity_marker_first(tmp_path, monkeypatch):
    save(tmp_path, 1, 1.0, keep=1)
    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(Killed):
        save(tmp_path, 2, 2.0, keep=1)  # killed while checkpoint-1 is being pruned
    assert (tmp_path / "checkpoint-1").is_dir()  # half deleted ...
    assert ckpt.checkpoints(tmp_path) == [tmp_path / "checkpoint-2"]  # ... and not taken for a checkpoint
    assert_complete(tmp_path)


def small_run(model_dir: Path, out: Path, **overrides) -> ForgeConfig:
    settings = {"sequence_len": 64, "max_steps": 2, "save_steps": 1, **overrides}
    return ForgeConfig(base_model=str(model_dir), output_dir=str(out), **settings)


@pytest.mark.parametrize(
    "first, then, named",
    [
        ({"unfrozen_parameters": ["model.layers.1.mlp.down_proj"]}, {"unfrozen_parameters": ["model.layers.1.mlp"]},
         "it trains another set of parameters .* resume with the unfrozen_parameters"),
        ({"unfrozen_parameters": ["lm_head.weight"]}, {"unfrozen_parameters": ["lm_head.weight[0:100]"]},
         "its optimizer groups hold .* unfrozen_parameters row ranges"),
        ({}, {"tokens": ["<|new_token|>"]},
         r"\S+ has shape \(49152, 64\) there and \(49153, 64\) here; resume with the tokens"),
        ({}, {"micro_batch_size": 2}, r"its remaining steps would train on other rows \(micro_batch_size x "
         r"gradient_accumulation_steps x processes = 1 x 1 x 1 there, 2 x 1 x 1 here\); resume with the settings"),
        ({}, {"seed": 7}, r"its remaining steps would train on other rows \(seed 42 there, 7 here\)"),
    ],
)
def test_resume_with_a_changed_config_names_the_key(tiny_model_dir, tmp_path, first, then, named):
    rows = random_rows(4, 49152, seed=1)
    out = tmp_path / "out"
    train(small_run(tiny_model_dir, out, **first), train_rows=rows)
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-1"
    changed = small_run(tiny_model_dir, out, resume_from_checkpoint="auto", **then)
    with pytest.raises(ForgeError,
                       match=f"resume_from_checkpoint: .*checkpoint-1 was written with a different config: {named}"):
        train(changed, train_rows=rows)


def test_trading_micro_batch_size_for_accumulation_steps_resumes(tiny_model_dir, tmp_path):
    """Every step still trains the same rows (as after an out-of-memory error on resume): not refused."""
    rows = random_rows(4, 49152, seed=1)
    out = tmp_path / "out"
    train(small_run(tiny_model_dir, out, micro_batch_size=2), train_rows=rows)
    (out / "model.safetensors").rename(tmp_path / "uninterrupted.safetensors")
    resumed = small_run(tiny_model_dir, out, resume_from_checkpoint="auto", micro_batch_size=1,
                        gradient_accumulation_steps=2)
    assert train(resumed, train_rows=rows).steps == 2
    expected = load_file(str(tmp_path / "uninterrupted.safetensors"))
    for name, value in final_weights(out).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5)


def one_weight_module() -> torch.nn.Module:
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.zeros(2, 2))
    return module


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-10])


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda f: (f / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
        (lambda f: (f / "optimizer.json").unlink(), "optimizer.json is missing"),
        (lambda f: (f / "rng-0.json").unlink(), "rng-0.json is missing"),
        (lambda f: (f / "rng-0.safetensors").unlink(), "rng-0.safetensors is missing"),
        (lambda f: truncate(f / "trainable.safetensors"),
         r"trainable.safetensors is not a readable safetensors file \(truncated or corrupt"),
        (lambda f: truncate(f / "state.json"), r"state.json is not valid JSON \(line \d+: "),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_before_anything_is_restored(tmp_path, damage, named):
    save(tmp_path, 1, 1.0)
    folder = save(tmp_path, 2, 2.0)
    damage(folder)
    module = one_weight_module()
    optimizer = torch.optim.AdamW(module.parameters())
    earlier = r"; set resume_from_checkpoint to .*checkpoint-1$"
    expected = rf"^resume_from_checkpoint: {folder} is damaged: {named}.*{earlier}"
    with pytest.raises(ForgeError, match=expected) as info:
        ckpt.load_checkpoint(folder, module, optimizer, 0)
    assert "\n" not in str(info.value)
    assert torch.equal(module.w, torch.zeros(2, 2)) and not optimizer.state  # nothing half restored


def test_a_weights_only_checkpoint_of_a_sharded_run_is_refused_on_resume(tmp_path):
    """FSDP/DeepSpeed optimizer state is sharded: their checkpoints hold weights only and must not half-resume."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight])
    folder = ckpt.save_checkpoint(tmp_path, 1, trainable={"w": weight}, optimizer=None, state={}, rank=0,
                                  is_main=True, barrier=lambda: None)
    assert not (folder / "optimizer.json").exists() and (folder / "trainable.safetensors").is_file()
    refused = r"^resume_from_checkpoint: .*checkpoint-1 holds weights only .* cannot be resumed"
    with pytest.raises(ForgeError, match=refused):
        ckpt.load_checkpoint(folder, torch.nn.Module(), optimizer, 0)


def test_resuming_keeps_this_runs_optimizer_kernel(tmp_path):
    """A checkpoint from an unfused AdamW must not switch the resumed run off the fused kernel (or back on)."""
    model = torch.nn.Linear(3, 3)
    unfused = torch.optim.AdamW(model.parameters(), fused=False)
    model(torch.ones(1, 3)).sum().backward()
    unfused.step()
    folder = ckpt.save_checkpoint(tmp_path, 1, trainable=dict(model.named_parameters()), optimizer=unfused, state={},
                                  rank=0, is_main=True, barrier=lambda: None)
    fused = torch.optim.AdamW(model.parameters(), fused=True)
    ckpt.load_checkpoint(folder, model, fused, 0)
    assert fused.param_groups[0]["fused"] is True
    assert torch.equal(fused.state[model.weight]["exp_avg"], unfused.state[model.weight]["exp_avg"])


def train_lrs(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["lr"] for line in lines if line["kind"] == "train"}


def test_a_resumed_run_trains_with_its_own_configs_learning_rate_decay_and_schedule(tiny_model_dir, tmp_path):
    """Resumed with a lower learning rate, another decay and a longer run: those apply, with a warning naming them
    (the HF Trainer keeps the checkpoint's learning rate silently); the moments still come from the checkpoint."""
    from rich.console import Console

    from dolphin_forge.train.optim import lr_factor

    rows = random_rows(4, 49152, seed=1)
    first = dict(lr_scheduler="cosine", warmup_steps=1, max_steps=4, save_steps=2)
    train(small_run(tiny_model_dir, tmp_path / "first", learning_rate=1e-3, weight_decay=0.0, **first),
          train_rows=rows)
    saved = tmp_path / "first" / "checkpoint-2"
    console = Console(record=True, width=400)
    changed = dict(first, max_steps=6, learning_rate=5e-4, weight_decay=0.1)
    resumed = small_run(tiny_model_dir, tmp_path / "resumed", resume_from_checkpoint=str(saved), **changed)
    assert train(resumed, train_rows=rows, console=console).steps == 6

    text = console.export_text()
    assert ("warning: resume_from_checkpoint: this config changes learning_rate 0.001 -> 0.0005, total_steps 4 -> 6, "
            "weight_decay 0.0 -> 0.1 against checkpoint-2; from step 3 on, training uses this config's values") in text
    lrs = train_lrs(tmp_path / "resumed")
    assert sorted(lrs) == [3, 4, 5, 6]
    for step, lr in lrs.items():
        assert lr == pytest.approx(5e-4 * lr_factor(step - 1, schedule="cosine", warmup=1, total=6), rel=1e-12)
    groups = json.loads((tmp_path / "resumed" / "checkpoint-4" / "optimizer.json").read_text())["param_groups"]
    assert [g["initial_lr"] for g in groups] == [5e-4] * 3 and groups[0]["weight_decay"] == 0.1
    before = load_file(str(saved / "optimizer.safetensors"))
    after = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "optimizer.safetensors"))
    steps = [name for name in after if name.endswith(".step")]
    assert steps and all(after[n].item() == before[n].item() + 2 for n in steps)  # moments went on, not restarted


def test_an_unchanged_resume_warns_about_nothing(tiny_model_dir, tmp_path):
    from rich.console import Console

    rows = random_rows(4, 49152, seed=1)
    out = tmp_path / "out"
    train(small_run(tiny_model_dir, out, max_steps=3), train_rows=rows)
    console = Console(record=True, width=400)
    train(small_run(tiny_model_dir, tmp_path / "again", max_steps=3, resume_from_checkpoint=str(out / "checkpoint-2")),
          train_rows=rows, console=console)
    assert "resumed from" in console.export_text() and "warning" not in console.export_text()


def test_a_checkpoint_without_recorded_settings_still_names_a_changed_learning_rate(tiny_model_dir, tmp_path):
    """Checkpoints written before state.json recorded `optimizer_settings`: the optimizer groups tell."""
    from rich.console import Console

    rows = random_rows(4, 49152, seed=1)
    out = tmp_path / "out"
    train(small_run(tiny_model_dir, out, learning_rate=2e-5), train_rows=rows)
    state_file = out / "checkpoint-1" / "state.json"
    state = json.loads(state_file.read_text())
    del state["optimizer_settings"]
    state_file.write_text(json.dumps(state))
    console = Console(record=True, width=400)
    again = small_run(tiny_model_dir, tmp_path / "again", learning_rate=1e-5,
                      resume_from_checkpoint=str(out / "checkpoint-1"))
    train(again, train_rows=rows, console=console)
    assert "this config changes learning_rate 2e-05 -> 1e-05 against checkpoint-1" in console.export_text()


def test_resuming_a_checkpoint_at_or_past_the_end_of_the_run_is_refused(tiny_model_dir, tmp_path):
    rows = random_rows(4, 49152, seed=1)
    out = tmp_path / "out"
    train(small_run(tiny_model_dir, out), train_rows=rows)
    shorter = small_run(tiny_model_dir, tmp_path / "again", max_steps=1,
                        resume_from_checkpoint=str(out / "checkpoint-1"))
    refused = r"checkpoint-1 is at step 1 and this config's run has 1 steps; raise max_steps"
    with pytest.raises(ForgeError, match=refused):
        train(shorter, train_rows=rows)


def test_the_rng_states_of_eleven_gpus_come_back_in_device_order(monkeypatch):
    """`cuda.10` sorts before `cuda.2` as text: restored by name, each GPU would get another one's generator."""
    tensors, meta = ckpt._rng_state()  # this machine's CPU states, plus eleven GPUs' told apart by their first byte
    tensors.update({f"cuda.{i}": torch.tensor([i], dtype=torch.uint8) for i in range(11)})
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(int(s[0]) for s in states))
    ckpt._set_rng_state(tensors, meta)
    assert restored == list(range(11))
