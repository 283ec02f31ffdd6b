"""User mistakes and unsupported hardware end in one clear ForgeError, not a traceback."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from dolphin_forge.config import ForgeConfig, load_config
from dolphin_forge.errors import ForgeError
from dolphin_forge.train import checkpoint as ckpt
from dolphin_forge.train.distributed import fill_deepspeed_auto
from dolphin_forge.train.optim import lr_factor
from dolphin_forge.train.sft import train
from tests.train.rows import random_rows

CPU_ONLY = pytest.mark.skipif(torch.accelerator.is_available(), reason="checks the CPU error path")


@CPU_ONLY
@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"adapter": "qlora"}, "adapter: qlora needs bitsandbytes on a CUDA GPU"),
        ({"adapter": "lora", "load_in_4bit": True}, "load_in_4bit needs bitsandbytes on a CUDA GPU"),
        ({"optimizer": "adamw_8bit"}, "optimizer: adamw_8bit needs bitsandbytes on a CUDA GPU"),
    ],
)
def test_gpu_only_features_fail_clearly_on_cpu(tmp_path, overrides, named):
    config = ForgeConfig(base_model=str(tmp_path / "never-loaded"), output_dir=str(tmp_path / "out"), **overrides)
    with pytest.raises(ForgeError, match=named) as info:
        train(config, train_rows=[])
    assert "instead" in str(info.value) or "use `optimizer: adamw_torch`" in str(info.value)


def test_nan_loss_stops_with_a_last_good_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(out), sequence_len=64, max_steps=6,
                         learning_rate=1e30, max_grad_norm=None, lr_scheduler="constant")
    with pytest.raises(ForgeError, match=r"training stopped at step \d+: the loss is nan") as info:
        train(config, train_rows=random_rows(4, 49152, seed=1))
    saved = ckpt.latest_checkpoint(out)
    assert saved is not None and str(saved) in str(info.value)
    state = json.loads((saved / "state.json").read_text())
    assert all(v == v for v in state["train_losses"])  # the checkpoint holds only finite-loss steps


def test_under_deepspeed_a_nan_loss_never_reaches_the_engine_step(tiny_model_dir, tmp_path, monkeypatch):
    """DeepSpeed's engine steps inside the window's last backward (accelerate's engine wrapper), so a NaN check after
    it would come too late: that backward is skipped instead, and the run stops as any other does."""
    from accelerate import Accelerator

    from dolphin_forge.train.sft import SFTRecipe

    monkeypatch.setattr(SFTRecipe, "_deepspeed", property(lambda self: True))  # no DeepSpeed on a CPU
    stepping_losses, backward = [], Accelerator.backward

    def spy(self, loss, **kwargs):
        stepping_losses.append(float(loss.detach()))
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", spy)
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64,
                         max_steps=6, learning_rate=1e30, max_grad_norm=None, lr_scheduler="constant")
    with pytest.raises(ForgeError, match=r"training stopped at step \d+: the loss is nan"):
        train(config, train_rows=random_rows(4, 49152, seed=1))
    assert stepping_losses and all(math.isfinite(loss) for loss in stepping_losses)


def test_non_finite_gradients_stop_the_run_before_the_step_even_without_clipping(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    """A finite loss can come with NaN gradients; stepping on them would save NaN weights as the last good state."""
    from safetensors.torch import load_file

    from dolphin_forge.train.sft import SFTRecipe

    accumulate = SFTRecipe.accumulate_gradients

    def poisoned(self, step):
        values = accumulate(self, step)
        if step == 2:
            next(p for p in self.model.parameters() if p.requires_grad).grad[0, 0] = float("nan")
        return values

    monkeypatch.setattr(SFTRecipe, "accumulate_gradients", poisoned)
    out = tmp_path / "out"
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(out), sequence_len=64, max_steps=6,
                         max_grad_norm=None)
    with pytest.raises(ForgeError, match=r"^training stopped at step 3: the gradient norm is nan \(loss \d"):
        train(config, train_rows=random_rows(4, 49152, seed=1))
    saved = ckpt.latest_checkpoint(out)
    assert saved is not None and saved.name == "checkpoint-2"
    assert all(torch.isfinite(t).all() for t in load_file(saved / "trainable.safetensors").values())


def test_nan_stop_keeps_the_checkpoint_already_saved_for_that_step(tiny_model_dir, tmp_path, monkeypatch):
    """Re-saving it would store the RNG state the failed step advanced, breaking exact resume from it."""
    saved_steps = []
    save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint",
                        lambda out, step, **kw: saved_steps.append(step) or save(out, step, **kw))
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64, max_steps=6,
                         learning_rate=1e30, max_grad_norm=None, lr_scheduler="constant", save_steps=1)
    with pytest.raises(ForgeError, match=r"training stopped at step \d+") as info:
        train(config, train_rows=random_rows(4, 49152, seed=1))
    failed = int(re.search(r"step (\d+)", str(info.value))[1]) - 1  # optimizer steps completed before the NaN
    assert failed >= 1  # so the loop had already saved checkpoint-<failed>
    assert saved_steps == list(range(1, failed + 1))
    assert str(tmp_path / "out" / f"checkpoint-{failed}") in str(info.value)


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "state.json").write_text("{}")
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(out), sequence_len=64, max_steps=2,
                         save_steps=1)
    named = r"output_dir: .* already holds checkpoints .*checkpoint-3.*set `resume_from_checkpoint: auto`"
    with pytest.raises(ForgeError, match=named):
        train(config, train_rows=random_rows(4, 49152, seed=1))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]  # nothing written, nothing deleted


def test_settings_that_would_be_silently_ignored_are_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ForgeError, match="adapter and unfrozen_parameters"):
        load_config(data={"adapter": "lora", "lora_target_linear": True, "unfrozen_parameters": ["lm_head.weight"]})
    rows = random_rows(4, 49152, seed=1)
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64, max_steps=2,
                         early_stopping_patience=2, eval_steps=1)
    with pytest.raises(ForgeError, match="early_stopping_patience: needs a validation split; set val_set_size"):
        train(config, train_rows=rows)  # no validation rows
    config.eval_steps = None
    with pytest.raises(ForgeError, match="early_stopping_patience: needs evaluations during the run"):
        train(config, train_rows=rows, val_rows=rows[:1])  # validation rows, but evaluated only at start and end


def test_deepspeed_auto_values_are_filled_from_the_config():
    ds = {
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto"},
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }
    config = ForgeConfig(micro_batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5, bf16="auto")
    filled = fill_deepspeed_auto(ds, config, world_size=8, hidden_size=64, mixed="bf16")
    assert filled["train_batch_size"] == 96 and filled["train_micro_batch_size_per_gpu"] == 3
    assert filled["gradient_accumulation_steps"] == 4 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert "auto" not in json.dumps(filled)
    assert ds["train_batch_size"] == "auto"  # the input is not modified
    # `bf16: auto` on a GPU without bf16 resolves to no mixed precision: DeepSpeed must not switch bf16 on
    plain = fill_deepspeed_auto(ds, config, world_size=8, hidden_size=64, mixed="no")
    assert plain["bf16"]["enabled"] is False and plain["fp16"]["enabled"] is False


@pytest.mark.parametrize(("text", "named"), [
    ("[1, 2]", "the top level is an array"),
    ('{"zero_optimization": "stage3"}', "zero_optimization is a string"),
    ('{"optimizer": {"type": "AdamW", "params": [0.9]}}', "optimizer.params is an array"),
])
def test_a_deepspeed_json_of_another_shape_is_one_line(tmp_path, text, named):
    """Read as a mapping when its "auto" values are filled: an AttributeError wherever deepspeed is installed."""
    from dolphin_forge.train.distributed import read_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(ForgeError, match=rf"^deepspeed: {path}: {named}; expected a JSON object of DeepSpeed settings"):
        read_deepspeed_config(ForgeConfig(deepspeed=str(path)), None)


def test_a_warmup_longer_than_the_run_is_a_warning(tiny_model_dir, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=300)
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64,
                         max_steps=2, warmup_steps=100)
    train(config, train_rows=random_rows(4, 49152, seed=1), console=console)
    assert ("warning: warmup_steps: 100 warmup steps in a run of 2: the learning rate only reaches 1% of "
            "learning_rate") in console.export_text()


def test_schedules():
    cosine = [lr_factor(s, schedule="cosine", warmup=2, total=10) for s in range(10)]
    assert cosine[:3] == [0.0, 0.5, 1.0] and cosine[-1] > 0 and all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    assert lr_factor(6, schedule="cosine", warmup=2, total=10) == pytest.approx(0.5)
    assert lr_factor(6, schedule="linear", warmup=2, total=10) == pytest.approx(0.5)
    assert lr_factor(9, schedule="constant", warmup=2, total=10) == 1.0
    assert lr_factor(10, schedule="cosine", warmup=0, total=10, min_ratio=0.1) == pytest.approx(0.1)


def test_fsdp_on_one_process_trains_unsharded_with_a_warning(tiny_model_dir, tmp_path):
    from rich.console import Console

    console = Console(record=True, width=200)
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64,
                         max_steps=1, fsdp=["full_shard", "auto_wrap"])
    result = train(config, train_rows=random_rows(4, 49152, seed=1), console=console)
    assert result.steps == 1 and result.summary["processes"] == 1
    assert "warning: fsdp: a single process has nothing to shard" in console.export_text()


def test_fsdp_refuses_row_ranges_and_deepspeed(tiny_model_dir, tmp_path):
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64,
                         max_steps=1, fsdp="full_shard", unfrozen_parameters=[r"^model.embed_tokens.weight$[0:100]"])
    with pytest.raises(ForgeError, match=r"unfrozen_parameters: row ranges \(model.embed_tokens.weight\) cannot be "
                                         r"trained under fsdp"):
        train(config, train_rows=random_rows(4, 49152, seed=1))
    with pytest.raises(ValueError, match="deepspeed and fsdp: both shard the model; set one of them"):
        ForgeConfig(base_model="m", deepspeed="zero3.json", fsdp="full_shard")


def test_fsdp_names_the_decoder_layer_class_when_the_configured_one_is_missing(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dolphin_forge.train.distributed import layers_to_wrap

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert len(layers_to_wrap(model, {})) == 2
    with pytest.raises(ForgeError, match=r"^fsdp_config.fsdp_transformer_layer_cls_to_wrap: this model has no "
                                         r"MixtralSparseMoeBlock module to wrap; expected its decoder layer class "
                                         r"\(LlamaDecoderLayer\)$"):
        layers_to_wrap(model, {"transformer_layer_cls_to_wrap": "MixtralSparseMoeBlock"})


@pytest.mark.parametrize(("ds", "mixed", "named"), [
    ({"bf16": {"enabled": True}}, "no", r"bf16\.enabled is true but this run trains in float32 \(bf16: false, or "),
    ({"fp16": {"enabled": False}}, "fp16", r"fp16\.enabled is false but this run trains in fp16; set it to \"auto\""),
    ({"optimizer": {"type": "AdamW"}}, "bf16", r"its optimizer section is not supported: .* \(optimizer, learning_r"),
    ({"scheduler": {"type": "WarmupLR"}}, "bf16", r"its scheduler section is not supported: .* \(lr_scheduler, "),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "bf16",
     r"zero_optimization\.offload_optimizer runs DeepSpeed's CPU Adam, which would train optimizer: adamw_8bit as "),
])
def test_a_deepspeed_json_at_odds_with_the_run_is_one_line(ds, mixed, named):
    """The Dolphin cards' zero3_bf16.json switches bf16 on literally: a float32 run must not train in bf16 under
    DeepSpeed while reporting float32; and the optimizer and schedule come from the training config only."""
    from dolphin_forge.train.distributed import check_deepspeed_settings

    with pytest.raises(ForgeError, match=f"^deepspeed: {named}"):
        check_deepspeed_settings(ds, ForgeConfig(optimizer="adamw_8bit"), mixed)
    if "enabled" in json.dumps(ds):  # the same literal agreeing with the run is accepted
        check_deepspeed_settings(ds, ForgeConfig(), "bf16" if ds.get("bf16", {}).get("enabled") else "no")
    if "offload" in json.dumps(ds):  # DeepSpeed's CPU Adam runs AdamW for torch's AdamW
        check_deepspeed_settings(ds, ForgeConfig(), mixed)


def test_a_deepspeed_json_at_odds_with_the_run_is_refused_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    from dolphin_forge.train import sft

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded first")

    monkeypatch.setattr(sft, "load_model", never)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), deepspeed=str(path),
                         bf16=False)
    with pytest.raises(ForgeError, match=f"^deepspeed: {path}: bf16.enabled is true but this run trains in float32"):
        train(config, train_rows=random_rows(4, 49152, seed=1))


def fake_fp16(monkeypatch, overflow_steps, norm_when_fine=1.0):
    """An fp16 run on CPU, faked: the loss scaler's overflow shows as an infinite gradient norm at the given steps
    (0-based), and its skipped update as an optimizer step that does nothing. Returns the steps actually applied."""
    from dolphin_forge.train.sft import SFTRecipe

    setup, applied = SFTRecipe.setup, []

    def fp16_setup(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        self.mixed = "fp16"
        step, calls = self.optimizer.step, {"n": 0}

        def clip(parameters, max_norm):
            return torch.tensor(math.inf if calls["n"] in overflow_steps else norm_when_fine)

        def scaled_step(*a, **k):
            if calls["n"] not in overflow_steps:
                applied.append(calls["n"])
                step(*a, **k)
            calls["n"] += 1

        self.accelerator.clip_grad_norm_ = clip
        self.optimizer.step = scaled_step

    monkeypatch.setattr(SFTRecipe, "setup", fp16_setup)
    return applied


def test_an_fp16_overflow_skips_the_step_and_the_run_goes_on(tiny_model_dir, tmp_path, monkeypatch):
    """The loss scaler overflows in the first steps of most fp16 runs: that is a skipped update, not a NaN stop."""
    applied = fake_fp16(monkeypatch, overflow_steps={1, 2})
    out = tmp_path / "out"
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(out), sequence_len=64, max_steps=5)
    assert train(config, train_rows=random_rows(4, 49152, seed=1)).steps == 5
    assert applied == [0, 3, 4]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("skipped") for m in lines if m["kind"] == "train"] == [None, "fp16 overflow", "fp16 overflow",
                                                                          None, None]


def test_fp16_overflows_that_never_end_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    from dolphin_forge.train import sft

    monkeypatch.setattr(sft, "MAX_OVERFLOWS", 3)
    fake_fp16(monkeypatch, overflow_steps=set(range(10)))
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), sequence_len=64,
                         max_steps=6)
    with pytest.raises(ForgeError, match=r"^training stopped at step 3: the gradient norm is inf \(loss \d"):
        train(config, train_rows=random_rows(4, 49152, seed=1))


def test_a_gradient_norm_deepspeed_did_not_measure_is_logged_as_null(tiny_model_dir, tmp_path, monkeypatch):
    """DeepSpeed's engine reports no norm before its first measured step (accelerate then returns None)."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda self, parameters, max_norm: None)
    out = tmp_path / "out"
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(out), sequence_len=64, max_steps=2)
    assert train(config, train_rows=random_rows(4, 49152, seed=1)).steps == 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["grad_norm"] for m in lines if m["kind"] == "train"] == [None, None]


def test_8bit_adamw_keeps_32_bit_states_for_embeddings(tokenizer, monkeypatch):
    """As the HF Trainer does for the Dolphin cards' `optimizer: adamw_8bit` (bitsandbytes faked: no GPU here)."""
    import sys
    import types

    from dolphin_forge.train.optim import build_optimizer
    from tests.tiny import build_tiny_model

    overrides = []
    manager = types.SimpleNamespace(register_module_override=lambda module, name, cfg: overrides.append(
        (type(module).__name__, name, cfg)))
    optim = types.SimpleNamespace(AdamW8bit=lambda groups, **kw: ("AdamW8bit", kw),
                                  PagedAdamW8bit=lambda groups, **kw: ("PagedAdamW8bit", kw),
                                  GlobalOptimManager=types.SimpleNamespace(get_instance=lambda: manager))
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(optim=optim))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config = ForgeConfig(optimizer="paged_adamw_8bit", adam_beta2=0.95)
    name, kwargs = build_optimizer(build_tiny_model(tokenizer), config)
    assert name == "PagedAdamW8bit" and kwargs["betas"] == (0.9, 0.95)
    assert overrides == [("Embedding", "weight", {"optim_bits": 32})]


def test_each_process_loads_its_quantized_model_onto_its_own_gpu(tiny_model_dir, tmp_path, monkeypatch):
    """bitsandbytes is faked (no GPU here): what reaches the loader is the device map of this process's GPU."""
    from dolphin_forge.models import lora
    from dolphin_forge.train import sft

    class Loaded(Exception):
        pass

    def capture(path, **kwargs):
        raise Loaded(kwargs)

    monkeypatch.setattr(lora, "check_quantization_supported", lambda config: None)
    monkeypatch.setattr(lora, "quantization_config", lambda config, mixed: "4-bit")
    monkeypatch.setattr(sft, "load_model", capture)
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = ForgeConfig(base_model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), adapter="qlora",
                         lora_target_linear=True)
    with pytest.raises(Loaded) as loaded:
        train(config, train_rows=random_rows(4, 49152, seed=1))
    assert loaded.value.args[0]["quantization_config"] == "4-bit" and loaded.value.args[0]["device_map"] == {"": 1}
