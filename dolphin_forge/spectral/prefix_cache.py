"""Exact reuse of unchanged layers when scoring a one-matrix change: a decoder-layer input cache.

LASER changes one weight matrix per attempt. Every layer below the changed one computes exactly what it computed
for the current model, so their work can be skipped: the inputs of each decoder layer are recorded for every
scoring batch of the current model, and an attempt at layer L runs only layers L..end, starting from the recorded
input of layer L. When the change is kept, the inputs recorded during that run (layers above L) replace the old
ones; when it is rejected they are dropped. An attempt in the middle of the model costs about half a forward pass,
one near the top only the head.

It plugs into `evaluate.perplexity.perplexity_of_ids` unchanged: `PrefixCachedLM` is a module whose forward takes
`input_ids` like the model's and looks the batch up by content. Skipping the lower layers works by handing the
model's own forward the recorded hidden states as `inputs_embeds` with its layer list temporarily cut to L..end,
so positions, masks and rotary embeddings are computed exactly as in a full pass. Architectures that transform
`inputs_embeds` before the first layer (e.g. Gemma's embedding scale) would break this, so `verify` compares a
cached pass with the full pass bit for bit and the search falls back to full passes when they differ.

Memory: one hidden-state tensor per layer per batch (layers x tokens x hidden size x 4 bytes for fp32). When that
exceeds `max_bytes`, only every k-th layer's input is kept and an attempt starts at the nearest kept layer below.
`max_bytes` bounds the cache, not the peak: during a scoring pass the inputs being recorded (`pending`) sit beside
the cache until the change is kept or dropped, so the two together can reach 2 x `max_bytes`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def decoder_layers(model: Any) -> nn.ModuleList | None:
    """The decoder layer list of a causal LM (``model.model.layers`` for Llama/Mistral/Qwen), if it has one."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) > 0 else None


class PrefixCachedLM(nn.Module):
    """A causal LM wrapper whose forward can start at a decoder layer, from recorded inputs of that layer."""

    def __init__(self, model: Any, tokens_per_pass: int, max_bytes: int = 2 << 30):
        super().__init__()
        self.model = model
        self.config = model.config
        layers = decoder_layers(model)
        if layers is None:
            raise ValueError("model has no decoder layer list")
        self.decoder = model.get_decoder()
        self.layers = list(layers)
        hidden = int(getattr(model.config, "hidden_size"))
        per_layer = tokens_per_pass * hidden * next(model.parameters()).element_size()
        self.every = max(1, math.ceil(per_layer * len(self.layers) / max_bytes))
        self.kept_layers = set(range(0, len(self.layers), self.every))
        self.cache: dict[int, dict[bytes, torch.Tensor]] = {i: {} for i in self.kept_layers}
        self.pending: dict[int, dict[bytes, torch.Tensor]] = {}
        self.start = 0

    def start_for(self, layer: int) -> int:
        """The nearest layer at or below `layer` whose inputs are cached."""
        return max(i for i in self.kept_layers if i <= layer)

    @contextmanager
    def starting_at(self, layer: int) -> Iterator[None]:
        """Run forwards from the cached input of layer `start_for(layer)` (0: a full forward)."""
        self.start, self.pending = self.start_for(layer), {}
        try:
            yield
        finally:
            self.start = 0

    def commit(self) -> None:
        """The last scored change is kept: its recorded layer inputs become the cache."""
        for layer, entries in self.pending.items():
            self.cache[layer] = entries
        self.pending = {}

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **kwargs: Any) -> Any:
        key = input_ids.detach().cpu().numpy().tobytes()
        recorded = {layer: self.pending.setdefault(layer, {}) for layer in self.kept_layers if layer >= self.start}
        hooks = [
            self.layers[layer].register_forward_pre_hook(self._recorder(recorded[layer], key), with_kwargs=True)
            for layer in recorded
        ]
        try:
            if self.start == 0:
                return self.model(input_ids=input_ids, use_cache=False, **kwargs)
            hidden = self.cache[self.start][key]
            full = self.decoder.layers
            self.decoder.layers = nn.ModuleList(self.layers[self.start :])
            try:
                return self.model(inputs_embeds=hidden, use_cache=False, **kwargs)
            finally:
                self.decoder.layers = full
        finally:
            for hook in hooks:
                hook.remove()

    @staticmethod
    def _recorder(store: dict[bytes, torch.Tensor], key: bytes):  # noqa: ANN205 - a forward pre-hook
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            store[key] = hidden.detach().clone()

        return hook
