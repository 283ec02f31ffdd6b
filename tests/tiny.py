"""Tiny random models around the real tokenizer, for fast unit tests."""

from __future__ import annotations

import torch


def build_tiny_model(tokenizer, arch: str = "llama", seed: int = 0, **overrides):
    """A 2-layer, hidden-64 causal LM of the given architecture with the real tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    config = (MistralConfig if arch == "mistral" else LlamaConfig)(**kwargs)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def enable_checkpointing(model) -> None:
    """transformers' gradient checkpointing on every decoder layer, non-reentrant (the recipe's default)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older name below
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
