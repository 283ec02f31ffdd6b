"""The `eval` stage: load each model once, measure perplexities and harness tasks, write JSON and tables.

Everything measurable about a model goes through one loaded copy of it: perplexity on text files with our
sliding-window scorer, then every harness task through an `HFLM` wrapping the same model object. Earlier
results.json files can be added so the comparison table shows, for example, a model before and after a stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from dolphin_forge.config import EvalConfig, ForgeConfig, describe_error, resolve_path
from dolphin_forge.errors import ForgeError, read_text_file
from dolphin_forge.evaluate.harness import (
    CPU_AUTO_BATCH_SIZE,
    HarnessRun,
    TaskRequest,
    check_local_data,
    harness_model,
    resolve_tasks,
    run_harness,
)
from dolphin_forge.evaluate.perplexity import default_max_length, perplexity, use_bf16_autocast
from dolphin_forge.evaluate.report import ModelEvaluation, load_results, write_results
from dolphin_forge.models.default import resolve_model_path

Notify = Callable[[str], None]


def eval_settings(config: ForgeConfig, flags: Mapping[str, str] | None = None, **updates: Any) -> EvalConfig:
    """`config.eval` with command-line values (those not None) applied and validated like the file's.

    `flags` maps a key to the option that sets it (`output_dir` -> `--output`), so that an error names what the
    user typed; a value without one is named by its key.
    """
    given = {k: v for k, v in updates.items() if v is not None and v != []}
    named = {key: flag for key, flag in (flags or {}).items() if key in given}
    try:
        return EvalConfig.model_validate({**config.eval.model_dump(), **given})
    except ValidationError as exc:
        raise ForgeError("\n".join(_setting_error(error, named) for error in exc.errors())) from None


def _setting_error(error: dict[str, Any], flags: Mapping[str, str]) -> str:
    key = ".".join(map(str, error["loc"]))
    where = f"{flags[key]} {error['input']}" if key in flags else f"eval.{key} = {error['input']!r}"
    return f"{where}: {describe_error(error)}"


def inference_dtype() -> torch.dtype:
    """bf16 on a GPU that supports it, float32 elsewhere (CPUs without native bf16 would only emulate it)."""
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_eval(folder: str, trust_remote_code: bool = False, key: str = "eval.models") -> tuple[Any, Any]:
    """A model folder's model (safetensors only) and its own tokenizer, on the best device.

    `key` is the config key the folder came from (`eval.models`, or `base_model` when none are listed), for errors.
    """
    from dolphin_forge.models.load import load_model, open_tokenizer

    tokenizer = open_tokenizer(folder, key, trust_remote_code)  # first: it fails in a second, the weights take longer
    model = load_model(folder, dtype=inference_dtype(), trust_remote_code=trust_remote_code).to(_device())
    return model, tokenizer


def limit_value(limit: float | None) -> int | float | None:
    """The harness reads an int as a count and a float below 1 as a fraction of each task."""
    if limit is None:
        return None
    return int(limit) if limit >= 1 else limit


@dataclass(frozen=True)
class EvalPlan:
    """What `settings` ask for, checked before any model is loaded (a typo should not cost a 7B load first)."""

    data_dir: Path | None
    requests: list[TaskRequest]
    skipped: list[str]  # suite tasks with no local copy while the hub is off
    files: list[Path]


def plan_evaluation(settings: EvalConfig, config_path: Path | None = None) -> EvalPlan:
    """Resolve tasks, suites, the data folder, its task files and the perplexity files; one-line errors for anything
    missing."""
    data_dir = resolve_path(settings.data_dir, config_path) if settings.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise ForgeError(f"eval.data_dir: {data_dir} is not a folder")
    requests, skipped = resolve_tasks(settings.tasks, data_dir, settings.hub, settings.num_fewshot)
    _check_task_data(requests, data_dir)
    files = [resolve_path(f, config_path) for f in settings.perplexity_files]
    for file in files:
        if not file.is_file():
            raise ForgeError(f"eval.perplexity_files: {file} is not a file")
    _check_distinct_names(files)
    if not requests and not files:
        raise ForgeError(_nothing_to_run(skipped))
    return EvalPlan(data_dir, requests, skipped, files)


def _check_task_data(requests: list[TaskRequest], data_dir: Path | None) -> None:
    """The files the local tasks read, and IFEval's Punkt model (or the text to train one): the harness would only
    look for them after the model has loaded."""
    check_local_data(requests, data_dir)
    if any(r.harness_task == "ifeval_local" for r in requests):
        from dolphin_forge.evaluate.punkt import check_punkt

        check_punkt(data_dir)


def _check_distinct_names(files: list[Path]) -> None:
    """Results are kept under each file's name: a second `test.txt` from another folder would replace the first's."""
    seen: dict[str, Path] = {}
    for file in files:
        if file.name in seen:
            raise ForgeError(
                f"eval.perplexity_files: {seen[file.name]} and {file} share the name {file.name!r}, under which "
                "results are kept; rename one, or list a file once"
            )
        seen[file.name] = file


def _nothing_to_run(skipped: list[str]) -> str:
    """Why nothing would run: tasks were asked for but all need the hub, or nothing was asked for at all."""
    if not skipped:
        return "eval: nothing to evaluate; set eval.tasks (or --tasks) and/or eval.perplexity_files"
    verb = "has" if len(skipped) == 1 else "have"
    return (
        f"eval.tasks: {', '.join(skipped)} {verb} no local copy and eval.hub is false, so nothing is left to run "
        "(set eval.hub: true where the dataset hub is reachable)"
    )


def evaluate_model(
    model: Any,
    tokenizer: Any,
    settings: EvalConfig,
    *,
    name: str,
    path: str | None = None,
    config_path: Path | None = None,
    notify: Notify | None = None,
    on_progress: Callable[[ModelEvaluation], None] | None = None,
) -> ModelEvaluation:
    """Perplexity on every `settings.perplexity_files` and every harness task of `settings.tasks`, on one model.

    Usable on an in-memory model (e.g. right after training) as well as on one loaded from a folder.
    `on_progress` receives the evaluation so far after each file and task (to save partial results).
    """
    plan = plan_evaluation(settings, config_path)
    say = notify or (lambda _message: None)
    for task in plan.skipped:
        say(f"[yellow]warning:[/] {task}: no local copy and the dataset hub is off (eval.hub: false): skipped")

    evaluation = ModelEvaluation(name=name, path=path, settings=_recorded(settings, plan.data_dir))
    for file in plan.files:
        evaluation.perplexity[file.name] = _perplexity_of_file(model, tokenizer, file, settings)
        say(f"{name}: perplexity of {file.name} = {evaluation.perplexity[file.name]['perplexity']:.4f}")
        if on_progress is not None:
            on_progress(evaluation)
    if plan.requests:
        if any(r.harness_task == "ifeval_local" for r in plan.requests):
            from dolphin_forge.evaluate.punkt import ensure_punkt

            note = ensure_punkt(plan.data_dir)
            if note:
                say(f"[yellow]note:[/] {note}")

        def task_done(request: TaskRequest, run: HarnessRun) -> None:
            evaluation.harness = run.results  # every task so far, merged
            evaluation.seconds[request.name] = run.seconds[request.name]
            evaluation.task_names[request.name] = request.harness_task
            say(f"{name}: {request.name} done in {run.seconds[request.name]:.1f} s")
            if on_progress is not None:
                on_progress(evaluation)

        run_harness(
            harness_model(model, tokenizer, batch_size=settings.batch_size),
            plan.requests,
            data_dir=plan.data_dir,
            limit=limit_value(settings.limit),
            apply_chat_template=settings.apply_chat_template,
            gen_kwargs={"max_gen_toks": settings.max_gen_toks} if settings.max_gen_toks else None,
            on_task=task_done,
        )
    return evaluation


def _perplexity_of_file(model: Any, tokenizer: Any, file: Path, settings: EvalConfig) -> dict[str, float | int | str]:
    start = time.perf_counter()
    try:  # a wrong encoding is refused: scoring U+FFFD in place of the bytes would report a perplexity of other text
        text = read_text_file(file, "plain UTF-8 text to score")
    except ForgeError as exc:
        raise ForgeError(f"eval.perplexity_files: {exc}") from None
    max_length = settings.max_length or default_max_length(model)
    stride = settings.stride or max_length // 2
    batch_size = settings.batch_size if isinstance(settings.batch_size, int) else CPU_AUTO_BATCH_SIZE
    try:
        result = perplexity(
            model, tokenizer, text, max_length=max_length, stride=stride, batch_size=batch_size,
            max_tokens=settings.max_tokens,
        )
    except ForgeError as exc:
        raise ForgeError(f"eval.perplexity_files: {file}: {exc}") from None
    return {
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "max_length": max_length,
        "stride": stride,
        "dtype": "bfloat16 (autocast)" if use_bf16_autocast(model) else str(next(model.parameters()).dtype)[6:],
        "seconds": time.perf_counter() - start,
    }


def _recorded(settings: EvalConfig, data_dir: Path | None) -> dict[str, Any]:
    return {
        "limit": settings.limit,
        "batch_size": settings.batch_size,
        "apply_chat_template": settings.apply_chat_template,
        "data_dir": str(data_dir) if data_dir else None,
        "num_fewshot": settings.num_fewshot,
        "max_gen_toks": settings.max_gen_toks,
        "dtype": str(inference_dtype()),  # of the weights; perplexity entries record their compute dtype
    }


def run_eval(
    config: ForgeConfig,
    config_path: Path | None = None,
    *,
    settings: EvalConfig | None = None,
    compare: Sequence[Path] = (),
    notify: Notify | None = None,
) -> tuple[list[ModelEvaluation], dict[str, Path]]:
    """Evaluate every model of the settings (default: `base_model`), add earlier results, write the report."""
    settings = settings or config.eval
    plan_evaluation(settings, config_path)  # fail on a typo before loading any weights
    earlier = [e for path in compare for e in load_results(resolve_path(str(path), config_path))]
    out = Path(settings.output_dir or Path(config.output_dir) / "eval")  # relative to the working dir, as output_dir
    evaluations: list[ModelEvaluation] = []
    model_paths = settings.models or [config.base_model]
    key = "eval.models" if settings.models else "base_model"
    folders = [resolve_model_path(path, config_path, key=key) for path in model_paths]  # all exist before a load
    for model_path, folder in zip(model_paths, folders):
        model, tokenizer = load_for_eval(folder, config.trust_remote_code, key)
        name = Path(model_path).name if model_path != "default" else "SmolLM2-135M-Instruct"

        def save_partial(current: ModelEvaluation) -> None:  # an interrupted run keeps every finished task
            write_results([*earlier, *evaluations, current], out)

        evaluations.append(
            evaluate_model(
                model,
                tokenizer,
                settings,
                name=name,
                path=model_path,
                config_path=config_path,
                notify=notify,
                on_progress=save_partial,
            )
        )
        del model
    return evaluations, write_results([*earlier, *evaluations], out)
