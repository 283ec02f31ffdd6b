"""Which attention kernel a run gets on a GPU (faked here: no GPU in CI), and the clear errors when it cannot."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.packed import PACKED_SDPA
from dolphin_forge.train import hardware


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU of a chosen compute capability, with or without flash-attn installed."""

    def install(capability: tuple[int, int], flash_attn: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if flash_attn else None) if name == "flash_attn"
                            else find_spec(name, *a))

    return install


CUDA = torch.device("cuda")


@pytest.mark.parametrize(
    "capability, mixed, settings, expected",
    [
        ((8, 0), "bf16", {}, "flash_attention_2"),  # A100, bf16: auto
        ((9, 0), "fp16", {"flash_attention": True}, "flash_attention_2"),
        ((8, 0), "no", {}, "sdpa"),  # float32: flash-attn cannot compute it
        ((7, 0), "fp16", {}, "sdpa"),  # V100: too old for flash-attn 2
        ((8, 0), "bf16", {"flash_attention": False}, "sdpa"),
    ],
)
def test_flash_attention_only_where_it_can_run(fake_gpu, capability, mixed, settings, expected):
    fake_gpu(capability)
    assert hardware.attention_implementation(ForgeConfig(**settings), CUDA, mixed) == expected


@pytest.mark.parametrize(
    "capability, mixed, flash_attn, message",
    [
        ((8, 0), "no", True, r"bf16 or fp16 .* this run is float32 on compute capability 8\.0; drop"),
        ((7, 5), "fp16", True, r"compute capability 8\.0 or newer .* this run is half precision on compute "
                               r"capability 7\.5"),
        ((8, 0), "bf16", False, r"the flash-attn package"),
    ],
)
def test_asking_for_flash_attention_where_it_cannot_run_is_one_line(fake_gpu, capability, mixed, flash_attn, message):
    fake_gpu(capability, flash_attn)
    with pytest.raises(ForgeError, match=f"^flash_attention: true needs .*{message}"):
        hardware.attention_implementation(ForgeConfig(flash_attention=True), CUDA, mixed)


def test_cpu_runs_use_per_sample_attention():
    cpu = torch.device("cpu")
    assert hardware.attention_implementation(ForgeConfig(flash_attention=True), cpu, "no") == PACKED_SDPA
