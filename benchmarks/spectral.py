"""Spectral tools against the public procedures, measured in the same run on the same model.

Spectrum: our scan (tensor-by-tensor from safetensors, float64 Gram eigenvalues, one matrix at a time on all
cores, or `--workers N` matrices at once) against the public Spectrum tool's algorithm (load the whole model in
fp32, `torch.linalg.svdvals` per module, same SNR formula). Each side runs in a fresh subprocess that reports
its wall time, its peak RSS (VmHWM) and the resident memory of the bare interpreter with torch imported, so that
the model-dependent part can be compared as well. The two SNR tables are compared, and the top-50% selections
must be identical.

LASER: our search (`laser_search`: one Gram eigensolve per candidate, only the needed prefix of the text tokenised,
once; batched scoring, layer-input cache) against the reference procedure (per candidate: full SVD with
full_matrices=True in float64, the whole eval text tokenised again, batch-1 full forward passes) on the same
candidates, token budget and window length.
Both must reach the same decisions.

    .venv/bin/python benchmarks/spectral.py [--model default] [--candidates 14] [--tokens 1024] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dolphin_forge.config import SPECTRAL_MODULE_TYPES as TYPES  # noqa: E402 - needs ROOT on sys.path

WIKITEXT = ROOT.parent / "shared" / "data" / "eval" / "wikitext2_test.raw"


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS:")


def peak_mb() -> float:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent that forked this process."""
    return _status_mb("VmHWM:")


# --- children: one measurement each, in a fresh process ----------------------------------------------------------


def child_ours(model: str, workers: int) -> dict:
    import torch  # noqa: F401 - the baseline includes torch, like the reference's

    from dolphin_forge.spectral.scan import scan_model

    base = rss_mb()
    start = time.perf_counter()
    scan = scan_model(model, TYPES, workers=workers)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_mb(), "base_mb": base, "snr": {m.module: m.snr for m in scan.matrices}}


def child_reference(model: str) -> dict:
    """The public Spectrum tool's algorithm, transcribed from its description: whole model in fp32, svdvals."""
    import torch
    from transformers import AutoModelForCausalLM

    base = rss_mb()
    start = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, low_cpu_mem_usage=True)
    snr = {}
    with torch.no_grad():
        for name, module in lm.named_modules():
            if not any(name.endswith("." + t) for t in TYPES) or not hasattr(module, "weight"):
                continue
            weights = module.weight.detach()
            s = torch.linalg.svdvals(weights)
            n, m = weights.shape
            sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
            threshold = sigma * (1 + (min(n, m) / max(n, m)) ** 0.5)
            signal, noise = s[s > threshold].sum(), s[s <= threshold].sum()
            snr[name] = float(signal / (noise if noise != 0 else 1.0) / s[0])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": peak_mb(), "base_mb": base, "snr": snr}


def run_child(kind: str, model: str, workers: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--model", model, "--workers", str(workers)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- LASER -------------------------------------------------------------------------------------------------------


def reference_laser(model, tokenizer, text: str, tokens: int, max_length: int, candidates) -> dict:
    """Per candidate: full float64 SVD (full_matrices=True), re-tokenised text, batch-1 full forward passes."""
    import torch

    from dolphin_forge.evaluate.perplexity import perplexity_of_ids
    from dolphin_forge.spectral.thresholds import marchenko_pastur_threshold

    def tokenize_whole_text() -> torch.Tensor:  # as a plain script would: the whole file, then the budget
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])

    params = dict(model.named_parameters())
    start = time.perf_counter()
    ids = tokenize_whole_text()
    current = perplexity_of_ids(model, ids, max_length=max_length, stride=max_length, batch_size=1).nll
    decisions = []
    for candidate in candidates:
        weight = params[candidate.module + ".weight"]
        original = weight.detach().clone()
        u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=True)
        k = int((s > marchenko_pastur_threshold(s, *weight.shape)).sum())
        with torch.no_grad():
            weight.copy_(((u[:, :k] * s[:k]) @ vh[:k]).to(weight.dtype))
        ids = tokenize_whole_text()
        nll = perplexity_of_ids(model, ids, max_length=max_length, stride=max_length, batch_size=1).nll
        if nll <= current:
            current = nll
            decisions.append(True)
        else:
            with torch.no_grad():
                weight.copy_(original)
            decisions.append(False)
    return {"seconds": time.perf_counter() - start, "decisions": decisions, "nll": current}


def ours_laser(model, tokenizer, text: str, tokens: int, max_length: int, candidates, batch_size: int) -> dict:
    from dolphin_forge.config import LaserConfig
    from dolphin_forge.evaluate.perplexity import tokenize_text
    from dolphin_forge.spectral.laser import laser_search

    start = time.perf_counter()
    ids = tokenize_text(tokenizer, text, max_tokens=tokens)
    settings = LaserConfig(max_length=max_length, batch_size=batch_size, max_changes=len(candidates))
    result = laser_search(model, ids, candidates, settings)
    return {
        "seconds": time.perf_counter() - start,
        "decisions": [a.kept for a in result.attempts],
        "nll": result.final.nll,
        "prefix_cache": result.prefix_cache,
    }


def bench_laser(model_dir: str, n_candidates: int, tokens: int, max_length: int, batch_size: int, order: str) -> dict:
    import torch

    from dolphin_forge.models.load import load_model
    from dolphin_forge.spectral.laser import order_candidates
    from dolphin_forge.spectral.scan import scan_model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = WIKITEXT.read_text(encoding="utf-8")
    scan = scan_model(model_dir, TYPES)
    candidates = order_candidates(scan.matrices, order, TYPES)[:n_candidates]
    ours = ours_laser(load_model(model_dir), tokenizer, text, tokens, max_length, candidates, batch_size)
    reference = reference_laser(load_model(model_dir), tokenizer, text, tokens, max_length, candidates)
    model = load_model(model_dir)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 1000, (1, max_length))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        forward = time.perf_counter() - start
    from dolphin_forge.models.hardware import matmul_peak_flops

    peak = matmul_peak_flops("cpu", torch.float32) / 1e9
    forward_mfu = 2 * params * max_length / forward / 1e9 / peak
    return {"ours": ours, "reference": reference, "matmul_peak_gflops": peak, "forward_mfu": forward_mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--child", choices=["ours", "reference"])
    parser.add_argument("--part", choices=["spectrum", "laser", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="matrices our scan works on at once")
    parser.add_argument("--candidates", type=int, default=14)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--order", choices=["lowest_snr", "last_layer_first"], default="lowest_snr")
    args = parser.parse_args()
    from dolphin_forge.models.default import resolve_model_path

    model = resolve_model_path(args.model)
    if args.child:
        result = child_ours(model, args.workers) if args.child == "ours" else child_reference(model)
        print(json.dumps(result))
        return

    print(f"model {model}, {os.cpu_count()} CPU cores")
    if args.part in ("spectrum", "all"):
        runs = {"ours": [], "reference": []}
        for _ in range(args.repeats):
            for kind in ("reference", "ours"):
                runs[kind].append(run_child(kind, model, args.workers))
        ours = min(runs["ours"], key=lambda r: r["seconds"])
        ref = min(runs["reference"], key=lambda r: r["seconds"])
        diff = max(abs(ours["snr"][k] - v) / abs(v) for k, v in ref["snr"].items())
        same = _top_half(ours["snr"]) == _top_half(ref["snr"])
        print(
            f"spectrum: {len(ref['snr'])} matrices, best of {args.repeats}, our workers {args.workers}\n"
            f"  ours      {ours['seconds']:7.2f} s  peak RSS {ours['peak_mb']:7.0f} MB "
            f"(torch-imported baseline {ours['base_mb']:.0f} MB)\n"
            f"  reference {ref['seconds']:7.2f} s  peak RSS {ref['peak_mb']:7.0f} MB "
            f"(torch-imported baseline {ref['base_mb']:.0f} MB)\n"
            f"  speed-up {ref['seconds'] / ours['seconds']:.2f}x; "
            f"peak RSS ratio {ours['peak_mb'] / ref['peak_mb']:.2f}; "
            f"above-baseline RSS ratio {(ours['peak_mb'] - ours['base_mb']) / (ref['peak_mb'] - ref['base_mb']):.2f}\n"
            f"  max relative SNR difference {diff:.2e}; identical top-50% selection: {same}"
        )
    if args.part in ("laser", "all"):
        laser = bench_laser(model, args.candidates, args.tokens, args.max_length, args.batch_size, args.order)
        ours, ref = laser["ours"], laser["reference"]
        print(
            f"laser: {args.candidates} candidates ({args.order}), {args.tokens} tokens, windows of {args.max_length}\n"
            f"  ours      {ours['seconds']:7.2f} s "
            f"(batch {args.batch_size}, layer-input cache {ours['prefix_cache']})\n"
            f"  reference {ref['seconds']:7.2f} s (full SVD, re-tokenised, batch 1, full forwards)\n"
            f"  speed-up {ref['seconds'] / ours['seconds']:.2f}x; "
            f"same decisions: {ours['decisions'] == ref['decisions']} "
            f"(kept {sum(ours['decisions'])}); final nll ours {ours['nll']:.6f} reference {ref['nll']:.6f}\n"
            f"  matmul peak {laser['matmul_peak_gflops']:.1f} GFLOP/s; full forward MFU {laser['forward_mfu']:.1%}"
        )


def _top_half(snr: dict[str, float]) -> set[str]:
    groups: dict[str, list[tuple[float, str]]] = {}
    for name, value in snr.items():
        groups.setdefault(name.split(".", 3)[3], []).append((value, name))
    return {n for g in groups.values() for _, n in sorted(g, reverse=True)[: len(g) // 2]}


if __name__ == "__main__":
    main()
