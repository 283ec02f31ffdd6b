"""Perplexity of raw text and validation loss of prepared ChatML rows: the two numbers every stage reports.

`train` reports `validation_loss` on its validation split, `laser` uses it to decide whether a layer's
rank reduction helped, and `eval` reports `perplexity` on text files such as wikitext-2. They live in one module so
that a loss printed by one stage means exactly the same thing as the loss printed by another.

We write the loops ourselves rather than call `model(..., labels=...)`: the model's built-in loss averages over a
batch, which cannot be combined across windows of different length without re-weighting, and it materialises
float32 logits for the whole batch at once. Here each window's negative log-likelihood is summed in float64, one
row at a time, so batching and window size change nothing but speed.

Sliding window: a text of N tokens is cut into windows of at most `max_length` tokens whose starts are `stride`
apart. With `stride < max_length` each token is scored exactly once, in the first window that contains it after the
previous window's end, so it sees at least `max_length - stride` tokens of context. The first token of the text has
no context and is never scored: a text of N tokens contributes N - 1 scored tokens. `stride == max_length` is the
chunked perplexity of the GPTQ and laserRMT literature (what `laser` scores): windows do not overlap, and the first
token of every window is left unscored, so N tokens contribute N - ceil(N / max_length) scored tokens.

Packed rows: a prepared row may hold several samples, with `position_ids` restarting at 0 at each. We pass those
position ids and no attention mask; transformers then builds a block-diagonal causal mask (or variable-length
flash-attention calls) so that no sample attends to another. A test proves a packed row scores exactly like its
samples run one by one.

bf16: forward passes run under bf16 autocast on a CUDA device that supports it and on CPUs with native bf16
instructions (AVX512-BF16 or AMX); elsewhere (e.g. a CPU that would only emulate bf16) they run in the model's dtype.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dolphin_forge.errors import ForgeError
from dolphin_forge.models.hardware import bf16_native
from dolphin_forge.models.packed import varlen_kwargs

#: Documents are joined with a blank line, the convention of the wikitext perplexity literature (and of the
#: Hugging Face perplexity guide), so that results are comparable with published numbers.
DOCUMENT_SEPARATOR = "\n\n"

#: `perplexity(max_length=None)` uses the model's context length, capped here to bound CPU memory and time.
DEFAULT_MAX_LENGTH_CAP = 2048

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity = exp(nll), where nll is the mean negative log-likelihood (nats) over `tokens` scored tokens."""

    perplexity: float
    nll: float
    tokens: int


def tokenize_text(tokenizer: Any, texts: str | Sequence[str], max_tokens: int | None = None) -> torch.LongTensor:
    """Token ids (1-D) of one text, or of several documents joined by `DOCUMENT_SEPARATOR` (a blank line).

    No BOS/EOS or other special tokens are added: the ids are exactly the tokenisation of the joined text.
    `max_tokens` keeps only the first that many ids.
    """
    text = texts if isinstance(texts, str) else DOCUMENT_SEPARATOR.join(texts)
    if max_tokens is not None and max_tokens < 2:
        raise ForgeError(f"max_tokens = {max_tokens}: expected at least 2 (one context token and one scored token)")
    ids = _leading_ids(tokenizer, text, max_tokens) if max_tokens is not None else _ids(tokenizer, text)
    return torch.tensor(ids, dtype=torch.long)


#: Tokens past `max_tokens` a text prefix must yield before its ids are trusted (only its tail can differ).
_PREFIX_MARGIN = 64


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _leading_ids(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """The first `max_tokens` ids of the whole text's tokenisation, tokenising only as much text as they need.

    A LASER search or a `--max-tokens` perplexity wants a few thousand tokens of a file that may hold millions
    (wikitext-2 test: ~1 s to tokenise whole). Pre-tokenisation and BPE are local, so a prefix cut at a line break
    tokenises exactly like the whole text except for its last few tokens; a prefix is used only when it yields
    `_PREFIX_MARGIN` tokens more than needed, and those are dropped.
    """
    length = max_tokens * 8
    while length < len(text):
        cut = text.rfind("\n", 0, length)
        if cut > 0:
            ids = _ids(tokenizer, text[:cut])
            if len(ids) >= max_tokens + _PREFIX_MARGIN:
                return ids[:max_tokens]
        length *= 4
    return _ids(tokenizer, text)[:max_tokens]


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def use_bf16_autocast(model: Any) -> bool:
    """True when bf16 autocast is both useful (the model is float32) and native on the model's device."""
    param = next(model.parameters())
    if param.dtype != torch.float32:
        return False
    return bf16_native(param.device)


@contextlib.contextmanager
def _scoring(model: Any) -> Iterator[None]:
    """Eval mode, no grad and (where native) bf16 autocast; the model's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if use_bf16_autocast(model)
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        model.train(was_training)


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(labels[t+1] | logits[t]) over labelled positions of one row, in float64, and their count."""
    targets = labels[1:]
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return 0.0, 0
    everything = count == keep.numel()  # the usual case: no copy of the (positions x vocabulary) logits
    scored = (logits[:-1] if everything else logits[:-1][keep]).float()
    log_probs = torch.log_softmax(scored, dim=-1)
    nll = -log_probs.gather(1, (targets if everything else targets[keep]).unsqueeze(1)).squeeze(1)
    return float(nll.double().sum()), count


def _windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window; token i is scored in the window where i >= first."""
    windows, previous_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, max(previous_end, begin + 1)))
        previous_end = end
        if end == n_tokens:
            break
    return windows


def _batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _pad_token_id(model: Any) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if isinstance(pad, int):
        return pad
    eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) else 0


def perplexity_of_ids(
    model: Any,
    ids: torch.Tensor | Sequence[int],
    *,
    max_length: int,
    stride: int | None = None,
    batch_size: int = 4,
) -> PerplexityResult:
    """Sliding-window perplexity of one token sequence (see the module docstring for which context each token gets).

    `stride` defaults to `max_length // 2`, so every token after the first window sees at least half a window of
    context. Windows are run `batch_size` at a time; results do not depend on `batch_size`.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_length < 2:
        raise ForgeError(f"max_length = {max_length}: expected at least 2 tokens per window")
    stride = max_length // 2 if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ForgeError(f"stride = {stride}: expected a number between 1 and max_length ({max_length})")
    if ids.numel() < 2:
        raise ForgeError(f"perplexity needs at least 2 tokens of text, got {ids.numel()}")
    if batch_size < 1:
        raise ForgeError(f"batch_size = {batch_size}: expected a number >= 1")

    device, pad = _model_device(model), _pad_token_id(model)
    total_nll, total_tokens = 0.0, 0
    with _scoring(model):
        for batch in _batches(_windows(ids.numel(), max_length, stride), batch_size):
            width = max(end - begin for begin, end, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for row, (begin, end, first) in enumerate(batch):
                input_ids[row, : end - begin] = ids[begin:end]
                labels[row, first - begin : end - begin] = ids[first:end]
            # Right padding needs no mask: under causal attention no real token attends to a later pad.
            logits = model(input_ids=input_ids.to(device), use_cache=False).logits
            for row in range(len(batch)):
                nll, count = _summed_nll(logits[row], labels[row].to(device))
                total_nll += nll
                total_tokens += count
    mean = total_nll / total_tokens
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=total_tokens)


def default_max_length(model: Any) -> int:
    """The model's context length, capped at `DEFAULT_MAX_LENGTH_CAP`."""
    context = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH_CAP
    return min(int(context), DEFAULT_MAX_LENGTH_CAP)


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: str | Sequence[str],
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    max_tokens: int | None = None,
) -> PerplexityResult:
    """Perplexity of a text (or documents joined by a blank line); `max_length` defaults to `default_max_length`."""
    ids = tokenize_text(tokenizer, texts, max_tokens=max_tokens)
    return perplexity_of_ids(
        model, ids, max_length=max_length or default_max_length(model), stride=stride, batch_size=batch_size
    )


def _column(row: Mapping[str, Any], name: str, index: int) -> list[int]:
    try:
        return list(row[name])
    except KeyError:
        raise ForgeError(f"validation row {index}: missing column {name!r} (expected prepared data)") from None


def validation_loss(model: Any, rows: Iterable[Mapping[str, Any]], *, batch_size: int = 1) -> float:
    """Mean negative log-likelihood over every labelled (trained) token of prepared rows, packed or not.

    Rows follow the prepared-data contract (`input_ids`, `labels` aligned with them, `position_ids` restarting at
    each packed sample). The mean is over tokens, not rows, so batching and packing do not change it.
    """
    if batch_size < 1:
        raise ForgeError(f"batch_size = {batch_size}: expected a number >= 1")
    examples = []
    for index, row in enumerate(rows):
        input_ids = _column(row, "input_ids", index)
        labels = _column(row, "labels", index)
        positions = list(row["position_ids"]) if row.get("position_ids") is not None else list(range(len(input_ids)))
        if not (len(input_ids) == len(labels) == len(positions)):
            raise ForgeError(
                f"validation row {index}: input_ids, labels and position_ids have lengths "
                f"{len(input_ids)}, {len(labels)}, {len(positions)}; expected equal lengths"
            )
        if input_ids:
            examples.append((input_ids, labels, positions))
    examples.sort(key=lambda example: len(example[0]), reverse=True)  # less padding per batch

    device, pad = _model_device(model), _pad_token_id(model)
    total_nll, total_tokens = 0.0, 0
    with _scoring(model):
        for batch in _batches(examples, batch_size):
            width = len(batch[0][0])
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            # Padding forms its own "sample" (positions restart at 0), so it never joins a real one.
            position_ids = torch.arange(width).repeat(len(batch), 1)
            for row, (ids, labs, positions) in enumerate(batch):
                n = len(ids)
                input_ids[row, :n] = torch.tensor(ids)
                labels[row, :n] = torch.tensor(labs)
                position_ids[row, :n] = torch.tensor(positions)
                position_ids[row, n:] = torch.arange(width - n)
            position_ids = position_ids.to(device)
            logits = model(
                input_ids=input_ids.to(device), position_ids=position_ids, use_cache=False,
                **varlen_kwargs(model, position_ids),
            ).logits
            for row in range(len(batch)):
                nll, count = _summed_nll(logits[row], labels[row].to(device))
                total_nll += nll
                total_tokens += count
    if total_tokens == 0:
        raise ForgeError("validation data has no labelled (trained) tokens, so there is no loss to compute")
    return total_nll / total_tokens
