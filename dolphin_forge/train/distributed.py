"""One process or many: the `Accelerator` for DDP, FSDP or DeepSpeed, chosen from the config and the launcher.

`dolphin-forge train` runs as is on one device, and under `torchrun` / `accelerate launch` it picks the world up
from the environment (gloo on CPU, NCCL on GPU). `deepspeed:` takes an Axolotl DeepSpeed JSON whose `"auto"`
values are filled here from the config, the way the HF Trainer fills them for Axolotl; `fsdp:` / `fsdp_config:`
take Axolotl's FSDP keys.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from dolphin_forge.config import ForgeConfig, resolve_path
from dolphin_forge.errors import ForgeError


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
    for section in ("optimizer", "scheduler"):
        params = filled.get(section, {}).get("params", {})
        for key in [k for k, v in params.items() if v == "auto"]:
            raise ForgeError(f"deepspeed: {section}.params.{key} = 'auto' is not supported; set a value or drop the {section} section")
    leftover = [k for k, v in zero.items() if v == "auto"]
    if leftover:
        raise ForgeError(f"deepspeed: zero_optimization.{leftover[0]} = 'auto' cannot be filled without the model's hidden size")
    return filled


def read_deepspeed_config(config: ForgeConfig, config_path: Path | None) -> dict[str, Any]:
    path = resolve_path(config.deepspeed, config_path)
    if not path.is_file():
        here = Path(__file__).resolve().parents[2] / config.deepspeed
        path = here if here.is_file() else path
    if not path.is_file():
        raise ForgeError(f"deepspeed: {config.deepspeed} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ForgeError(f"deepspeed: {path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def check_sharding_supported(config: ForgeConfig) -> None:
    """FSDP shards over accelerator devices (accelerate refuses it on a CPU): say so before anything is loaded."""
    if config.fsdp and not torch.accelerator.is_available():
        raise ForgeError(
            "fsdp: FSDP needs GPUs (accelerate shards over CUDA/XPU devices) and none is available; on this machine "
            "drop the fsdp keys and train with plain DDP instead (`torchrun --nproc_per_node N`)"
        )


def make_accelerator(config: ForgeConfig, config_path: Path | None, mixed: str, hidden_size: int | None) -> Any:
    """The `Accelerator` for this run (plain, DDP, FSDP or DeepSpeed)."""
    from accelerate import Accelerator

    # cpu=True is what makes accelerate join a torchrun world over gloo when there is no GPU
    kwargs: dict[str, Any] = {"mixed_precision": mixed, "cpu": not torch.cuda.is_available()}
    if config.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise ForgeError(
                "deepspeed: the deepspeed package is not installed (`pip install 'dolphin-forge[gpu]'`, needs a GPU); "
                "drop the key to train with plain DDP (`torchrun --nproc_per_node N`)"
            )
        from accelerate.utils import DeepSpeedPlugin

        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds = fill_deepspeed_auto(read_deepspeed_config(config, config_path), config, world, hidden_size, mixed)
        # known gap: the model is loaded before this Accelerator exists, so ZeRO-3 cannot partition it while it
        # loads (zero.Init); each process holds a full copy until `prepare`
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds)
    elif config.fsdp:
        from accelerate.utils import FullyShardedDataParallelPlugin

        options = config.fsdp if isinstance(config.fsdp, list) else str(config.fsdp).split()
        fsdp_config = {k.removeprefix("fsdp_"): v for k, v in (config.fsdp_config or {}).items()}
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            sharding_strategy="SHARD_GRAD_OP" if "shard_grad_op" in options else "FULL_SHARD",
            cpu_offload=bool(fsdp_config.get("offload_params")) or "offload" in options,
            sync_module_states=bool(fsdp_config.get("sync_module_states", True)),
            limit_all_gathers=bool(fsdp_config.get("limit_all_gathers", True)),
            auto_wrap_policy="transformer_based_wrap" if "auto_wrap" in options else None,
            use_orig_params=True,
            state_dict_type="FULL_STATE_DICT",
        )
    return Accelerator(**kwargs)
