#!/usr/bin/env bash
# The demo recipe on the embedded SmolLM2-135M-Instruct, as far as the stages exist today. Run via `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
forge=.venv/bin/dolphin-forge
# train and laser refuse to overwrite an earlier run's output; the demo owns these folders, so a rerun starts clean
rm -rf out/curated out/demo-sft out/spectrum-demo out/dolphin-2.6-laser-smollm2 out/eval-demo

echo "== validate: the dolphin-2.9 seed config, verbatim from its model card"
# It loads; its model and datasets are not on this machine, which validate reports with status 1 (2: invalid config).
status=0
$forge validate examples/dolphin-2.9-llama3-8b.yml > /dev/null || status=$?
test "$status" -eq 1
echo "ok: the config is valid; its model and dataset paths are listed as not found here"

echo "== curate: clean, dedupe, de-refuse, system prompts (ShareGPT JSONL out)"
$forge curate examples/curate.yml

echo "== preprocess: the curated rows in ChatML with label masks, packed"
recipe=(examples/dolphin-2.9-llama3-8b.smollm2.yml --datasets "[{path: out/curated/curated.jsonl, type: sharegpt}]")
$forge preprocess "${recipe[@]}" --debug 1

echo "== train: a few SFT steps of the dolphin-2.9 recipe (full fine-tune, packed) on the curated rows"
$forge train "${recipe[@]}" --max-steps 4 --micro-batch-size 1 --gradient-accumulation-steps 1 --sequence-len 512 \
  --val-set-size 16 --output-dir out/demo-sft

echo "== spectrum: SNR per weight matrix, unfrozen_parameters for the top 25% (dolphin-2.9.3's selective recipe)"
$forge spectrum examples/dolphin-2.9.3-mistral-nemo-12b.smollm2.yml --top-percent 25 --show 5 --output-dir out/spectrum-demo

echo "== laser: Marchenko-Pastur rank reduction, kept only where perplexity does not get worse (dolphin-2.6)"
$forge laser examples/dolphin-2.6-mistral-7b-dpo-laser.smollm2.yml

echo "== eval: wikitext-2 perplexity and Winogrande offline, tables like the cards'"
$forge eval examples/dolphin-2.9-llama3-8b.smollm2.yml --model default --model out/demo-sft --data-dir ../shared/data/eval --tasks winogrande --limit 5 \
  --perplexity ../shared/data/eval/wikitext2_test.raw --max-tokens 2048 --eval.max_length 512 --output out/eval-demo
