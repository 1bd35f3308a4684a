"""What makes a stage a stage: one `Stage` record each, declared in the stage's own module.

A record holds the stage's name, the stages it reads (`needs`), its fingerprint, how it is made (build and commit
through `RunFolder.ensure`, then read back) and its plan (the dry run's work and counts). `pipeline.resolver.Run` is a
resolver over the records (`STAGES` there): `run.need("scores")` makes every stage `needs` lists first, then the
stage; the dry run (`commands.plan`) walks the same `needs` and calls the same `fingerprint` and `plan`, so the
plan and the run cannot list different stages. A stage reads its inputs with `run.need` too, and only the ones its
`needs` lists (`Run.need` refuses any other), which keeps the declaration honest.

`Arg` picks one stage of a kind: the self-evolving round for reference, scores and partition (round 1 is the
plain folder name, round r > 1 `<name>-round<r>`), `(mode, folder)` for a final training, nothing otherwise.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Optional, Protocol, Sequence

from tokenforget.config.training import TrainingConfig
from tokenforget.runfolder import round_stage

if TYPE_CHECKING:  # what a stage reads of a run, for the type checker: no import at run time, no floor of the house
    from tokenforget.config import RunConfig
    from tokenforget.model.loading import BaseModel
    from tokenforget.runfolder import RunFolder
    from tokenforget.training.fit import FitSetup

Arg = Hashable  # a round (int), a (mode, folder) pair, or None
Need = tuple[str, Arg]  # (stage kind, its arg): one stage a record reads


class SelectionRecord(Protocol):
    """What the stages before the partition read of the run's token selection (`partition.Selection`, frozen: read-only
    here)."""

    @property
    def needs_scores(self) -> bool: ...

    @property
    def reads_known_noise(self) -> bool: ...


class StageRun(Protocol):
    """What a stage needs of the run it is made in (`pipeline.resolver.Run` has it)."""

    cfg: RunConfig
    bf16: bool
    base: BaseModel
    setup: FitSetup
    folder: RunFolder
    log: Callable[[str], None]

    def need(self, kind: str, arg: Arg = None) -> Any: ...  # a stage's output, made first when missing

    def fp(self, kind: str, arg: Arg = None) -> str: ...  # a stage's fingerprint

    @property
    def rounds(self) -> int: ...

    @property
    def selection(self) -> SelectionRecord: ...  # the record of `partition.selection`


@dataclass
class StagePlan:
    """One stage of a dry run: what it would do, and whether it is reused."""

    name: str
    fingerprint: str
    reuse: bool  # True: its stage.json matches, the command would skip it
    examples: int
    tokens: int  # tokens of the examples the stage goes over (prompt and response)
    work: str
    seconds: float  # estimated wall time if it runs (0 when reused)
    trainings: int = 0  # model trainings the stage runs (a reference per fold)
    forwards: int = 0  # forward passes over every example (the scoring pass: base, reference, noisy references)
    training: Optional[TrainingConfig] = None  # the settings its trainings run (the memory and cost plans read them)
    examples_ids: Sequence[Sequence[int]] = ()  # the examples its trainings or forwards go over


@dataclass
class TokenSets:
    """The examples each stage goes over, as token id lists (the dry run's, tokenized without a model)."""

    all: list[list[int]]
    masks: list[list[int]]  # 1 where a token gets a loss (response tokens), per example of `all`
    response_tokens: int
    reference: list[list[int]]  # the reference training's examples (every mode trains on `all`)
    trusted: list[list[int]] = field(default_factory=list)  # `train.trusted_path`'s, after `all` in the final training


@dataclass
class Timing:
    """Measured seconds per padded token (median of the timed repeats) and what they were measured on."""

    train: dict[tuple[int, int], float]  # (batch size, gradient checkpointing) -> s/token of a training micro-batch
    forward: dict[int, float]  # batch size -> s/token of one scoring forward
    notes: list[str]
    measured: bool = True  # False: no warm-up was asked for, the plan has no wall-time estimate


@dataclass
class PlanInputs:
    """What a stage's plan reads besides the run: the token sets, the warm-up's timing, the seconds tokenizing took."""

    sets: TokenSets
    timing: Timing
    tokenize_s: float = 0.0


Planner = Callable[[StageRun, Arg, str, bool, PlanInputs], StagePlan]  # (run, arg, fingerprint, reused, inputs)


@dataclass(frozen=True)
class Stage:
    """One stage: its kind (the folder's name), what it reads, its fingerprint, how it is made, its plan."""

    kind: str
    needs: Callable[[StageRun, Arg], list[Need]]  # the stages it reads, in the order they are made
    fingerprint: Callable[[StageRun, Arg], str]
    make: Callable[[StageRun, Arg], Any]  # RunFolder.ensure with the stage's build and commit, then its output
    plan: Planner
    folder: Callable[[Arg], str] = lambda _arg: ""  # the stage folder's name; default: the kind (per round)
    trains: str = ""  # "" or the training settings it runs ("reference", "train"): memory and cost plans read it

    def folder_name(self, arg: Arg) -> str:
        return self.folder(arg) or round_stage(self.kind, arg if isinstance(arg, int) else 1)


def no_needs(_run: StageRun, _arg: Arg) -> list[Need]:
    return []


def training_plan(name: str, fp: str, reuse: bool, examples: Sequence[Sequence[int]], tcfg: TrainingConfig,
                  seed: int, timing: Timing) -> StagePlan:
    """The plan of one training of `tcfg` on `examples`: optimizer steps, and its wall time at the warm-up's rate."""
    steps = optimizer_steps(len(examples), tcfg)
    per_token = timing.train.get((tcfg.batch_size, tcfg.gradient_checkpointing), 0.0)
    secs = train_padded_tokens(examples, tcfg, seed) * per_token
    work = f"{steps} optimizer steps of {tcfg.batch_size} x {tcfg.grad_accum}"
    return StagePlan(name, fp, reuse, len(examples), sum(map(len, examples)), work, 0.0 if reuse else secs, trainings=1,
                     training=tcfg, examples_ids=examples)


# ---------------------------------------------------------------- counts (the dry run's and the cost plan's)


def optimizer_steps(n_examples: int, cfg: TrainingConfig) -> int:
    """Optimizer steps of one training, as the Trainer counts them: max_steps, or
    ceil(epochs x max(1, ceil(micro-batches per epoch / grad_accum)))."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro = math.ceil(n_examples / cfg.batch_size)
    return math.ceil(cfg.epochs * max(1, math.ceil(micro / cfg.grad_accum)))


def micro_batches(n_examples: int, cfg: TrainingConfig) -> int:
    """Forward-backward passes of one training: max_steps x grad_accum, or ceil(epochs x batches per epoch)."""
    if cfg.max_steps > 0:
        return cfg.max_steps * cfg.grad_accum
    return math.ceil(cfg.epochs * math.ceil(n_examples / cfg.batch_size))


def longest(examples: Sequence[Sequence[int]], max_length: int) -> int:
    """The tokens of the longest example, at most `max_length`: the length a padded micro-batch reaches at most (not
    `max_length` itself, which 100-token examples never fill)."""
    return min(max_length, max(map(len, examples), default=max_length))


def train_padded_tokens(examples: Sequence[Sequence[int]], cfg: TrainingConfig, seed: int) -> int:
    """Expected padded tokens of a training: each epoch a seeded shuffle cut into batches (the last one
    smaller), each batch padded to its longest example (not padded at all with `packing`), until the
    training's micro-batches are done."""
    lengths = [len(e) for e in examples]
    todo, total, rng = micro_batches(len(lengths), cfg), 0, random.Random(seed)
    while todo > 0:
        order = rng.sample(range(len(lengths)), len(lengths))
        for start in range(0, len(order), cfg.batch_size):
            if todo == 0:
                break
            batch = order[start : start + cfg.batch_size]
            widths = [lengths[i] for i in batch]
            total += sum(widths) if cfg.packing else len(batch) * max(widths)
            todo -= 1
    return total
