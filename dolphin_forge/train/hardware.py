"""How a training run uses the device: mixed precision, weight dtype, the attention kernel and host memory.

`bf16: auto` means bf16 autocast wherever the hardware does bf16 natively (`models.hardware.bf16_native`); on a
CPU without AVX512-BF16 or AMX bf16 is emulated and slower than float32, so `auto` stays in float32 there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import sys

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


def attention_implementation(config: ForgeConfig, device: torch.device, mixed: str) -> str:
    """flash_attention_2 (variable-length kernels for packed rows) on a GPU that can run it, else per-sample SDPA.

    flash-attn computes in bf16/fp16 only and needs an Ampere or newer GPU: a float32 run (`bf16: false`, or
    `bf16: auto` on a V100/T4) or an older GPU uses transformers' SDPA, or is refused if `flash_attention: true`
    asks for it explicitly. `models.packed` runs SDPA sample by sample within packed rows on CPU; on a GPU without
    flash-attn transformers' own SDPA (a block-diagonal mask derived from the restarting position ids) is used.
    Either way a packed row's samples never attend to each other (tests/train/test_packing.py proves it).
    """
    if device.type != "cuda":
        return register_packed_attention()
    installed = importlib.util.find_spec("flash_attn") is not None
    half = mixed in ("bf16", "fp16")  # `bf16: full` (bf16 weights) resolves to "bf16" too
    ampere = torch.cuda.get_device_capability(device) >= (8, 0)
    if config.flash_attention is not False and installed and half and ampere:
        return "flash_attention_2"
    if config.flash_attention:
        if not installed:
            raise ForgeError("flash_attention: true needs the flash-attn package: `pip install 'dolphin-forge[gpu]'`")
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ForgeError(
            "flash_attention: true needs bf16 or fp16 (`bf16: auto` or `bf16: true`) on a GPU of compute capability "
            f"8.0 or newer (Ampere); this run is {'half precision' if half else 'float32'} on compute capability "
            f"{capability}; drop flash_attention to use SDPA"
        )
    return "sdpa"


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_host_memory(device: torch.device) -> None:
    """Hand memory that training has freed back to the OS (CPU runs on glibc only; elsewhere a no-op).

    On CPU, tensors live in glibc's heap. Activations are freed in a different order than they were allocated, so
    the heap keeps up to ~1 GB of free but fragmented pages per step of a 135M model at 2048 tokens, and the
    process' peak RSS is that much above what it really uses. `malloc_trim(0)` returns those pages, but pages
    handed back must be faulted in again when the next activations are allocated. The recipe therefore trims
    only when `gradient_checkpointing` is on, i.e. when the user has chosen memory over speed: there, once
    between a micro-batch's forward and backward and once after each optimizer step, it lowered peak RSS from
    3.94 to 3.44 GB for 3% of throughput; without checkpointing it would cost 12% for 4% (benchmarks/RESULTS.md).
    With `gradient_checkpointing_layers`, once more when the backward has passed the layers that kept their
    activations: -210 MB of peak for 1.5% (15 of SmolLM2's 30 layers kept, 2048 tokens).
    GPU memory is managed by CUDA's caching allocator, not here.
    """
    libc = _glibc() if device.type == "cpu" else None
    if libc is not None:
        libc.malloc_trim(0)
