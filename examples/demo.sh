#!/usr/bin/env bash
# The demo recipe on the embedded SmolLM2-135M-Instruct, as far as the stages exist today. Run via `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
forge=.venv/bin/dolphin-forge

echo "== validate: the dolphin-2.9 seed config, verbatim from its model card"
$forge validate examples/dolphin-2.9-llama3-8b.yml > /dev/null
echo "ok"

echo "== curate: clean, dedupe, de-refuse, system prompts (ShareGPT JSONL out)"
$forge curate examples/curate.yml

echo "== preprocess: the curated rows in ChatML with label masks, packed"
recipe=(examples/dolphin-2.9-llama3-8b.smollm2.yml --datasets "[{path: out/curated/curated.jsonl, type: sharegpt}]")
$forge preprocess "${recipe[@]}" --debug 1
