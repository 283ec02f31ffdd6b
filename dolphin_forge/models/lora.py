"""LoRA / QLoRA set-up through `peft`, and merging an adapter back into its base model.

Config keys follow Axolotl: `adapter` (lora | qlora), `lora_r`, `lora_alpha`, `lora_dropout`,
`lora_target_modules`, `lora_target_linear` (every linear layer but the LM head), `lora_modules_to_save`
(modules trained in full beside the adapter, e.g. embed_tokens and lm_head when tokens were added).
QLoRA and 8-bit loading need bitsandbytes on a CUDA GPU; elsewhere they stop with one error saying what to use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError, read_json_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_quantization_supported(config: ForgeConfig) -> None:
    """QLoRA / load_in_4bit / load_in_8bit need bitsandbytes and CUDA: fail early and clearly without them."""
    wants = config.adapter == "qlora" or config.load_in_4bit or config.load_in_8bit
    if not wants:
        return
    what = (
        "adapter: qlora" if config.adapter == "qlora" else ("load_in_4bit" if config.load_in_4bit else "load_in_8bit")
    )
    if not torch.cuda.is_available():
        raise ForgeError(
            f"{what} needs bitsandbytes on a CUDA GPU and this machine has none; "
            "use `adapter: lora` with load_in_4bit/load_in_8bit false (or a full or selective fine-tune) instead"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ForgeError(f"{what} needs bitsandbytes: `pip install 'dolphin-forge[gpu]'`") from None


def quantization_config(config: ForgeConfig, mixed: str) -> Any:
    """The `BitsAndBytesConfig` for QLoRA-style loading, or None; 4-bit layers compute in the run's precision
    (`mixed`: 'bf16', 'fp16' or 'no'), so an fp16-only GPU is not handed bf16 matmuls."""
    if not (config.adapter == "qlora" or config.load_in_4bit or config.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, torch.float32),
    )


def quantized_device_map() -> dict[str, int]:
    """Each process's quantized weights on its own GPU: without a device map transformers puts them on the current
    device, GPU 0 in every process at load time (the launcher's LOCAL_RANK is set, the device not yet)."""
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head (what `lora_target_linear: true` targets)."""
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    return sorted(names)


def apply_lora(model: torch.nn.Module, config: ForgeConfig, added_tokens: int = 0) -> Any:
    """Wrap `model` in a peft LoRA model as the config describes."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.lora_target_linear:
        targets = sorted(set(linear_module_names(model)) | set(config.lora_target_modules or []))
    elif config.lora_target_modules:
        targets = list(config.lora_target_modules)
    else:
        raise ForgeError("adapter: set lora_target_linear: true or list lora_target_modules")
    check_target_modules(model, config.lora_target_modules or [])
    to_save = list(config.lora_modules_to_save or [])
    if added_tokens and not {"embed_tokens", "lm_head"} <= set(to_save):
        raise ForgeError(
            f"adapter: {added_tokens} tokens were added to the vocabulary, so their embeddings must train: "
            "set lora_modules_to_save: [embed_tokens, lm_head]"
        )
    if config.adapter == "qlora" or config.load_in_4bit or config.load_in_8bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a target that is a whole block, not a layer; drop the block's printout
        reason = re.sub(r"\(\n.*\n\)", "", str(exc), flags=re.S)
        raise ForgeError(f"lora_target_modules: peft cannot adapt {targets}: {reason}") from None


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """peft silently skips a misspelt target as long as another one matches: catch typos by peft's own rule."""
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        raise ForgeError(
            f"lora_target_modules: {', '.join(map(repr, unknown))} names no module of this model; "
            f"its linear layers are {', '.join(linear_module_names(model))}"
        )


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """`adapter_config.json` as a dict; a hand-edited or truncated file is a user mistake, not a traceback."""
    path = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.exists():
        raise ForgeError(f"{adapter_dir}: does not exist; expected the output folder of a LoRA `train` run")
    if not is_adapter_folder(adapter_dir):
        raise ForgeError(f"{adapter_dir}: not a LoRA adapter folder (no {ADAPTER_CONFIG})")
    data = read_json_file(path, "a LoRA adapter config")
    if not isinstance(data, dict):
        raise ForgeError(f"{path}: expected a JSON object")
    return data


def check_adapter_folder(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config, once the folder is known to hold its weights too.

    Without this check peft falls back to the model hub and fails on a repo id, which misleads about the cause.
    """
    settings = read_adapter_config(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ForgeError(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS} (expected a LoRA adapter folder written by dolphin-forge train)"
        )
    return settings


def adapter_tokenizer(adapter_dir: Path, base_dir: str, base_key: str = "base_model") -> Any:
    """The adapter's own tokenizer (training may have added tokens), else the base model's.

    `train` always saves the tokenizer beside the adapter; adapters from elsewhere often carry none, and then the
    base model's is the one the adapter was trained with.
    """
    from dolphin_forge.models.load import has_tokenizer, open_tokenizer

    if has_tokenizer(adapter_dir):
        return open_tokenizer(adapter_dir, "adapter")
    return open_tokenizer(base_dir, base_key)


def apply_adapter(model: torch.nn.Module, adapter_dir: Path, base_dir: str) -> Any:
    """`model` with the adapter loaded; a corrupt weights file or an adapter made for another base is one line."""
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except SafetensorError as exc:
        weights = adapter_dir / ADAPTER_WEIGHTS
        raise ForgeError(f"{weights}: not a readable safetensors file (truncated or corrupt: {exc})") from None
    except RuntimeError as exc:  # torch lists every mismatching tensor on its own line: name the first
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "mismatch" in line), lines[0] if lines else type(exc).__name__)
        raise ForgeError(f"{adapter_dir}: the adapter does not fit the base model {base_dir} ({first})") from None


def check_merge_output(output_dir: Path, adapter_dir: Path, base_dir: Path) -> None:
    """Refused before the base model loads: `save_pretrained` replaces files without asking, so writing into the
    base model's folder (or over another model) would silently overwrite its weights with the merged ones."""
    if output_dir.is_file():
        raise ForgeError(f"{output_dir}: is a file; expected a folder for the merged model (it is created if missing)")
    for folder, what in ((adapter_dir, "the adapter"), (base_dir, "the base model")):
        if output_dir.resolve() == folder.resolve():
            raise ForgeError(f"{output_dir}: is {what}'s folder; choose another folder for the merged model")
    if (output_dir / "config.json").is_file() or any(output_dir.glob("*.safetensors")):
        raise ForgeError(f"{output_dir}: already holds a model; choose another folder or remove it")


def merge_lora(adapter_dir: Path, output_dir: Path, base_model: str | None = None) -> Path:
    """Load the base model, apply the adapter in `adapter_dir`, merge it and save a plain HF model folder."""
    from dolphin_forge.models.default import resolve_model_path
    from dolphin_forge.models.load import load_model

    recorded = check_adapter_folder(adapter_dir).get("base_model_name_or_path")
    where = f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path"
    if not base_model and not (isinstance(recorded, str) and recorded):
        raise ForgeError(f"{where} is empty or not a folder name; pass --base-model")
    base_key = "--base-model" if base_model else where
    base_dir = resolve_model_path(base_model or recorded, key=base_key)
    check_merge_output(output_dir, adapter_dir, Path(base_dir))
    tokenizer = adapter_tokenizer(adapter_dir, base_dir, base_key)
    model = load_model(base_dir)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    merged = apply_adapter(model, adapter_dir, base_dir).merge_and_unload()
    generation = adapter_dir / "generation_config.json"
    if generation.is_file():
        from transformers import GenerationConfig

        merged.generation_config = GenerationConfig.from_pretrained(adapter_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir
