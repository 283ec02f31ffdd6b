"""Preprocess throughput: dolphin-forge vs Axolotl's `chat_template` tokenisation, same rows, same tokenizer.

The 5,000-row Alpaca sample (less its 2 empty answers) is repeated to 20,000 rows of OpenAI-style `messages`
(Axolotl's chat_template input).
Both sides run in their own interpreter, one process each, and time only the work on rows that are already in
memory (parsing files and importing libraries are excluded on both sides):
  - Axolotl: `ChatTemplateStrategy.tokenize_prompt` per row (the function its `preprocess` maps over datasets);
  - ours: `to_conversation` + `ChatMLEncoder.encode` (what `preprocess` runs per chunk).
It also times our whole `preprocess` stage cold (read, tokenise, split, pack, write Arrow) and checks that both
tools produce the same input ids and labels row by row.

Run: .venv/bin/python benchmarks/preprocess.py [--peer-python /work/peers/axo/bin/python] [--rows 20000]
The peer venv: python3 -m venv /work/peers/axo && /work/peers/axo/bin/pip install torch==2.13.0 axolotl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_5000_sample.json"

OURS = r"""
import json, sys, time, hashlib
from dolphin_forge.config import DatasetConfig, load_config
from dolphin_forge.data.chatml import ChatMLEncoder
from dolphin_forge.data.formats import Record, to_conversation
from dolphin_forge.data.preprocess import preprocess
from transformers import AutoTokenizer

rows_path, model, out = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(model)
rows = [json.loads(line) for line in open(rows_path)]
dataset = DatasetConfig(path=rows_path, type="chat_template", field_messages="messages")
encoder = ChatMLEncoder(tokenizer)
start = time.perf_counter()
conversations = [to_conversation(Record(rows_path, i, r), dataset) for i, r in enumerate(rows, 1)]
samples = encoder.encode(conversations)
core = time.perf_counter() - start
digests = [hashlib.sha1(json.dumps([s.input_ids, s.labels]).encode()).hexdigest() for s in samples]
config = load_config(data={"base_model": model, "sequence_len": 2048, "sample_packing": True,
    "dataset_prepared_path": out + "/prepared", "datasets": [dataset.model_dump()]}).config
start = time.perf_counter()
prepared = preprocess(config, tokenizer=tokenizer, force=True)
stage = time.perf_counter() - start
json.dump({"core_seconds": core, "stage_seconds": stage, "digests": digests,
           "packing_efficiency": prepared.report["packing_efficiency"]}, open(out + "/ours.json", "w"))
"""

PEER = r"""
import json, sys, time, hashlib, logging
logging.disable(logging.WARNING)
from axolotl.utils.dict import DictDefault
from axolotl.prompt_strategies.chat_template import load
from transformers import AutoTokenizer

rows_path, model, out = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(model)
rows = [json.loads(line) for line in open(rows_path)]
cfg = DictDefault({"train_on_inputs": False, "sequence_len": 2048, "chat_template": "chatml"})
strategy = load(tokenizer, cfg, {"type": "chat_template", "field_messages": "messages",
                                 "roles_to_train": ["assistant"], "train_on_eos": "turn"})
start = time.perf_counter()
samples = [strategy.tokenize_prompt(r) for r in rows]
core = time.perf_counter() - start
digests = [hashlib.sha1(json.dumps([s["input_ids"], [-100] + s["labels"][1:]]).encode()).hexdigest()
           for s in samples]
json.dump({"core_seconds": core, "digests": digests}, open(out + "/peer.json", "w"))
"""


def write_rows(count: int, path: Path) -> None:
    alpaca = [r for r in json.loads(ALPACA.read_text()) if r["output"].strip()]  # 2 rows have no answer
    with path.open("w") as handle:
        for i in range(count):
            row = alpaca[i % len(alpaca)]
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="/work/peers/axo/bin/python")
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    if not ALPACA.is_file():
        sys.exit(f"needs {ALPACA}")
    from dolphin_forge.models.default import fetch_default_model

    model = str(fetch_default_model())
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.jsonl"
        write_rows(args.rows, rows)
        subprocess.run([sys.executable, "-c", OURS, str(rows), model, tmp], check=True)
        subprocess.run([args.peer_python, "-c", PEER, str(rows), model, tmp], check=True,
                       stderr=subprocess.DEVNULL)
        ours = json.loads((Path(tmp) / "ours.json").read_text())
        peer = json.loads((Path(tmp) / "peer.json").read_text())
    # Axolotl labels the first token when it is trained; ours never does (packing safety): compared without it.
    same = sum(a == b for a, b in zip(ours["digests"], peer["digests"], strict=True))
    ours_rate, peer_rate = args.rows / ours["core_seconds"], args.rows / peer["core_seconds"]
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
    print(f"rows: {args.rows} (Alpaca sample repeated), tokenizer: SmolLM2-135M-Instruct, sequence_len 2048")
    print(f"axolotl chat_template tokenisation: {peer_rate:,.0f} rows/s")
    print(f"dolphin-forge tokenisation+masking: {ours_rate:,.0f} rows/s")
    print(f"ratio (ours / axolotl): {ours_rate / peer_rate:.1f}x")
    print(f"dolphin-forge whole preprocess stage (read, tokenise, split, pack, write): "
          f"{args.rows / ours['stage_seconds']:,.0f} rows/s, packing efficiency {ours['packing_efficiency']:.4f}")
    print(f"identical input_ids and labels: {same}/{args.rows} rows")


if __name__ == "__main__":
    main()
