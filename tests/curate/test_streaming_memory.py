"""Streaming: a 2 GB input is curated with flat memory (peak RSS far below the file size).

The file is generated in a few seconds from a handful of pre-serialised blocks. Most of its bytes sit in a field
the conversation does not use (a raw-HTML-like column kept beside the chat, as scraped dumps often have), and one
row in ten carries a 100 kB document in its system message that every text filter reads; that keeps the test within
the CI budget while every byte still goes through the reader, the bounded worker queue and (for the documents) the
filters, shards and the external shuffle. Filter speed is measured by benchmarks/curate.py, not here.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path


FILE_BYTES = 2 * 10**9
BLOCK_CHARS = 100_000

RUNNER = """
import json, sys
from dolphin_forge.config import load_config
from dolphin_forge.curate import curate
config = load_config(data=json.loads(sys.argv[1])).config
report = curate(config).report
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_kb": peak_kb, "read": report.rows_read, "written": report.rows_written}))
"""


def rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            own = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return own + sum(rss_kb(int(child)) for child in children.read().split())
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return 0


def generate(path: Path, size: int) -> int:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocabulary = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    blocks = [json.dumps(" ".join(rng.choices(vocabulary, k=BLOCK_CHARS // 6))) for _ in range(8)]
    rows = written = 0
    with path.open("w", encoding="utf-8") as handle:
        while written < size:
            prompt = " ".join(rng.choices(vocabulary, k=12))
            block = blocks[rows % len(blocks)]
            if rows % 10 == 0:
                line = (f'{{"id": "r{rows}", "conversations": [{{"from": "system", "value": {block}}}, '
                        f'{{"from": "human", "value": "{prompt}"}}, {{"from": "gpt", "value": "Answer {rows}."}}]}}\n')
            else:
                line = (f'{{"id": "r{rows}", "raw_html": {block}, "conversations": [{{"from": "human", "value": '
                        f'"{prompt}"}}, {{"from": "gpt", "value": "Answer {rows}."}}]}}\n')
            handle.write(line)
            written += len(line)
            rows += 1
    return rows


def test_memory_stays_flat_on_a_2gb_file(tmp_path: Path) -> None:
    source = tmp_path / "big.jsonl"
    try:
        rows = generate(source, FILE_BYTES)
        assert source.stat().st_size >= FILE_BYTES
        config = {"curate": {"output_dir": str(tmp_path / "out"), "processes": 2, "batch_rows": 64,
                             "sources": [{"path": str(source)}]}}
        # ru_maxrss would be useless here: Linux carries it across exec, so the child would inherit pytest's peak
        runner = subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(config)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        tree_peak_kb = 0
        while runner.poll() is None:
            tree_peak_kb = max(tree_peak_kb, rss_kb(runner.pid))
            time.sleep(0.2)
        stdout, stderr = runner.communicate()
        assert runner.returncode == 0, stderr[-3000:]
        result = json.loads(stdout.strip().splitlines()[-1])
    finally:
        source.unlink(missing_ok=True)
    assert result["read"] == result["written"] == rows
    parent_mb, tree_mb = result["peak_kb"] / 1024, tree_peak_kb / 1024
    print(f"2 GB input, {rows} rows: peak RSS {parent_mb:.0f} MB (parent), {tree_mb:.0f} MB (parent + 2 workers)")
    assert parent_mb < 400, f"parent peak RSS {parent_mb:.0f} MB on a 2 GB file: memory is not flat"
    assert tree_mb < 700, f"process tree peak RSS {tree_mb:.0f} MB on a 2 GB file: memory is not flat"
