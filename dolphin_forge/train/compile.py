"""`torch_compile: true`: each decoder layer's training forward compiled by inductor; the loop itself stays eager.

Why the layers and not the whole model: on a CPU the matmuls already run near the machine's peak, and what is left
of a step is elementwise work (RMSNorm, rotary embeddings, SiLU, residual adds) that eager PyTorch runs as dozens of
separate passes over memory, three times per layer with gradient checkpointing (forward, recomputation, backward).
Compiling a layer fuses those passes. The rest stays as it is:

* the checkpoint stays eager around the compiled layer (dynamo traces a checkpoint into one opaque region and gives
  up on all of it at the first unsupported op), so memory and recomputation are what they are without compiling;
* packed attention is one opaque operator (`models.packed.packed_attention`), so the data-dependent sample
  boundaries do not break the graph;
* in a checkpointed layer the MLP's down projection stays outside the graph: torch's non-reentrant checkpoint stops
  recomputing a layer at its last saved tensor, the projection's input, so eagerly the projection itself is never
  recomputed; inside a compiled graph, whose saved tensors are packed together at its end, it would be. A layer
  that keeps its activations (`gradient_checkpointing_layers`) is compiled whole;
* where the LM head is not fused with the loss (`train.loss`), the loss (cross-entropy over the vocabulary at the
  trained positions) is compiled too: eagerly its forward and backward make ~6 passes over a (positions x
  vocabulary) tensor, compiled ~3;
* evaluation forwards run eagerly (no second, inference-only compile for an occasional validation pass).

Shapes are compiled as dynamic, so packed rows of any length reuse one compiled layer. The first step pays the
compile (~15-30 s for SmolLM2 on 2 CPU cores); later steps of that model run ~9% faster (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
import types
from typing import Any

import torch
import torch.nn.functional as F

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.train.recompute import decoder_layers

CXX_COMPILERS = ("g++", "c++", "clang++")


def check_torch_compile(config: ForgeConfig, device: torch.device) -> None:
    """Refuse, before the model loads, what `torch_compile` is not tested with, and a CPU with no C++ compiler."""
    if not config.torch_compile:
        return
    for key, value in (("fsdp", config.fsdp), ("deepspeed", config.deepspeed), ("load_in_4bit", config.load_in_4bit),
                       ("load_in_8bit", config.load_in_8bit)):
        if value:
            raise ForgeError(f"torch_compile: not supported together with {key} yet; set torch_compile: false")
    if device.type == "cpu" and not any(shutil.which(name) for name in CXX_COMPILERS):
        raise ForgeError(
            "torch_compile: on CPU, inductor compiles C++ and no compiler was found (g++, c++ or clang++ on PATH); "
            "install one (e.g. `apt install g++`) or set torch_compile: false"
        )
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ForgeError("torch_compile: on a GPU, inductor needs the triton package (`pip install triton`); "
                         "install it or set torch_compile: false")


def compile_decoder_layers(model: Any) -> int:
    """Route every decoder layer's training forward through a compiled copy (see the module docstring)."""
    layers = decoder_layers(model)
    if not layers:
        raise ForgeError(f"torch_compile: {type(model).__name__} has no transformers decoder layers to compile "
                         "(remote code?); set torch_compile: false")
    for layer in layers:
        layer.forward = types.MethodType(_training_forward, layer)
        down = _down_projection(layer)
        if down is not None and layer.gradient_checkpointing:
            down.forward = torch.compiler.disable(down.forward)
    return len(layers)


def restore_eager_layers(model: Any) -> None:
    """Undo `compile_decoder_layers` (before the model is saved or used for generation)."""
    for layer in decoder_layers(model):
        layer.__dict__.pop("forward", None)
        down = _down_projection(layer)
        if down is not None:
            down.__dict__.pop("forward", None)


def _down_projection(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The layer's MLP down projection (kept out of the compiled graph), or None if it has none by that name."""
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    return down if isinstance(down, torch.nn.Module) else None


@functools.cache
def _compiled(function: Any) -> Any:
    return torch.compile(function, dynamic=True)


def compiled_cross_entropy() -> Any:
    """`F.cross_entropy`, compiled for inputs of any number of positions."""
    return _compiled(F.cross_entropy)


def _recomputed_layer(forward: Any, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A checkpointed layer's forward: compiled apart from `_kept_layer` (below)."""
    return forward(layer, *args, **kwargs)


def _kept_layer(forward: Any, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The forward of a layer that keeps its activations: one whole graph, down projection included.

    A function of its own because dynamo keeps compiled graphs per code object and does not guard on a module's
    replaced `forward`: sharing one function with the checkpointed layers, these layers would reuse their graph,
    broken at the (there eager) down projection.
    """
    return forward(layer, *args, **kwargs)


def _training_forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    declared = type(self).forward
    # transformers >= 5 checkpoints inside `forward` (a wrapper around the layer's own forward, kept as __wrapped__)
    plain = getattr(declared, "__wrapped__", declared)
    if not self.training:
        return plain(self, *args, **kwargs)
    compiled = _compiled(_recomputed_layer if self.gradient_checkpointing else _kept_layer)
    if plain is not declared and self.gradient_checkpointing:
        # as transformers' wrapper: the recomputation must not update a cache a second time
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if not getattr(self, "_can_checkpoint_with_cache", False):
            kwargs.pop("past_key_values", None)
            kwargs.pop("layer_past", None)
        return self._gradient_checkpointing_func(functools.partial(compiled, plain, self, **kwargs), *args)
    return compiled(plain, self, *args, **kwargs)
