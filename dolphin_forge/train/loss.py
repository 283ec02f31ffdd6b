"""The LM head and the cross-entropy as one operation, a chunk of positions at a time.

Why our own: the usual path multiplies the hidden states by the head (positions x vocabulary logits), keeps the
logits for the backward, and the backward makes a second tensor of that size for their gradient. With SmolLM2's
49k-token vocabulary at 2048 packed tokens that is ~430 MB alive at the start of the backward, when every layer's
saved activations still exist too: it sets the run's peak memory, and for Llama-3's 128k vocabulary it is the
largest tensor of the whole step. Here each chunk's logits are made, turned into the loss and into the gradients
of the hidden states and of the head weight, and dropped before the next chunk (as Liger's and Apple's Cut
Cross-Entropy do on GPUs); the backward then only scales the stored gradients. Same FLOPs, the same loss and
gradients within float rounding, a chunk's worth of logits alive instead of two full tensors.

It applies to models whose forward ends with a plain linear head and nothing after it (`FUSED_MODEL_TYPES`), and
not under FSDP or DeepSpeed ZeRO-3, which gather the head's weight only inside the head's own forward; elsewhere
the recipe keeps transformers' head and `F.cross_entropy`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: Architectures whose causal-LM forward is `lm_head(hidden_states)` with no scaling or soft-capping after it.
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3"})
#: Float32 logits per chunk: ~64 MiB (340 positions of a 49k vocabulary, 130 of a 128k one).
CHUNK_ELEMENTS = 1 << 24


def fusable_head(model: Any, sharded: bool) -> torch.nn.Linear | None:
    """The model's LM head when the fused loss can replace it, else None (see the module docstring)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's transformers model
    if sharded or getattr(model.config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None
    if not type(base).__module__.startswith("transformers.models."):  # remote code may do more after its head
        return None
    head = model.get_output_embeddings()
    # an accelerate hook (device_map offloading) moves the weight in the head's own forward, which this bypasses
    return head if type(head) is torch.nn.Linear and not hasattr(head, "_hf_hook") else None


@contextlib.contextmanager
def head_returns_hidden_states(head: torch.nn.Linear) -> Iterator[dict[str, torch.dtype | None]]:
    """Inside, the model's `logits` are the hidden states the head would have multiplied.

    Yields where the head's dtype under autocast is recorded (`"dtype"`): accelerate's mixed precision autocasts
    the model's forward only, so the loss, computed after it, must be told the dtype the head would have run in.
    """
    if "forward" in head.__dict__:
        raise RuntimeError("head_returns_hidden_states: the head's forward is already replaced")
    seen: dict[str, torch.dtype | None] = {"dtype": None}

    def hidden_states(hidden: torch.Tensor) -> torch.Tensor:
        device = hidden.device.type
        seen["dtype"] = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return hidden

    head.forward = hidden_states
    try:
        yield seen
    finally:
        del head.forward


def linear_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    targets: torch.Tensor,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sum over positions of cross-entropy(head(hidden), targets); positions whose target is `ignore_index` count 0.

    `hidden` is (positions, hidden size), `targets` (positions,). The head's matmuls run in `compute_dtype` (the
    autocast dtype of a mixed-precision run; default: the weight's) and the softmax in float32, as
    `F.cross_entropy(head(hidden).float(), ...)` would. Gradients are prepared only when autograd records.
    """
    compute = compute_dtype or head.weight.dtype
    return _LinearCrossEntropy.apply(
        hidden, head.weight, head.bias, targets, ignore_index, compute, torch.is_grad_enabled()
    )


def _head_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """float32 logits of one chunk, written into `out`."""
    if h.dtype == torch.float32:
        return torch.addmm(b, h, w.t(), out=out) if b is not None else torch.mm(h, w.t(), out=out)
    return out.copy_(torch.nn.functional.linear(h, w, b))


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, chunk by chunk, its gradients; backward scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, ignore_index, compute, recording):  # noqa: ANN001, ANN205
        want_hidden, want_weight, want_bias = (recording and wanted for wanted in ctx.needs_input_grad[:3])
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute)
            b = None if bias is None else bias.to(compute)
            # float32 until the backward scales it: a bf16 copy would round the scale into every element
            grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if want_hidden else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want_bias else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            step = max(1, CHUNK_ELEMENTS // weight.shape[0])
            # one logits buffer for every chunk: a fresh ~64 MiB tensor per chunk would be a fresh mmap, page faults
            buffer = torch.empty(min(step, hidden.shape[0]), weight.shape[0], dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], step):
                h = hidden[start:start + step].to(compute)
                t = targets[start:start + step]
                logits = _head_logits(h, w, b, buffer[: h.shape[0]])
                ignored = t == ignore_index
                picked = t.masked_fill(ignored, 0).unsqueeze(1)
                target_logit = logits.gather(1, picked)
                # softmax in place: the buffer becomes d loss / d logits = softmax - one_hot(target)
                peak = logits.amax(dim=1, keepdim=True)
                total = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
                rows = (peak + total.log() - target_logit).squeeze(1)
                loss += rows.masked_fill_(ignored, 0).sum()
                if not (want_hidden or want_weight or want_bias):
                    continue
                grad = logits.div_(total)
                grad.scatter_add_(1, picked, torch.full(picked.shape, -1.0, device=grad.device))
                grad[ignored] = 0
                grad = grad.to(compute)
                if want_hidden:
                    grad_hidden[start:start + step] = grad @ w
                if want_weight and compute == torch.float32:
                    grad_weight.addmm_(grad.t(), h)  # in place: no head-sized temporary per chunk
                elif want_weight:
                    grad_weight += grad.t() @ h
                if want_bias:
                    grad_bias += grad.float().sum(0)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: torch.Tensor):  # noqa: ANN205
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice over one forward (retain_graph)")
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None  # handed out below, scaled in place: ~one head-sized tensor alive, not two
        scale = grad_loss.float()
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(scale).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(scale).to(weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
