"""One process or many: the `Accelerator` for DDP or DeepSpeed, and FSDP sharding, chosen from the config and
the launcher.

`dolphin-forge train` runs as is on one device, and under `torchrun` / `accelerate launch` it picks the world up
from the environment (gloo on CPU, NCCL on GPU). `deepspeed:` takes an Axolotl DeepSpeed JSON whose `"auto"`
values are filled here from the config, the way the HF Trainer fills them for Axolotl.

`fsdp:` / `fsdp_config:` take Axolotl's FSDP keys, and we shard with torch's own FSDP2 (`fully_shard`, one unit
per decoder layer plus the root, as torchtune does) instead of accelerate's FSDP plugin. Why: accelerate ignores
that plugin on a CPU and silently trains with DDP, so its FSDP path could never run where our tests run, while
`fully_shard` runs over gloo as over NCCL; and its parameters are DTensors whose local shards we checkpoint in
safetensors, which makes FSDP runs resumable without pickles (see `train.checkpoint`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from dolphin_forge.config import ForgeConfig, resolve_path
from dolphin_forge.errors import ForgeError, read_text_file
from dolphin_forge.train.optim import EIGHT_BIT


def fill_deepspeed_auto(
    ds: dict[str, Any], config: ForgeConfig, world_size: int, hidden_size: int | None, mixed: str
) -> dict[str, Any]:
    """A copy of a DeepSpeed config with every `"auto"` replaced by the value the training config implies.

    `mixed` is the run's precision as `train.hardware.mixed_precision` resolved it for this device ('bf16', 'fp16'
    or 'no'), so `bf16: auto` enables DeepSpeed's bf16 only on hardware that has it.
    """
    filled = json.loads(json.dumps(ds))
    values = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "train_batch_size": config.total_batch_size(world_size),
        "gradient_clipping": config.max_grad_norm or 0.0,
    }
    for key, value in values.items():
        if filled.get(key) == "auto":
            filled[key] = value
    for section, on in (("bf16", mixed == "bf16"), ("fp16", mixed == "fp16")):
        if isinstance(filled.get(section), dict) and filled[section].get("enabled") == "auto":
            filled[section]["enabled"] = on
    zero = filled.get("zero_optimization", {})
    if hidden_size:
        sizes = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        for key, value in sizes.items():
            if zero.get(key) == "auto":
                zero[key] = value
    leftover = [k for k, v in zero.items() if v == "auto"]
    if leftover:
        raise ForgeError(
            f"deepspeed: zero_optimization.{leftover[0]} = 'auto' cannot be filled without the model's hidden size"
        )
    return filled


def check_deepspeed_settings(ds: dict[str, Any], config: ForgeConfig, mixed: str, where: str = "deepspeed") -> None:
    """Refuse a DeepSpeed JSON that would train otherwise than the config says; called before the model loads.

    A literal `enabled` for bf16/fp16 must agree with the run's precision (the Dolphin cards' zero3_bf16.json sets
    bf16 on: a float32 run would train in bf16 while reporting float32); the optimizer and schedule come from the
    training config only; an offloaded optimizer becomes DeepSpeed's CPU Adam, which runs a bitsandbytes AdamW as
    Adam with L2 decay. `where` names the file in the message.
    """
    for section, on in (("bf16", mixed == "bf16"), ("fp16", mixed == "fp16")):
        values = ds.get(section)
        enabled = values.get("enabled") if isinstance(values, dict) else None
        if isinstance(enabled, bool) and enabled != on:
            precision = {"no": "float32 (bf16: false, or `bf16: auto` on a GPU without bf16)"}.get(mixed, mixed)
            raise ForgeError(
                f"{where}: {section}.enabled is {str(enabled).lower()} but this run trains in {precision}; "
                f'set it to "auto" to follow the bf16/fp16 keys'
            )
    for section, keys in (("optimizer", "optimizer, learning_rate, weight_decay, adam_*"),
                          ("scheduler", "lr_scheduler, warmup_steps")):
        if section in ds:  # accelerate refuses a second optimizer; a second scheduler would run beside ours
            raise ForgeError(
                f"{where}: its {section} section is not supported: the run's {section} comes from the training "
                f"config ({keys}); drop the section"
            )
    offload = ds.get("zero_optimization", {}).get("offload_optimizer")
    if isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme") and config.optimizer in EIGHT_BIT:
        raise ForgeError(
            f"{where}: zero_optimization.offload_optimizer runs DeepSpeed's CPU Adam, which would train "
            f"optimizer: {config.optimizer} as Adam with L2 decay instead of AdamW; use optimizer: adamw_torch"
        )


def read_deepspeed_config(config: ForgeConfig, config_path: Path | None) -> dict[str, Any]:
    path = resolve_path(config.deepspeed, config_path)
    if not path.is_file():
        here = Path(__file__).resolve().parents[2] / config.deepspeed
        path = here if here.is_file() else path
    if not path.is_file():
        raise ForgeError(f"deepspeed: {config.deepspeed} not found")
    try:
        ds = json.loads(read_text_file(path, "a DeepSpeed JSON config"))
    except json.JSONDecodeError as exc:
        raise ForgeError(f"deepspeed: {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    check_deepspeed_shape(ds, path)
    return ds


def check_deepspeed_shape(ds: Any, path: Path) -> None:
    """The sections `fill_deepspeed_auto` reads must be JSON objects; another shape would end in an AttributeError."""
    if not isinstance(ds, dict):
        raise _not_an_object(path, "the top level", ds)
    for key in ("zero_optimization", "optimizer", "scheduler"):
        value = ds.get(key)
        if value is not None and not isinstance(value, dict):
            raise _not_an_object(path, key, value)
        params = value.get("params") if isinstance(value, dict) and key != "zero_optimization" else None
        if params is not None and not isinstance(params, dict):
            raise _not_an_object(path, f"{key}.params", params)


def _not_an_object(path: Path, where: str, value: Any) -> ForgeError:
    kinds = {list: "an array", str: "a string", bool: "true or false", int: "a number", float: "a number"}
    return ForgeError(
        f"deepspeed: {path}: {where} is {kinds.get(type(value), 'null')}; "
        'expected a JSON object of DeepSpeed settings ({"key": value, ...})'
    )


def fsdp_options(config: ForgeConfig) -> tuple[list[str], dict[str, Any]]:
    """Axolotl's `fsdp` list (or space-separated string) and its `fsdp_config` without the `fsdp_` prefixes."""
    options = config.fsdp if isinstance(config.fsdp, list) else str(config.fsdp or "").split()
    return [o.lower() for o in options], {k.removeprefix("fsdp_"): v for k, v in (config.fsdp_config or {}).items()}


def layers_to_wrap(model: torch.nn.Module, fsdp_config: dict[str, Any]) -> list[torch.nn.Module]:
    """The modules that become FSDP units: those of the classes in `fsdp_transformer_layer_cls_to_wrap`, else of the
    model's own `_no_split_modules` (its decoder layer), as Axolotl's transformer-based wrap policy chooses them."""
    own: set[str] = set()
    for module in model.modules():
        own.update(getattr(module, "_no_split_modules", None) or [])
    named = fsdp_config.get("transformer_layer_cls_to_wrap")
    classes = {c.strip() for c in (named if isinstance(named, list) else str(named).split(","))} if named else own
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        wanted, expected = " or ".join(sorted(classes)) or "layer", ", ".join(sorted(own)) or "unknown for this model"
        raise ForgeError(
            f"fsdp_config.fsdp_transformer_layer_cls_to_wrap: this model has no {wanted} module to wrap; "
            f"expected its decoder layer class ({expected})"
        )
    return layers


def loads_on_first_process_only(config: ForgeConfig) -> bool:
    """`fsdp_cpu_ram_efficient_loading`: under FSDP only the first process reads the weights; the others build the
    model on the meta device and receive their shards from it, so the whole run holds one full copy in CPU memory
    instead of one per process (8 x 48 GB for a 12B model in float32 on 8 GPUs)."""
    return bool(config.fsdp) and bool(fsdp_options(config)[1].get("cpu_ram_efficient_loading")) and world_size() > 1


def world_size() -> int:
    """Processes in this run, from the launcher's environment (known before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def shard_model(
    model: torch.nn.Module, config: ForgeConfig, device: torch.device, mixed: str, from_first: bool = False
) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 across the launched processes; returns it (its class becomes FSDP<...>).

    `full_shard` frees each layer's gathered weights after its forward, `shard_grad_op` keeps them until the backward
    (`reshard_after_forward`; the root unit, embeddings and head, keeps them in both, as torch chooses by default);
    `auto_wrap` makes every decoder layer its own unit (without it the whole model is one, and its peak memory is a
    full copy); `offload_params` keeps shards in CPU memory on a GPU machine. bf16/fp16 runs gather half-precision
    weights and reduce gradients in float32, FSDP's form of mixed precision. `from_first`: the other processes hold
    a meta model (`loads_on_first_process_only`) and receive their shards of the first's weights. FSDP1's tuning
    keys in Axolotl configs (`use_orig_params`, `limit_all_gathers`, `sync_module_states`, `*_prefetch`,
    `state_dict_type`) have no FSDP2 counterpart and change nothing: checkpoints always hold sharded optimizer state
    and gathered weights.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options, fsdp_config = fsdp_options(config)
    grad_op = "shard_grad_op" in options or str(fsdp_config.get("sharding_strategy", "")).upper() == "SHARD_GRAD_OP"
    configured = fsdp_config.get("reshard_after_forward")
    kwargs: dict[str, Any] = {"reshard_after_forward": bool(configured) if configured is not None else not grad_op}
    if mixed in ("bf16", "fp16"):
        half = torch.bfloat16 if mixed == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
    if device.type != "cpu" and offloads_params(config):
        kwargs["offload_policy"] = CPUOffloadPolicy()
    full = model.state_dict() if from_first and process_rank() == 0 else {}
    if "auto_wrap" in options or fsdp_config.get("auto_wrap_policy"):
        for layer in layers_to_wrap(model, fsdp_config):
            fully_shard(layer, **kwargs)  # moves its shard to the device: the whole model never sits on one GPU
    root = {**kwargs, "reshard_after_forward": None if kwargs["reshard_after_forward"] else False}
    fully_shard(model, **root)
    if from_first:
        _receive_weights(model, full, torch.device("cpu") if "offload_policy" in kwargs else device, device)
    return model


def _receive_weights(
    model: torch.nn.Module, full: dict[str, torch.Tensor], storage: torch.device, device: torch.device
) -> None:
    """Give the meta shards of the other processes memory on `storage` (the CPU when shards are offloaded), then
    every process its shard of the first's weights.

    Buffers that are not saved (rotary frequencies) were computed by each process's own `empty_model`; `to_empty`
    would leave them uninitialised, so they are put back, on the compute `device` where the first process's are.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if process_rank() != 0:
        buffers = {name: b.clone() for name, b in model.named_buffers() if not b.is_meta}
        model.to_empty(device=storage)
        for name, value in buffers.items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = value.to(device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)


def offloads_params(config: ForgeConfig) -> bool:
    options, fsdp_config = fsdp_options(config)
    return bool(fsdp_config.get("offload_params")) or "offload" in options


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit back to its shards. Needed before writing into parameters: after a forward without
    resharding (`shard_grad_op`, the root unit) the module holds gathered copies, and what is written into the
    shards would be overwritten when FSDP switches back to them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def gradient_sync(model: Any, accelerator: Any, sync: bool) -> Iterator[None]:
    """Reduce gradients across processes only on the last micro-batch of a window (DDP's `no_sync`, FSDP2's
    `set_requires_gradient_sync`); the sum over the window is the same either way, the traffic is not."""
    if sync:
        yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def make_accelerator(config: ForgeConfig, ds: dict[str, Any] | None, mixed: str, hidden_size: int | None) -> Any:
    """The `Accelerator` for this run (plain, DDP or DeepSpeed; FSDP runs shard with `shard_model` on top of a plain
    one). `ds`: the run's DeepSpeed JSON as `read_deepspeed_config` read it, or None."""
    from accelerate import Accelerator

    # cpu=True is what makes accelerate join a torchrun world over gloo when there is no GPU
    kwargs: dict[str, Any] = {"mixed_precision": mixed, "cpu": not torch.cuda.is_available()}
    world = world_size()
    if config.fsdp and offloads_params(config) and torch.cuda.is_available() and world > 1:
        # offloaded shards and their gradients live in CPU memory: their collectives (the gradient norm) need gloo
        # beside NCCL; accelerate then joins this process group instead of creating an NCCL-only one
        if not torch.distributed.is_initialized():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group("cuda:nccl,cpu:gloo")
    if ds is not None:
        if importlib.util.find_spec("deepspeed") is None:
            raise ForgeError(
                "deepspeed: the deepspeed package is not installed (`pip install 'dolphin-forge[gpu]'`, needs a GPU); "
                "drop the key to train with plain DDP (`torchrun --nproc_per_node N`)"
            )
        from accelerate.utils import DeepSpeedPlugin

        ds = fill_deepspeed_auto(ds, config, world, hidden_size, mixed)
        # known gap: the model is loaded before this Accelerator exists, so ZeRO-3 cannot partition it while it
        # loads (zero.Init); each process holds a full copy until `prepare`
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    return Accelerator(**kwargs)
