"""One configuration schema for every stage, accepting Axolotl-style YAML.

The configs printed in the Dolphin seed cards load verbatim. Keys that Axolotl knows but that have no effect here
(``xformers_attention``, ``wandb_watch``, ...) are accepted silently when empty and named in a warning when set;
keys nobody knows are listed in one warning, or rejected under ``strict``. Every validation problem becomes one
line naming the file, line, key, the value given and what is allowed.

This module is the leaf of the package: it imports nothing from the rest of dolphin_forge but `errors`.
"""

from __future__ import annotations

import difflib
import math
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dolphin_forge.errors import ForgeError, read_text_file


def _output_folder(value: str) -> str:
    """`~` expanded (every writer would otherwise create a folder named `~`); a file is refused at load, since a
    stage would otherwise fail at its first write, for `train` after the model has loaded."""
    folder = Path(value).expanduser()
    if folder.is_file():
        raise ValueError("is a file; expected a folder (it is created if missing)")
    return str(folder)


#: A folder a stage writes into, relative to the working directory (as Axolotl's `output_dir`).
OutputFolder = Annotated[str, AfterValidator(_output_folder)]


# --- datasets ---------------------------------------------------------------------------------------------------

DatasetType = Literal["sharegpt", "chat_template", "alpaca", "openai", "messages"]
TrainOnEos = Literal["turn", "last", "all", "none"]
#: What a dataset's `roles:` may map names onto: the ChatML roles, and tool_call (read as an assistant tool call).
ROLE_TARGETS = ("system", "user", "assistant", "tool", "tool_call")
#: ShareGPT / chat-template role names seen in the wild, mapped onto the four ChatML roles.
ROLE_ALIASES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "tool": "tool",
    "ipython": "tool",
    "observation": "tool",
    "function": "tool",
    "function_response": "tool",
    "function-response": "tool",
    "function_call": "tool_call",
    "function-call": "tool_call",
}


def role_aliases(roles: dict[str, list[str]] | None) -> dict[str, str]:
    """Role name (lower case) -> ChatML role: the aliases above plus a dataset's own `roles:` names."""
    aliases = dict(ROLE_ALIASES)
    for target, names in (roles or {}).items():
        for name in names:
            aliases[str(name).lower()] = target
    return aliases


class DatasetConfig(BaseModel):
    """One entry of ``datasets:``; both Axolotl forms (legacy ``sharegpt`` and ``chat_template``) are accepted."""

    model_config = ConfigDict(extra="allow")

    path: str
    type: DatasetType = "sharegpt"
    conversation: str | None = "chatml"
    ds_type: Literal["json", "jsonl", "parquet", "arrow"] | None = None  # how to read the files (default: by suffix)
    data_files: str | list[str] | None = None  # files inside the folder `path`
    split: str | None = None
    name: str | None = None
    field_messages: str | None = None
    message_property_mappings: dict[str, str] | None = None
    message_field_role: str | None = None
    message_field_content: str | None = None
    roles: dict[str, list[str]] | None = None
    roles_to_train: list[str] | None = None
    train_on_eos: TrainOnEos | None = None
    chat_template: str | None = None

    @field_validator("conversation")
    @classmethod
    def _chatml_only(cls, value: str | None) -> str | None:
        if value not in (None, "chatml"):
            raise ValueError("only 'chatml' is supported: the Dolphin recipe trains in ChatML")
        return value

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value not in (None, "chatml", "tokenizer_default"):
            raise ValueError("expected 'chatml' or 'tokenizer_default' (this product renders ChatML)")
        return value

    @field_validator("roles")
    @classmethod
    def _role_targets(cls, value: dict[str, list[str]] | None) -> dict[str, list[str]] | None:
        """Caught here: a typo like `asistant` would otherwise surface as a KeyError in the middle of preprocess."""
        unknown = [role for role in value or {} if role not in ROLE_TARGETS]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}: expected one of {', '.join(ROLE_TARGETS)}")
        return value

    @field_validator("roles_to_train")
    @classmethod
    def _trained_roles_known(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        """A typo here (`asisstant`) would otherwise train nothing at all and only show up as a flat loss."""
        aliases = role_aliases(info.data.get("roles"))
        unknown = [role for role in value or [] if str(role).lower() not in aliases]
        if unknown:
            raise ValueError(
                f"unknown role {unknown[0]!r}: expected system, user, assistant or tool, a ShareGPT name such as "
                "gpt or human, or a name listed under `roles`"
            )
        return value


def _non_empty_token(value: str) -> str:
    """An empty token would reach the tokenizer at `train` or `preprocess`, after the model has loaded, and fail
    there with a message naming no config key (or, as a special token, silently mean nothing)."""
    if value == "":
        raise ValueError("a token must be non-empty text")
    return value


#: A token the config adds to the tokenizer (`tokens:`) or names as special (`special_tokens:`).
Token = Annotated[str, AfterValidator(_non_empty_token)]


class SpecialTokens(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bos_token: Token | None = None
    eos_token: Token | None = None
    pad_token: Token | None = None
    unk_token: Token | None = None


# --- curate -----------------------------------------------------------------------------------------------------


class CurateSource(DatasetConfig):
    """One input of ``curate.sources``: a dataset entry plus its name, mixing weight, cap and system prompts."""

    name: str | None = None
    weight: float = Field(default=1.0, gt=0)
    max_rows: int | None = Field(default=None, gt=0)
    system_prompts: str | None = None

    @field_validator("data_files")
    @classmethod
    def _path_names_the_file(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is not None:
            raise ValueError("not supported in curate sources: point `path` at the file or folder")
        return value


class CurateCleanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    min_answer_chars: int = Field(default=1, ge=0)
    max_answer_chars: int | None = Field(default=None, gt=0)
    max_nonprintable_ratio: float = Field(default=0.05, ge=0, le=1)
    max_repeated_chars: int | None = Field(default=200, gt=1)
    languages: list[str] | None = None


class CurateFunctionCallingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    lenient: bool = True


class CurateRefusalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    scope: Literal["assistant", "all"] = "assistant"
    action: Literal["drop_conversation", "drop_turn"] = "drop_conversation"
    phrases: list[str] = Field(default_factory=list)
    phrase_files: list[str] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)
    replace_defaults: bool = False


class CurateSystemPromptsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    file: str | None = None
    mode: Literal["missing", "always"] = "missing"
    system_conversations: Literal["drop_conversation", "drop_turn", "flag", "off"] = "drop_conversation"


class CurateDedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exact: bool = True
    near: bool = True
    scope: Literal["first_user", "conversation", "assistant"] = "first_user"
    threshold: float = Field(default=0.8, gt=0, lt=1)
    num_perm: int = Field(default=128, ge=16, le=1024)
    ngram: int = Field(default=5, ge=1)


class CurateConfig(BaseModel):
    """``curate:``: raw instruction/chat files into one clean ShareGPT JSONL (see dolphin_forge.curate)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[CurateSource] = Field(default_factory=list)
    output_dir: OutputFolder = "./curated"
    processes: int | None = Field(default=None, ge=1)
    batch_rows: int = Field(default=256, ge=1)
    seed: int | None = None
    shuffle: bool = True
    samples: int = Field(default=5, ge=0)
    clean: CurateCleanConfig = Field(default_factory=CurateCleanConfig)
    function_calling: CurateFunctionCallingConfig = Field(default_factory=CurateFunctionCallingConfig)
    refusal: CurateRefusalConfig = Field(default_factory=CurateRefusalConfig)
    system_prompts: CurateSystemPromptsConfig = Field(default_factory=CurateSystemPromptsConfig)
    dedup: CurateDedupConfig = Field(default_factory=CurateDedupConfig)


# --- spectral tools (Spectrum layer selection, LASER-RMT) --------------------------------------------------------

SPECTRAL_MODULE_TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
NoiseThreshold = Literal["marchenko_pastur", "gavish_donoho"]


class SpectrumConfig(BaseModel):
    """`spectrum:` - which matrices to scan and how many of each type to keep trainable."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # default: base_model
    module_types: list[str] = Field(default_factory=lambda: list(SPECTRAL_MODULE_TYPES), min_length=1)
    top_percent: float = Field(default=50.0, gt=0, le=100)
    threshold: NoiseThreshold = "marchenko_pastur"
    workers: int = Field(default=1, ge=1)  # matrices scanned at once (each uses all cores; N x the memory)
    output_dir: OutputFolder | None = None  # default: <output_dir>/spectrum


class LaserConfig(BaseModel):
    """`laser:` - LASER-RMT search: candidates, noise threshold, perplexity budget and stopping rules."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # default: base_model
    eval_file: str | None = None  # plain text; its first `search_tokens` tokens score changes
    search_tokens: int = Field(default=4096, gt=1)
    # the tokens after those, measured before and after only; default: as many as search_tokens, or what the file
    # has after them (a search on a few thousand tokens can pick noise that a held-out part exposes); 0 turns it off
    heldout_tokens: int | None = Field(default=None, ge=0)
    max_length: int = Field(default=512, gt=1)
    batch_size: int = Field(default=4, gt=0)
    module_types: list[str] = Field(default_factory=lambda: list(SPECTRAL_MODULE_TYPES), min_length=1)
    layers: list[int] | None = None  # default: every layer
    order: Literal["lowest_snr", "last_layer_first"] = "lowest_snr"
    threshold: NoiseThreshold = "marchenko_pastur"
    max_changes: int = Field(default=8, gt=0)
    max_attempts: int | None = Field(default=None, gt=0)
    time_budget_minutes: float | None = Field(default=None, gt=0)
    output_dir: OutputFolder | None = None  # default: <output_dir>/laser

    @field_validator("heldout_tokens")
    @classmethod
    def _heldout_scorable(cls, value: int | None) -> int | None:
        """A perplexity needs two tokens (one predicted): catch 1 here, not after the model has been loaded."""
        if value == 1:
            raise ValueError("expected 0 (no held-out measurement) or a number >= 2")
        return value

    @field_validator("layers")
    @classmethod
    def _layers_count_from_zero(cls, value: list[int] | None) -> list[int] | None:
        """Layer numbers are those in the weight names (from 0); a negative one would silently select nothing."""
        negative = [layer for layer in value or [] if layer < 0]
        if negative:
            listed = ", ".join(str(layer) for layer in negative)
            raise ValueError(
                f"expected layer numbers >= 0, counted from the first layer (not from the end); got {listed}"
            )
        return value


class EvalConfig(BaseModel):
    """`eval:` - which models, perplexity text files and harness tasks (or suites) to evaluate, and how."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list)  # model folders; default: base_model
    tasks: list[str] = Field(default_factory=list)  # harness tasks or suites (leaderboard-v1, leaderboard-v2)
    data_dir: str | None = None  # local copies of the eval datasets (../shared/data/eval)
    hub: bool = False  # the dataset hub is reachable: run tasks that have no local copy from it
    limit: float | None = Field(default=None, gt=0)  # examples per task (< 1: a fraction)
    num_fewshot: int | None = Field(default=None, ge=0)  # shots for every task; default: the suite's or the task's
    max_gen_toks: int | None = Field(default=None, gt=0)  # cap on generated tokens (generative tasks)
    batch_size: int | Literal["auto"] = "auto"
    apply_chat_template: bool = False
    perplexity_files: list[str] = Field(default_factory=list)  # plain text files
    max_length: int | None = Field(default=None, gt=1)  # perplexity window; default: model context, capped
    stride: int | None = Field(default=None, gt=0)  # default: max_length // 2
    max_tokens: int | None = Field(default=None, gt=1)  # score only the first tokens of each file
    output_dir: OutputFolder | None = None  # default: <output_dir>/eval

    @field_validator("batch_size")
    @classmethod
    def _positive_batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("expected a whole number >= 1, or auto")
        return value

    @field_validator("stride")
    @classmethod
    def _stride_fits_window(cls, value: int | None, info: ValidationInfo) -> int | None:
        window = info.data.get("max_length")
        if value is not None and window is not None and value > window:
            raise ValueError(f"expected at most max_length ({window})")
        return value


# --- the whole config -------------------------------------------------------------------------------------------

#: Axolotl keys accepted for compatibility that change nothing here; set to a non-empty value they earn a warning.
INERT_AXOLOTL_KEYS: dict[str, str] = {
    "model_type": "the architecture is read from the model's config.json",
    "tokenizer_type": "the tokenizer class is read from the model folder",
    "tokenizer_use_fast": "a fast (Rust) tokenizer is always used",
    "model_config": "use the model folder's config.json",
    "wandb_watch": "gradients are not watched",
    "wandb_log_model": "checkpoints are not uploaded",
    "xformers_attention": "attention kernels are chosen automatically",
    "group_by_length": "packing already balances row lengths",
    "eval_table_size": "no prediction tables are logged",
    "local_rank": "the rank comes from the launcher's environment",
    "debug": "use `preprocess --debug N`",
    "hub_model_id": "there is no model hub here",
    "strict": "handled: unknown keys become errors when true",
}


#: The keys `gradient_checkpointing_kwargs` may hold (torch.utils.checkpoint's options) and their allowed values.
CHECKPOINTING_KWARGS: dict[str, tuple[Any, ...]] = {
    "use_reentrant": (True, False),
    "preserve_rng_state": (True, False),
    "determinism_check": ("default", "none"),
    "debug": (True, False),
}


def _yaml_word(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


class ForgeConfig(BaseModel):
    """Every stage's settings. Field names and meanings follow Axolotl so that existing configs keep working."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    # model and tokenizer
    base_model: str = "default"
    base_model_config: str | None = None
    tokenizer_config: str | None = None
    trust_remote_code: bool = False
    chat_template: Literal["chatml", "tokenizer_default"] | None = "chatml"
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    tokens: list[Token] = Field(default_factory=list)
    load_in_8bit: bool | None = False
    load_in_4bit: bool | None = False

    # data
    datasets: list[DatasetConfig] = Field(default_factory=list)
    dataset_prepared_path: OutputFolder | None = None
    dataset_processes: int | None = Field(default=None, ge=1)
    val_set_size: float = Field(default=0.0, ge=0)
    sequence_len: int = Field(default=2048, gt=0)
    sample_packing: bool = False
    eval_sample_packing: bool | None = None
    pad_to_sequence_len: bool | None = None
    train_on_inputs: bool = False
    excess_length_strategy: Literal["drop", "truncate", "raise"] = "drop"
    shuffle_merged_datasets: bool = True

    # training
    output_dir: OutputFolder = "./out"
    adapter: Literal["lora", "qlora"] | None = None
    lora_r: int = Field(default=8, gt=0)
    lora_alpha: float = Field(default=16, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_linear: bool | None = None
    lora_target_modules: list[str] | None = None
    lora_modules_to_save: list[str] | None = None
    unfrozen_parameters: list[str] | None = None
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    micro_batch_size: int = Field(default=1, gt=0)
    eval_batch_size: int | None = Field(default=None, gt=0)
    num_epochs: float = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"] = (
        "adamw_torch"
    )
    learning_rate: float = Field(default=2e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    max_grad_norm: float | None = Field(default=1.0, ge=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    cosine_min_lr_ratio: float | None = Field(default=None, ge=0, le=1)
    warmup_steps: int | None = Field(default=None, ge=0)
    warmup_ratio: float | None = Field(default=None, ge=0, le=1)
    bf16: bool | Literal["auto", "full"] | None = "auto"
    fp16: bool | None = None
    tf32: bool | None = None
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    gradient_checkpointing_layers: int | None = Field(default=None, ge=0)  # ours: checkpoint only the first N layers
    flash_attention: bool | None = None
    torch_compile: bool | Literal["auto"] | None = None  # auto: as true (Axolotl's "if torch supports it": all do)
    seed: int = 42
    logging_steps: int = Field(default=1, gt=0)
    evals_per_epoch: int | None = Field(default=None, gt=0)
    eval_steps: int | None = Field(default=None, gt=0)
    saves_per_epoch: int | None = Field(default=None, gt=0)
    save_steps: int | None = Field(default=None, gt=0)
    save_strategy: Literal["no", "epoch", "steps"] | None = None
    save_total_limit: int | None = Field(default=None, gt=0)
    resume_from_checkpoint: str | None = None
    early_stopping_patience: int | None = Field(default=None, gt=0)
    load_best_model_at_end: bool | None = None
    deepspeed: str | None = None
    fsdp: list[str] | str | None = None
    fsdp_config: dict[str, Any] | None = None
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_name: str | None = None
    wandb_run_id: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    spectrum: SpectrumConfig = Field(default_factory=SpectrumConfig)
    laser: LaserConfig = Field(default_factory=LaserConfig)
    curate: CurateConfig = Field(default_factory=CurateConfig)

    @field_validator("tokens", "special_tokens", "datasets", mode="before")
    @classmethod
    def _empty_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        """Axolotl configs often leave these keys present but empty (`tokens:`); that means the default."""
        return cls.model_fields[info.field_name].default_factory() if value is None else value

    @field_validator("gradient_checkpointing_kwargs")
    @classmethod
    def _checkpointing_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """torch's checkpoint hands unknown keys to the layer, which ignores them, or (with use_reentrant) fails
        at the first step; a string such as `no` would silently count as true."""
        for key, given in (value or {}).items():
            allowed = CHECKPOINTING_KWARGS.get(key)
            if allowed is None:
                raise ValueError(f"unknown key {key!r}: expected one of {', '.join(CHECKPOINTING_KWARGS)}")
            if given not in allowed or type(given) is not type(allowed[0]):
                raise ValueError(f"{key} = {given!r}: expected {' or '.join(map(_yaml_word, allowed))}")
        return value

    @field_validator("resume_from_checkpoint", mode="before")
    @classmethod
    def _checkpoint_folder_or_auto(cls, value: Any) -> Any:
        """HF's Trainer spells "the newest checkpoint" `true` (and "none" `false`): name this product's spelling
        instead of answering "expected a string"."""
        if value is True:
            raise ValueError("expected a checkpoint folder, or auto for the newest one in output_dir (not true)")
        return None if value is False else value

    @field_validator("fsdp", mode="before")
    @classmethod
    def _fsdp(cls, value: Any) -> Any:
        return None if value in ("", []) else value

    @model_validator(mode="after")
    def _consistent(self) -> ForgeConfig:
        if self.val_set_size >= 1 and not float(self.val_set_size).is_integer():
            raise ValueError("val_set_size: a value >= 1 is a row count and must be a whole number")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("warmup_steps and warmup_ratio: set one of them, not both")
        if self.adapter is None and (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("load_in_4bit/load_in_8bit: quantised loading needs `adapter: qlora` or `adapter: lora`")
        if self.deepspeed and self.fsdp:
            raise ValueError("deepspeed and fsdp: both shard the model; set one of them")
        if self.gradient_checkpointing_layers is not None and not self.gradient_checkpointing:
            raise ValueError("gradient_checkpointing_layers: set, but gradient_checkpointing is off; "
                             "set gradient_checkpointing: true or drop the key")
        if self.adapter and self.unfrozen_parameters:
            raise ValueError("adapter and unfrozen_parameters: LoRA trains adapters, not chosen weights; set one")
        if self.save_steps and self.save_strategy not in (None, "steps"):
            raise ValueError(f"save_strategy: {self.save_strategy!r} contradicts save_steps; set 'steps' or drop one")
        allowed_per_epoch = {"no": (None,), "epoch": (None, 1)}.get(self.save_strategy or "")
        if allowed_per_epoch is not None and self.saves_per_epoch not in allowed_per_epoch:
            raise ValueError(f"save_strategy: {self.save_strategy!r} contradicts saves_per_epoch; drop one")
        if self.save_strategy == "steps" and not self.save_steps:
            raise ValueError("save_strategy: 'steps' needs save_steps")
        return self

    # derived values ---------------------------------------------------------------------------------------------

    @property
    def keeps_best_weights(self) -> bool:
        """Whether training ends with the weights of its best validation loss. Axolotl turns HF's
        `load_best_model_at_end` on with early stopping (HF requires it there); `false` opts out."""
        if self.load_best_model_at_end is not None:
            return self.load_best_model_at_end
        return bool(self.early_stopping_patience)

    def unknown_keys(self) -> list[str]:
        """Keys nothing reads: top-level ones, then those inside `datasets` and `curate.sources` entries."""
        nested = [
            f"{prefix}.{index}.{key}"
            for prefix, entries in (("datasets", self.datasets), ("curate.sources", self.curate.sources))
            for index, entry in enumerate(entries)
            for key in entry.model_extra or {}
        ]
        return sorted(self.model_extra or {}) + nested

    def missing_paths(self, config_path: Path | None) -> list[str]:
        """Files the config names that are not there (checked by `validate`; the stages fail on them later)."""
        problems = []
        base = resolve_path(self.base_model, config_path)
        if self.base_model != "default" and not base.is_dir():
            what = "is a file, not a model folder" if base.exists() else "is not a local folder (no hub; try `default`)"
            problems.append(f"base_model {self.base_model!r} {what}")
        for index, dataset in enumerate(self.datasets):
            folder = resolve_path(dataset.path, config_path)
            if not folder.exists():
                problems.append(f"datasets.{index}.path {dataset.path!r} does not exist")
            names = [dataset.data_files] if isinstance(dataset.data_files, str) else dataset.data_files or []
            problems += [
                f"datasets.{index}.data_files {name!r} is not a file in {dataset.path!r}"
                for name in names
                if folder.exists() and not (folder / name).is_file()
            ]
        # key, value, and what it must be: "file", "folder", or None for either
        named = [("deepspeed", self.deepspeed, None)]
        named += [(f"curate.sources.{i}.path", source.path, None) for i, source in enumerate(self.curate.sources)]
        named += [("laser.eval_file", self.laser.eval_file, "file"), ("eval.data_dir", self.eval.data_dir, "folder")]
        named += [(f"eval.perplexity_files.{i}", f, "file") for i, f in enumerate(self.eval.perplexity_files)]
        for key, value, kind in named:
            found = resolve_path(value, config_path) if value else None
            if found is None:
                continue
            if not found.exists():
                problems.append(f"{key} {value!r} does not exist")
            elif (kind == "file" and not found.is_file()) or (kind == "folder" and not found.is_dir()):
                problems.append(f"{key} {value!r} is not a {kind}")
        return problems

    def total_batch_size(self, world_size: int = 1) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * world_size

    def steps_per_epoch(self, train_rows: int, world_size: int = 1) -> int:
        """Optimizer steps per epoch for `train_rows` (packed) training rows."""
        micro_batches = math.ceil(train_rows / (self.micro_batch_size * world_size))
        return max(1, math.ceil(micro_batches / self.gradient_accumulation_steps))


# --- loading ----------------------------------------------------------------------------------------------------


class LoadedConfig(BaseModel):
    """A validated config plus where it came from and what the user should hear about it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    config: ForgeConfig
    path: Path | None
    warnings: list[str]


def _key_lines(text: str) -> list[tuple[str, int]]:
    """Each top-level key with its 1-based line in the YAML text, in order, for error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return []
    if not isinstance(node, yaml.MappingNode):
        return []
    return [(k.value, k.start_mark.line + 1) for k, _ in node.value if isinstance(k, yaml.ScalarNode)]


def _duplicate_key_warnings(keys: list[tuple[str, int]], source: str) -> list[str]:
    """YAML keeps a repeated key's last value without a word: in a long config the earlier line does nothing."""
    lines: dict[str, list[int]] = {}
    for key, line in keys:
        lines.setdefault(key, []).append(line)
    return [
        f"{source}: {key} is set more than once (lines {', '.join(map(str, found))}); the last value is used"
        for key, found in lines.items()
        if len(found) > 1
    ]


#: A key's place in the config, e.g. ("datasets", 0, "path").
KeyPath = tuple[str | int, ...]


def parse_override(key: str, raw: str) -> tuple[list[str | int], Any]:
    """Turn ``--learning-rate 1e-5`` or ``--datasets.0.path x.jsonl`` into a key path and a YAML-typed value."""
    parts: list[str | int] = []
    for part in key.lstrip("-").split("."):
        parts.append(int(part) if part.isdigit() else part.replace("-", "_"))
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    for key, raw in overrides.items():
        path, value = parse_override(key, raw)
        target: Any = data
        for i, part in enumerate(path):
            _check_step(target, path, i, key)
            if i == len(path) - 1:
                target[part] = value
            else:
                if isinstance(part, str) and target.get(part) is None:
                    target[part] = [] if isinstance(path[i + 1], int) else {}
                target = target[part]
    return data


def _check_step(target: Any, path: list[str | int], i: int, key: str) -> None:
    """An override may only name keys of mappings and existing indices of lists, e.g. ``datasets.0.path``."""
    part, where = path[i], ".".join(str(p) for p in path[:i])
    if isinstance(part, int) and isinstance(target, list):
        if part >= len(target):
            raise ForgeError(f"override {key}: index {part} is out of range")
    elif isinstance(part, int) or not isinstance(target, dict):
        what = "a list" if isinstance(target, list) else "a mapping" if isinstance(target, dict) else repr(target)
        step = f"index {part}" if isinstance(part, int) else f"key {part!r}"
        hint = f" (name an entry by its index, e.g. {where}.0.{part})" if isinstance(target, list) else ""
        raise ForgeError(f"override {key}: {where} is {what}, so it has no {step}{hint}")


def describe_error(error: dict[str, Any]) -> str:
    """What a pydantic error expected, in the words of this product's messages (not pydantic's)."""
    kind, msg = error["type"], error["msg"]
    ctx = error.get("ctx") or {}
    if kind in ("float_parsing", "float_type"):
        return "expected a number"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "expected a whole number"
    if kind in ("bool_parsing", "bool_type"):
        return "expected true or false"
    if kind == "greater_than":
        return f"expected a number > {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"expected a number >= {ctx.get('ge')}"
    if kind == "less_than":
        return f"expected a number < {ctx.get('lt')}"
    if kind == "less_than_equal":
        return f"expected a number <= {ctx.get('le')}"
    if kind == "literal_error":
        expected = str(ctx.get("expected"))
        return f"expected one of {expected}" if " or " in expected else f"expected {expected}"
    if kind == "list_type":
        return "expected a list (one `- item` line per entry, or [a, b])"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "expected a mapping of keys to values"
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} entry" + ("" if ctx.get("min_length") == 1 else "s")
    if kind == "string_type":
        return "expected a string"
    if kind == "missing":
        return "this key is required"
    if kind == "extra_forbidden":
        return "unknown key"
    return msg.removeprefix("Value error, ")


def _is_union_branch(part: Any) -> bool:
    """pydantic names the alternative of a union it tried inside the key's location; the user wrote no such key."""
    branches = ("str", "bool", "int", "float", "list[str]", "dict[str,any]")
    return isinstance(part, str) and (part.startswith(("function-", "literal[")) or part in branches)


def _error_lines(
    exc: ValidationError, source: str, data: dict[str, Any], lines: dict[str, int], flags: dict[KeyPath, str]
) -> list[str]:
    """One line per problem; a union's alternatives collapse into the first meaningful explanation.

    A value set by a command-line override is named by its flag, not the file: the file does not hold it.
    """
    seen: dict[str, tuple[int, str]] = {}
    for error in exc.errors():
        loc = [p for p in error["loc"] if not _is_union_branch(p)]
        key = ".".join(str(p) for p in loc) or "(config)"
        if key in seen:  # another alternative of a union (`bf16: true | auto | full`): each is allowed
            line, text = seen[key]
            also = describe_error(error).removeprefix("expected ")
            seen[key] = (line, text if also in text else f"{text}, or {also}")
            continue
        value: Any = data
        for part in loc:
            try:
                value = value[part]
            except (KeyError, IndexError, TypeError):
                value = None
                break
        got = "" if error["type"] == "missing" or not loc else f" = {value!r}"
        setter = _setting_override(loc, flags)
        line = lines.get(str(loc[0]), 0) if loc and setter is None else 0
        if setter is None:
            text = f"{source}:{line}: {key}{got}" if line else f"{source}: {key}{got}"
        elif len(setter) == len(loc):
            text = flags[setter]
        else:  # a key inside the value the flag set
            text = f"{flags[setter]}: {key}{got}"
        hint = _did_you_mean(tuple(loc)) if error["type"] == "extra_forbidden" and setter is not None else ""
        seen[key] = (line, f"{text}: {describe_error(error)}{hint}")
    return [text for _, text in sorted(seen.values(), key=lambda item: item[0])]


def _override_flags(overrides: dict[str, str]) -> dict[KeyPath, str]:
    """Key path -> the option as typed (`--learning-rate abc`), to name in errors about the value it set."""
    return {tuple(parse_override(key, raw)[0]): f"--{key} {shlex.quote(raw)}" for key, raw in overrides.items()}


def _setting_override(loc: list[str | int], flags: dict[KeyPath, str]) -> KeyPath | None:
    """The override that set `loc` or a key holding it (`--datasets '[...]'` sets `datasets.0.type`), if any."""
    setting = [path for path in flags if tuple(loc[: len(path)]) == path]
    return max(setting, key=len) if setting else None


def _unknown_key_problems(
    unknown: list[str], source: str, overrides: dict[str, str], strict: bool
) -> tuple[list[str], list[str]]:
    """Errors for keys nothing reads, and those left to a warning (in the file, not strict).

    A config file may hold Axolotl keys this product does not use, so those are a warning; a key typed on the
    command line (`--max-step 2`, or inside a value a flag set: `--datasets '[{tpye: x}]'`) is a typo, and a
    warning scrolling past would let a long run start as if unset.
    """
    flags = _override_flags(overrides)
    problems, in_file = [], []
    for key in unknown:
        loc = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        setter = _setting_override(list(loc), flags) or next((f for f in flags if f[: len(loc)] == loc), None)
        if setter is None:
            in_file.append(key)
        else:
            problems.append(f"{flags[setter]}: unknown key {key}{_did_you_mean(loc)}")
    if strict and in_file:
        problems.insert(0, f"{source}: unknown keys (strict mode): {', '.join(in_file)}")
    return problems, in_file


def _did_you_mean(loc: tuple[str | int, ...]) -> str:
    """`; did you mean --<flag>?` for the nearest key at the same place in the schema, or nothing."""
    model: Any = ForgeConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        model = _model_in(field.annotation) if field is not None else None
        if model is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), getattr(model, "model_fields", {}), n=1)
    return f"; did you mean --{'.'.join(map(str, (*loc[:-1], close[0]))).replace('_', '-')}?" if close else ""


def _model_in(annotation: Any) -> Any:
    """The pydantic model a field holds, directly, in a list or as an optional value (else None)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for arg in getattr(annotation, "__args__", ()) if (m := _model_in(arg)) is not None), None)


#: Values of inert keys that mean what this product does anyway, so they earn no warning.
_HARMLESS = {"model_type": "AutoModelForCausalLM", "tokenizer_type": "AutoTokenizer", "tokenizer_use_fast": True}


def _inert_warnings(data: dict[str, Any]) -> list[str]:
    return [
        f"{key} = {data[key]!r} has no effect here ({why})"
        for key, why in INERT_AXOLOTL_KEYS.items()
        if data.get(key) not in (None, "", False, [], {}) and key != "strict" and _HARMLESS.get(key) != data[key]
    ]


def yaml_error_line(path: str | Path, exc: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the file, the line and what is wrong there."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}" if mark else str(path)
    return f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})"


def read_yaml_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """A YAML config file's mapping and its text; every problem is one line naming the file (and line)."""
    file = Path(path)
    if file.is_dir():
        raise ForgeError(f"{path}: is a folder; expected a YAML config file")
    if not file.is_file():
        raise ForgeError(f"{path}: config file not found")
    text = read_text_file(file, "a YAML config file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ForgeError(yaml_error_line(path, exc)) from None
    if not isinstance(data, dict):
        raise ForgeError(f"{path}: expected a mapping of keys to values at the top level")
    return data, text


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, str] | None = None,
    strict: bool = False,
    data: dict[str, Any] | None = None,
) -> LoadedConfig:
    """Read, override and validate a config. Raises ForgeError with one line per problem."""
    source = str(path) if path is not None else "<config>"
    lines: dict[str, int] = {}
    duplicates: list[str] = []
    if path is not None:
        data, text = read_yaml_file(path)
        keys = _key_lines(text)
        lines, duplicates = dict(keys), _duplicate_key_warnings(keys, source)
    if not isinstance(data or {}, dict):
        raise ForgeError(f"{source}: expected a mapping of keys to values at the top level")
    data = dict(data or {})
    data = apply_overrides(data, overrides or {})
    strict = strict or data.get("strict") is True
    inert = {k for k in INERT_AXOLOTL_KEYS}
    to_validate = {k: v for k, v in data.items() if k not in inert}
    try:
        config = ForgeConfig.model_validate(to_validate)
    except ValidationError as exc:
        raise ForgeError("\n".join(_error_lines(exc, source, data, lines, _override_flags(overrides or {})))) from None

    warnings = duplicates + _inert_warnings(data)
    problems, in_file = _unknown_key_problems(config.unknown_keys(), source, overrides or {}, strict)
    if problems:
        raise ForgeError("\n".join(problems))
    if in_file:
        warnings.insert(0, f"unknown keys ignored: {', '.join(in_file)}")
    return LoadedConfig(config=config, path=Path(path) if path is not None else None, warnings=warnings)


def resolve_path(value: str, config_path: Path | None) -> Path:
    """A relative path in a config resolves against the working directory, then the config file's folder."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute() or candidate.exists() or config_path is None:
        return candidate
    beside = config_path.parent / candidate
    return beside if beside.exists() else candidate


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def slug(text: str) -> str:
    return _SAFE.sub("-", text).strip("-") or "x"
