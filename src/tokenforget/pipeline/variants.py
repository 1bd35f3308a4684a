"""Variants: one run with other settings (`compare.variants`), in the run's folder or, where it changes the
partition, the reference or the score, in a folder of its own seeded with the run's finished stages."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from tokenforget.config.measure import VARIANT_SECTIONS
from tokenforget.training.objectives import needs_partition as mode_needs_partition
from tokenforget.pipeline.resolver import STAGES, Run
from tokenforget.runfolder import STAGE_FILE
from tokenforget.stages.score import raw_fingerprint_of, raw_score_fp, reusable_score_fps


def variant(run: Run, name: str, adopt: bool = True) -> tuple[Run, str]:
    """A `compare.variants` entry: `run` with its `train` fields overridden, and the mode it trains.

    A variant that also overrides `partition`, `reference` or `score` gets a run folder of its own,
    `run_dir/variant-<name>/`, seeded (with `adopt`) with copies of `run`'s finished stages it shares.
    """
    cfg = run.cfg
    overrides = dict(cfg.compare.variants[name])
    sections = {sec: replace(getattr(cfg, sec), **overrides.pop(sec)) for sec in VARIANT_SECTIONS if sec in overrides}
    objective = replace(cfg.train.objective, **overrides.get("objective", {}))  # its knobs over the run's
    train_cfg = replace(cfg.train, **{**overrides, "objective": objective})
    if not sections:
        return Run(replace(cfg, train=train_cfg), base=run.base, log=run.log, ranks=run.ranks), train_cfg.objective.mode
    no_recursion = replace(cfg.compare, variants={**cfg.compare.variants, name: overrides})
    sub_cfg = replace(cfg, run_dir=str(run.root / f"variant-{name}"), train=train_cfg, compare=no_recursion, **sections)
    sub = Run(sub_cfg, base=run.base, log=run.log, ranks=run.ranks)
    if adopt:
        adopt_stages(sub, run)
    return sub, train_cfg.objective.mode



def adopt_stages(child: Run, parent: Run) -> None:
    """Copy `parent`'s finished data, reference and scores stages that `child`'s fingerprints match, so a
    variant that changes only the partition does not train the reference again, and one that changes only
    `score.method` does not score again. Where `parent` needs a partition anyway, its matching stages are made
    first, so a variant listed before the mode that needs them does not make a copy of its own."""
    if needs_partition(parent):
        make_shared_first(child, parent)
    read = {"data", "scores", *scoring_reads(child)}  # no reference it never reads
    for stage in (s for s in ADOPTED_STAGES if s in read):
        mine = child.fp(stage)
        if child.ranks.is_main and not child.is_done(stage, mine) and adoptable(child, parent, stage, mine):
            child.folder.copy_stage(stage, parent.stage_dir(stage))
    child.ranks.barrier()



ADOPTED_STAGES = ("data", "reference", "reference-noisy", "scores")  # in the order they are made


def scoring_reads(run: Run) -> set[str]:
    """The stages `run`'s scoring pass reads, as the registry says (a base-only pass reads no reference)."""
    return {kind for kind, _ in STAGES["scores"].needs(run, 1)}



def needs_partition(run: Run) -> bool:
    """Whether a mode `compare` trains in `run`'s own folder (a mode, or a variant that changes only training)
    needs the partition, and so the reference and the scores, whatever the variants before it do."""
    variants = run.cfg.compare.variants
    own = [mode for sub, mode in (variant(run, name, adopt=False) for name in variants) if sub.root == run.root]
    return any(mode_needs_partition(m) for m in [*run.cfg.compare.modes, *own])



def make_shared_first(child: Run, parent: Run) -> None:
    """Make `parent`'s reference and scores now where `child` would copy them (the same reference; the same
    scoring pass or one its method is rescored from), instead of `child` training and scoring its own."""
    if "reference" in scoring_reads(child) and child.fp("reference") == parent.fp("reference"):
        parent.need("reference")
    if child.fp("scores") == parent.fp("scores") or raw_score_fp(parent) in reusable_score_fps(child):
        parent.need("scores")



def adoptable(child: Run, parent: Run, stage: str, fp: str) -> bool:
    """Whether `adopt_stages` copies `parent`'s `stage` (of fingerprint `fp` in `child`) instead of running it."""
    if stage not in ADOPTED_STAGES:
        return False
    if parent.is_done(stage, fp):
        return True
    # another score.method over the same scoring pass: rescored from it without a forward pass
    done = parent.stage_dir(stage) / STAGE_FILE
    return stage == "scores" and done.is_file() and raw_fingerprint_of(done) in reusable_score_fps(child)



def train(run: Run, mode: str, suffix: str = "") -> Path:
    """`run.train(mode)`, where `mode` may also be a `compare.variants` name (its stage: `train-<name>`); `suffix`
    is added to the stage's name (`train-sft-e2`)."""
    if mode not in run.cfg.compare.variants:
        return run.train(mode, stage=f"train-{mode}{suffix}")
    sub, sub_mode = variant(run, mode)
    return sub.train(sub_mode, stage=f"train-{mode}{suffix}")



def train_fp(run: Run, mode: str) -> str:
    """`run.train_fp(mode)`, for a mode or a variant; a fingerprint copies nothing (dry runs call it)."""
    if mode not in run.cfg.compare.variants:
        return run.train_fp(mode)
    sub, sub_mode = variant(run, mode, adopt=False)
    return sub.train_fp(sub_mode)



def evaluate(run: Run, target: Optional[str]) -> dict[str, Any]:
    """`run.evaluate(target)`; a variant with a folder of its own is evaluated there."""
    if target in run.cfg.compare.variants:
        sub, _ = variant(run, target)
        if sub.root != run.root:
            return sub.evaluate(target)
    return run.evaluate(target)
