"""The Trainer: the token-class collators and `ForgettingTrainer`, a `transformers.Trainer` subclass.

The Trainer brings checkpoints, resume, logging and DDP/FSDP/DeepSpeed through accelerate; this module
adds only the per-token class tensor and the objective. One code path trains every mode of `objectives.OBJECTIVES`:
`forget` (the paper), `ignore` (positives only), `sft` (every response token) and `dft`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from tokenforget.errors import UserError
from tokenforget.config.training import ObjectiveConfig, TrainingConfig
from tokenforget.model.head_ce import token_cross_entropy
from tokenforget.model.model_ce import ce_path, model_token_ce
from tokenforget.training.objectives import (
    FORGET, LEARN, OBJECTIVES, TokenCounts, check_objective, get_schedule, needs_base_ce,
)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; training stopped with the last good checkpoint kept."""


# Optional per-token float columns that travel with `token_class` to the objective (padding gets 0):
# `token_weight`, the |weight| of soft token selection; `ce_base`, the base model's CE from the scores stage
# (for `tnpo`, which compares the model's probability of a token with the base model's).
EXTRA_COLUMNS = ("token_weight", "ce_base")


@dataclass
class TokenClassCollator:
    """Right-pads `input_ids` and `token_class`; padding gets class 0 (no loss).

    Output: input_ids (B, T) long, attention_mask (B, T) long, token_class (B, T) long, and each of
    `EXTRA_COLUMNS` the features carry as (B, T) float32.
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        cls = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            cls[row, :n] = torch.as_tensor(f["token_class"], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "token_class": cls}
        for name in (c for c in EXTRA_COLUMNS if c in features[0]):
            batch[name] = torch.zeros((len(features), width), dtype=torch.float32)
            for row, f in enumerate(features):
                batch[name][row, : len(f[name])] = torch.as_tensor(f[name], dtype=torch.float32)
        return batch


@dataclass
class PackedTokenClassCollator:
    """Padding-free batches: all examples of a batch in one row, no padding at all.

    `position_ids` restart at 0 for each example; transformers turns them into a block-causal mask, so
    attention never crosses examples. Classes are concatenated alongside, so each stays on its token;
    an example's first token must have class 0 (it has no prediction), so no loss crosses a boundary.

    Output: input_ids (1, N), position_ids (1, N), token_class (1, N), N = total tokens of the batch, and
    each of `EXTRA_COLUMNS` the features carry as (1, N) float32.
    """

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if any(f["token_class"][0] != 0 for f in features):
            raise ValueError("packing needs class 0 on every example's first token")
        ids = torch.cat([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        cls = torch.cat([torch.as_tensor(f["token_class"], dtype=torch.long) for f in features])
        pos = torch.cat([torch.arange(len(f["input_ids"])) for f in features])
        batch = {"input_ids": ids[None], "position_ids": pos[None], "token_class": cls[None]}
        for name in (c for c in EXTRA_COLUMNS if c in features[0]):
            batch[name] = torch.cat([torch.as_tensor(f[name], dtype=torch.float32) for f in features])[None]
        return batch


class ForgettingMixin:
    """The forgetting objective for any `transformers.Trainer` subclass (ours, TRL's `SFTTrainer`, ...).

    Put it first among the bases: `class T(ForgettingMixin, SomeTrainer)`. It owns the lambda schedule, the
    optimizer-batch token counts, the objective and its logging; the subclass's `compute_loss` only turns
    its forward pass into a (B, T) per-token loss and calls `objective_loss`.

    The means of the objective are over the whole optimizer batch: `get_batch_samples` counts positive
    and negative tokens over every micro-batch of the accumulation step (and over every rank), and
    `objective_loss` divides each micro-batch's sums by those counts. The micro-batch losses then add up
    to the batch loss, so the Trainer must not divide by the accumulation steps again.
    """

    loss_is_scaled_for_ga = True  # transformers >= 5.19: `training_step` then uses the loss as it is
    state: Any
    args: Any
    accelerator: Any
    _signature_columns: Optional[list[str]]

    def init_forgetting(self, objective: ObjectiveConfig) -> None:
        """Set the objective and schedule (see `ObjectiveConfig`); call before the Trainer's own `__init__`."""
        self.objective_name, self.forget_term = objective.mode, objective.forget_term
        check_objective(objective, "train.objective")  # unknown names fail here, not at step 1
        self.objective = OBJECTIVES[objective.mode].bound(objective)  # its settings bound: batch tensors only after
        self.needs_base_ce = needs_base_ce(objective)
        self.schedule = get_schedule(objective.schedule, warmup=objective.warmup)
        self.t_min, self.t_max = objective.t_min, objective.t_max
        self._sums = torch.zeros(4, dtype=torch.float64)  # pos loss sum, neg loss sum, n_pos, n_neg
        self._last_lambda = 0.0  # lambda of the last training micro-batch, for logging

    def current_lambda(self) -> float:
        """lambda(t) at the current optimizer step t of T = max_steps."""
        return self.schedule(self.state.global_step, self.state.max_steps, self.t_min, self.t_max)

    def _set_signature_columns_if_needed(self) -> None:
        """Keep `token_class` (and `EXTRA_COLUMNS`) even with `remove_unused_columns=True` (no forward arguments)."""
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        if self._signature_columns is not None:
            missing = [c for c in ("token_class", *EXTRA_COLUMNS) if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *missing]

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)  # type: ignore[misc]
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batch_samples:
            cls = batch["token_class"]
            counts += torch.stack([(cls == LEARN).sum(), (cls == FORGET).sum()]).to(device, torch.float64)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)  # (world, 2) -> (2,)
        return batch_samples, counts

    def objective_loss(
        self,
        token_loss: torch.Tensor,
        token_class: torch.Tensor,
        num_items_in_batch: Any,
        training: bool,
        extras: Optional[dict[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The objective over one micro-batch, scaled so micro-batches and ranks add up to the batch mean.

        Args:
            token_loss: (B, T) per-token CE, entry t = -log p(token t | tokens < t), entry 0 = 0.
            token_class: (B, T) +1 learn / -1 forget / 0 no loss.
            num_items_in_batch: the (2,) optimizer-batch counts from `get_batch_samples`, or None (evaluation:
                this batch's own counts).
            extras: the batch's `EXTRA_COLUMNS` present, (B, T) each: `token_weight` -> the objective's
                `weight`, `ce_base` -> `ce_base` (read by `tnpo` only).

        Raises:
            NonFiniteLossError: the loss is NaN or infinite (training stops; the last checkpoint is kept).
        """
        counts = TokenCounts(*num_items_in_batch.tolist()) if torch.is_tensor(num_items_in_batch) else None
        lam = self.current_lambda()
        extras = dict(extras or {})
        if not self.needs_base_ce:
            extras.pop("ce_base", None)  # a labels file carries it for every mode; only `tnpo` reads it
        elif "ce_base" not in extras:
            if training:
                raise UserError(f"train.objective.forget_term: '{self.forget_term}' needs the base "
                                "model's per-token CE in the batch (a `ce_base` column); the training set has none")
            extras["ce_base"] = token_loss.detach()  # an eval set has no negative tokens; any value will do
        parts = self.objective(token_loss, token_class, lam, counts, **_objective_extras(extras))
        if not torch.isfinite(parts.loss):
            self._stop_non_finite(parts.loss)
        if training:
            self._last_lambda = lam
            self._track(parts.pos_sum, parts.neg_sum, token_class)
        # DDP averages gradients over ranks; our sums are already divided by the all-rank counts.
        return parts.loss * self.accelerator.num_processes

    def _stop_non_finite(self, loss: torch.Tensor) -> None:
        step = self.state.global_step + 1
        ckpt = last_checkpoint(Path(self.args.output_dir))
        kept = f"last good checkpoint kept at {ckpt}" if ckpt else "no checkpoint was saved before it"
        raise NonFiniteLossError(f"training loss became {loss.item()} at optimizer step {step}; stopped, {kept}")

    def _track(self, pos_sum: torch.Tensor, neg_sum: torch.Tensor, token_class: torch.Tensor) -> None:
        n_pos, n_neg = (token_class == LEARN).sum(), (token_class == FORGET).sum()
        self._sums += torch.stack([pos_sum, neg_sum, n_pos, n_neg]).detach().cpu().double()

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._sums[2] + self._sums[3] > 0:
            pos, neg, n_pos, n_neg = self._sums.tolist()
            logs["loss_pos"] = pos / max(n_pos, 1.0)
            logs["loss_neg"] = neg / max(n_neg, 1.0) if n_neg else float("nan")
            if OBJECTIVES[self.objective_name].uses_lambda:
                logs["lambda"] = self._last_lambda
            logs["n_pos"], logs["n_neg"] = int(n_pos), int(n_neg)
            self._sums.zero_()
        super().log(logs, start_time)  # type: ignore[misc]


def _objective_extras(extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Batch columns -> the objective's keyword arguments (`token_weight` is its `weight`)."""
    names = {"token_weight": "weight", "ce_base": "ce_base"}
    return {names[k]: v for k, v in extras.items() if k in names}


class ForgettingTrainer(ForgettingMixin, Trainer):
    """A Trainer whose loss is a tokenforget objective over per-token classes (see `ForgettingMixin`).

    Batches carry `input_ids`, `attention_mask` and `token_class` (see `TokenClassCollator`). The per-token
    CE comes from `model_token_ce` (loss positions only; no full logits where `model_ce.ce_path` allows),
    or, with `chunked_ce=False`, from the model's full logits.
    """

    def __init__(
        self,
        *args: Any,
        objective: ObjectiveConfig = ObjectiveConfig(),
        chunked_ce: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        self.init_forgetting(objective)
        super().__init__(*args, **kwargs)
        # Per-token CE at loss positions only, exact for every model (`model_ce.ce_path` says how); decided
        # here, before accelerate wraps or shards the model, so the probe forward runs on the plain model.
        self.chunked_ce = chunked_ce is not False
        if self.chunked_ce:
            ce_path(self.model)
        if self.args.label_names is None:
            self.label_names = ["token_class"]  # the batch's "labels": evaluation computes a loss only if present

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ) -> Any:
        token_class = inputs["token_class"]  # (B, T)
        ids = inputs["input_ids"]
        extra = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}  # padded or packed
        outputs = None
        if self.chunked_ce and not return_outputs:
            token_loss = model_token_ce(model, ids, token_class != 0, **extra)  # (B, T) fp32, loss positions only
        else:
            outputs = model(input_ids=ids, use_cache=False, **extra)
            token_loss = token_cross_entropy(outputs.logits, ids)  # (B, T) fp32
        extras = {k: inputs[k] for k in EXTRA_COLUMNS if k in inputs}  # (B, T) each
        loss = self.objective_loss(token_loss, token_class, num_items_in_batch, model.training, extras)
        return (loss, outputs) if return_outputs else loss


def training_arguments(
    cfg: TrainingConfig,
    output_dir: Path,
    seed: int,
    bf16: bool,
    report_to: Sequence[str] = ("none",),
    **overrides: Any,
) -> TrainingArguments:
    """TrainingArguments for one training; bf16 means autocast (over fp32 weights, or bf16 ones with
    `model.weights: bf16`); `fp16=True` in `overrides` is fp16 autocast with loss scaling (CUDA only).

    Precedence, lowest first: our defaults and typed fields (with `report_to`, the Trainer's logging
    integrations such as `tensorboard`, see `send_tensorboard_to`), then `cfg.training_args` (any
    TrainingArguments field, passed through unchanged), then `overrides` from the calling code.
    """
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a share of the steps in transformers 5
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        gradient_checkpointing=cfg.gradient_checkpointing,
        # non-reentrant: works with frozen embeddings (LoRA) without forcing input gradients
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to=list(report_to),
        remove_unused_columns=False,  # keep `token_class`, which the model's forward does not take
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    kwargs.update(cfg.training_args)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Any,
    args: TrainingArguments,
    objective: ObjectiveConfig = ObjectiveConfig(),
    packing: bool = False,
    eval_dataset: Any = None,
    log_dir: Optional[Path] = None,
) -> ForgettingTrainer:
    """A ForgettingTrainer over data sets with `input_ids` and `token_class` columns (padded or packed batches),
    and optionally `token_weight` and `ce_base` (see `EXTRA_COLUMNS`).

    `log_dir`: where TensorBoard events go when `args.report_to` includes `tensorboard`.
    """
    collator = PackedTokenClassCollator() if packing else TokenClassCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = ForgettingTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        objective=objective,
    )
    if log_dir is not None:
        send_tensorboard_to(trainer, log_dir)
    if trainer.pop_callback(ProgressCallback) is not None:  # the bar stays, the raw log dicts go (log_history.json)
        trainer.add_callback(BarOnlyProgress)
    return trainer


class BarOnlyProgress(ProgressCallback):
    """transformers' progress bar without the log dicts it writes under it (`{'loss': ...}` every `logging_steps`):
    the console shows one bar a training; the numbers stay in `log_history.json` and TensorBoard."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None


def send_tensorboard_to(trainer: Trainer, log_dir: Path) -> None:
    """Point the Trainer's own TensorBoard callback (added by `report_to`) at `log_dir`.

    transformers 5 has no `logging_dir` argument: the callback writes under `output_dir`, which for us
    is a work folder deleted when training ends. The callback reads `logging_dir` at train begin, and
    logs every number in the logs dict, so loss_pos, loss_neg, lambda, n_pos, n_neg reach TensorBoard.
    """
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(log_dir)


def last_checkpoint(output_dir: Path) -> Optional[str]:
    """The newest `checkpoint-N` folder under `output_dir`, or None."""
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(ckpts[-1]) if ckpts else None
