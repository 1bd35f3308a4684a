"""The pipeline: a run folder and a resolver over the stage records, in the order of the data's journey.

Each stage declares itself in its own module (`stages.stage.Stage`: what it reads, its fingerprint, how it is
made, its plan); `STAGES` lists them. `Run.need(kind, arg)` makes the stages a record `needs` first, then the
stage, through the one loop every stage goes through (`RunFolder.ensure`: reuse the stage when its `stage.json`
holds the fingerprint of its current inputs, else build it and commit it atomically):

    stage folder           record (module under stages/)      reads
    data/                  data.STAGES                        the JSONL or Hub data (noise.corrupt on the way)
    reference/             reference.REFERENCE                data (round r > 1: partition of round r - 1)
    reference-noisy/       reference.NOISY_REFERENCE          data
    scores/                score.STAGES                       data, reference, reference-noisy
    partition/             partition.STAGES                   data, scores
    labels/                labels.STAGES                      data, scores, partition
    train-<mode>/          train.STAGES                       data (sft, dft), or labels and partition
    eval-<model>/          evaluate.STAGES                    a train stage or the base

The dry run (`commands.plan`) walks the same records. The layout of the folder is described in `runfolder`;
compare's variants (one run with other settings) are in `pipeline.variants`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import datasets

from tokenforget.training import fit as fit_mod
from tokenforget.config import RunConfig, to_dict
from tokenforget.model.loading import BaseModel, check_attention, check_qlora, use_bf16
from tokenforget.runfolder import Ranks, RunFolder
from tokenforget.stages import (
    data as data_mod,
    evaluate as eval_mod,
    labels as labels_mod,
    partition as part_mod,
    preference as pref_mod,
    reference as ref_mod,
    score as score_mod,
    train as train_stage,
)
from tokenforget.stages.stage import Arg, Stage
from tokenforget.pipeline.names import check_names

# Every stage record, in the journey's order: each stage module lists its own (`STAGES` there), so a new stage
# in a module that has stages is one record in that module.
STAGES: dict[str, Stage] = {
    s.kind: s for module in (data_mod, ref_mod, score_mod, part_mod, labels_mod, train_stage, pref_mod,
                                             eval_mod) for s in module.STAGES
}
PER_ROUND = ("reference", "scores", "partition")  # kinds with one stage per self-evolving round (arg: the round)


class Run:
    """One run folder and the stages that fill it: `need` makes a stage and what it reads, `fp` fingerprints one."""

    def __init__(self, cfg: RunConfig, base: Optional[BaseModel] = None, log: Callable[[str], None] = print,
                 ranks: Optional[Ranks] = None):
        check_names(cfg)
        self.cfg = cfg
        self.base = base or BaseModel(cfg.model, qlora=cfg.lora.qlora)
        ranks = ranks or Ranks.detect(cfg.ddp_timeout)
        self.log = log if ranks.is_main else (lambda _msg: None)
        self.folder = RunFolder(Path(cfg.run_dir), to_dict(cfg), ranks, self.log)
        self.bf16 = use_bf16(cfg.model.precision)
        self.selection = part_mod.SELECTIONS[cfg.partition.selection]
        self.setup = fit_mod.FitSetup(self.base, cfg.lora, cfg.train, cfg.seed, self.bf16, self.folder, cfg.report_to,
                                      cfg.ddp_timeout)
        self._made: dict[tuple[str, Arg], Any] = {}  # stage outputs already made or read in this process
        self._reading: list[tuple[str, list[tuple[str, Arg]]]] = []  # the stages being made, with what they may read
        self.folder.check_same_run(cfg.overwrite)
        if cfg.lora.qlora:  # settings that would fail only when their stage starts fail now, before any write
            check_qlora(cfg.model)
        check_attention(cfg.model)
        train_stage.check_trusted(cfg)
        fit_mod.check_training_args(cfg, self.root / ".check", self.bf16)

    # the run folder's bookkeeping, for callers that hold a Run
    root = property(lambda self: self.folder.root)
    ranks = property(lambda self: self.folder.ranks)
    skipped = property(lambda self: self.folder.reused)
    rounds = property(lambda self: self.cfg.reference.rounds)

    def stage_dir(self, name: str) -> Path:
        return self.folder.stage_dir(name)

    def is_done(self, name: str, fp: str) -> bool:
        return self.folder.is_done(name, fp)

    # ------------------------------------------------------------ the resolver

    @staticmethod
    def arg_of(kind: str, arg: Arg) -> Arg:
        """A per-round kind's arg defaults to round 1."""
        return (arg or 1) if kind in PER_ROUND else arg

    def fp(self, kind: str, arg: Arg = None) -> str:
        """The fingerprint of the stage `kind` (`arg`: its round, or (mode, folder) for a training)."""
        return STAGES[kind].fingerprint(self, self.arg_of(kind, arg))

    def need(self, kind: str, arg: Arg = None) -> Any:
        """The output of the stage `kind`, made (or reused) after the stages its record `needs`. A stage being
        made may read only what its record lists: what it reads and what the dry run plans cannot differ."""
        arg = self.arg_of(kind, arg)
        if self._reading and (kind, arg) not in self._reading[-1][1]:
            raise RuntimeError(f"stage {self._reading[-1][0]} reads {kind} {arg!r}, which its record's needs do not list")
        if (kind, arg) in self._made:
            return self._made[(kind, arg)]
        stage = STAGES[kind]
        needs = stage.needs(self, arg)
        for up_kind, up_arg in needs:
            self.need(up_kind, up_arg)
        self._reading.append((stage.folder_name(arg), [(k, self.arg_of(k, a)) for k, a in needs]))
        try:
            self._made[(kind, arg)] = stage.make(self, arg)
        finally:
            self._reading.pop()
        return self._made[(kind, arg)]

    # ------------------------------------------------------------ the stages by name, for commands and tests

    def data(self) -> datasets.Dataset:
        return self.need("data")

    def reference(self, rnd: int = 1) -> Path:
        return self.need("reference", rnd)

    def score(self, rnd: Optional[int] = None) -> datasets.Dataset:
        return self.need("scores", rnd or self.rounds)

    def partition(self, rnd: Optional[int] = None) -> datasets.Dataset:
        return self.need("partition", rnd or self.rounds)

    def labels(self) -> Path:
        return self.need("labels")

    def train_set(self, mode: str) -> datasets.Dataset:
        return train_stage.train_set(self, mode)

    def train(self, mode: Optional[str] = None, stage: Optional[str] = None) -> Path:
        """Train from the base model with `mode` (default `train.objective.mode`) into the stage `stage` (default
        `train-<mode>`). A `compare.variants` name is trained by `variants.train`."""
        mode = mode or self.cfg.train.objective.mode
        return self.need("train", (mode, stage or f"train-{mode}"))

    def train_fp(self, mode: str) -> str:
        return self.fp("train", (mode, f"train-{mode}"))

    def evaluate(self, target: Optional[str] = None) -> dict[str, Any]:
        """Evaluate a model with `cfg.eval` (`stages.evaluate`): None or `base`, a mode or variant name, or a folder."""
        return self.need("eval", target)


def has_corrupt(run: Run) -> bool:
    """Whether the run's data has known noise (a `corrupt` mask with a set token)."""
    return any(any(c) for c in run.data()["corrupt"])
