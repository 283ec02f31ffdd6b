"""Two processes (gloo, CPU) with G accumulation steps reach the weights of one process with 2G."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dolphin_forge.config import load_config
from dolphin_forge.train.sft import train
from tests.tiny import build_tiny_model
from tests.train.rows import write_chat_jsonl

REPO = Path(__file__).resolve().parents[2]


def test_two_process_ddp_matches_one_process(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    build_tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_chat_jsonl(tmp_path / "chat.jsonl", count=36)
    base = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(tmp_path / "chat.jsonl"), "type": "sharegpt"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "weight_decay": 0.1,
        "seed": 5,
    }
    runs = {"one": (1, 4), "two": (2, 2)}  # name: (processes, gradient_accumulation_steps)
    for name, (procs, accumulation) in runs.items():
        config = tmp_path / f"{name}.yml"
        config.write_text(yaml.safe_dump({**base, "gradient_accumulation_steps": accumulation,
                                          "output_dir": str(tmp_path / name)}))
        if procs == 1:
            train(load_config(config).config, config)
            continue
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(29500 + os.getpid() % 1000), "-m", "dolphin_forge.cli", "train", str(config)]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    before = build_tiny_model(tokenizer).state_dict()
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    assert not torch.equal(one["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    summary = yaml.safe_load((tmp_path / "two" / "training_summary.json").read_text())
    assert summary["processes"] == 2
    # AdamW's update hardly changes if every gradient is scaled alike; the gradient norm before clipping does
    norms = {name: [m["grad_norm"] for m in train_metrics(tmp_path / name)] for name in runs}
    assert len(norms["two"]) == 4 and norms["two"][0] == pytest.approx(norms["one"][0], rel=1e-5)


def train_metrics(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["kind"] == "train"]
