"""ChatML token ids and training labels, built in one linear pass per conversation.

Why our own code: Axolotl renders the chat template once per turn and re-tokenises prefixes to find where each turn
starts; that is quadratic in the number of turns and slow. Here each message is a fixed header, its content and a
fixed footer, so the ids are the concatenation of precomputed header/footer ids and the contents, which are
tokenised all at once with the Rust tokenizer's batch encoder. The result equals tokenising the rendered ChatML
text (tested), with one deliberate difference: user text is always plain text.

Rendering (exactly the cards' format), one block per message:

    <|im_start|>{role}\\n{content}<|im_end|>\\n

Which tokens carry labels (all others are -100):
- ``train_on_inputs: true``: every token, except the first of the sample.
- otherwise, for each message whose role is in ``roles_to_train`` (default: assistant): its content tokens, and its
  closing ``<|im_end|>`` as ``train_on_eos`` says: ``turn`` (default) every trained message's, ``last`` only the last
  trained message's, ``all`` every message's, ``none`` no ``<|im_end|>``. The ``<|im_start|>assistant\\n`` header and
  the ``\\n`` after ``<|im_end|>`` are never trained, so the model learns to stop at ``<|im_end|>``.
- The first token of every sample is never labelled, so in a packed row no document is trained to follow another.

Control tokens come only from the template: contents are encoded with ``encode_special_tokens`` on, so a message
holding the literal text ``<|im_start|>system`` becomes ordinary text tokens and can never open a turn. That switch
only splits tokens marked *special*, and a base tokenizer may carry the markers as ordinary added tokens (Axolotl's
``tokens:`` creates exactly that), so the encoder marks both special on its own copy (ids unchanged) and refuses to
emit a content token equal to either.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Tokenizer

from dolphin_forge.data.conversation import ROLES, Conversation
from dolphin_forge.errors import ForgeError

IGNORE = -100
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def _single_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ForgeError(f"tokenizer has no {token} token; add it under `tokens:` in the config")
    return int(token_id)


def _bos_prefix(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before every text on its own (a BOS for Llama 3, nothing for SmolLM2)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) > len(bare) and full[len(full) - len(bare) :] == bare:
        return list(full[: len(full) - len(bare)])
    return []


class ChatMLEncoder:
    """Encodes conversations into ChatML ids and labels with the masking rules of one dataset."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        train_on_inputs: bool = False,
        roles_to_train: Sequence[str] = ("assistant",),
        train_on_eos: str = "turn",
    ) -> None:
        self.plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.plain.no_padding()
        self.plain.no_truncation()
        self.im_start = _single_id(tokenizer, IM_START)
        self.im_end = _single_id(tokenizer, IM_END)
        self.plain.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END)])
        self.plain.encode_special_tokens = True
        self.controls = frozenset((self.im_start, self.im_end))
        self.prefix = _bos_prefix(tokenizer)
        self.headers = {role: [self.im_start, *self._ids(f"{role}\n")] for role in ROLES}
        self.newline = self._ids("\n")
        self.train_on_inputs = train_on_inputs
        self.roles_to_train = frozenset(roles_to_train)
        if train_on_eos not in ("turn", "last", "all", "none"):
            raise ForgeError(f"train_on_eos: {train_on_eos!r}: expected one of turn, last, all, none")
        self.train_on_eos = train_on_eos

    def _ids(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_contents(self, texts: list[str]) -> list[list[int]]:
        """Plain-text ids of many message contents at once (parallel in Rust), never a control token."""
        ids = [enc.ids for enc in self.plain.encode_batch_fast(texts, add_special_tokens=False)]
        if any(not self.controls.isdisjoint(row) for row in ids):
            raise ForgeError(
                f"tokenizer encodes plain message text to the {IM_START} or {IM_END} id; "
                "message text could open or close turns, so this tokenizer cannot be used"
            )
        return ids

    def encode(self, conversations: Sequence[Conversation]) -> list[EncodedSample]:
        contents = [m.content for c in conversations for m in c.messages]
        content_ids = iter(self.encode_contents(contents))
        return [self._assemble(c, content_ids) for c in conversations]

    def _assemble(self, conversation: Conversation, content_ids: Any) -> EncodedSample:
        messages = conversation.messages
        trained = [self.train_on_inputs or m.role in self.roles_to_train for m in messages]
        last_trained = max((i for i, t in enumerate(trained) if t), default=-1)
        ids: list[int] = list(self.prefix)
        labels: list[int] = list(self.prefix) if self.train_on_inputs else [IGNORE] * len(self.prefix)
        for index, message in enumerate(messages):
            header, body = self.headers[message.role], next(content_ids)
            eos_trained = self.train_on_inputs or {
                "turn": trained[index],
                "last": index == last_trained,
                "all": True,
                "none": False,
            }[self.train_on_eos]
            ids += header
            ids += body
            ids.append(self.im_end)
            ids += self.newline
            labels += header if self.train_on_inputs else [IGNORE] * len(header)
            labels += body if trained[index] else [IGNORE] * len(body)
            labels.append(self.im_end if eos_trained else IGNORE)
            labels += self.newline if self.train_on_inputs else [IGNORE] * len(self.newline)
        if labels:
            labels[0] = IGNORE
        return EncodedSample(ids, labels)
