"""The `spectrum` and `laser` stages as library calls: resolve inputs from the config, run, write every output.

`run_spectrum` writes the SNR JSON, the heat map and the `unfrozen_parameters` fragment (optionally merged into a
training config). `run_laser` loads the model, tokenises the eval text once, splits it into a search part and a
held-out part, runs the search, measures the held-out part before and after, and saves the modified model as a
normal HF folder with a JSON log and a PNG of the search. The CLI only parses arguments and prints.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dolphin_forge.config import ForgeConfig, resolve_path
from dolphin_forge.errors import ForgeError, missing_file, read_text_file
from dolphin_forge.evaluate.perplexity import PerplexityResult, perplexity_of_ids, tokenize_text
from dolphin_forge.models.default import resolve_model_path
from dolphin_forge.models.load import load_model, load_tokenizer
from dolphin_forge.spectral.checkpoint import Checkpoint, LayerMatrix
from dolphin_forge.spectral.laser import (
    LaserAttempt, LaserResult, check_loaded_names, laser_search, order_candidates,
)
from dolphin_forge.spectral.plots import laser_trace, snr_heatmap
from dolphin_forge.spectral.scan import SpectrumScan, scan_matrices, selected_count, write_scan_json
from dolphin_forge.spectral.unfrozen import merge_into_config, read_merge_target, unfrozen_parameters_yaml


def _model_dir(model: str | None, key: str, config: ForgeConfig, config_path: Path | None) -> tuple[Path, str]:
    """The stage's own model (`key`) when set, else base_model, with the key it came from, for later errors too."""
    name, key = (model, key) if model else (config.base_model, "base_model")
    return Path(resolve_model_path(name, config_path, key=key)), key


def _check_write_config(path: Path) -> None:
    """`--write-config` is checked before the scan, which can take an hour, rather than when merging after it."""
    try:
        read_merge_target(path)
    except ForgeError as exc:
        raise ForgeError(f"--write-config: {exc}") from None


def _check_top_percent(matrices: list[LayerMatrix], top_percent: float, name: str) -> list[str]:
    """A warning naming the module types the share keeps none of; an error when it keeps nothing at all.

    The reference count is a floor, so a small share of a type with few matrices is silently none. Checked before
    the scan, which can take an hour.
    """
    counts = Counter(m.module_type for m in matrices)
    empty = sorted(t for t, total in counts.items() if selected_count(total, top_percent) == 0)
    if not empty:
        return []
    smallest = math.ceil(10000 / min(counts.values())) / 100  # >= 100 / n, so floor(n * it / 100) >= 1 for each type
    if len(empty) == len(counts):
        raise ForgeError(f"{name}: selects no matrix of any module type; expected {smallest:g} or more (one of each)")
    return [f"{name} selects no matrix of {', '.join(empty)}; {smallest:g} or more selects one of each module type"]


@dataclass
class SpectrumOutputs:
    scan: SpectrumScan
    top_percent: float
    folder: Path
    json: Path
    heatmap: Path
    fragment: Path
    merged_config: Path | None
    warnings: list[str] = field(default_factory=list)


def run_spectrum(
    config: ForgeConfig,
    config_path: Path | None = None,
    top_percent: float | None = None,
    write_config: Path | None = None,
    progress: bool = False,
) -> SpectrumOutputs:
    """Scan `spectrum.model` (default: base_model) and write every output into `spectrum.output_dir`.

    `top_percent` overrides `spectrum.top_percent`; `write_config` names a YAML config to merge the list into.
    """
    settings = config.spectrum
    share = f"spectrum.top_percent = {settings.top_percent:g}"
    if top_percent is not None:
        if not 0 < top_percent <= 100:
            raise ForgeError(f"--top-percent {top_percent:g}: expected a number > 0 and <= 100")
        settings = settings.model_copy(update={"top_percent": float(top_percent)})
        share = f"--top-percent {top_percent:g}"
    if write_config is not None:
        _check_write_config(write_config)
    model, key = _model_dir(settings.model, "spectrum.model", config, config_path)
    checkpoint = Checkpoint(model, key)
    matrices = checkpoint.layer_matrices(settings.module_types)
    warnings = _check_top_percent(matrices, settings.top_percent, share)
    scan = scan_matrices(checkpoint, matrices, settings.threshold, settings.workers, progress=progress)
    folder = Path(settings.output_dir or Path(config.output_dir) / "spectrum")
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "snr.json"
    write_scan_json(scan, json_path)
    heatmap = snr_heatmap(scan, settings.top_percent, folder / "snr_heatmap.png")
    fragment_text = unfrozen_parameters_yaml(scan, settings.top_percent)
    fragment = folder / f"unfrozen_parameters_top{settings.top_percent:g}.yaml"
    fragment.write_text(fragment_text)
    merged = merge_into_config(write_config, fragment_text) if write_config is not None else None
    return SpectrumOutputs(scan, settings.top_percent, folder, json_path, heatmap, fragment, merged, warnings)


@dataclass
class LaserOutputs:
    result: LaserResult
    heldout_before: PerplexityResult | None
    heldout_after: PerplexityResult | None
    folder: Path
    model_dir: Path
    log: Path
    plot: Path


def _eval_ids(
    config: ForgeConfig, config_path: Path | None, tokenizer: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The search tokens and the held-out tokens that follow them, from one tokenisation of `laser.eval_file`."""
    settings = config.laser
    if settings.eval_file is None:
        raise ForgeError("laser.eval_file: set a plain-text file to score changes on (e.g. wikitext2_test.raw)")
    path = resolve_path(settings.eval_file, config_path)
    if not path.is_file():
        raise ForgeError(f"laser.eval_file: {path} {missing_file(path)}")
    try:
        text = read_text_file(path, "plain UTF-8 text to score changes on")
    except ForgeError as exc:
        raise ForgeError(f"laser.eval_file: {exc}") from None
    search_tokens, asked = settings.search_tokens, settings.heldout_tokens
    ids = tokenize_text(tokenizer, text, max_tokens=search_tokens + (search_tokens if asked is None else asked))
    required = search_tokens + (asked or 0)  # the default held-out part takes what the file has, if anything
    if ids.numel() < required:
        names = "search_tokens" if asked is None else "search_tokens + heldout_tokens"
        raise ForgeError(f"laser.eval_file: {path} has {ids.numel()} tokens; {names} = {required} are needed")
    heldout = ids[search_tokens:]
    return ids[:search_tokens], heldout if heldout.numel() >= 2 else None


def stored_dtype(checkpoint: Checkpoint) -> torch.dtype | None:
    """The dtype config.json declares, else the one the weights are stored in: some configs declare none, and a bf16
    model saved back in float32 would double in size."""
    config = checkpoint.folder / "config.json"
    declared = json.loads(config.read_text()) if config.is_file() else {}
    name = declared.get("dtype") or declared.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else checkpoint.weight_dtype()


def save_like_source(model: Any, source: Path, target: Path, dtype: torch.dtype | None) -> None:
    """Save in the source checkpoint's dtype, with the source's tokenizer and other files copied unchanged."""
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
    model.save_pretrained(target, safe_serialization=True)
    for file in source.iterdir():
        written = (target / file.name).exists()
        if file.is_file() and not written and not file.name.endswith((".safetensors", ".index.json", ".bin")):
            shutil.copy2(file, target / file.name)


def _laser_folder(config: ForgeConfig, model_dir: Path) -> Path:
    """`laser.output_dir`, refused before anything loads when the save would overwrite a model or write into the
    input: `save_pretrained` replaces files without asking, and only after a search that can take hours."""
    key = "laser.output_dir" if config.laser.output_dir else "output_dir"
    folder = Path(config.laser.output_dir or Path(config.output_dir) / "laser")
    for target in (folder, folder / "model"):
        if target.resolve() == model_dir.resolve():
            raise ForgeError(f"{key}: {folder} would write into the input model {model_dir}; choose another folder")
        if (target / "config.json").is_file() or any(target.glob("*.safetensors")):
            raise ForgeError(f"{key}: {target} already holds a model; choose another folder or remove it")
    return folder


def run_laser(config: ForgeConfig, config_path: Path | None = None, progress: bool = False) -> LaserOutputs:
    """LASER-RMT on `laser.model` (default: base_model); writes the model, log and plot into `laser.output_dir`."""
    settings = config.laser
    model_dir, key = _model_dir(settings.model, "laser.model", config, config_path)
    folder = _laser_folder(config, model_dir)
    tokenizer = load_tokenizer(config.model_copy(update={"base_model": str(model_dir)}), key=key)
    search_ids, heldout_ids = _eval_ids(config, config_path, tokenizer)
    checkpoint = Checkpoint(model_dir, key)
    matrices = checkpoint.layer_matrices(settings.module_types, settings.layers, section="laser")

    # CPU: fp32 (bf16 autocast where native, see evaluate.perplexity). GPU: the checkpoint's own dtype, so weights
    # that are not changed are saved back bit-identical and a 7B model fits.
    on_gpu = torch.cuda.is_available()
    source_dtype = stored_dtype(checkpoint)
    dtype = (source_dtype or torch.bfloat16) if on_gpu else torch.float32
    model = load_model(model_dir, dtype=dtype, trust_remote_code=config.trust_remote_code)
    check_loaded_names(model, matrices, checkpoint.layer_types())
    scan = scan_matrices(checkpoint, matrices, settings.threshold)
    candidates = order_candidates(scan.matrices, settings.order, settings.module_types)
    if on_gpu:
        model = model.to("cuda")

    def heldout() -> PerplexityResult | None:
        if heldout_ids is None:
            return None
        return perplexity_of_ids(
            model,
            heldout_ids,
            max_length=settings.max_length,
            stride=settings.max_length,
            batch_size=settings.batch_size,
        )

    bar = Progress(
        TextColumn("laser {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        disable=not progress, transient=True,
    )
    with bar:
        task = bar.add_task("held-out perplexity", total=len(candidates))
        heldout_before = heldout()
        bar.update(task, description="baseline")

        def advance(attempt: LaserAttempt, index: int) -> None:
            state = "kept" if attempt.kept else attempt.reason
            bar.update(task, completed=index + 1, description=f"{attempt.module} {state}")

        # changes are rounded to the dtype `save_like_source` writes, so every reported perplexity is the saved model's
        result = laser_search(model, search_ids, candidates, settings, on_attempt=advance, storage_dtype=source_dtype)
        heldout_after = heldout()

    folder.mkdir(parents=True, exist_ok=True)
    out_model = folder / "model"
    save_like_source(model, model_dir, out_model, source_dtype)
    log = folder / "laser_log.json"
    record = result.to_json()
    record["model"] = str(model_dir)
    record["heldout_tokens"] = 0 if heldout_ids is None else int(heldout_ids.numel())
    record["heldout_before"] = None if heldout_before is None else asdict(heldout_before)
    record["heldout_after"] = None if heldout_after is None else asdict(heldout_after)
    log.write_text(json.dumps(record, indent=1))
    plot = laser_trace(result.attempts, result.baseline.perplexity, folder / "laser_search.png")
    return LaserOutputs(result, heldout_before, heldout_after, folder, out_model, log, plot)
