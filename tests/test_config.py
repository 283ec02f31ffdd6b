"""The config schema: seed configs load verbatim, bad values give one clear line each, overrides and warnings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dolphin_forge.config import load_config
from dolphin_forge.errors import ForgeError

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT.parent / "shared" / "seeds"
SEED_CONFIGS = ["dolphin-2.9-llama3-8b", "dolphin-2.9.3-mistral-nemo-12b"]


def seed_yaml(name: str) -> str:
    card = SEEDS / f"{name}.md"
    if not card.is_file():
        pytest.skip(f"seed cards not found at {SEEDS}")
    return re.search(r"```yaml\n(.*?)```", card.read_text(), re.S).group(1)


@pytest.mark.parametrize("name", SEED_CONFIGS)
def test_seed_card_configs_load_verbatim(tmp_path, name):
    path = tmp_path / "seed.yml"
    path.write_text(seed_yaml(name))
    loaded = load_config(path, strict=True)
    config = loaded.config
    assert config.sample_packing and config.train_on_inputs is False and config.bf16 == "auto"
    assert config.special_tokens.eos_token == "<|im_end|>"
    assert config.tokens[0] == "<|im_start|>"
    assert config.deepspeed == "deepspeed_configs/zero3_bf16.json"
    assert all(d.type == "sharegpt" and d.conversation == "chatml" for d in config.datasets)
    assert not any("unknown" in w for w in loaded.warnings)


def test_the_example_copies_equal_the_cards():
    for name in SEED_CONFIGS:
        assert (ROOT / "examples" / f"{name}.yml").read_text().endswith(seed_yaml(name))


def test_seed_values_are_read_correctly(tmp_path):
    path = tmp_path / "seed.yml"
    path.write_text(seed_yaml("dolphin-2.9.3-mistral-nemo-12b"))
    config = load_config(path).config
    assert config.learning_rate == 5e-6 and config.weight_decay == 0.1 and config.warmup_steps == 100
    assert config.gradient_accumulation_steps == 16 and config.micro_batch_size == 1
    assert config.unfrozen_parameters[:2] == ["^lm_head.weight$", "^model.embed_tokens.weight$"]
    assert len(config.unfrozen_parameters) == 6 + 7 * 20
    assert config.total_batch_size(world_size=8) == 128


def test_bad_values_give_one_line_each_naming_key_value_and_line(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("base_model: default\nlearning_rate: fast\nsequence_len: -1\n")
    with pytest.raises(ForgeError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines == [
        f"{path}:2: learning_rate = 'fast': expected a number",
        f"{path}:3: sequence_len = -1: expected a number > 0",
    ]


def test_cli_validate_rejects_bad_values_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("learning_rate: fast\nsequence_len: -1\n")
    result = subprocess.run([sys.executable, "-m", "dolphin_forge.cli", "validate", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {path}:1: learning_rate = 'fast': expected a number",
        f"error: {path}:2: sequence_len = -1: expected a number > 0",
    ]


def test_literal_choices_are_listed():
    with pytest.raises(ForgeError, match=r"lr_scheduler = 'cosin': expected one of 'cosine', 'linear'"):
        load_config(data={"lr_scheduler": "cosin"})


def test_unknown_keys_warn_once_and_fail_under_strict():
    loaded = load_config(data={"learning_rate": 1e-5, "lerning_rate": 1, "bogus": 2})
    assert loaded.warnings == ["unknown keys ignored: bogus, lerning_rate"]
    with pytest.raises(ForgeError, match="unknown keys \\(strict mode\\): bogus, lerning_rate"):
        load_config(data={"lerning_rate": 1, "bogus": 2}, strict=True)
    with pytest.raises(ForgeError, match="strict mode"):
        load_config(data={"strict": True, "bogus": 2})


def test_inert_axolotl_keys_warn_only_when_they_ask_for_something():
    assert load_config(data={"model_type": "AutoModelForCausalLM", "xformers_attention": None}).warnings == []
    warnings = load_config(data={"xformers_attention": True}).warnings
    assert warnings == ["xformers_attention = True has no effect here (attention kernels are chosen automatically)"]


def test_cli_style_overrides_are_typed_and_reach_nested_keys():
    loaded = load_config(
        data={"datasets": [{"path": "a.jsonl"}]},
        overrides={"learning-rate": "1e-5", "datasets.0.path": "b.jsonl", "sample-packing": "true",
                   "special_tokens.pad_token": "<pad>"},
    )
    config = loaded.config
    assert config.learning_rate == 1e-5 and config.datasets[0].path == "b.jsonl" and config.sample_packing is True
    assert config.special_tokens.pad_token == "<pad>"
    with pytest.raises(ForgeError, match="index 3 is out of range"):
        load_config(data={"datasets": [{"path": "a"}]}, overrides={"datasets.3.path": "x"})


def test_whole_dataset_list_override_in_flow_yaml():
    config = load_config(data={}, overrides={"datasets": "[{path: x.json, type: alpaca}]"}).config
    assert config.datasets[0].type == "alpaca"


def test_chat_template_dataset_form(tmp_path):
    config = load_config(data={"datasets": [{
        "path": "x.jsonl", "type": "chat_template", "field_messages": "messages",
        "message_property_mappings": {"role": "role", "content": "content"},
        "roles_to_train": ["assistant"], "train_on_eos": "turn"}]}).config
    assert config.datasets[0].roles_to_train == ["assistant"]
    with pytest.raises(ForgeError, match="datasets.0.train_on_eos = 'sometimes'"):
        load_config(data={"datasets": [{"path": "x", "type": "chat_template", "train_on_eos": "sometimes"}]})


def test_val_set_size_fraction_or_count_and_derived_steps():
    config = load_config(data={"val_set_size": 0.0002, "micro_batch_size": 3, "gradient_accumulation_steps": 4}).config
    assert config.steps_per_epoch(train_rows=100) == 9  # ceil(ceil(100 / 3) / 4)
    assert config.steps_per_epoch(train_rows=100, world_size=8) == 2
    with pytest.raises(ForgeError, match="whole number"):
        load_config(data={"val_set_size": 2.5})


def test_missing_file_and_bad_yaml_are_one_line(tmp_path):
    with pytest.raises(ForgeError, match="config file not found"):
        load_config(tmp_path / "nope.yml")
    listed = tmp_path / "list.yml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ForgeError, match="expected a mapping of keys to values"):
        load_config(listed)
    path = tmp_path / "broken.yml"
    path.write_text("a: 1\nb: [1, 2\n")
    with pytest.raises(ForgeError, match=rf"{re.escape(str(path))}:\d+: not valid YAML"):
        load_config(path)


def test_unknown_keys_inside_dataset_and_curate_source_entries_are_named():
    data = {"bogus": 1, "datasets": [{"path": "a.jsonl"}, {"path": "b.jsonl", "tpye": "alpaca"}],
            "curate": {"sources": [{"path": "c.jsonl", "wieght": 2}]}}
    assert load_config(data=data).warnings == [
        "unknown keys ignored: bogus, datasets.1.tpye, curate.sources.0.wieght"]
    with pytest.raises(ForgeError, match=r"unknown keys \(strict mode\): datasets\.0\.feild_messages$"):
        load_config(data={"datasets": [{"path": "a.jsonl", "feild_messages": "x"}]}, strict=True)


def test_roles_must_map_onto_chatml_roles():
    config = load_config(data={"datasets": [{"path": "a", "roles": {"assistant": ["bot"], "tool_call": ["call"]}}]})
    assert config.config.datasets[0].roles == {"assistant": ["bot"], "tool_call": ["call"]}
    with pytest.raises(ForgeError) as info:
        load_config(data={"datasets": [{"path": "a", "roles": {"asistant": ["bot"]}}]})
    assert str(info.value) == ("<config>: datasets.0.roles = {'asistant': ['bot']}: unknown role 'asistant': "
                               "expected one of system, user, assistant, tool, tool_call")


def test_roles_to_train_must_name_a_known_role():
    dataset = {"path": "a", "roles": {"assistant": ["bot"]}, "roles_to_train": ["gpt", "Bot"]}
    config = load_config(data={"datasets": [dataset]})
    assert config.config.datasets[0].roles_to_train == ["gpt", "Bot"]
    with pytest.raises(ForgeError) as info:
        load_config(data={"datasets": [{"path": "a", "roles_to_train": ["asisstant"]}]})
    assert str(info.value) == (
        "<config>: datasets.0.roles_to_train = ['asisstant']: unknown role 'asisstant': expected system, user, "
        "assistant or tool, a ShareGPT name such as gpt or human, or a name listed under `roles`")


@pytest.mark.parametrize(("data", "override", "message"), [
    ({"datasets": [{"path": "a"}]}, "datasets.path",
     "override datasets.path: datasets is a list, so it has no key 'path' (name an entry by its index, e.g. "
     "datasets.0.path)"),
    ({"learning_rate": 1e-5}, "learning-rate.x",
     "override learning-rate.x: learning_rate is 1e-05, so it has no key 'x'"),
    ({"learning_rate": 1e-5}, "learning-rate.0",
     "override learning-rate.0: learning_rate is 1e-05, so it has no index 0"),
    ({"eval": {"tasks": []}}, "eval.0", "override eval.0: eval is a mapping, so it has no index 0"),
])
def test_overrides_through_a_list_or_a_value_are_one_line_errors(data, override, message):
    with pytest.raises(ForgeError) as info:
        load_config(data=data, overrides={override: "1"})
    assert str(info.value) == message


def test_data_files_are_checked_by_validate_and_refused_in_curate_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    config = load_config(data={"datasets": [{"path": str(tmp_path), "data_files": ["a.jsonl", "b.jsonl"]}]}).config
    assert config.missing_paths(None) == [f"datasets.0.data_files 'b.jsonl' is not a file in {str(tmp_path)!r}"]
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # `validate` must not pass a file that every stage refuses
    gguf = load_config(data={"base_model": str(tmp_path / "model.gguf")}).config
    assert gguf.missing_paths(None) == [f"base_model {str(tmp_path / 'model.gguf')!r} is a file, not a model folder"]
    with pytest.raises(ForgeError, match="curate.sources.0.data_files = 'a.jsonl': not supported in curate sources"):
        load_config(data={"curate": {"sources": [{"path": str(tmp_path), "data_files": "a.jsonl"}]}})


def test_config_files_in_another_encoding_or_folders_are_named(tmp_path):
    bad = tmp_path / "latin1.yml"
    bad.write_bytes("base_model: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ForgeError, match=r"latin1.yml: not UTF-8 text \(byte 15"):
        load_config(bad)
    with pytest.raises(ForgeError, match="is a folder; expected a YAML config file"):
        load_config(tmp_path)
    marked = tmp_path / "bom.yml"
    marked.write_text("learning_rate: 0.001\n", encoding="utf-8-sig")
    assert load_config(marked).config.learning_rate == 0.001


@pytest.mark.parametrize("key", ["output_dir", "dataset_prepared_path", "curate.output_dir", "spectrum.output_dir",
                                 "laser.output_dir", "eval.output_dir"])
def test_an_output_folder_that_is_a_file_is_refused_at_load(tmp_path, monkeypatch, key):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken.jsonl").write_text("{}\n")
    with pytest.raises(ForgeError, match=f"--{re.escape(key)} taken.jsonl: is a file; expected a folder"):
        load_config(data={}, overrides={key: "taken.jsonl"})
    assert load_config(data={}, overrides={key: "new-folder"}).config


@pytest.mark.parametrize("key", ["output_dir", "dataset_prepared_path", "curate.output_dir", "spectrum.output_dir",
                                 "laser.output_dir", "eval.output_dir"])
def test_an_output_folder_under_home_is_expanded_not_created_as_a_folder_named_tilde(tmp_path, monkeypatch, key):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(data={}, overrides={key: "~/runs/a"}).config
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    assert value == str(tmp_path / "runs" / "a")


def test_strict_mode_names_the_flag_of_an_unknown_key_from_the_command_line(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("foo: 1\n")
    with pytest.raises(ForgeError) as info:
        load_config(path, {"bogus-key": "3"}, strict=True)
    assert str(info.value).splitlines() == [
        f"{path}: unknown keys (strict mode): foo", "--bogus-key 3: unknown key bogus_key"
    ]


def test_an_unknown_key_typed_on_the_command_line_is_an_error_even_without_strict(tmp_path):
    """A file may hold Axolotl keys we skip (a warning); a mistyped flag would start a long run as if unset."""
    path = tmp_path / "c.yml"
    path.write_text("foo: 1\nmax_steps: 100\n")
    with pytest.raises(ForgeError) as info:
        load_config(path, {"max-step": "2"})
    assert str(info.value) == "--max-step 2: unknown key max_step; did you mean --max-steps?"
    assert load_config(path, {"max-steps": "2"}).warnings == ["unknown keys ignored: foo"]


def test_a_bad_value_from_an_override_names_the_flag_and_one_from_the_file_names_the_file(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text("learning_rate: 1e-5\nsequence_len: -1\n")
    overrides = {"learning-rate": "abc", "datasets": "[{path: x.json, type: bogus}]", "eval.batch-size": "0"}
    with pytest.raises(ForgeError) as info:
        load_config(path, overrides)
    assert str(info.value).splitlines() == [
        "--datasets '[{path: x.json, type: bogus}]': datasets.0.type = 'bogus': expected one of 'sharegpt', "
        "'chat_template', 'alpaca', 'openai' or 'messages'",
        "--learning-rate abc: expected a number",
        "--eval.batch-size 0: expected a whole number >= 1, or auto",
        f"{path}:2: sequence_len = -1: expected a number > 0",
    ]


@pytest.mark.parametrize(("data", "message"), [
    ({"save_strategy": "no", "save_steps": 5}, "save_strategy: 'no' contradicts save_steps; set 'steps' or drop one"),
    ({"save_strategy": "steps"}, "save_strategy: 'steps' needs save_steps"),
    ({"save_strategy": "best"}, "save_strategy = 'best': expected one of 'no', 'epoch' or 'steps'"),
    ({"save_strategy": "no", "saves_per_epoch": 2}, "save_strategy: 'no' contradicts saves_per_epoch; drop one"),
    ({"save_strategy": "epoch", "saves_per_epoch": 4}, "save_strategy: 'epoch' contradicts saves_per_epoch; drop one"),
])
def test_save_strategy_is_checked_against_save_steps(data, message):
    with pytest.raises(ForgeError, match=re.escape(message)):
        load_config(data=data)


def test_save_strategy_epoch_with_one_save_per_epoch_agrees():
    assert load_config(data={"save_strategy": "epoch", "saves_per_epoch": 1}).config.saves_per_epoch == 1


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("datasets:\n  path: x.json\n", "datasets = {'path': 'x.json'}: expected a list (one `- item` line per entry"),
    ("datasets: [data.jsonl]\n", "datasets.0 = 'data.jsonl': expected a mapping of keys to values"),
    ("base_model: [a, b]\n", "base_model = ['a', 'b']: expected a string"),
    ("spectrum:\n  module_types: []\n", "spectrum.module_types = []: expected at least 1 entry"),
    ("bf16: maybe\n", "bf16 = 'maybe': expected true or false, or one of 'auto' or 'full'"),
    ("eval:\n  batch_size: big\n", "eval.batch_size = 'big': expected a whole number, or 'auto'"),
])
def test_a_value_of_the_wrong_shape_says_what_every_allowed_form_is(tmp_path, yaml_text, message):
    """In this product's words, not pydantic's; a union names all its forms, not only the first (bf16: auto)."""
    path = tmp_path / "c.yml"
    path.write_text(yaml_text)
    with pytest.raises(ForgeError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:1: {message}")


def test_a_key_set_twice_is_a_warning_naming_both_lines(tmp_path):
    """YAML keeps the last value silently; the earlier line of a long config would do nothing without a word."""
    path = tmp_path / "c.yml"
    path.write_text("learning_rate: 1e-4\nmicro_batch_size: 2\nlearning_rate: 2e-5\n")
    loaded = load_config(path)
    assert loaded.config.learning_rate == 2e-5
    assert loaded.warnings == [f"{path}: learning_rate is set more than once (lines 1, 3); the last value is used"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ("{use_reentrant: true, foo: 1}", "unknown key 'foo': expected one of use_reentrant, preserve_rng_state, "),
    ("{use_reentrant: 'no'}", "use_reentrant = 'no': expected true or false"),
    ("{determinism_check: strict}", "determinism_check = 'strict': expected 'default' or 'none'"),
])
def test_gradient_checkpointing_kwargs_are_torch_checkpoint_options(tmp_path, kwargs, message):
    """torch passes unknown keys on to the layer (ignored, or a traceback mid-step with use_reentrant), and a quoted
    'no' would count as true."""
    path = tmp_path / "c.yml"
    path.write_text(f"gradient_checkpointing: true\ngradient_checkpointing_kwargs: {kwargs}\n")
    with pytest.raises(ForgeError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:2: gradient_checkpointing_kwargs = ") and message in str(info.value)
    assert "\n" not in str(info.value)
    loaded = load_config(data={"gradient_checkpointing_kwargs": {"use_reentrant": False, "preserve_rng_state": True}})
    assert loaded.config.gradient_checkpointing_kwargs == {"use_reentrant": False, "preserve_rng_state": True}


def test_resume_from_checkpoint_true_names_auto(tmp_path):
    """HF's Trainer takes `true` for the newest checkpoint; "expected a string" would not say what to write."""
    path = tmp_path / "c.yml"
    path.write_text("resume_from_checkpoint: true\n")
    with pytest.raises(ForgeError, match=re.escape(f"{path}:1: resume_from_checkpoint = True: expected a checkpoint "
                                                   "folder, or auto for the newest one in output_dir (not true)")):
        load_config(path)
    assert load_config(data={"resume_from_checkpoint": False}).config.resume_from_checkpoint is None


@pytest.mark.parametrize(("yaml_text", "message"), [
    ('tokens: ["<|im_start|>", ""]\n', "tokens.1 = '': a token must be non-empty text"),
    ('special_tokens:\n  pad_token: ""\n', "special_tokens.pad_token = '': a token must be non-empty text"),
])
def test_an_empty_token_is_refused_naming_its_key(tmp_path, yaml_text, message):
    """An empty token would otherwise reach the tokenizer after the model has loaded, naming no config key."""
    path = tmp_path / "c.yml"
    path.write_text(yaml_text)
    with pytest.raises(ForgeError, match=re.escape(f"{path}:1: {message}")) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert load_config(data={"tokens": None, "special_tokens": {"pad_token": None}}).config.tokens == []


def test_validate_names_every_missing_file_the_stages_would_read(tmp_path):
    """A missing curate source or laser/eval file used to pass `validate` and fail only when its stage ran."""
    (tmp_path / "here.txt").write_text("text")
    data = {
        "curate": {"sources": [{"path": str(tmp_path / "here.txt")}, {"path": "nope.jsonl"}]},
        "laser": {"eval_file": "/workspace/datasets/heldout.txt"},
        "eval": {"perplexity_files": [str(tmp_path / "here.txt"), "gone.txt"], "data_dir": str(tmp_path / "here.txt")},
    }
    assert load_config(data=data).config.missing_paths(tmp_path) == [
        "curate.sources.1.path 'nope.jsonl' does not exist",
        "laser.eval_file '/workspace/datasets/heldout.txt' does not exist",
        f"eval.data_dir {str(tmp_path / 'here.txt')!r} is not a folder",
        "eval.perplexity_files.1 'gone.txt' does not exist",
    ]


@pytest.mark.parametrize("flag, value, message", [
    ("trainer.max-steps", "2", "--trainer.max-steps 2: unknown key trainer"),
    ("datasets.0.pth", "y", "--datasets.0.pth y: unknown key datasets.0.pth; did you mean --datasets.0.path?"),
    ("laser.search-tokns", "5", "--laser.search-tokns 5: unknown key; did you mean --laser.search-tokens?"),
    ("datasets", "[{path: a, type: alpaca, tpye: x}]",
     "--datasets '[{path: a, type: alpaca, tpye: x}]': unknown key datasets.0.tpye; did you mean --datasets.0.type?"),
])
def test_unknown_keys_inside_a_flags_value_or_path_are_the_flags_errors(flag, value, message):
    with pytest.raises(ForgeError) as info:
        load_config(data={"datasets": [{"path": "a", "type": "alpaca"}]}, overrides={flag: value})
    assert str(info.value) == message
