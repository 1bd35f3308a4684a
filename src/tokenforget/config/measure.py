"""`compare`, `audit` and `detect`: the measuring commands' sections (seeds, variants, measures)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from tokenforget.config.data import NoiseKind
from tokenforget.config.tokens import PartitionConfig, ScoreConfig
from tokenforget.config.training import FLAT_OBJECTIVE, ObjectiveConfig, ReferenceConfig, ReferenceKind, TrainConfig
from tokenforget.errors import ConfigError, _check


@dataclass
class CompareConfig:
    """`tokenforget compare`: the training modes and the seeds; each seed is a run folder of its own."""

    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """One complete run per seed (reference subset, reference, scores, partition, every mode's training)."""
    modes: list[str] = field(default_factory=lambda: ["sft", "ignore", "forget"])
    """Names of `objectives.OBJECTIVES` (checked when the comparison starts), trained from one shared reference and
    set of scores per seed; `sft` is the paired baseline."""
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    """More trainings beside `modes`, by name: overrides of `train` fields (not `training`), e.g.
    `{wga: {objective: {forget_term: wga, beta: 2.0}}, cosine: {objective: {schedule: cosine}}}`. Each trains
    `forget` (unless it sets `objective.mode`) on the seed's shared partition as stage `train-<name>` and is evaluated and
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
VARIANT_FIXED = ("training", "labels_path", "eval_path", "eval_split", "trusted_path")
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
    _check(name != "base", where, "a variant needs a name of its own, not the base model's")
    _check(isinstance(overrides, dict), where, f"must be a mapping of train fields, got {overrides!r}")
    known = {f.name for f in fields(TrainConfig)}
    sections = {"partition": PartitionConfig, "reference": ReferenceConfig, "score": ScoreConfig}
    for key, value in overrides.items():
        if key in VARIANT_SECTIONS:
            _check(isinstance(value, dict) and set(value) <= set(VARIANT_SECTIONS[key]), f"{where}.{key}",
                   f"a mapping of {list(VARIANT_SECTIONS[key])}, got {value!r}")
            continue
        _check(key not in FLAT_OBJECTIVE, f"{where}.{key}",
               f"it is 'objective: {{{FLAT_OBJECTIVE.get(key)}: ...}}' now (see CHANGELOG)")
        _check(key in known and key not in VARIANT_FIXED, f"{where}.{key}",
               f"not a train field a variant may set (choose from {sorted(known - set(VARIANT_FIXED))} "
               f"or the sections {list(VARIANT_SECTIONS)})")
    objective = overrides.get("objective", {})
    knobs = [f.name for f in fields(ObjectiveConfig)]
    _check(isinstance(objective, dict) and set(objective) <= set(knobs), f"{where}.objective",
           f"a mapping of {knobs}, got {objective!r}")
    try:
        TrainConfig(**{k: v for k, v in overrides.items() if k not in VARIANT_SECTIONS and k != "objective"},
                    objective=ObjectiveConfig(**objective))
        for sec, cls in sections.items():
            cls(**overrides.get(sec, {}))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


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
