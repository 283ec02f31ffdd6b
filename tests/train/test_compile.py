"""`torch_compile`: compiled decoder layers give the eager gradients; what it is not tested with is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.train import compile as compiling
from tests.tiny import build_tiny_model, enable_checkpointing
from tests.train.rows import random_rows
from tests.train.test_recipe import window_gradients


needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in compiling.CXX_COMPILERS),
    reason="torch_compile on CPU needs a C++ compiler (g++, c++ or clang++) on PATH",
)


@needs_compiler
@pytest.mark.parametrize("checkpointing, mode", [(True, "full"), (False, "full"), (True, "lora")])
def test_compiled_layers_give_the_eager_gradients(tiny_model_dir, tmp_path, checkpointing, mode):
    from torch._dynamo.utils import counters

    rows = random_rows(4, 49152, seed=7, per_row=3)  # several samples per row: the packed operator inside the graph
    common = dict(micro_batch_size=2, gradient_accumulation_steps=2, gradient_checkpointing=checkpointing)
    if checkpointing:
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if mode == "lora":
        common.update(adapter="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_linear=True)
    loss_a, grads_a = window_gradients(tiny_model_dir, tmp_path / "a", rows, **common)
    torch._dynamo.reset()
    counters.clear()
    loss_b, grads_b = window_gradients(tiny_model_dir, tmp_path / "b", rows, torch_compile=True, **common)
    assert counters["stats"]["unique_graphs"] >= 1  # compiled code ran
    breaks = list(counters["graph_break"])
    assert all(b.startswith("Skip calling `torch.compiler.disable()`d function") for b in breaks), breaks
    # the only break: the eager down projection (the packed attention's data-dependent boundaries do not break)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) >= 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_restoring_eager_layers_undoes_the_compiled_routing(tokenizer):
    model = build_tiny_model(tokenizer)
    enable_checkpointing(model)  # checkpointed layers keep their down projection eager
    assert compiling.compile_decoder_layers(model) == 2
    layer = model.model.layers[0]
    assert "forward" in layer.__dict__ and "forward" in layer.mlp.down_proj.__dict__
    compiling.restore_eager_layers(model)
    assert "forward" not in layer.__dict__ and "forward" not in layer.mlp.down_proj.__dict__


@pytest.mark.parametrize("key, value", [("fsdp", ["full_shard"]), ("deepspeed", "zero3.json")])
def test_torch_compile_is_refused_with_what_it_is_not_tested_with(tmp_path, key, value):
    config = ForgeConfig(base_model="m", torch_compile=True, **{key: value})
    with pytest.raises(ForgeError, match=f"torch_compile: not supported together with {key}"):
        compiling.check_torch_compile(config, torch.device("cpu"))


def test_torch_compile_on_cpu_needs_a_cxx_compiler(monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(ForgeError, match="no compiler was found"):
        compiling.check_torch_compile(ForgeConfig(base_model="m", torch_compile="auto"), torch.device("cpu"))
    compiling.check_torch_compile(ForgeConfig(base_model="m"), torch.device("cpu"))  # off: nothing to check


def test_a_model_without_transformers_decoder_layers_is_refused():
    with pytest.raises(ForgeError, match="torch_compile: Linear has no transformers decoder layers"):
        compiling.compile_decoder_layers(torch.nn.Linear(2, 2))
