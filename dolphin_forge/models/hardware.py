"""What the device can do: native bf16, and the matmul peak that MFU is measured against.

Shared by training, evaluation and the benchmarks, so that "bf16 where native" and "MFU" mean the same everywhere.
bf16 counts as native on a CUDA GPU that supports it and on a CPU with AVX512-BF16 or AMX; elsewhere bf16 is
emulated and slower than float32. The MFU denominator is measured, not looked up: a short run of large matmuls on
this very device, because published peaks mean little on a shared 2-core CPU.
"""

from __future__ import annotations

import functools
import time

import torch


def bf16_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def matmul_peak_flops(device_type: str, dtype: torch.dtype, size: int | None = None, seconds: float = 1.0) -> float:
    """Measured FLOP/s of square matmuls of `size` in `dtype` on this device (best of a short run); by default 2048
    on a CPU and 8192 on a GPU, where smaller matmuls do not fill an A100/H100 and would understate its peak."""
    device = torch.device(device_type)
    size = size or (8192 if device.type == "cuda" else 2048)
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
