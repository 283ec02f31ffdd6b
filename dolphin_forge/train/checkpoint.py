"""Checkpoints that can be trusted after a crash, and that never unpickle anything.

A checkpoint is a folder ``checkpoint-<step>`` in the output folder holding:

* ``trainable.safetensors``: every trainable parameter (the frozen ones are re-created from the base model);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors and its scalar settings. Under FSDP each
  process writes its own shard of the optimizer's tensors, ``optimizer-<rank>.safetensors``, and the run resumes on
  as many processes. DeepSpeed's engine keeps its optimizer state to itself: there a checkpoint holds the weights
  only and cannot be resumed;
* ``rng-<rank>.safetensors`` + ``rng-<rank>.json``: each process's torch (CPU and CUDA), numpy and Python RNG states;
* ``state.json``: the step, the optimizer settings it was written with, the data order, early-stopping
  bookkeeping. It is written last.

When the run keeps its best weights (`load_best_model_at_end`, on with early stopping), ``best-weights/`` holds
the trainable weights of the best validation loss so far, the step and the run they come from, written the same way.

Everything is written into ``.tmp-checkpoint-<step>`` and renamed into place, so a process killed at any moment
leaves either a complete checkpoint or a temporary folder that `latest_checkpoint` ignores (and the next save
removes). A checkpoint being replaced is first renamed aside, and one being pruned loses its ``state.json`` first,
so a half-deleted folder never looks complete. We write our own format instead of `accelerate.save_state` because
that one pickles the optimizer and RNG states, and loading pickles is exactly what this product promises never to do.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dolphin_forge.errors import ForgeError

PREFIX = "checkpoint-"
BEST = "best-weights"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name)[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def _checkpoint_names(output_dir: Path) -> list[str]:
    """Every checkpoint folder, complete or not: a half-written one is still another run's."""
    return sorted(p.name for p in output_dir.iterdir() if _NAME.match(p.name)) if output_dir.is_dir() else []


def refuse_used_output_dir(output_dir: Path) -> None:
    """A fresh run must not share `output_dir` with an earlier run's checkpoints.

    Pruning would delete the newer-numbered old ones or keep them instead of ours, and `auto` resume would later
    pick a stale one: both silently mix two runs.
    """
    found = _checkpoint_names(output_dir)
    if found:
        raise ForgeError(
            f"output_dir: {output_dir} already holds checkpoints of an earlier run ({', '.join(found[:3])}); "
            "set `resume_from_checkpoint: auto` to continue that run, or choose another output_dir"
        )


def resolve_resume(value: str | None, output_dir: Path) -> Path | None:
    """`resume_from_checkpoint`: a checkpoint folder, or `auto` for the newest complete one (None if there is none)."""
    if not value:
        return None
    if value == "auto":
        return latest_checkpoint(output_dir)
    path = Path(value).expanduser()
    if not (path / "state.json").is_file():
        raise ForgeError(f"resume_from_checkpoint: {value} is not a complete checkpoint folder (no state.json)")
    if path.resolve().parent != output_dir.resolve():
        found = _checkpoint_names(output_dir)
        if found:  # pruning and a later `auto` resume would mix that run's checkpoints with this one's
            raise ForgeError(
                f"resume_from_checkpoint: {value} lies outside output_dir {output_dir}, which holds checkpoints of "
                f"another run ({', '.join(found[:3])}); resume into an empty output_dir or into {path.parent}"
            )
    return path


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": _jsonable(random.getstate())}
    return tensors, meta


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]  # cuda.10 after 9
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(_tupled(meta["python"]))


def _is_dtensor(value: Any) -> bool:
    return hasattr(value, "to_local") and hasattr(value, "device_mesh")


def _optimizer_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's tensors (this process's shard of each FSDP DTensor) and its JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    sharded: list[str] = []
    for index, values in state["state"].items():
        for key, value in values.items():
            if _is_dtensor(value):
                sharded.append(f"{index}.{key}")
                value = value.to_local()
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "scalars": scalars}
    if sharded:
        meta.update(sharded=sharded, shards=torch.distributed.get_world_size())
    return tensors, meta


def _as_param(value: torch.Tensor, param: torch.Tensor, is_shard: bool) -> torch.Tensor:
    """A saved tensor shaped as `param` holds it: a DTensor on the same mesh when `param` is one (from this
    process's saved shard, or cut from a whole tensor saved by an unsharded run)."""
    if not _is_dtensor(param):
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor

    if is_shard:
        return DTensor.from_local(value.to(param.device), param.device_mesh, param.placements, shape=param.shape,
                                  stride=param.stride())
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def _copy_weights(params: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(_as_param(value, params[name], is_shard=False))


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict()'s index order
    sharded = set(meta.get("sharded", []))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        param = params[int(index)]
        if value.dim() > 0 and (key in sharded or value.shape == param.shape):  # not the scalar `step`
            value = _as_param(value, param, is_shard=key in sharded)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    # the groups' settings (learning rate, decay, betas, which kernel runs) are this run's, from its config: only
    # the state (moments, step counts) comes from the checkpoint; `optim.changed_settings` says what differs
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": saved["params"]}
        for saved, group in zip(meta["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    rank: int,
    is_main: bool,
    barrier: Any,
    keep: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically (all processes call this; each writes its own RNG file)."""
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    if is_main:
        for stale in output_dir.glob(f".tmp-{PREFIX}*"):  # left by saves that were killed half way
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors, meta = _rng_state()
    save_file(tensors, str(tmp / f"rng-{rank}.safetensors"))
    (tmp / f"rng-{rank}.json").write_text(json.dumps(meta))
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_files(optimizer)
        if "shards" in opt_meta:  # FSDP: every process holds a shard
            save_file(opt_tensors, str(tmp / f"optimizer-{rank}.safetensors"))
        elif is_main:
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if is_main:
            (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    if is_main:
        _write_trainable(trainable, tmp)
    barrier()
    if is_main:
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=float))
        _move_into_place(tmp, final)
        if keep is not None:
            for old in checkpoints(output_dir)[:-keep]:
                (old / "state.json").unlink()
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _write_trainable(trainable: dict[str, torch.Tensor], folder: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(folder / "trainable.safetensors"))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Replace `final` by the complete folder `tmp`: at every moment one of the two is whole."""
    aside = tmp.with_name(tmp.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)  # left by a replace that was killed half way
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def save_best_weights(
    output_dir: Path, step: int, val_loss: float, trainable: dict[str, torch.Tensor], run_id: str
) -> None:
    """Keep the trainable weights of a new best validation loss (main process only), atomically."""
    tmp = output_dir / f".tmp-{BEST}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_trainable(trainable, tmp)
    (tmp / "state.json").write_text(json.dumps({"step": step, "val_loss": val_loss, "run": run_id}))
    _move_into_place(tmp, output_dir / BEST)


def load_best_weights(folders: list[Path], model: torch.nn.Module, step: int, run_id: str) -> Path | None:
    """Put the weights this run kept at `step` back into `model`, from the first of `folders` holding them; None
    (model untouched) when none does, so another run's or another step's weights are never used. A damaged folder
    (a full disk, a half copy) raises ForgeError naming it, with the model untouched."""
    from safetensors import SafetensorError

    for folder in (f / BEST for f in folders):
        try:
            saved = json.loads((folder / "state.json").read_text()) if (folder / "state.json").is_file() else {}
            if not (isinstance(saved, dict) and saved.get("step") == step and saved.get("run") == run_id):
                continue
            weights = load_file(str(folder / "trainable.safetensors"))
        except (OSError, ValueError, SafetensorError) as exc:  # a cut-off state.json is a JSONDecodeError
            raise ForgeError(f"{folder} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        _copy_weights(dict(model.named_parameters()), weights)
        return folder
    return None


def _check_same_setup(
    folder: Path,
    weights: dict[str, torch.Tensor],
    params: dict[str, torch.nn.Parameter],
    opt_meta: dict[str, Any],
    optimizer: torch.optim.Optimizer,
) -> None:
    """Resuming with a config that trains other parameters would fail deep inside torch: name the key instead."""
    where = f"resume_from_checkpoint: {folder} was written with a different config"
    trainable = {name for name, param in params.items() if param.requires_grad}
    differ = sorted(set(weights) ^ trainable)
    if differ:
        raise ForgeError(
            f"{where}: it trains another set of parameters (e.g. {', '.join(differ[:3])}); "
            "resume with the unfrozen_parameters / adapter / tokens it was written with"
        )
    for name, value in weights.items():
        if value.shape != params[name].shape:
            raise ForgeError(
                f"{where}: {name} has shape {tuple(value.shape)} there and {tuple(params[name].shape)} here; "
                "resume with the tokens / special_tokens (vocabulary size) and base_model it was written with"
            )
    saved = [len(group["params"]) for group in opt_meta["param_groups"]]
    current = [len(group["params"]) for group in optimizer.param_groups]
    if saved != current:
        raise ForgeError(
            f"{where}: its optimizer groups hold {saved} parameters, this run's hold {current}; "
            "resume with the unfrozen_parameters row ranges it was written with"
        )


def _optimizer_tensors(folder: Path, meta: dict[str, Any], params: dict[str, Any], rank: int, world: int) -> Path:
    """The file holding this process's optimizer tensors; a sharded state resumes only on its own world size."""
    shards = meta.get("shards")
    if shards is None:
        return folder / "optimizer.safetensors"
    if shards != world or not any(_is_dtensor(p) for p in params.values()):
        raise ForgeError(
            f"resume_from_checkpoint: {folder} holds optimizer state sharded by FSDP over {shards} processes; "
            f"resume under FSDP on {shards} processes (`torchrun --nproc_per_node {shards}`), not {world}"
        )
    return folder / f"optimizer-{rank}.safetensors"


def _damaged(folder: Path, file: Path, why: str) -> ForgeError:
    """A checkpoint missing a file or holding a truncated one cannot resume exactly: name the file and a way on."""
    step = _NAME.match(folder.name)
    earlier = [c.name for c in checkpoints(folder.parent) if step and int(_NAME.match(c.name)[1]) < int(step[1])]
    way = f"set resume_from_checkpoint to {folder.parent / earlier[-1]}" if earlier else "start a new run"
    return ForgeError(f"resume_from_checkpoint: {folder} is damaged: {file.name} {why}; {way}")


def _read_json(folder: Path, name: str) -> Any:
    """One of the checkpoint's JSON files; a missing or cut-off one is named (json's own error names no file)."""
    file = folder / name
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _damaged(folder, file, "is missing") from None
    except json.JSONDecodeError as exc:
        raise _damaged(folder, file, f"is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise _damaged(folder, file, "is not UTF-8 text") from None


def _read_tensors(folder: Path, file: Path) -> dict[str, torch.Tensor]:
    """One of the checkpoint's safetensors files; safetensors' own error for a truncated one names no file."""
    from safetensors import SafetensorError

    if not file.is_file():
        raise _damaged(folder, file, "is missing")
    try:
        return load_file(str(file))
    except SafetensorError as exc:
        raise _damaged(folder, file, f"is not a readable safetensors file (truncated or corrupt: {exc})") from None


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    """This process's RNG files; a run resumed on more processes than wrote it starts the new ones from rank 0's."""
    if not (folder / f"rng-{rank}.safetensors").is_file() and not (folder / f"rng-{rank}.json").is_file():
        rank = 0
    return folder / f"rng-{rank}.safetensors", folder / f"rng-{rank}.json"


def check_same_data_order(folder: Path, saved: dict[str, int] | None, current: dict[str, int]) -> None:
    """Resuming must continue on the rows the checkpoint's run would have trained next (see `batches.BatchPlan`).

    Changing micro_batch_size against gradient_accumulation_steps keeps every step's rows and is allowed; any other
    change of the order would silently train other rows than an uninterrupted run. Old checkpoints record none.
    """
    if saved is None:
        return
    differ = []
    if saved["rows"] != current["rows"]:
        differ.append(f"{saved['rows']} training rows there, {current['rows']} here (datasets, val_set_size, "
                      "sequence_len or packing changed)")
    if saved["seed"] != current["seed"]:
        differ.append(f"seed {saved['seed']} there, {current['seed']} here")
    per_step = [d["micro_batch_size"] * d["gradient_accumulation_steps"] * d["processes"] for d in (saved, current)]
    if per_step[0] != per_step[1] or saved["rows_per_epoch"] != current["rows_per_epoch"]:
        sizes = [f"{d['micro_batch_size']} x {d['gradient_accumulation_steps']} x {d['processes']}"
                 for d in (saved, current)]
        differ.append(f"micro_batch_size x gradient_accumulation_steps x processes = {sizes[0]} there, {sizes[1]} "
                      "here" + ("" if per_step[0] != per_step[1] else " (padded differently across processes)"))
    if differ:
        raise ForgeError(
            f"resume_from_checkpoint: {folder} was written with a different config: its remaining steps would train "
            f"on other rows ({'; '.join(differ)}); resume with the settings it was written with"
        )


def load_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    world: int = 1,
    data_order: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Restore trainable weights, optimizer and this process's RNG from `folder`; returns its `state.json`.

    Every file is read and checked before anything is restored, so a damaged checkpoint or one from another
    `data_order` (this run's, see `check_same_data_order`) is refused with the model untouched.
    """
    if not (folder / "optimizer.json").is_file():
        if (folder / "optimizer.safetensors").is_file() or any(folder.glob("optimizer-*.safetensors")):
            raise _damaged(folder, folder / "optimizer.json", "is missing")
        raise ForgeError(
            f"resume_from_checkpoint: {folder} holds weights only (a DeepSpeed run's checkpoint: its engine keeps "
            "the optimizer state), so it cannot be resumed"
        )
    state = _read_json(folder, "state.json")
    weights = _read_tensors(folder, folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    opt_meta = _read_json(folder, "optimizer.json")
    _check_same_setup(folder, weights, params, opt_meta, optimizer)
    optimizer_file = _optimizer_tensors(folder, opt_meta, params, rank, world)
    if data_order is not None:
        check_same_data_order(folder, state.get("data"), data_order)
    opt_tensors = _read_tensors(folder, optimizer_file)
    rng_file, rng_meta_file = _rng_files(folder, rank)
    rng = _read_tensors(folder, rng_file)
    rng_meta = _read_json(folder, rng_meta_file.name)
    _copy_weights(params, weights)
    _load_optimizer(optimizer, opt_tensors, opt_meta)
    _set_rng_state(rng, rng_meta)
    state.setdefault("optimizer_settings", _group_settings(opt_meta["param_groups"][0]))
    return state


def _group_settings(group: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint written before state.json recorded `optimizer_settings` holds of them: its decay group's."""
    return {
        "learning_rate": group.get("initial_lr", group["lr"]),
        "weight_decay": group["weight_decay"],
        "adam_beta1": group["betas"][0],
        "adam_beta2": group["betas"][1],
        "adam_epsilon": group["eps"],
    }
