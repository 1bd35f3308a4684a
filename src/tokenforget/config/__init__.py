"""Typed run configuration, validated once at the edge.

Every stage reads only the dataclass it needs. jsonargparse turns `RunConfig` into a YAML schema with
command-line overrides (`--partition.rho 0.5`), so nothing here parses text by hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

# Each section lives in a module of its own (`tokenforget.config.<room>`); all are importable from here as before.
from tokenforget.config.data import RECURRING_SENTENCE, DataConfig, DataFormat, NoiseKind  # noqa: F401
from tokenforget.config.evaluation import EvalConfig
from tokenforget.config.measure import (  # noqa: F401
    VARIANT_FIXED, VARIANT_SECTIONS, AuditConfig, AuditMeasure, CompareConfig, DetectConfig,
)
from tokenforget.config.model import PEFT_OWNED, AttnImplementation, LoraSettings, ModelConfig, Precision, WeightsDtype  # noqa: F401
from tokenforget.config.tokens import FalsePositives, PartitionConfig, ScoreConfig  # noqa: F401
from tokenforget.config.training import (  # noqa: F401
    FLAT_OBJECTIVE, TRAINING_ARGS_OWNED, ObjectiveConfig, ReferenceConfig, ReferenceKind, TrainConfig, TrainingConfig,
)
from tokenforget.errors import ConfigError, UserError, _check, _check_pass_through  # noqa: F401


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
        # without a clean file both references learn the noise, and their difference finds nothing
        _check(self.score.method not in NEEDS_NOISY or bool(self.reference.path or self.reference.checkpoint),
               "reference.path", f"'{self.score.method}' holds the noisy references against a trusted one: set "
               "reference.path to a clean file (or reference.checkpoint)")
        _check(self.reference.disjoint_from == "all" or self.partition.selection.startswith("verified_"),
               "reference.disjoint_from", "'wrong' is for the verified selections, which read only the answers known "
               f"wrong; partition.selection '{self.partition.selection}' reads every answer's scores")


def to_dict(cfg: object) -> dict:
    """A plain, JSON-serialisable view of a config dataclass (for fingerprints and run records)."""
    return asdict(cfg)  # type: ignore[arg-type]


T = TypeVar("T")


def nest_objective(values: dict[str, Any]) -> dict[str, Any]:
    """Train fields (or a compare variant's overrides) as written before `train.objective`: the objective's knobs
    (`FLAT_OBJECTIVE`'s old names) moved into `objective`, under their new names; other keys as they are."""
    flat = {new: values[old] for old, new in FLAT_OBJECTIVE.items() if old in values}
    if not flat:
        return values
    rest = {k: v for k, v in values.items() if k not in FLAT_OBJECTIVE}
    return {**rest, "objective": {**rest.get("objective", {}), **flat}}


def from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """Rebuild a config dataclass from `to_dict` output (e.g. a run folder's `config.json`).

    Nested dataclass fields are rebuilt recursively; keys the dataclass does not have are ignored, so a
    `config.json` written by an older or newer version still loads.
    """
    if cls is TrainConfig and "objective" not in values:  # a record from before `train.objective`
        values = nest_objective(values)
    if cls is CompareConfig and "variants" in values:  # its variants may set the objective's knobs flat, as before
        values = {**values, "variants": {k: nest_objective(v) for k, v in values["variants"].items()}}
    hints = get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in values:
            continue
        v, t = values[f.name], hints[f.name]
        kwargs[f.name] = from_dict(t, v) if is_dataclass(t) and isinstance(v, dict) else v
    return cls(**kwargs)
