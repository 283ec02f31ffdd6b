"""Evaluation speed: our sliding-window perplexity against the Hugging Face perplexity-guide recipe, and our harness
bridge against `lm_eval.simple_evaluate` run directly, each pair measured in the same run on the same model.

- Perplexity peer: the loop from the transformers documentation ("Perplexity of fixed-length models"): one window
  at a time, `model(input_ids, labels=...)`, window losses re-weighted by their scored-token counts. Ours batches
  windows and scores in float64. Prints tokens/s, the ratio, both perplexities, and MFU against this machine's
  measured float32 matmul peak.
- Harness peer: `simple_evaluate(model="hf", ...)` on the same task files; ours wraps the already loaded model.
  Prints wall time per task, the ratio, and whether every metric is identical.

Run: .venv/bin/python benchmarks/eval.py [--tokens 4096] [--max-length 1024] [--stride 512] [--tasks winogrande]
     [--limit 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dolphin_forge.evaluate.harness import harness_model, resolve_tasks, run_harness, task_manager
from dolphin_forge.evaluate.perplexity import perplexity_of_ids, tokenize_text
from dolphin_forge.models.default import fetch_default_model
from dolphin_forge.models.hardware import matmul_peak_flops
from dolphin_forge.models.load import load_model

EVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The transformers-documentation recipe, one window per forward pass."""
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = ids.numel()
    with torch.no_grad():
        for begin in range(0, seq_len, stride):
            end = min(begin + max_length, seq_len)
            trg_len = end - prev_end
            input_ids = ids[begin:end][None]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            loss = model(input_ids, labels=target_ids).loss
            # The tokens the model's loss averaged over: labels shift left by one, so position 0 never counts.
            # (The documentation subtracts one per window instead, which under-counts every window but the first.)
            num_valid = int((target_ids[:, 1:] != -100).sum())
            nll_sum += float(loss) * num_valid
            n_tokens += num_valid
            prev_end = end
            if end == seq_len:
                break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens))), n_tokens


def bench_perplexity(model, tokenizer, args: argparse.Namespace) -> None:
    text = (EVAL_DATA / "wikitext2_test.raw").read_text(encoding="utf-8")
    ids = tokenize_text(tokenizer, text, max_tokens=args.tokens)
    params = sum(p.numel() for p in model.parameters())
    peak = matmul_peak_flops("cpu", torch.float32)
    start = time.perf_counter()
    guide_ppl, guide_tokens = guide_perplexity(model, ids, args.max_length, args.stride)
    guide_s = time.perf_counter() - start
    start = time.perf_counter()
    ours = perplexity_of_ids(model, ids, max_length=args.max_length, stride=args.stride, batch_size=args.batch_size)
    ours_s = time.perf_counter() - start
    forward_tokens = 0  # tokens through the model, overlaps included: what the FLOPs are spent on
    for begin in range(0, ids.numel(), args.stride):
        end = min(begin + args.max_length, ids.numel())
        forward_tokens += end - begin
        if end == ids.numel():
            break
    mfu = 2 * params * forward_tokens / ours_s / peak
    print(f"perplexity: {ids.numel()} tokens, window {args.max_length}, stride {args.stride}, batch {args.batch_size}")
    print(f"  guide recipe   {guide_tokens / guide_s:8.1f} scored tok/s  {guide_s:7.1f} s  ppl {guide_ppl:.4f}")
    print(f"  dolphin-forge  {ours.tokens / ours_s:8.1f} scored tok/s  {ours_s:7.1f} s  ppl {ours.perplexity:.4f}")
    print(f"  ratio {guide_s / ours_s:.2f}x; MFU {100 * mfu:.1f}% of a measured {peak / 1e9:.0f} GFLOP/s matmul peak")


def bench_harness(model, tokenizer, args: argparse.Namespace) -> None:
    from lm_eval import simple_evaluate

    requests, _ = resolve_tasks(args.tasks.split(","), EVAL_DATA)
    lm = harness_model(model, tokenizer, batch_size=args.batch_size)
    for request in requests:
        ours = run_harness(lm, [request], data_dir=EVAL_DATA, limit=args.limit)
        start = time.perf_counter()
        direct = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(fetch_default_model()), "dtype": "float32", "device": "cpu"},
            tasks=[request.harness_task],
            num_fewshot=request.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            task_manager=task_manager(EVAL_DATA, with_harness_tasks=False),
            log_samples=False,
            verbosity="ERROR",
        )
        direct_s = time.perf_counter() - start
        same = all(direct["results"][k] == ours.results["results"][k] for k in direct["results"])
        ours_s = ours.seconds[request.name]
        print(
            f"harness {request.name} (limit {args.limit}): bridge {ours_s:.1f} s (model already in memory), "
            f"lm_eval direct {direct_s:.1f} s (loads the model itself), ratio {direct_s / ours_s:.2f}x, "
            f"identical results: {same}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tasks", default="winogrande")
    parser.add_argument("--limit", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = fetch_default_model()
    model = load_model(folder).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    print(f"torch threads: {torch.get_num_threads()}")
    bench_perplexity(model, tokenizer, args)
    if args.tasks:
        bench_harness(model, tokenizer, args)


if __name__ == "__main__":
    main()
