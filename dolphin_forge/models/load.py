"""Loading models and tokenizers the way every stage needs them.

Safe by default: weights load only from safetensors (`use_safetensors=True`, so a pickle `.bin` is refused), and
`trust_remote_code` stays off unless the config asks for it. The tokenizer gets the config's `special_tokens` and
`tokens` added here, once, so that preprocessing and training agree on every id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.default import CHATML_TEMPLATE, resolve_model_path
from dolphin_forge.models.lora import is_adapter_folder

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Any of these in a folder means it carries a tokenizer of its own (what preprocessing hashes is another list).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_MARKERS)


def open_tokenizer(folder: str | Path, key: str, trust_remote_code: bool = False) -> Any:
    """A folder's tokenizer, or one line naming the config key the folder came from.

    A folder with no tokenizer file at all is said so plainly: transformers' own message for it is a half sentence.
    """
    from transformers import AutoTokenizer

    if Path(folder).is_dir() and not has_tokenizer(Path(folder)):
        raise ForgeError(f"{key}: {folder} has no tokenizer (none of {', '.join(TOKENIZER_MARKERS)})")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except json.JSONDecodeError as exc:  # transformers does not say which of the folder's JSON files it was reading
        where = _invalid_json_file(Path(folder)) or Path(folder)
        raise ForgeError(f"{key}: {where}:{exc.lineno}: not valid JSON ({exc.msg}); a truncated copy?") from None
    except (OSError, ValueError) as exc:
        raise ForgeError(f"{key}: cannot load a tokenizer from {folder}: {str(exc).strip().splitlines()[0]}") from None
    except Exception as exc:  # valid JSON of the wrong shape ends in a bare KeyError, or in tokenizers' own error
        raise ForgeError(
            f"{key}: cannot load a tokenizer from {folder}: its files are damaged or of another format "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'})"
        ) from None


def _invalid_json_file(folder: Path) -> Path | None:
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return file
    return None


def tokenizer_folder(config: ForgeConfig, config_path: Path | None, key: str = "base_model") -> tuple[str, str]:
    """Where the tokenizer comes from (`tokenizer_config`, else the model), with the key to name in errors."""
    if config.tokenizer_config:
        return resolve_model_path(config.tokenizer_config, config_path, key="tokenizer_config"), "tokenizer_config"
    return resolve_model_path(config.base_model, config_path, key=key), key


def base_tokenizer(config: ForgeConfig, config_path: Path | None = None, key: str = "base_model") -> Any:
    """The model's fast tokenizer as it ships, before the config adds anything (its size says which ids are new).

    `key` is the config key `config.base_model` came from (a stage may put its own model there, e.g. `laser.model`),
    so that errors name what the user wrote; a set `tokenizer_config` is named as itself.
    """
    path, key = tokenizer_folder(config, config_path, key)
    tokenizer = open_tokenizer(path, key, config.trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        raise ForgeError(f"{key}: {path} has no fast (tokenizer.json) tokenizer, which preprocessing needs")
    return tokenizer


def add_config_tokens(tokenizer: Any, config: ForgeConfig) -> Any:
    """`tokenizer` (changed in place) with the config's special tokens, added tokens and ChatML markers."""
    from tokenizers import AddedToken

    specials = {k: v for k, v in config.special_tokens.model_dump().items() if v is not None}
    if specials:
        tokenizer.add_special_tokens(specials)
    missing = [t for t in config.tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    # Special even when the base tokenizer already has them as ordinary added tokens (ids unchanged), so that
    # `skip_special_tokens` drops them and text is never read as a control marker where special tokens are split.
    markers = [AddedToken(m, special=True, normalized=False) for m in (IM_START, IM_END)]
    tokenizer.add_tokens(markers, special_tokens=True)
    if config.chat_template == "chatml" or not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or IM_END
    return tokenizer


def load_tokenizer(config: ForgeConfig, config_path: Path | None = None, key: str = "base_model") -> Any:
    """The base model's fast tokenizer with the config's special tokens and added tokens applied (`key`: see
    `base_tokenizer`)."""
    return add_config_tokens(base_tokenizer(config, config_path, key), config)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> Any:
    """A causal LM from a local folder, safetensors only.

    A folder without config.json (or a LoRA adapter's, which transformers loads onto its base) and a truncated weights
    file (an interrupted copy) are named plainly: transformers asks for a `model_type` key in the missing file, and
    safetensors' own error escapes as a traceback.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(str(path))
    if not (Path(resolved) / "config.json").is_file() and not is_adapter_folder(Path(resolved)):
        raise ForgeError(f"cannot load a model from {resolved}: no config.json (expected a Hugging Face model folder)")
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ForgeError(f"cannot load a model from {resolved}: {str(exc).splitlines()[0]}") from None
    except SafetensorError as exc:
        where = _unreadable_weights(Path(resolved))
        raise ForgeError(f"{where}: not a readable safetensors file (truncated or corrupt: {exc})") from None


def empty_model(
    path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False, **kwargs: Any
) -> Any:
    """The causal LM of `path` built from its config.json alone, its parameters on the meta device (no memory, no
    weights read) and its buffers real: what an FSDP process other than the first holds before the first process
    broadcasts the weights (`fsdp_cpu_ram_efficient_loading`, see `train.distributed.shard_model`)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    resolved = resolve_model_path(str(path))
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ForgeError(f"cannot load a model from {resolved}: {str(exc).splitlines()[0]}") from None
    with init_empty_weights(include_buffers=False):  # buffers such as rotary frequencies are computed, not loaded
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    model.tie_weights()  # as from_pretrained does: FSDP must see the same parameters in every process
    return model


def _unreadable_weights(folder: Path) -> Path:
    """The weights file safetensors cannot open (its error does not say which), else the folder itself."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError:
            return file
    return folder


@torch.no_grad()
def new_token_rows(model: Any, tokenizer: Any, base_vocab: int) -> range:
    """The embedding rows of the tokens the config added (ids base_vocab..), grown if needed and initialised.

    Many models pad their embedding matrix past their tokenizer (Qwen2: 151,936 rows for ~151.6k tokens), so added
    ids can land in existing rows that were never trained; counting new tokens by how much the matrix grew would
    miss them, leave them at their padding values and keep them frozen in selective training. Rows that had to be
    added come from transformers' mean resizing; padding rows taken by new tokens get the mean of the trained rows.
    """
    rows = range(base_vocab, len(tokenizer))
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        # a meta model (`empty_model`) has no values to average: its rows come from the first process
        meta = model.get_input_embeddings().weight.is_meta
        model.resize_token_embeddings(len(tokenizer), mean_resizing=not meta)
    taken = slice(base_vocab, min(old, len(tokenizer)))
    if taken.start < taken.stop:
        embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
        for weight in {id(m.weight): m.weight for m in embeddings if m is not None}.values():  # tied: once
            weight[taken] = weight[:base_vocab].mean(dim=0)
    return rows


