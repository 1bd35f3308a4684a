"""How models are trained: `training` (the Trainer's settings, in `reference` and `train`), `reference`, and
`train` with its `objective` (the loss over the partitioned tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

from tokenforget.errors import _check, _check_pass_through

ReferenceKind = Literal["slice", "trusted", "checkpoint"]


@dataclass
class TrainingConfig:
    """Optimisation settings shared by the reference and the final training (paper defaults)."""

    learning_rate: float = 1e-4
    epochs: float = 1.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run `epochs`)."""
    batch_size: int = 8
    """Micro-batch size per device."""
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    save_steps: int = 500
    """Checkpoint every N optimizer steps (resume picks up the last one)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant): less memory, about a third more time."""
    training_args: dict[str, Any] = field(default_factory=dict)
    """Any other `transformers.TrainingArguments` field, passed through unchanged and applied last, e.g.
    `{report_to: tensorboard, eval_strategy: steps, eval_steps: 50, load_best_model_at_end: true}`."""
    packing: bool = False
    """Padding-free batches: a batch's examples in one row, attention kept within each (position_ids)."""

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.grad_accum > 0, "grad_accum", f"must be > 0, got {self.grad_accum}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.epochs > 0 or self.max_steps > 0, "epochs", "epochs or max_steps must be > 0")
        if self.training_args:
            import dataclasses

            from transformers import TrainingArguments

            allowed = {f.name for f in dataclasses.fields(TrainingArguments)}
            _check_pass_through(self.training_args, allowed, TRAINING_ARGS_OWNED, "training_args", "TrainingArguments")


# TrainingArguments fields that a typed field of ours sets; `training_args` may not set them again.
TRAINING_ARGS_OWNED = {
    "output_dir": "run_dir", "seed": "seed", "data_seed": "seed",
    "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "learning_rate", "num_train_epochs": "epochs", "max_steps": "max_steps",
    "warmup_steps": "warmup_ratio", "lr_scheduler_type": "lr_scheduler", "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm", "logging_steps": "logging_steps", "save_steps": "save_steps",
    "gradient_checkpointing": "gradient_checkpointing", "bf16": "model.precision", "fp16": "model.precision",
}


@dataclass
class ReferenceConfig:
    """The reference model: LoRA SFT of the base model on a subset of the training data."""

    fraction: float = 0.2
    """Seeded random share of the training examples (used when `size` and `path` are unset)."""
    size: Optional[int] = None
    """Exact number of training examples instead of `fraction`."""
    path: Optional[str] = None
    """A trusted data file (same format as `data`) to train the reference on instead of a slice of the data.
    It must be disjoint from the scored data: an example whose prompt is also in `data.path` is refused."""
    checkpoint: Optional[str] = None
    """An existing model as the reference, no reference training: a LoRA adapter folder of this base model,
    a full model folder (`config.json`), or a stage folder of a run (`reference/`, `train-<mode>/`)."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    folds: int = 1
    """Cross-fitting: with K > 1 the examples are dealt into K seeded folds and K references are trained,
    reference k on `size` (or `fraction` x all) examples drawn from the other K - 1 folds (all of them when
    fewer); every example is scored by the reference of its own fold, which never saw it. K times the
    reference cost; use it when the reference would otherwise memorise the examples it scores."""
    rounds: int = 1
    """Self-evolving references (token-cleaning style): with R > 1, round r >= 2 trains a new reference from
    the base on the same subset with `ignore` on round r - 1's positive tokens, then scores and partitions
    again; training uses the last round's partition. Stages `reference-round<r>`, `scores-round<r>`,
    `partition-round<r>`. Use it when the first reference learned the noise it should detect."""
    noisy_folds: int = 0
    """A second, noisy reference for the two-reference scores (`score.method: contrastive`): with K >= 2, K
    references cross-fitted on the training data itself (as `folds`: each example's CE_noisy from the one that did
    not see it, trained on `noisy_fraction` x all examples drawn from the other folds), stage `reference-noisy/`;
    the scoring pass stores their CE as `ce_noisy` beside the first reference's `ce_ref` (the trusted one: set
    `path`). 0: none."""
    noisy_fraction: float = 1.0
    """`noisy_folds` only: the share of all examples each noisy reference trains on (all of the other folds at most)."""
    disjoint_from: Literal["all", "wrong"] = "all"
    """`path` only: what the trusted set may share no prompt with. `all`: every scored example (a reference that saw
    one finds it easy by memory). `wrong`: the answers known wrong only, for the verdict selections (`verified_*`),
    which read no other answer's scores: a reference trained on the file's own answers graded right."""

    def __post_init__(self) -> None:
        _check(0.0 < self.fraction <= 1.0, "reference.fraction", f"must be in (0, 1], got {self.fraction}")
        _check(self.size is None or self.size > 0, "reference.size", f"must be > 0, got {self.size}")
        _check(self.folds >= 1, "reference.folds", f"must be >= 1, got {self.folds}")
        _check(self.rounds >= 1, "reference.rounds", f"must be >= 1, got {self.rounds}")
        _check(self.noisy_folds == 0 or self.noisy_folds >= 2, "reference.noisy_folds",
               f"0 (none) or >= 2 cross-fitted noisy references, got {self.noisy_folds}")
        _check(0.0 < self.noisy_fraction <= 1.0, "reference.noisy_fraction", f"must be in (0, 1], got {self.noisy_fraction}")
        _check(self.folds == 1 or self.rounds == 1, "reference.rounds", "cross-fitting (folds > 1) and rounds > 1 "
               "do not combine; choose one")
        _check(self.path is None or (self.folds == 1 and self.rounds == 1), "reference.path",
               "folds and rounds draw the reference's examples from the training data; unset path")
        _check(not (self.path and self.checkpoint), "reference.checkpoint", "set either reference.path or reference.checkpoint")
        _check(self.checkpoint is None or (self.folds == 1 and self.rounds == 1), "reference.checkpoint",
               "folds and rounds train their own references; unset checkpoint")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training objective, in one frozen value (`train.objective` in a run's config; what a `ForgettingTrainer`
    or TRL's `ForgettingSFTTrainer` computes its loss with). Its numbers are checked here; its names are checked
    against the registries that declare them (`objectives.check_objective`, when a run or a trainer starts).

    The loss is `objectives.OBJECTIVES[mode]`; for `forget`, the negative tokens' term is
    `objectives.FORGET_TERMS[forget_term]` weighted by lambda(t) = `objectives.SCHEDULES[schedule]` from t_min to
    t_max over the optimizer steps.
    """

    mode: str = "forget"
    """A name of `objectives.OBJECTIVES`: `forget` (the paper), `sft` (every response token), `ignore` (positive
    tokens only) or `dft` (every response token, its CE scaled by the model's detached probability of it: Dynamic
    Fine-Tuning, arXiv 2508.05629)."""
    forget_term: str = "ga"
    """What `forget` does to negative tokens (`tokenforget.training.objectives.FORGET_TERMS`): `ga`, gradient ascent on
    their CE (the paper, unbounded); `unlikelihood`, -log(1 - p); `wga`, gradient ascent weighted by p^beta;
    `tnpo`, token-wise NPO, weighted by 2 p^beta / (p^beta + p_base^beta). The last three are bounded."""
    beta: float = 1.0
    """Temperature of `wga` and `tnpo`: larger beta stops pushing a token sooner once it is unlikely."""
    schedule: str = "linear"
    """How lambda moves over optimizer steps: `linear` (the paper), `constant`, `cosine`, `warmup_constant`;
    see `tokenforget.training.objectives.SCHEDULES`."""
    t_min: float = 0.0
    t_max: float = 0.25
    warmup: float = 0.1
    """`warmup_constant` only: share of the optimizer steps over which lambda rises from t_min to t_max."""

    def __post_init__(self) -> None:
        where = "train.objective"
        _check(self.t_min >= 0 and self.t_max >= 0, f"{where}.t_max", "lambda bounds must be >= 0")
        _check(0.0 < self.warmup <= 1.0, f"{where}.warmup", f"must be in (0, 1], got {self.warmup}")
        _check(self.beta > 0, f"{where}.beta", f"must be > 0, got {self.beta}")


# The objective's knobs sat flat in `train` before issue 29 (CHANGELOG): old name -> the field of `train.objective`.
# `from_dict` reads old run records through it, the CLI names the new key, fingerprints keep the old names.
FLAT_OBJECTIVE = {"mode": "mode", "forget_objective": "forget_term", "beta": "beta", "lambda_schedule": "schedule",
                  "t_min": "t_min", "t_max": "t_max", "lambda_warmup": "warmup"}


@dataclass
class TrainConfig:
    """The final training from the base model."""

    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The objective (`mode`, the forgetting term, lambda's schedule): `tokenforget.config.ObjectiveConfig`."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save_merged: bool = True
    """Also save the LoRA-merged model, loadable with `AutoModelForCausalLM.from_pretrained`."""
    labels_path: Optional[str] = None
    """Train on a token-label file that tokenforget exported (`run_dir/labels/labels.parquet`, or its folder):
    no data, reference, score or partition stage runs; `data` is not read."""
    trusted_path: Optional[str] = None
    """A file of trusted answers (same format as `data`) learned whole in the final training beside the data: every
    response token a learn token, never scored nor partitioned. What a user who has a clean set besides the noisy one
    trains on; with the trusted reference's file (`reference.path`) the fair grid's `*_plus_trusted` settings. Each
    mode reads it, `sft` too (`sft` on data + this file is the baseline for such a run)."""
    eval_path: Optional[str] = None
    """A held-out file (same format as `data`) for evaluation during training; set `eval_strategy` in
    `training.training_args`. All its response tokens count as learn tokens, so `eval_loss` is the held-out
    response NLL whatever the mode."""
    eval_split: str = "test"
    """Split of `eval_path` when it is a Hub data set."""
    seed: Optional[int] = None
    """The final training's seed (LoRA init, data order, dropout); None: the run's `seed`. A second source of
    randomness apart from the data's and the reference's (the run's `seed`): training seeds over the same data."""

    def objective_for(self, mode: Optional[str] = None) -> ObjectiveConfig:
        """The objective of a training of `mode` (default `objective.mode`): the other knobs as configured."""
        return self.objective if mode is None else replace(self.objective, mode=mode)  # type: ignore[arg-type]
