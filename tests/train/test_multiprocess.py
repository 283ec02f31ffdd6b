"""Several processes on CPU (gloo, under torchrun): DDP and FSDP with G accumulation steps reach the weights of one
process with 2G; an FSDP run resumed from its sharded checkpoint ends with the uninterrupted run's weights, and an
early-stopped FSDP run ends with its best step's weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dolphin_forge.config import load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.train.sft import train
from tests.tiny import build_tiny_model
from tests.train.test_compile import needs_compiler
from tests.train.rows import write_chat_jsonl

REPO = Path(__file__).resolve().parents[2]
FSDP = {"fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer) -> tuple[Path, dict]:
    """The reference: one process, 4 accumulation steps; returns its folder and the config the others share."""
    root = tmp_path_factory.mktemp("multiprocess")
    build_tiny_model(tokenizer, tie_word_embeddings=True).save_pretrained(root / "tiny")  # tied, as SmolLM2
    tokenizer.save_pretrained(root / "tiny")
    write_chat_jsonl(root / "chat.jsonl", count=36)
    base = {
        "base_model": str(root / "tiny"),
        "datasets": [{"path": str(root / "chat.jsonl"), "type": "sharegpt"}],
        "dataset_prepared_path": str(root / "prepared"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "weight_decay": 0.1,
        "seed": 5,
        "save_strategy": "no",
        "val_set_size": 4,
    }
    config = write_config(root / "one", {**base, "gradient_accumulation_steps": 4})
    train(load_config(config).config, config)
    return root / "one", base


def write_config(out: Path, values: dict) -> Path:
    path = out.with_suffix(".yml")
    path.write_text(yaml.safe_dump({**values, "output_dir": str(out)}))
    return path


# `dolphin-forge train CONFIG` with scripted validation losses, so that a run launched by torchrun stops early
SCRIPTED_LOSSES = """
import sys
import dolphin_forge.evaluate.perplexity as perplexity
from dolphin_forge.cli import main
losses, measure = iter([5.0, 4.0, 3.5, 3.0, 3.2, 3.3]), perplexity.validation_loss
def scripted(model, rows, batch_size):
    measure(model, rows, batch_size=batch_size)  # a real forward: with shard_grad_op it leaves gathered weights
    return next(losses)
perplexity.validation_loss = scripted
sys.argv = ["dolphin-forge", "train", sys.argv[1]]
main()
"""


def torchrun_train(config: Path, processes: int = 2, script: Path | None = None, ok: bool = True) -> str:
    """Run `train` under torchrun; returns its output (stdout and stderr), asserting the exit status is `ok`'s."""
    program = [str(script)] if script else ["-m", "dolphin_forge.cli", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           str(29500 + os.getpid() % 1000), *program, str(config)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result.stdout + result.stderr


def assert_same_weights(folder: Path, reference: Path) -> None:
    got, want = load_file(str(folder / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)


def train_metrics(folder: Path) -> list[dict]:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["kind"] == "train"]


def test_two_process_ddp_matches_one_process(one_process, tokenizer):
    one, base = one_process
    two = one.with_name("ddp")
    torchrun_train(write_config(two, {**base, "gradient_accumulation_steps": 2}))
    assert_same_weights(two, one)
    before = build_tiny_model(tokenizer, tie_word_embeddings=True).state_dict()
    weights = load_file(str(two / "model.safetensors"))
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], before["model.layers.0.mlp.up_proj.weight"])
    summary = json.loads((two / "training_summary.json").read_text())
    assert summary["processes"] == 2
    # AdamW's update hardly changes if every gradient is scaled alike; the gradient norm before clipping does
    norms = {folder.name: [m["grad_norm"] for m in train_metrics(folder)] for folder in (one, two)}
    assert len(norms["ddp"]) == 4 and norms["ddp"][0] == pytest.approx(norms["one"][0], rel=1e-5)


@needs_compiler
def test_two_process_ddp_with_compiled_checkpointed_layers_matches_one_eager_process(one_process):
    one, base = one_process
    two = one.with_name("ddp-compiled")
    torchrun_train(write_config(two, {**base, "gradient_accumulation_steps": 2, "torch_compile": True,
                                      "gradient_checkpointing": True}))
    assert_same_weights(two, one)


def test_fsdp_matches_one_process_resumes_exactly_and_keeps_its_best_weights(one_process):
    one, base = one_process
    fsdp = one.with_name("fsdp")
    values = {**base, **FSDP, "gradient_accumulation_steps": 2, "save_strategy": "steps", "save_steps": 2}
    torchrun_train(write_config(fsdp, values))
    assert_same_weights(fsdp, one)
    norms = [m["grad_norm"] for m in train_metrics(fsdp)]  # summed shard by shard: float32 order differs
    assert norms[0] == pytest.approx(train_metrics(one)[0]["grad_norm"], rel=1e-4)
    saved = fsdp / "checkpoint-2"
    shards = [load_file(str(saved / f"optimizer-{rank}.safetensors")) for rank in (0, 1)]
    assert not (saved / "optimizer.safetensors").exists()
    key = next(k for k, v in shards[0].items() if v.dim() == 2)  # each process holds half of every matrix's state
    assert shards[0][key].shape[0] + shards[1][key].shape[0] == 2 * shards[0][key].shape[0] > 0

    resumed = one.with_name("fsdp-resumed")  # as if killed after step 2: only that checkpoint survives
    shutil.copytree(saved, resumed / "checkpoint-2")
    torchrun_train(write_config(resumed, {**values, "resume_from_checkpoint": "auto"}))
    got, want = load_file(str(resumed / "model.safetensors")), load_file(str(fsdp / "model.safetensors"))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)

    damaged = one.with_name("fsdp-damaged")  # one process's shard is gone: both stop, neither waits for the other
    shutil.copytree(saved, damaged / "checkpoint-2")
    (damaged / "checkpoint-2" / "optimizer-1.safetensors").unlink()
    output = torchrun_train(write_config(damaged, {**values, "resume_from_checkpoint": "auto"}), ok=False)
    assert "checkpoint-2 is damaged: optimizer-1.safetensors is missing" in output
    assert "another process could not read its part of the checkpoint" in output

    single = one.with_name("fsdp-one-process")
    shutil.copytree(saved, single / "checkpoint-2")
    config = write_config(single, {**values, "resume_from_checkpoint": "auto"})
    with pytest.raises(ForgeError, match=r"sharded by FSDP over 2 processes; resume under FSDP on 2 processes"):
        train(load_config(config).config, config)

    # best validation loss at step 3, stopped by patience at step 5, whose evaluation left the weights gathered
    stopped = one.with_name("fsdp-early-stopped")
    script = stopped.with_name("scripted_losses.py")
    script.write_text(SCRIPTED_LOSSES)
    early = {**values, "fsdp": ["shard_grad_op", "auto_wrap"], "max_steps": 10, "eval_steps": 1,
             "early_stopping_patience": 2, "save_steps": 3}
    torchrun_train(write_config(stopped, early), script=script)
    summary = json.loads((stopped / "training_summary.json").read_text())
    assert (summary["steps"], summary["best_step"], summary["weights_from_step"]) == (5, 3, 3)
    best = stopped / "checkpoint-3" / "trainable.safetensors"  # this run's step 3 (its schedule spans 10 steps)
    got, want = load_file(str(stopped / "model.safetensors")), load_file(str(best))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


SELECTIVE = {"unfrozen_parameters": [r"^model.layers.1.mlp..*", r"^model.norm.weight$"]}
LORA = {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}


@pytest.mark.parametrize("mode", ["lora", "selective"])
def test_lora_and_selective_runs_under_fsdp_match_one_process(one_process, mode):
    """Frozen weights share FSDP units with trained ones (adapters, or the unfrozen MLP of a layer)."""
    one, base = one_process
    if mode == "lora":
        values, weights = {**base, **LORA}, "adapter_model.safetensors"
    else:
        values, weights = {**base, **SELECTIVE}, "model.safetensors"
    config = write_config(one.with_name(f"{mode}-one"), {**values, "gradient_accumulation_steps": 4})
    train(load_config(config).config, config)
    torchrun_train(write_config(one.with_name(f"{mode}-fsdp"), {**values, **FSDP, "gradient_accumulation_steps": 2}))
    got = load_file(str(one.with_name(f"{mode}-fsdp") / weights))
    want = load_file(str(one.with_name(f"{mode}-one") / weights))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
    before = load_file(str(one.with_name("tiny") / "model.safetensors"))
    changed = {name for name in want if name not in before or not torch.equal(want[name], before[name])}
    if mode == "lora":
        assert any("lora_B" in name for name in changed)
    else:  # exactly the listed matrices trained, the rest kept their base values
        listed = {f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}
        assert changed == listed | {"model.norm.weight"}


# `dolphin-forge train CONFIG` in which every process but the first fails if it reads the weights
FIRST_PROCESS_LOADS = """
import os
import sys
import dolphin_forge.train.sft as sft
from dolphin_forge.cli import main
if os.environ["RANK"] != "0":
    def refuse(*args, **kwargs):
        raise AssertionError("a process other than the first read the weights")
    sft.load_model = refuse
sys.argv = ["dolphin-forge", "train", sys.argv[1]]
main()
"""


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_fsdp_cpu_ram_efficient_loading_reads_the_weights_once_and_matches_one_process(one_process, mode):
    """Only the first process loads; the others build the model on the meta device (the full run adds a token,
    whose row the first process initialises; the LoRA run's adapters are made on the meta device) and receive
    their shards from it."""
    one, base = one_process
    values = {**base, **(LORA if mode == "lora" else {"tokens": ["<|tool|>"]})}
    weights = "adapter_model.safetensors" if mode == "lora" else "model.safetensors"
    reference = one.with_name(f"efficient-{mode}-one")
    config = write_config(reference, {**values, "gradient_accumulation_steps": 4})
    train(load_config(config).config, config)
    fsdp_config = {**FSDP["fsdp_config"], "fsdp_cpu_ram_efficient_loading": True}
    two = one.with_name(f"efficient-{mode}-fsdp")
    script = two.with_name("first_process_loads.py")
    script.write_text(FIRST_PROCESS_LOADS)
    torchrun_train(write_config(two, {**values, **FSDP, "fsdp_config": fsdp_config, "gradient_accumulation_steps": 2}),
                   script=script)
    got, want = load_file(str(two / weights)), load_file(str(reference / weights))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
