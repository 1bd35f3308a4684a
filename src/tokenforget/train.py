"""Train: the token-class collator and `ForgettingTrainer`, a `transformers.Trainer` subclass.

The Trainer brings checkpoints, resume, logging and DDP/FSDP/DeepSpeed through accelerate; this module
adds only the per-token class tensor and the objective. One code path trains all three modes:
`forget` (the paper), `ignore` (positives only) and `sft` (every response token).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments

from tokenforget.config import TrainingConfig
from tokenforget.losses import FORGET, LEARN, USES_LAMBDA, TokenCounts, get_objective, get_schedule, token_cross_entropy


@dataclass
class TokenClassCollator:
    """Right-pads `input_ids` and `token_class`; padding gets class 0 (no loss).

    Output: input_ids (B, T) long, attention_mask (B, T) long, token_class (B, T) long.
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
        return {"input_ids": ids, "attention_mask": mask, "token_class": cls}


class ForgettingTrainer(Trainer):
    """A Trainer whose loss is a tokenforget objective over per-token classes.

    The means of the objective are over the whole optimizer batch: `get_batch_samples` counts positive
    and negative tokens over every micro-batch of the accumulation step (and over every rank), and
    `compute_loss` divides each micro-batch's sums by those counts. The micro-batch losses then add up
    to the batch loss, so the Trainer must not divide by the accumulation steps again.
    """

    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        objective: str = "forget",
        lambda_schedule: str = "linear",
        t_min: float = 0.0,
        t_max: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.objective_name = objective
        self.objective = get_objective(objective)
        self.schedule = get_schedule(lambda_schedule)
        self.t_min, self.t_max = t_min, t_max
        self._sums = torch.zeros(4, dtype=torch.float64)  # pos loss sum, neg loss sum, n_pos, n_neg
        self._last_lambda = 0.0  # lambda of the last training micro-batch, for logging

    def current_lambda(self) -> float:
        """lambda(t) at the current optimizer step t of T = max_steps."""
        return self.schedule(self.state.global_step, self.state.max_steps, self.t_min, self.t_max)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        for batch in batch_samples:
            cls = batch["token_class"]
            counts += torch.stack([(cls == LEARN).sum(), (cls == FORGET).sum()]).to(device, torch.float64)
        if self.args.world_size > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)  # (world, 2) -> (2,)
        return batch_samples, counts

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ) -> Any:
        token_class = inputs["token_class"]  # (B, T)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        token_loss = token_cross_entropy(outputs.logits, inputs["input_ids"])  # (B, T) fp32
        counts = TokenCounts(*num_items_in_batch.tolist()) if torch.is_tensor(num_items_in_batch) else None
        lam = self.current_lambda()
        parts = self.objective(token_loss, token_class, lam, counts)
        if model.training:
            self._last_lambda = lam
            self._track(parts.pos_sum, parts.neg_sum, token_class)
        # DDP averages gradients over ranks; our sums are already divided by the all-rank counts.
        loss = parts.loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _track(self, pos_sum: torch.Tensor, neg_sum: torch.Tensor, token_class: torch.Tensor) -> None:
        n_pos, n_neg = (token_class == LEARN).sum(), (token_class == FORGET).sum()
        self._sums += torch.stack([pos_sum, neg_sum, n_pos, n_neg]).detach().cpu().double()

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._sums[2] + self._sums[3] > 0:
            pos, neg, n_pos, n_neg = self._sums.tolist()
            logs["loss_pos"] = pos / max(n_pos, 1.0)
            logs["loss_neg"] = neg / max(n_neg, 1.0) if n_neg else float("nan")
            if self.objective_name in USES_LAMBDA:
                logs["lambda"] = self._last_lambda
            logs["n_pos"], logs["n_neg"] = int(n_pos), int(n_neg)
            self._sums.zero_()
        super().log(logs, start_time)


def training_arguments(
    cfg: TrainingConfig,
    output_dir: Path,
    seed: int,
    bf16: bool,
    report_to: Sequence[str] = ("none",),
    **overrides: Any,
) -> TrainingArguments:
    """TrainingArguments for one training; bf16 means autocast (weights stay fp32).

    `report_to` names the Trainer's logging integrations (`tensorboard`, ...); see `send_tensorboard_to`.
    """
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
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
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to=list(report_to),
        remove_unused_columns=False,  # keep `token_class`, which the model's forward does not take
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def make_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Any,
    args: TrainingArguments,
    objective: str = "forget",
    lambda_schedule: str = "linear",
    t_min: float = 0.0,
    t_max: float = 0.25,
    log_dir: Optional[Path] = None,
) -> ForgettingTrainer:
    """A ForgettingTrainer over a data set with `input_ids` and `token_class` columns.

    `log_dir`: where TensorBoard events go when `args.report_to` includes `tensorboard`.
    """
    trainer = ForgettingTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=TokenClassCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        objective=objective,
        lambda_schedule=lambda_schedule,
        t_min=t_min,
        t_max=t_max,
    )
    if log_dir is not None:
        send_tensorboard_to(trainer, log_dir)
    return trainer


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


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out: Path, merged: bool) -> None:
    """Save the LoRA adapter to `out/adapter` and, if asked, the merged model to `out/model`.

    A full fine-tune (no adapter) is saved to `out/model` only.
    """
    is_peft = hasattr(model, "merge_and_unload")
    if is_peft:
        model.save_pretrained(out / "adapter")
    if merged or not is_peft:
        full = model.merge_and_unload() if is_peft else model
        full.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
