"""Optimizer and learning-rate schedule exactly as the config names them.

AdamW with decoupled weight decay on matrices only (biases and norm weights have one dimension and no decay,
the nanoGPT/torchtune convention). Parameters of which only some rows train (`models.freeze.PartialParameter`)
get their decay applied by row, outside the optimizer, so frozen rows never move.

The schedules are written as one small function rather than taken from `transformers.get_scheduler`, because
`cosine_min_lr_ratio` and the warmup from `warmup_ratio` must be combined, and a `LambdaLR` over a pure function of
the step is trivially exact on resume.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.freeze import PartialParameter

EIGHT_BIT = ("adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit")


def build_optimizer(
    model: torch.nn.Module,
    config: ForgeConfig,
    partial: dict[str, PartialParameter] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, in a decay group, a no-decay group and a row-decayed group."""
    partial = partial or {}
    decay, no_decay, by_row = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in partial:
            by_row.append(param)
        elif param.dim() >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    if not (decay or no_decay or by_row):
        raise ForgeError("nothing to train: every parameter is frozen (check unfrozen_parameters / adapter)")
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": by_row, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = dict(
        lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon
    )
    if config.optimizer in EIGHT_BIT:
        return _bitsandbytes_adamw(model, groups, config, kwargs)
    # adamw_torch and adamw_torch_fused are the same update; torch's fused kernel does it in one pass per tensor
    # instead of ~10 (CPU: 0.10 s instead of 0.50 s per step for 135M parameters, benchmarks/RESULTS.md)
    kwargs["fused"] = _fused_supported([p for group in groups for p in group["params"]])
    return torch.optim.AdamW(groups, **kwargs)


def _fused_supported(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW takes floating-point tensors on CPU or CUDA, all on one device type."""
    devices = {p.device.type for p in params}
    return len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def check_optimizer_supported(config: ForgeConfig) -> None:
    """The 8-bit optimizers need bitsandbytes and CUDA: say so before anything is loaded."""
    if config.optimizer not in EIGHT_BIT:
        return
    if not torch.cuda.is_available():
        raise ForgeError(
            f"optimizer: {config.optimizer} needs bitsandbytes on a CUDA GPU and none is available; "
            "use `optimizer: adamw_torch` (or adamw_torch_fused) on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ForgeError(
            f"optimizer: {config.optimizer} needs bitsandbytes: `pip install 'dolphin-forge[gpu]'`, "
            "or use `optimizer: adamw_torch`"
        ) from None


def _bitsandbytes_adamw(
    model: torch.nn.Module, groups: list[dict[str, Any]], config: ForgeConfig, kwargs: dict[str, Any]
) -> Any:
    """bitsandbytes' 8-bit AdamW, with 32-bit states for embedding weights as the HF Trainer keeps them: their rows
    are updated sparsely, and bitsandbytes advises against 8-bit states for them (its `StableEmbedding`)."""
    check_optimizer_supported(config)
    import bitsandbytes as bnb

    optimizer_class = bnb.optim.PagedAdamW8bit if config.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    optimizer = optimizer_class(groups, **kwargs)
    manager = bnb.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def warmup_steps(config: ForgeConfig, total_steps: int) -> int:
    if config.warmup_steps is not None:
        return config.warmup_steps
    if config.warmup_ratio is not None:
        return math.ceil(config.warmup_ratio * total_steps)
    return 0


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate used for optimizer step `step` (0-based)."""
    if step < warmup:
        return step / warmup
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: ForgeConfig, total_steps: int, start_step: int = 0
) -> Any:
    """The config's schedule, positioned at `start_step` (a resumed run: the groups already hold `initial_lr`)."""
    warmup = warmup_steps(config, total_steps)
    min_ratio = config.cosine_min_lr_ratio or 0.0

    def factor(step: int) -> float:
        return lr_factor(step, schedule=config.lr_scheduler, warmup=warmup, total=total_steps, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start_step - 1)


def optimizer_settings(config: ForgeConfig, total_steps: int) -> dict[str, Any]:
    """Everything that fixes an optimizer step's update besides the state, as a checkpoint records it.

    A resumed run trains with its own config's settings (`changed_settings` lists what differs), like a fresh one.
    Torch's and the HF Trainer's resume keeps the checkpoint's learning rate instead, silently, a common surprise
    when a run is resumed with a lower one; here the config a user reads is the one that trains.
    """
    return {
        "learning_rate": config.learning_rate,
        "lr_scheduler": config.lr_scheduler,
        "warmup_steps": warmup_steps(config, total_steps),
        "cosine_min_lr_ratio": config.cosine_min_lr_ratio or 0.0,
        "total_steps": total_steps,
        "weight_decay": config.weight_decay,
        "adam_beta1": config.adam_beta1,
        "adam_beta2": config.adam_beta2,
        "adam_epsilon": config.adam_epsilon,
    }


def changed_settings(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """`key old -> new` for every setting a checkpoint was written with that this run changes (none if unrecorded)."""
    saved = saved or {}
    return [f"{key} {saved[key]} -> {value}" for key, value in current.items() if key in saved and saved[key] != value]
