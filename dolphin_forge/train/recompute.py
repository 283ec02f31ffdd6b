"""Which decoder layers recompute their activations in the backward (gradient checkpointing).

`gradient_checkpointing: true` checkpoints every layer: the forward keeps only each layer's input and the backward
runs the layer again, a third more matmul work for a model of SmolLM2's shape. `gradient_checkpointing_layers: N`
(ours; no Axolotl counterpart, as torchtune's selective activation checkpointing) checkpoints only the first N
layers and lets the last ones keep their activations: each kept layer saves its recomputation and costs its saved
activations (~65 MB per SmolLM2 layer at 2048 tokens in float32, ~45 MB compiled). The last layers are the ones to
keep because the backward reaches them first: their activations are freed before most gradients exist, so up to a
point they add little to the peak (benchmarks/RESULTS.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dolphin_forge.errors import ForgeError


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's transformer blocks: the modules transformers makes checkpointable."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def checkpoint_first_layers(model: Any, count: int) -> None:
    """After transformers has checkpointed every layer: keep checkpointing the first `count`, not the others."""
    layers = decoder_layers(model)
    if count > len(layers):
        raise ForgeError(f"gradient_checkpointing_layers: {count}, but the model has {len(layers)} decoder layers; "
                         f"expected at most {len(layers)}")
    for layer in layers[count:]:
        layer.gradient_checkpointing = False


def after_kept_layers_backward(model: Any, count: int, callback: Callable[[], None]) -> None:
    """Call `callback` in each training backward once the layers that keep their activations are done.

    That is when their activations have just been freed; the recipe hands those pages back to the OS there
    (`train.hardware.release_freed_host_memory`), before the checkpointed layers' gradients are allocated.
    """
    layers = decoder_layers(model)
    if count >= len(layers):
        return

    def hook_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(lambda grad: callback())

    layers[count].register_forward_pre_hook(hook_input, with_kwargs=True)
