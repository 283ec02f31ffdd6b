"""What the machine can do: bf16 support, the attention kernel, and the matmul peak MFU is measured against.

`bf16: auto` means bf16 autocast wherever the hardware does bf16 natively: a CUDA GPU that supports it, or a CPU
with AVX512-BF16 or AMX instructions. On a CPU without them bf16 is emulated and slower than float32, so `auto`
stays in float32 there. The MFU denominator is measured, not looked up: a few seconds of large matmuls in the
training dtype on this very device, because published peaks mean little on a shared 2-core CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.packed import register_packed_attention


@functools.cache
def cpu_has_native_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return False
    flags = cpuinfo.read_text(errors="ignore")
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


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


@functools.cache
def matmul_peak_flops(device_type: str, dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """Measured FLOP/s of square matmuls of `size` in `dtype` on this device (best of a short run)."""
    device = torch.device(device_type)
    generator = torch.Generator(device=device).manual_seed(0)  # never the global RNG: training must not depend on it
    a = torch.randn(size, size, device=device, generator=generator).to(dtype)
    b = torch.randn(size, size, device=device, generator=generator).to(dtype)
    best = 0.0
    deadline = time.perf_counter() + seconds
    torch.mm(a, b)  # warm-up
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best
