"""Curation throughput: refusal filter + exact + MinHash near dedup on the shared Alpaca files, against the naive
datasketch recipe people write by hand (one Python `in` test per phrase per row, one MinHash per row updated one
shingle at a time, MinHashLSH) and against a tuned version of that recipe, measured in the same run on the same
rows. Both read the JSON and write the kept
rows as JSONL; ours runs the whole `curate` stage (report, shards, seeded shuffle included) with the other filters
off. Prints rows/s and the ratios; the goal is >= 3x.

    .venv/bin/python benchmarks/curate.py [--repeat 3] [--processes 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from dolphin_forge.config import load_config
from dolphin_forge.curate import curate
from dolphin_forge.curate.refusal import compile_phrases, default_phrases

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca"
NUM_PERM, THRESHOLD, NGRAM = 128, 0.8, 5


def naive(files: list[Path], out: Path, tuned: bool = False) -> tuple[int, int]:
    """The hand-written baseline: what a user glues together from datasketch and a phrase list.

    ``tuned`` is the careful version of the same recipe: one compiled regex for the phrases, the permutations
    made once and shared, and ``update_batch`` instead of one ``update`` per shingle.
    """
    phrases = default_phrases()
    pattern = compile_phrases(phrases)
    template = MinHash(num_perm=NUM_PERM)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    seen: set[str] = set()
    read = kept = 0
    with out.open("w", encoding="utf-8") as handle:
        for file in files:
            for number, row in enumerate(json.loads(file.read_text(encoding="utf-8"))):
                read += 1
                answer = row["output"].lower()
                if not answer.strip():
                    continue
                if pattern.search(answer) if tuned else any(phrase in answer for phrase in phrases):
                    continue
                prompt = f"{row['instruction']}\n\n{row['input']}".strip() if row["input"] else row["instruction"]
                normalised = " ".join(re.sub(r"[^\w\s]+", " ", prompt.lower()).split())
                digest = hashlib.md5(normalised.encode()).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
                words = re.findall(r"\w+", prompt.lower())
                shingles = [" ".join(words[i : i + NGRAM]) for i in range(max(1, len(words) - NGRAM + 1))]
                if tuned:
                    sketch = MinHash(num_perm=NUM_PERM, permutations=template.permutations, scheme=template.scheme)
                    sketch.update_batch([shingle.encode() for shingle in shingles])
                else:
                    sketch = MinHash(num_perm=NUM_PERM)
                    for shingle in shingles:
                        sketch.update(shingle.encode())
                if lsh.query(sketch):
                    continue
                lsh.insert(f"{file.name}:{number}", sketch)
                conversation = [{"from": "human", "value": prompt}, {"from": "gpt", "value": row["output"]}]
                handle.write(json.dumps({"conversations": conversation}, ensure_ascii=False) + "\n")
                kept += 1
    return read, kept


def ours(out_dir: Path, processes: int) -> tuple[int, int]:
    config = load_config(data={"curate": {
        "output_dir": str(out_dir), "processes": processes,
        "sources": [{"path": str(ALPACA), "type": "alpaca"}],
        "clean": {"enabled": False}, "function_calling": {"enabled": False},
        "system_prompts": {"enabled": False, "system_conversations": "off"},
        "dedup": {"num_perm": NUM_PERM, "threshold": THRESHOLD, "ngram": NGRAM},
    }}).config
    report = curate(config).report
    return report.rows_read, report.rows_kept


def best_of(repeat: int, run) -> tuple[float, tuple[int, int]]:  # noqa: ANN001 - a zero-argument callable
    times, result = [], (0, 0)
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    files = sorted(ALPACA.glob("*.json"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_s, (base_read, base_kept) = best_of(args.repeat, lambda: naive(files, work / "naive.jsonl"))
        tuned_s, (_, tuned_kept) = best_of(args.repeat, lambda: naive(files, work / "tuned.jsonl", tuned=True))
        one_s, (read, kept_one) = best_of(args.repeat, lambda: ours(work / "one", 1))
        many_s, (_, kept_many) = best_of(args.repeat, lambda: ours(work / "many", args.processes))
    assert read == base_read, (read, base_read)
    print(f"rows: {read} (alpaca, {len(files)} files); kept: naive {base_kept}, tuned {tuned_kept}, ours {kept_one}")
    print(f"naive datasketch (phrase loop, per-shingle MinHash): {base_read / base_s:8.0f} rows/s  ({base_s:.2f} s)")
    print(f"tuned datasketch (one regex, update_batch):         {base_read / tuned_s:8.0f} rows/s  ({tuned_s:.2f} s)"
          f"  x{base_s / tuned_s:.2f}")
    print(f"dolphin-forge curate, 1 process:                    {read / one_s:8.0f} rows/s  ({one_s:.2f} s)"
          f"  x{base_s / one_s:.2f} (x{tuned_s / one_s:.2f} vs tuned)")
    print(f"dolphin-forge curate, {args.processes} processes:                  {read / many_s:8.0f} rows/s  "
          f"({many_s:.2f} s)  x{base_s / many_s:.2f} (x{tuned_s / many_s:.2f} vs tuned)")
    assert kept_many == kept_one


if __name__ == "__main__":
    main()
