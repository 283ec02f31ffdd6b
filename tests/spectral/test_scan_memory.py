"""The Spectrum scan never holds the model: its peak memory grows by a small fraction of the checkpoint's size.

A 20-layer checkpoint of random matrices (~340 MB of float32) is written straight with safetensors, and a fresh
process scans it. What the scan adds to the interpreter's resident memory (block, Gram matrix, eigensolver
workspace, LAPACK code pages, allocator slack: ~40 MB here) must stay under a third of the file: loading the
model, or keeping each read's memory map alive, would add all of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

LAYERS, HIDDEN, INTERMEDIATE = 20, 512, 4096

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest, which just held the tensors)
RUNNER = """
import json, sys
import torch
from dolphin_forge.spectral.scan import scan_model
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))
base_kb = status("VmRSS:")
scan = scan_model(sys.argv[1], ["self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"])
print(json.dumps({"matrices": len(scan.matrices), "added_kb": status("VmHWM:") - base_kb}))
"""


def write_checkpoint(folder: Path) -> int:
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=generator)
        tensors[f"{prefix}.mlp.up_proj.weight"] = torch.randn(INTERMEDIATE, HIDDEN, generator=generator)
        tensors[f"{prefix}.mlp.down_proj.weight"] = torch.randn(HIDDEN, INTERMEDIATE, generator=generator)
    path = folder / "model.safetensors"
    save_file(tensors, path)
    return path.stat().st_size


def test_scan_adds_far_less_memory_than_the_checkpoint_holds(tmp_path):
    size = write_checkpoint(tmp_path)
    out = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    added = result["added_kb"] * 1024
    print(f"checkpoint {size / 2**20:.0f} MiB, scan added {added / 2**20:.1f} MiB of resident memory")
    assert result["matrices"] == 3 * LAYERS
    assert added < size / 3
