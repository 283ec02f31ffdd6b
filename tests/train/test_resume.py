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

from dolphin_forge.config import load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.train import checkpoint as ckpt
from dolphin_forge.train.sft import train
from tests.tiny import build_tiny_model
from tests.train.rows import write_chat_jsonl

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


def test_sigkill_then_resume_gives_the_same_weights(run_config, tmp_path):
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

    resumed = load_config(run_config, {"output_dir": str(out), "resume_from_checkpoint": "auto"}).config
    result = train(resumed, run_config)
    assert result.steps == expected.steps
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
