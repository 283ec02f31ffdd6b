"""Training throughput of `dolphin-forge train` against Axolotl and TRL's SFTTrainer, run back to back.

Same model (the embedded SmolLM2-135M-Instruct), same data (ShareGPT conversations from ../shared/data), sequence
length 2048 with packing, micro batch 1, no accumulation, float32 on this CPU (Axolotl needs bf16: false here),
AdamW at 2e-5, N optimizer steps each, gradient checkpointing on for all three by default (the seed configs' setting
and TRL's default; `--no-gradient-checkpointing` turns it off for all three). Ours runs three times: as configured
by default; with `torch_compile: true` (decoder layers compiled; its first, excluded step includes the compile);
and, as `ours-fast`, compiled with `gradient_checkpointing_layers: 15` (`--checkpointed-layers`): the first 15 of
SmolLM2's 30 layers recompute in the backward, the last 15 keep their activations. Reported per tool:

* real tokens/s: non-padding tokens processed per second of training steps;
* trained tokens/s: tokens whose label is trained (the masking differs: Axolotl and we train assistant turns only,
  TRL's defaults train every token, so for TRL the two numbers are equal);
* MFU: 6 x (linear weights) x real tokens/s over the matmul peak measured in this run (float32, and bf16 for
  reference), the same formula for every tool;
* peak RSS of the training process (`wait4` rusage).

Step times exclude the first step (warm-up) and model loading / preprocessing. Peers run from their own venv
(`--peer-python`, default /work/peers/axo/bin/python); nothing here is imported from them.

    .venv/bin/python benchmarks/train_throughput.py --steps 4
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DATA = SHARED / "sharegpt" / "fastchat_dummy_conversation.json"

TRL_SCRIPT = r'''
import json, sys, time
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

model_dir, data_path, out, steps, seq_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
checkpointing = sys.argv[6] == "1"
roles = {"human": "user", "gpt": "assistant", "system": "system"}
rows = [{"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in r["conversations"]]}
        for r in json.load(open(data_path))]
dataset = Dataset.from_list(rows)

class Timer(TrainerCallback):
    def __init__(self):
        self.times, self.tokens, self.start = [], [], None
    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.start)
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "num_tokens" in logs:
            self.tokens.append(logs["num_tokens"])

timer = Timer()
config = SFTConfig(output_dir=out, max_length=seq_len, packing=True, per_device_train_batch_size=1,
                   gradient_accumulation_steps=1, max_steps=steps, learning_rate=2e-5, logging_steps=1,
                   save_strategy="no", report_to=[], bf16=False, fp16=False, use_cpu=True, seed=42,
                   gradient_checkpointing=checkpointing)
trainer = SFTTrainer(model=model_dir, args=config, train_dataset=dataset,
                     processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer])
trainer.train()
print("TRL_RESULT " + json.dumps({"times": timer.times, "num_tokens": timer.tokens}))
'''


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, str]:
    """Run a command, return (exit code, peak RSS in MiB of it and its waited children, its output)."""
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, log.read_text(errors="ignore")


def checkpointing_keys(on: bool) -> dict:
    """The seed configs' gradient checkpointing keys (Axolotl's and our schema share them)."""
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}} if on else {}


def run_ours(
    work: Path, model_dir: Path, steps: int, seq_len: int, checkpointing: bool, compiled: bool,
    checkpointed_layers: int | None = None, name: str = "ours",
) -> dict:
    config = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(DATA), "type": "sharegpt", "conversation": "chatml"}],
        "dataset_prepared_path": str(work / "ours-prepared"),
        "output_dir": str(work / f"{name}-out"),
        "sequence_len": seq_len,
        "sample_packing": True,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": 2e-5,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "bf16": "auto",
        "seed": 42,
        "torch_compile": compiled,
        **checkpointing_keys(checkpointing),
    }
    if checkpointing and checkpointed_layers is not None:
        config["gradient_checkpointing_layers"] = checkpointed_layers
    path = work / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    forge = [sys.executable, "-m", "dolphin_forge.cli"]
    subprocess.run([*forge, "preprocess", str(path)], cwd=REPO, check=True, capture_output=True)
    code, rss, output = run_measured([*forge, "train", str(path)], work / f"{name}.log")
    if code != 0:
        raise SystemExit(f"dolphin-forge train failed:\n{output[-3000:]}")
    lines = [json.loads(x) for x in (work / f"{name}-out" / "metrics.jsonl").read_text().splitlines()]
    steps_ = [x for x in lines if x["kind"] == "train"][1:]
    seconds = sum(x["real_tokens"] / x["real_tokens_per_s"] for x in steps_)
    return {
        "real": sum(x["real_tokens"] for x in steps_) / seconds,
        "trained": sum(x["trained_tokens"] for x in steps_) / seconds,
        "rss": rss,
        "step_s": seconds / len(steps_),
    }


def run_axolotl(
    work: Path,
    model_dir: Path,
    steps: int,
    seq_len: int,
    peer_python: str,
    real_per_trained: float,
    checkpointing: bool,
) -> dict:
    config = {
        "base_model": str(model_dir),
        "datasets": [{
            "path": str(DATA), "type": "chat_template", "chat_template": "chatml", "field_messages": "conversations",
            "message_property_mappings": {"role": "from", "content": "value"},
            "roles": {"user": ["human"], "assistant": ["gpt"], "system": ["system"]},
        }],
        "ds_type": "json",
        "dataset_prepared_path": str(work / "axo-prepared"),
        "output_dir": str(work / "axo-out"),
        "sequence_len": seq_len,
        "sample_packing": True,
        "pad_to_sequence_len": True,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "num_epochs": 1,
        "learning_rate": 2e-5,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "flash_attention": False,
        "attn_implementation": "sdpa",
        "logging_steps": 1,
        "save_strategy": "no",
        "val_set_size": 0,
        "include_tkps": True,
        "seed": 42,
        **checkpointing_keys(checkpointing),
    }
    path = work / "axolotl.yml"
    path.write_text(yaml.safe_dump(config))
    bin_dir = Path(peer_python).parent
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled",
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}  # axolotl starts `accelerate launch` from PATH
    code, rss, output = run_measured([str(bin_dir / "axolotl"), "train", str(path)], work / "axolotl.log", env)
    if code != 0:
        raise SystemExit(f"axolotl train failed:\n{output[-3000:]}")
    logs = [ast.literal_eval(m) for m in re.findall(r"\{'loss'[^{}]*\}", output)]
    rates = [float(x["tokens/train_per_sec_per_gpu"]) for x in logs if "tokens/train_per_sec_per_gpu" in x][1:]
    if not rates:
        raise SystemExit(f"no tokens/train_per_sec_per_gpu in Axolotl's log {work / 'axolotl.log'}")
    trained = statistics.mean(rates)
    return {"real": trained * real_per_trained, "trained": trained, "rss": rss, "step_s": float("nan"),
            "note": "real = trained x (real/trained of the same data as we mask it)"}


def run_trl(work: Path, model_dir: Path, steps: int, seq_len: int, peer_python: str, checkpointing: bool) -> dict:
    script = work / "trl_sft.py"
    script.write_text(TRL_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    cmd = [peer_python, str(script), str(model_dir), str(DATA), str(work / "trl-out"), str(steps), str(seq_len),
           str(int(checkpointing))]
    code, rss, output = run_measured(cmd, work / "trl.log", env)
    if code != 0:
        raise SystemExit(f"TRL failed:\n{output[-3000:]}")
    result = json.loads(output.split("TRL_RESULT ", 1)[1].splitlines()[0])
    tokens = result["num_tokens"]
    per_step = [b - a for a, b in zip(tokens, tokens[1:])]  # tokens of steps 2..N
    seconds = sum(result["times"][1:])
    real = sum(per_step) / seconds
    return {"real": real, "trained": real, "rss": rss, "step_s": seconds / len(per_step)}


def real_per_trained(work: Path) -> float:
    """Real tokens per trained token of the benchmark data as `dolphin-forge preprocess` masks it."""
    reports = list((work / "ours-prepared").glob("*/report.json"))
    if not reports:
        raise SystemExit(
            "run the `ours` tool first: Axolotl's real tokens/s is derived from our prepared data's counts"
        )
    report = json.loads(reports[0].read_text())
    return report["total_tokens"] / report["trainable_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--tools", default="ours,ours-compiled,ours-fast,axolotl,trl")
    parser.add_argument("--peer-python", default="/work/peers/axo/bin/python")
    parser.add_argument("--work", default="/tmp/dolphin-forge-bench-train")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--checkpointed-layers", type=int, default=15,
                        help="gradient_checkpointing_layers of the ours-fast run (of SmolLM2's 30 layers)")
    parser.add_argument(
        "--reuse", action="store_true", help="Report tools not in --tools from an earlier run in --work"
    )
    args = parser.parse_args()

    from dolphin_forge.models.default import fetch_default_model
    from dolphin_forge.models.hardware import matmul_peak_flops
    from dolphin_forge.train.metrics import matmul_parameters
    from dolphin_forge.models.load import load_model

    if not DATA.is_file():
        raise SystemExit(f"{DATA} not found (the shared datasets live beside the checkout)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = fetch_default_model()
    linear = matmul_parameters(load_model(model_dir))
    peak32 = matmul_peak_flops("cpu", torch.float32, seconds=3.0)
    peak16 = matmul_peak_flops("cpu", torch.bfloat16, seconds=3.0)
    console = Console(width=120)
    console.print(
        f"matmul peak: float32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s; {linear:,} linear weights"
    )

    runners = {
        "ours": (
            "dolphin-forge",
            lambda: run_ours(work, model_dir, args.steps, args.seq_len, args.gradient_checkpointing, False),
        ),
        "ours-compiled": (
            "dolphin-forge torch_compile",
            lambda: run_ours(work, model_dir, args.steps, args.seq_len, args.gradient_checkpointing, True,
                             name="ours-compiled"),
        ),
        "ours-fast": (
            f"dolphin-forge torch_compile, {args.checkpointed_layers} layers checkpointed",
            lambda: run_ours(work, model_dir, args.steps, args.seq_len, args.gradient_checkpointing, True,
                             args.checkpointed_layers, name="ours-fast"),
        ),
        "axolotl": ("axolotl", lambda: run_axolotl(work, model_dir, args.steps, args.seq_len, args.peer_python,
                                                   real_per_trained(work), args.gradient_checkpointing)),
        "trl": ("trl", lambda: run_trl(work, model_dir, args.steps, args.seq_len, args.peer_python,
                                           args.gradient_checkpointing)),
    }
    results: dict[str, dict] = {}
    tools = args.tools.split(",")
    for tool, (name, run) in runners.items():
        saved = work / f"{tool}.json"
        if tool in tools:
            started = time.time()
            results[name] = run()
            saved.write_text(json.dumps(results[name]))
            console.print(f"{name} done in {time.time() - started:.0f}s")
        elif args.reuse and saved.is_file():
            results[name] = json.loads(saved.read_text())

    checkpointing = "on" if args.gradient_checkpointing else "off"
    table = Table(title=f"training throughput, seq {args.seq_len}, packing, gradient checkpointing {checkpointing}, "
                        f"{args.steps} steps (first excluded)")
    for column in ("tool", "real tok/s", "trained tok/s", "MFU fp32", "MFU vs bf16 peak", "peak RSS MiB"):
        table.add_column(column, justify="right")
    for name, r in results.items():
        mfu = 6 * linear * r["real"]
        table.add_row(name, f"{r['real']:.1f}", f"{r['trained']:.1f}", f"{100 * mfu / peak32:.1f}%",
                      f"{100 * mfu / peak16:.1f}%", f"{r['rss']:.0f}")
    console.print(table)
    for name in [n for n in results if n.startswith("dolphin-forge")]:
        ours = results[name]
        for peer in ("axolotl", "trl"):
            if peer in results:
                p = results[peer]
                console.print(
                    f"{name} / {peer}: real tokens/s x{ours['real'] / p['real']:.2f}, "
                    f"trained tokens/s x{ours['trained'] / p['trained']:.2f}, peak RSS x{ours['rss'] / p['rss']:.2f}"
                )
    (work / "results.json").write_text(
        json.dumps({"peak_fp32": peak32, "peak_bf16": peak16, "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
