"""Training hands freed heap memory back to the OS on CPU (peak RSS is a benchmark goal)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dolphin_forge.train.hardware import release_freed_host_memory


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim exists on Linux only")
def test_freed_fragmented_heap_is_returned_to_the_os():
    # 1 MiB tensors are below glibc's raised mmap threshold, so they live in the heap; freeing every other one
    # leaves holes that glibc keeps (resident) until trimmed.
    torch.ones(4 << 20)  # raise the dynamic mmap threshold past 1 MiB, as training's large tensors do
    tensors = [torch.ones(1 << 18) for _ in range(400)]  # 400 x 1 MiB, touched
    del tensors[::2]
    before = resident_mib()
    release_freed_host_memory(torch.device("cpu"))
    after = resident_mib()
    assert before - after > 100, (before, after)  # ~200 MiB of holes; most of it must be released
    del tensors
