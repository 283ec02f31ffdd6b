"""How a training run uses the device: mixed precision, weight dtype and the attention kernel.

`bf16: auto` means bf16 autocast wherever the hardware does bf16 natively (`models.hardware.bf16_native`); on a
CPU without AVX512-BF16 or AMX bf16 is emulated and slower than float32, so `auto` stays in float32 there.
"""

from __future__ import annotations

import importlib.util

import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.hardware import bf16_native
from dolphin_forge.models.packed import register_packed_attention


def mixed_precision(config: ForgeConfig, device: torch.device) -> str:
    """Accelerate's `mixed_precision` value for this config on this device: 'bf16', 'fp16' or 'no'."""
    if config.fp16:
        if device.type != "cuda":
            raise ForgeError("fp16: true needs a CUDA GPU; on CPU use `bf16: auto` (or false)")
        return "fp16"
    if config.bf16 == "auto":
        return "bf16" if bf16_native(device) else "no"
    return "bf16" if config.bf16 in (True, "full") else "no"


def weights_dtype(config: ForgeConfig) -> torch.dtype:
    """`bf16: full` keeps the weights themselves in bf16; otherwise they stay float32 (autocast does the rest)."""
    return torch.bfloat16 if config.bf16 == "full" else torch.float32


def attention_implementation(config: ForgeConfig, device: torch.device) -> str:
    """flash_attention_2 (variable-length kernels for packed rows) on a GPU that has it, else per-sample SDPA.

    `models.packed` runs SDPA sample by sample within packed rows; on a GPU without flash-attn transformers' own
    SDPA (a block-diagonal mask derived from the restarting position ids) is used. Either way a packed row's
    samples never attend to each other (tests/train/test_packing.py proves it).
    """
    if device.type == "cuda" and config.flash_attention is not False and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    if config.flash_attention and device.type == "cuda":
        raise ForgeError("flash_attention: true needs the flash-attn package: `pip install 'dolphin-forge[gpu]'`")
    return "sdpa" if device.type == "cuda" else register_packed_attention()
