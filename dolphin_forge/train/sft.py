"""The supervised fine-tuning recipe: one explicit loop, read top to bottom.

Why our own loop and not the HF `Trainer`: three promises of this stage are hard to keep through it. (1) The loss
is the mean over every trained token of the whole accumulation window (and of every process), not a mean of
per-micro-batch means, so 1 micro-batch of 8 rows and 8 micro-batches of 1 row give the same gradient.
(2) A run killed at any moment and resumed ends with the same weights as an uninterrupted one: the data position
is a pure function of the optimizer step (`batches.BatchPlan`) and checkpoints hold the RNG state. (3) Nothing is
ever unpickled. `accelerate` does what it is good at: device placement, autocast, DDP and DeepSpeed; FSDP is
torch's own `fully_shard` (see `train.distributed` for why).

Flow of `train()`: seed -> tokenizer and prepared rows -> model (resized for added tokens) -> mode (full,
selective `unfrozen_parameters`, or LoRA) -> optimizer, schedule, accelerator -> resume -> loop over optimizer
steps (accumulate, clip, step, log, evaluate, checkpoint, early-stop) -> save an HF folder and a JSON summary.

Packed rows: the model receives position ids that restart at 0 for each sample and no attention mask; with SDPA
transformers turns that into a block-diagonal causal mask, with flash-attention 2 into variable-length kernels.
Only positions whose next token is trained reach the LM head (`logits_to_keep`), which saves the head's matmul on
prompt tokens and the memory of their logits; where exact (`train.loss`), the head and the cross-entropy run fused,
a chunk of positions at a time, so no full logits tensor exists at all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import resource
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.markup import escape

from dolphin_forge.config import ForgeConfig
from dolphin_forge.errors import ForgeError
from dolphin_forge.models.default import resolve_model_path
from dolphin_forge.models.freeze import FreezeSummary, apply_unfrozen_parameters, summarize, unfreeze_rows
from dolphin_forge.models.packed import restore_standard_attention, varlen_kwargs
from dolphin_forge.models.load import (
    IM_END,
    add_config_tokens,
    base_tokenizer,
    empty_model,
    load_model,
    new_token_rows,
)
from dolphin_forge.train import checkpoint as ckpt
from dolphin_forge.train.batches import IGNORE_INDEX, BatchPlan, MicroBatch, collate
from dolphin_forge.train.compile import (
    check_torch_compile,
    compile_decoder_layers,
    compiled_cross_entropy,
    restore_eager_layers,
)
from dolphin_forge.train.distributed import (
    check_deepspeed_settings,
    gradient_sync,
    loads_on_first_process_only,
    make_accelerator,
    process_rank,
    read_deepspeed_config,
    reshard,
    shard_model,
)
from dolphin_forge.models.hardware import matmul_peak_flops
from dolphin_forge.train.hardware import (
    attention_implementation,
    mixed_precision,
    release_freed_host_memory,
    weights_dtype,
)
from dolphin_forge.train.recompute import after_kept_layers_backward, checkpoint_first_layers, decoder_layers
from dolphin_forge.train.loss import fusable_head, head_returns_hidden_states, linear_cross_entropy
from dolphin_forge.train.metrics import (
    MetricsSink,
    describe_step,
    linear_size,
    matmul_parameters,
    progress_bar,
    training_flops,
)
from dolphin_forge.train.optim import (
    build_optimizer,
    build_scheduler,
    changed_settings,
    check_optimizer_supported,
    lr_factor,
    optimizer_settings,
)

SUMMARY_FILE = "training_summary.json"
#: fp16 steps in a row whose gradients overflow before the run stops: the scaler halves its scale at each.
MAX_OVERFLOWS = 20


@dataclass
class TrainResult:
    """What a finished (or early-stopped) run produced."""

    output_dir: Path
    steps: int
    stopped: str
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def summed_token_loss(
    model: Any, batch: MicroBatch, unwrapped: Any = None, compiled: bool = False, head: torch.nn.Linear | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over trained positions of a micro-batch, and the head positions computed.

    Only sequence positions where some row's next token is trained go through the LM head. `unwrapped`: the model
    inside a DDP/DeepSpeed wrapper, whose config names the attention kernel. `compiled`: the loss runs compiled
    (`torch_compile`). `head`: the model's LM head, to run fused with the loss (`train.loss`; see `fusable_head`).
    """
    targets = batch.labels[:, 1:]
    wanted = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if wanted.numel() == 0:
        wanted = torch.zeros(1, dtype=torch.long, device=batch.input_ids.device)
    with head_returns_hidden_states(head) if head is not None else contextlib.nullcontext({}) as seen:
        outputs = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, logits_to_keep=wanted,
            **varlen_kwargs(unwrapped or model, batch.position_ids),
        ).logits  # the hidden states at the wanted positions when `head` is given
    picked = targets[:, wanted].reshape(-1)
    if head is not None:
        hidden = outputs.reshape(-1, outputs.shape[-1])
        loss = linear_cross_entropy(hidden, head, picked, IGNORE_INDEX, compute_dtype=seen["dtype"])
    else:
        cross_entropy = compiled_cross_entropy() if compiled else F.cross_entropy
        loss = cross_entropy(
            outputs.float().reshape(-1, outputs.shape[-1]), picked, ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return loss, int(wanted.numel()) * batch.input_ids.shape[0]


class SFTRecipe:
    """State of one training run; `setup()` builds everything, `run()` trains."""

    def __init__(self, config: ForgeConfig, config_path: Path | None = None, console: Any = None) -> None:
        self.config = config
        self.config_path = config_path
        self.console = console
        self.output_dir = Path(config.output_dir)

    # --- setup ---------------------------------------------------------------------------------------------------

    def setup(self, train_rows: Any = None, val_rows: Any = None) -> None:
        from accelerate.utils import set_seed

        from dolphin_forge.models.lora import (
            apply_lora,
            check_quantization_supported,
            quantization_config,
            quantized_device_map,
        )

        config = self.config
        check_quantization_supported(config)
        check_optimizer_supported(config)
        if not config.resume_from_checkpoint:
            ckpt.refuse_used_output_dir(self.output_dir)
        set_seed(config.seed)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        check_torch_compile(config, device)
        self.mixed = mixed_precision(config, device)
        self._overflows = 0  # fp16 steps in a row whose scaled gradients overflowed (see _loss_scaler_overflow)
        if config.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        tokenizer = base_tokenizer(config, self.config_path)
        base_vocab = len(tokenizer)  # ids from here on are the config's new tokens
        self.tokenizer = add_config_tokens(tokenizer, config)

        ds = read_deepspeed_config(config, self.config_path) if config.deepspeed else None
        if ds is not None:  # before minutes of loading: the JSON can be at odds with the run
            check_deepspeed_settings(ds, config, self.mixed, where=f"deepspeed: {config.deepspeed}")
        model_path = resolve_model_path(config.base_model, self.config_path)
        load_kwargs: dict[str, Any] = {"attn_implementation": attention_implementation(config, device, self.mixed)}
        quant = quantization_config(config, self.mixed)
        if quant is not None:
            load_kwargs.update(quantization_config=quant, device_map=quantized_device_map())
        loads_once = loads_on_first_process_only(config)
        if loads_once and quant is not None:
            raise ForgeError(
                "fsdp_config.fsdp_cpu_ram_efficient_loading: not supported for quantized (QLoRA, load_in_4bit/8bit) "
                "models, whose weights are quantized as they load; drop one of the two"
            )
        load = empty_model if loads_once and process_rank() != 0 else load_model
        model = load(model_path, dtype=weights_dtype(config), trust_remote_code=config.trust_remote_code, **load_kwargs)
        model.config.use_cache = False
        hidden_size = getattr(model.config, "hidden_size", None)
        self.accelerator = make_accelerator(config, ds, self.mixed, hidden_size)
        acc = self.accelerator

        if train_rows is None:
            from dolphin_forge.data.preprocess import preprocess

            with acc.main_process_first():
                prepared = preprocess(config, self.config_path, progress=acc.is_main_process)
            train_rows, val_rows = prepared.train, prepared.val
        if len(train_rows) == 0:
            raise ForgeError("datasets: preprocessing left no training rows")
        check_early_stopping(config, val_rows)
        self.train_rows, self.val_rows = train_rows, val_rows

        new_rows = new_token_rows(model, self.tokenizer, base_vocab)
        self.mode, self.freeze = "full", None
        if config.adapter:
            model = apply_lora(model, config, added_tokens=len(new_rows))
            self.mode = config.adapter
            self.freeze = summarize(model, {}, [])
        elif config.unfrozen_parameters:
            self.mode = "selective"
            self.freeze = apply_unfrozen_parameters(model, config.unfrozen_parameters)
            if new_rows:
                self.freeze = self._unfreeze_new_rows(model, new_rows, self.freeze)
        else:
            self.freeze = summarize(model, {}, [])
        if config.gradient_checkpointing:
            kwargs = config.gradient_checkpointing_kwargs or {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if kwargs.get("use_reentrant", True) and hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            if config.gradient_checkpointing_layers is not None:
                checkpoint_first_layers(model, config.gradient_checkpointing_layers)
                after_kept_layers_backward(model, config.gradient_checkpointing_layers,
                                           functools.partial(release_freed_host_memory, device))
        if config.torch_compile:
            compile_decoder_layers(model)

        self.plan = BatchPlan(
            num_rows=len(train_rows),
            micro_batch_size=config.micro_batch_size,
            accumulation_steps=config.gradient_accumulation_steps,
            world_size=acc.num_processes,
            rank=acc.process_index,
            seed=config.seed,
        )
        self.total_steps = config.max_steps or max(1, math.ceil(config.num_epochs * self.plan.steps_per_epoch))
        if config.fsdp and self.freeze.partial:
            raise ForgeError(
                f"unfrozen_parameters: row ranges ({', '.join(self.freeze.partial)}) cannot be trained under fsdp "
                "(a sharded parameter's rows are spread over processes); train whole matrices, or drop the fsdp keys"
            )
        self.fsdp = bool(config.fsdp) and acc.num_processes > 1
        if self.fsdp:
            model = shard_model(model, config, acc.device, self.mixed, from_first=loads_once)
        optimizer = build_optimizer(model, config, self.freeze.partial)
        if self.fsdp:  # already sharded: accelerate must not wrap it in DDP
            self.model, self.optimizer = model, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.linear_params = matmul_parameters(self._unwrapped)
        head = self._unwrapped.get_output_embeddings()
        if head is None:
            self.head_params = 0
        else:  # a LoRA run's `modules_to_save` wraps the head: its weight is the head's
            self.head_params = linear_size(head) if isinstance(head, torch.nn.Linear) else head.weight.numel()
        self.fused_head = fusable_head(self._unwrapped, sharded=self.fsdp or self._deepspeed)
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}
        self.peak_flops = matmul_peak_flops(device.type, half.get(self.mixed, torch.float32))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _unfreeze_new_rows(self, model: Any, rows: range, summary: FreezeSummary) -> FreezeSummary:
        """Embedding (and untied head) rows of added tokens train even when the matrices are frozen."""
        names = {id(p): n for n, p in model.named_parameters()}
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None and id(module.weight) in names:
                summary = unfreeze_rows(model, names[id(module.weight)], rows.start, rows.stop, summary)
        return summary

    @property
    def _unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    @property
    def _deepspeed(self) -> bool:
        """DeepSpeed's engine owns the sharded weights and optimizer: checkpoints hold weights only (see checkpoint)."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights as plain tensors (gathered from the shards under FSDP/DeepSpeed: every process
        must call this; under FSDP only the main process receives them)."""
        if self.fsdp:
            return self._gathered(trainable_only=False)
        return self.accelerator.get_state_dict(self.model)

    def _gathered(self, trainable_only: bool) -> dict[str, torch.Tensor]:
        """FSDP: the full tensors on the main process, once per tensor (a tied head is the embedding, as
        `save_pretrained` expects), frozen ones left out when only the trainable are wanted (a LoRA base stays
        sharded instead of being gathered for every checkpoint)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        gathered = get_model_state_dict(self.model, options=options)
        names = {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers()}
        return {n: t for n, t in gathered.items() if n in names}

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            return self._gathered(trainable_only=True)
        names = {n for n, p in self._unwrapped.named_parameters() if p.requires_grad}
        if self._deepspeed:
            return {n: t for n, t in self._full_state_dict().items() if n in names}
        return {n: p for n, p in self._unwrapped.named_parameters() if n in names}

    # --- the loop ------------------------------------------------------------------------------------------------

    def run(self, progress: bool = False) -> TrainResult:
        config, acc = self.config, self.accelerator
        main = acc.is_main_process
        resume = ckpt.resolve_resume(config.resume_from_checkpoint, self.output_dir)
        state: dict[str, Any] = {"best_val": None, "bad_evals": 0, "best": None, "val_losses": [], "train_losses": [],
                                 "tokens": 0, "trained_tokens": 0, "seconds": 0.0, "run": self._run_id()}
        self.resumed_from = resume
        step = 0
        if resume is not None and self._deepspeed:
            raise ForgeError(
                "resume_from_checkpoint: resuming under DeepSpeed is not supported yet (its engine shards the "
                "optimizer state); resume with FSDP or DDP (fsdp keys, or none), or start from the checkpoint"
            )
        if resume is not None:
            saved = self._load_checkpoint_everywhere(resume)
            saved.pop("data", None)
            saved.pop("scheduler", None)  # written before the optimizer settings were: the step fixes the schedule
            step = saved.pop("step")
            if step >= self.total_steps:
                raise ForgeError(
                    f"resume_from_checkpoint: {resume} is at step {step} and this config's run has {self.total_steps} "
                    "steps; raise max_steps or num_epochs to train on, or use the checkpoint's weights as they are"
                )
            changed = changed_settings(saved.pop("optimizer_settings", None), self._optimizer_settings())
            self.scheduler = build_scheduler(self.optimizer, config, self.total_steps, start_step=step)
            state.update(saved)
            if "run" not in saved:  # written before runs had an id; its best-weights/ has none either
                state["run"] = None
            if main and self.console:
                self.console.print(f"resumed from {resume} at step {step}")
                if changed:
                    self._warn(
                        f"resume_from_checkpoint: this config changes {', '.join(changed)} against {resume.name}; "
                        f"from step {step + 1} on, training uses this config's values, so the run will differ "
                        "from an uninterrupted one"
                    )
        self.sink = MetricsSink(self.output_dir, config, enabled=main, resumed_step=step)
        if main and self.console:
            self._print_setup(resume)
            for warning in self.sink.warnings:
                self._warn(warning)

        eval_every = self._every(config.eval_steps, config.evals_per_epoch)
        # as Axolotl: without save_steps or saves_per_epoch a checkpoint ends every epoch; `save_strategy: no` opts out
        saves = config.saves_per_epoch or 1
        save_every = self._every(config.save_steps, saves) if config.save_strategy != "no" else None
        if self.val_rows is not None and step == 0:
            self._evaluate(0, state)
        stopped = "completed"
        bar = progress_bar(progress and main)
        with bar:
            task = bar.add_task("train", total=self.total_steps, completed=step, stats="")
            while step < self.total_steps:
                started = time.perf_counter()
                values = self._optimizer_step(step, state)
                step += 1
                elapsed = time.perf_counter() - started
                state["seconds"] += elapsed
                values.update(
                    real_tokens_per_s=values["real_tokens"] / elapsed,
                    trained_tokens_per_s=values["trained_tokens"] / elapsed,
                    mfu=values.pop("flops") / elapsed / self.peak_flops,
                    epoch=step / self.plan.steps_per_epoch,
                )
                state["train_losses"].append(values["loss"])
                if step % config.logging_steps == 0 or step == self.total_steps:
                    self.sink.log("train", step, values)
                bar.update(task, completed=step, stats=describe_step(values))
                if self.val_rows is not None and eval_every and step % eval_every == 0 and step < self.total_steps:
                    if self._evaluate(step, state):
                        stopped = "early_stopping"
                if save_every and step % save_every == 0 and step < self.total_steps:
                    self._save_checkpoint(step, state)
                if stopped != "completed":
                    break
        if self.val_rows is not None and (not state["val_losses"] or state["val_losses"][-1][0] != step):
            self._evaluate(step, state)
        self.sink.close()
        return self._finish(step, stopped, state)

    def _load_checkpoint_everywhere(self, folder: Path) -> dict[str, Any]:
        """`load_checkpoint` on every process, which all stop if one cannot: with a file missing for one process only
        (its FSDP shard, its RNG) the others would go on as if resumed until the launcher kills them, or wait for it
        in the first collective."""
        acc = self.accelerator
        problem: ForgeError | None = None
        try:
            saved = ckpt.load_checkpoint(folder, self._unwrapped, self.optimizer, acc.process_index,
                                         acc.num_processes, data_order=self.plan.data_order())
        except ForgeError as exc:
            problem = exc
        if acc.num_processes > 1:
            failed = int(acc.reduce(torch.tensor(int(problem is not None), device=acc.device), reduction="sum"))
            if failed and problem is None:
                problem = ForgeError(f"resume_from_checkpoint: {folder}: another process could not read its part "
                                     "of the checkpoint (its error is printed above or below)")
        if problem is not None:
            raise problem
        return saved

    def _run_id(self) -> str:
        """One id for this run on every process (each FSDP process loads its shard of the best weights by it)."""
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([uuid.uuid4().hex])[0] if self.accelerator.num_processes > 1 else uuid.uuid4().hex

    def _every(self, steps: int | None, per_epoch: int | None) -> int | None:
        """Steps between evals (or saves): `per_epoch` of them per epoch, rounded up as the HF Trainer rounds
        Axolotl's fractions, never more often than asked; a run shorter than an epoch spreads them over the run."""
        if steps:
            return steps
        if per_epoch:
            return math.ceil(min(self.plan.steps_per_epoch, self.total_steps) / per_epoch)
        return None

    def accumulate_gradients(self, step: int) -> dict[str, float]:
        """Forward and backward over the window of optimizer step `step`, normalised by its trained-token count.

        Afterwards every trainable parameter's `.grad` is the gradient of the mean loss over all trained tokens of
        the window on all processes. Returns the loss and the token and FLOP counts of the window.
        """
        acc = self.accelerator
        device = acc.device
        micro_batches = self.plan.window(step)  # row indices of each micro-batch of the window
        batches = [collate([self.train_rows[i] for i in rows], self.pad_id, self._pad_to()) for rows in micro_batches]
        trained, real = sum(b.trained_tokens for b in batches), sum(b.real_tokens for b in batches)
        counts = torch.tensor([trained, real], device=device)
        total_trained, total_real = (int(v) for v in acc.reduce(counts, reduction="sum"))
        # DDP averages gradients over processes; `accelerator.backward` (DeepSpeed's engine, under DeepSpeed) divides
        # the loss by gradient_accumulation_steps, but ours is already the mean over the whole window: undo both
        scale = acc.num_processes * acc.gradient_accumulation_steps / max(1, total_trained)
        self.model.train()
        loss_sum = torch.zeros((), device=device)
        flops = 0.0
        for index, batch in enumerate(batches):
            sync = index == len(batches) - 1
            acc.sync_gradients = sync  # as `accelerate.accumulate()` sets it: DeepSpeed steps its engine only when True
            with gradient_sync(self.model, acc, sync):
                summed, head_positions = summed_token_loss(
                    self.model, batch.to(device), self._unwrapped, bool(self.config.torch_compile), self.fused_head
                )
                if self.config.gradient_checkpointing:
                    release_freed_host_memory(device)
                if not (sync and self._deepspeed) or self._finite_everywhere(loss_sum + summed.detach()):
                    acc.backward(summed * scale)  # DeepSpeed's engine steps inside the last one: never on a NaN
            loss_sum += summed.detach()
            flops += training_flops(self._unwrapped.config, self.linear_params - self.head_params, batch.seq_lens)
            flops += 6.0 * self.head_params * head_positions
        return {
            "loss": float(acc.reduce(loss_sum, reduction="sum")) / max(1, total_trained),
            "real_tokens": total_real,
            "trained_tokens": total_trained,
            "flops": float(acc.reduce(torch.tensor(flops, device=device), reduction="sum")) / acc.num_processes,
        }

    def _finite_everywhere(self, value: torch.Tensor) -> bool:
        return bool(torch.isfinite(self.accelerator.reduce(value.reshape(1), reduction="sum")).all())

    def _optimizer_step(self, step: int, state: dict[str, Any]) -> dict[str, float]:
        """Accumulate, clip, stop on a non-finite loss, decay partially-trained rows, step."""
        config = self.config
        values = self.accumulate_gradients(step)
        # the norm is measured even without clipping (an infinite limit clips nothing): a finite loss can still come
        # with non-finite gradients, and stepping on them would turn every weight into NaN
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        norm = self.accelerator.clip_grad_norm_(trainable, config.max_grad_norm or math.inf)
        # a DTensor under FSDP; None under DeepSpeed before its first measured step (or after a skipped one)
        grad_norm = None if norm is None else float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(values["loss"]) and (grad_norm is None or math.isfinite(grad_norm))
        overflow = self._loss_scaler_overflow(values["loss"], grad_norm)
        if not finite and not overflow:
            self._stop_on_nan(step, state, values["loss"], grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        if not overflow:
            for part in self.freeze.partial.values():
                part.decay_(lr, config.weight_decay)
        self.optimizer.step()  # after an fp16 overflow the loss scaler skips the update and lowers its scale
        self.scheduler.step()  # the schedule follows the step number, skipped or not
        self.optimizer.zero_grad(set_to_none=True)
        if config.gradient_checkpointing:
            release_freed_host_memory(self.accelerator.device)
        state["tokens"] += values["real_tokens"]
        state["trained_tokens"] += values["trained_tokens"]
        if overflow:  # JSON has no infinity
            return {**values, "lr": lr, "grad_norm": None, "skipped": "fp16 overflow"}
        return {**values, "lr": lr, "grad_norm": grad_norm}

    def _loss_scaler_overflow(self, loss: float, grad_norm: float | None) -> bool:
        """An fp16 step whose scaled gradients overflowed: normal while the loss scaler looks for its scale (it skips
        the update), so the run goes on; only `MAX_OVERFLOWS` in a row, where the scale has collapsed, stop it."""
        if self.mixed != "fp16" or not math.isfinite(loss) or grad_norm is None or math.isfinite(grad_norm):
            self._overflows = 0
            return False
        self._overflows += 1
        return self._overflows < MAX_OVERFLOWS

    def _pad_to(self) -> int | None:
        return self.config.sequence_len if self.config.pad_to_sequence_len else None

    def _stop_on_nan(self, step: int, state: dict[str, Any], loss: float, grad_norm: float | None) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        path = self.output_dir / f"{ckpt.PREFIX}{step}"
        if not (path / "state.json").is_file():  # an existing one holds the RNG state from before this failed step
            path = self._save_checkpoint(step, state)
        what = f"the gradient norm is {grad_norm} (loss {loss:.4f})" if math.isfinite(loss) else f"the loss is {loss}"
        advice = "Lower learning_rate" + ("" if self.config.max_grad_norm else ", set max_grad_norm")
        raise ForgeError(
            f"training stopped at step {step + 1}: {what}, not a finite number; "
            f"the last good state is saved in {path}. {advice}, or check the data"
        )

    def _evaluate(self, step: int, state: dict[str, Any]) -> bool:
        """Validation loss; returns True when early stopping says to stop."""
        from dolphin_forge.evaluate.perplexity import validation_loss

        acc = self.accelerator
        batch = self.config.eval_batch_size or self.config.micro_batch_size
        loss = validation_loss(self._unwrapped, self.val_rows, batch_size=batch)
        if acc.num_processes > 1:  # one value everywhere: the early-stop and best-weights decisions gate collectives
            loss = float(acc.reduce(torch.tensor(loss, device=acc.device), reduction="mean"))
        state["val_losses"].append([step, loss])
        self.sink.log("eval", step, {"val_loss": loss})
        if self.console and acc.is_main_process:
            self.console.print(f"step {step}: validation loss {loss:.4f}")
        best = state["best_val"]
        if best is None or loss < best:
            state["best_val"], state["bad_evals"] = loss, 0
        elif step > 0:
            state["bad_evals"] += 1
        if step > 0 and (state["best"] is None or loss < state["best"][1]):
            state["best"] = [step, loss]
            keep = self.config.keeps_best_weights and not self._deepspeed
            if keep and step < self.total_steps:  # the last step's weights are the output anyway
                trainable = self._trainable_state()  # a collective under FSDP: every process gathers
                if acc.is_main_process:
                    ckpt.save_best_weights(self.output_dir, step, loss, trainable, state["run"])
                acc.wait_for_everyone()
        patience = self.config.early_stopping_patience
        return bool(patience and state["bad_evals"] >= patience)

    def _optimizer_settings(self) -> dict[str, Any]:
        return optimizer_settings(self.config, self.total_steps)

    def _save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        acc = self.accelerator
        return ckpt.save_checkpoint(
            self.output_dir,
            step,
            trainable=self._trainable_state(),
            optimizer=None if self._deepspeed else self.optimizer,  # DeepSpeed's engine: weights only, see checkpoint
            state={**state, "optimizer_settings": self._optimizer_settings(), "data": self.plan.data_order()},
            rank=acc.process_index,
            is_main=acc.is_main_process,
            barrier=acc.wait_for_everyone,
            keep=self.config.save_total_limit,
        )

    # --- output --------------------------------------------------------------------------------------------------

    def _finish(self, step: int, stopped: str, state: dict[str, Any]) -> TrainResult:

        acc = self.accelerator
        acc.wait_for_everyone()
        model = self._unwrapped
        restore_eager_layers(model)
        keep = self.config.keeps_best_weights and (acc.is_main_process or self.fsdp)  # FSDP: each loads its shard
        weights_step = self._restore_best(step, state["best"], state["run"]) if keep else step
        state_dict = self._full_state_dict()
        summary = {
            "mode": self.mode,
            "steps": step,
            "total_steps": self.total_steps,
            "stopped": stopped,
            "epochs": step / self.plan.steps_per_epoch,
            "processes": acc.num_processes,
            "mixed_precision": self.mixed,
            "trainable_parameters": self.freeze.trainable,
            "frozen_parameters": self.freeze.frozen,
            "first_train_loss": state["train_losses"][0] if state["train_losses"] else None,
            "last_train_loss": state["train_losses"][-1] if state["train_losses"] else None,
            "val_losses": state["val_losses"],
            "best_step": state["best"][0] if state["best"] else None,
            "best_val_loss": state["best"][1] if state["best"] else None,
            "weights_from_step": weights_step,
            "tokens": state["tokens"],
            "trained_tokens": state["trained_tokens"],
            "train_seconds": state["seconds"],
            "real_tokens_per_s": state["tokens"] / state["seconds"] if state["seconds"] else None,
            "trained_tokens_per_s": state["trained_tokens"] / state["seconds"] if state["seconds"] else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "matmul_peak_flops": self.peak_flops,
        }
        if acc.is_main_process:
            out = self.output_dir
            out.mkdir(parents=True, exist_ok=True)
            self._chat_ready(model)
            restore_standard_attention(model.get_base_model() if self.config.adapter else model)
            if self.config.adapter:
                base = resolve_model_path(self.config.base_model, self.config_path)
                model.peft_config["default"].base_model_name_or_path = base
                model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)  # gathered under FSDP
                model.generation_config.save_pretrained(out)
            else:
                model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(out)
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            if self.console:
                self._print_summary(summary)
        acc.wait_for_everyone()
        return TrainResult(
            output_dir=self.output_dir,
            steps=step,
            stopped=stopped,
            train_losses=state["train_losses"],
            val_losses=[tuple(v) for v in state["val_losses"]],
            summary=summary,
        )

    def _restore_best(self, step: int, best: list | None, run: str) -> int:
        """The step whose weights go into the output: the best validation loss's when the run keeps them (looked for
        in output_dir, then beside the checkpoint this run resumed from, if that lies elsewhere)."""
        if best is None or best[0] == step:
            return step
        folders = [self.output_dir]
        if self.resumed_from is not None and self.resumed_from.parent.resolve() != self.output_dir.resolve():
            folders.append(self.resumed_from.parent)
        if self.fsdp:
            reshard(self.model)
        why = "under DeepSpeed they are not kept yet" if self._deepspeed else f"no {ckpt.BEST}/ holds them"
        if not self._deepspeed:
            try:
                if ckpt.load_best_weights(folders, self._unwrapped, best[0], run):
                    return best[0]
            except ForgeError as exc:  # the run's own weights are still good: write them rather than nothing
                why = str(exc)
        if self.console and self.accelerator.is_main_process:
            self._warn(
                f"load_best_model_at_end: the best validation loss was at step {best[0]} but {why}; "
                f"the output holds the weights of step {step}"
            )
        return step

    # --- printing ------------------------------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(text)}", highlight=False)

    def _print_setup(self, resume: Path | None) -> None:
        from rich.table import Table

        table = Table(title=f"parameters ({self.mode} fine-tune)")
        table.add_column("parameter")
        table.add_column("trainable", justify="right")
        table.add_column("frozen", justify="right")
        for row in self.freeze.rows:
            table.add_row(row["parameter"], f"{row['trainable']:,}", f"{row['frozen']:,}")
        table.add_row("[bold]total", f"[bold]{self.freeze.trainable:,}", f"[bold]{self.freeze.frozen:,}")
        self.console.print(table)
        if self.config.fsdp and not self.fsdp:
            self._warn(
                "fsdp: a single process has nothing to shard, so this run trains unsharded; "
                "launch it with `torchrun --nproc_per_node N` to shard it"
            )
        for pattern in self.freeze.unmatched:
            self._warn(f"unfrozen_parameters: {pattern!r} matches no parameter")
        if self.config.warmup_steps and self.config.warmup_steps >= self.total_steps:
            self._warn(self._short_run_warmup())
        processes = f"{self.accelerator.num_processes} process(es)" + (" sharded by FSDP" if self.fsdp else "")
        self.console.print(
            f"{len(self.train_rows)} training rows, {self.plan.steps_per_epoch} steps per epoch, "
            f"{self.total_steps} steps, {processes}, precision: "
            f"{self.mixed if self.mixed != 'no' else 'float32'}"
            f"{'' if self.mixed == 'no' else ' (FSDP mixed precision)' if self.fsdp else ' autocast'}"
        )
        if self.config.torch_compile:
            self.console.print("torch_compile: decoder layers compiled by inductor; the first step includes compiling")
        if self.config.gradient_checkpointing_layers is not None:
            total = len(decoder_layers(self._unwrapped))
            self.console.print(f"gradient checkpointing: the first {self.config.gradient_checkpointing_layers} of "
                               f"{total} decoder layers recompute in the backward, the others keep their activations")

    def _short_run_warmup(self) -> str:
        """A warmup longer than the run (a short test run of a long config, or max_steps lowered) is legal but means
        the schedule never reaches learning_rate; nothing else in the output would show it."""
        peak = lr_factor(self.total_steps - 1, schedule=self.config.lr_scheduler, warmup=self.config.warmup_steps,
                         total=self.total_steps)
        return (
            f"warmup_steps: {self.config.warmup_steps} warmup steps in a run of {self.total_steps}: the learning rate "
            f"only reaches {peak:.0%} of learning_rate and never decays; lower warmup_steps or use warmup_ratio"
        )

    def _chat_ready(self, model: Any) -> None:
        """Generation stops at `<|im_end|>`; the base's sampling defaults are kept; `use_cache` (off for training)
        is back on and config.json names the tokenizer's eos, so plain transformers generates as the tokenizer says."""
        from transformers import GenerationConfig

        base = getattr(model, "generation_config", None)
        generation = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
        generation.eos_token_id = self.tokenizer.convert_tokens_to_ids(IM_END)
        generation.pad_token_id = self.pad_id
        if self.config.adapter:
            generation.bos_token_id = None
        model.generation_config = generation
        config = (model.get_base_model() if self.config.adapter else model).config
        config.use_cache = True
        if self.tokenizer.eos_token_id is not None:
            config.eos_token_id = self.tokenizer.eos_token_id

    def _print_summary(self, summary: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="training summary")
        table.add_column("")
        table.add_column("value", justify="right")
        for key in ("steps", "stopped", "first_train_loss", "last_train_loss", "tokens", "trained_tokens",
                    "real_tokens_per_s", "trained_tokens_per_s", "peak_rss_mb"):
            value = summary[key]
            table.add_row(key, f"{value:,.4f}" if isinstance(value, float) else str(value))
        for step, loss in summary["val_losses"]:
            table.add_row(f"val_loss @ step {step}", f"{loss:.4f}")
        if summary["weights_from_step"] != summary["steps"]:
            table.add_row("weights from step (best val_loss)", str(summary["weights_from_step"]))
        self.console.print(table)
        first, best = (summary["val_losses"] or [[None, None]])[0], summary["best_val_loss"]
        if first[0] == 0 and best is not None and first[1] <= best:
            self._warn(f"validation loss never went below the base model's ({first[1]:.4f} at step 0)")
        if self.config.adapter:
            self.console.print(f"LoRA adapter written to {self.output_dir} (merge it: `dolphin-forge merge-lora "
                               f"{self.output_dir} OUT`)")
        else:
            self.console.print(f"model written to {self.output_dir}")


def check_early_stopping(config: ForgeConfig, val_rows: Any) -> None:
    """Early stopping and best weights without validation losses during the run would do nothing: say so instead."""
    for key in ("load_best_model_at_end", "early_stopping_patience"):
        if not getattr(config, key):
            continue
        if val_rows is None or len(val_rows) == 0:
            raise ForgeError(f"{key}: needs a validation split; set val_set_size > 0 or drop the key")
        if not (config.eval_steps or config.evals_per_epoch):
            raise ForgeError(f"{key}: needs evaluations during the run; set eval_steps or evals_per_epoch")


def train(
    config: ForgeConfig,
    config_path: Path | None = None,
    *,
    train_rows: Any = None,
    val_rows: Any = None,
    progress: bool = False,
    console: Any = None,
) -> TrainResult:
    """Fine-tune as `config` says; rows default to `preprocess(config)` (pass them to train on rows built in code)."""
    recipe = SFTRecipe(config, config_path, console)
    recipe.setup(train_rows, val_rows)
    return recipe.run(progress=progress)
