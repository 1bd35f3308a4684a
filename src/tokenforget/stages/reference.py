"""Reference: the model whose per-token loss the score compares with the base model's.

Three kinds, each a LoRA adapter on the base (or a full model): a plain SFT of the base on a seeded subset of
the data (or on `reference.path`, a trusted set); K cross-fitted references, each trained on examples outside
one fold so that no example is scored by a reference that saw it (`reference.folds`); and a self-evolving
round's reference, trained with `ignore` on the tokens the previous round marked positive (`reference.rounds`).
`reference.checkpoint` names a finished one instead.

Each function here trains or loads; the run folder (`pipeline`) decides when, and where the result goes.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import numpy as np

from tokenforget.config import to_dict
from tokenforget.config.data import DataConfig
from tokenforget.errors import ConfigError
from tokenforget.config.training import ReferenceConfig
from tokenforget.model.loading import FOLDS_FILE, checkpoint_dir
from tokenforget.runfolder import file_digest, fingerprint, folder_digest, release_memory, round_stage, stable_view
from tokenforget.stages import data as data_mod
from tokenforget.stages.labels_in_data import DataError, Record
from tokenforget.stages.stage import Arg, Need, PlanInputs, Stage, StagePlan, StageRun, training_plan
from tokenforget.stages.verdicts import known_noise
from tokenforget.training.fit import FitSetup, fit, fit_stage, save_model, sft_classes, with_classes


def reference_examples(
    tokens: datasets.Dataset, rc: ReferenceConfig, dc: DataConfig, tokenizer: Any, seed: int
) -> datasets.Dataset:
    """What the reference trains on: `reference.path` tokenized like the data (and disjoint from it), else the
    seeded `reference.fraction` (or `size`) of the tokenized examples."""
    if rc.path:
        records = data_mod.load_records(dc, rc.path)
        scored = data_mod.load_records(dc)
        if rc.disjoint_from == "wrong":  # the verified selections read only the answers known wrong
            scored = [r for r in scored if r.is_correct is False or (r.is_correct is None and r.corrupt_spans)]
        check_disjoint(records, scored, "reference.path")
        cols, _ = data_mod.tokenize_records(tokenizer, records, dc)
        return datasets.Dataset.from_dict(cols)
    return tokens.select(reference_subset(len(tokens), rc.fraction, rc.size, seed))


def train_reference(setup: FitSetup, subset: datasets.Dataset, rc: ReferenceConfig, fp: str) -> Any:
    """SFT of a fresh LoRA copy of the base on `subset`; the finished Trainer."""
    return fit(setup, sft_classes(subset), rc.training, setup.objective("sft"), "reference", fp)


def evolved_subset(tokens: datasets.Dataset, classes: datasets.Dataset, rc: ReferenceConfig, seed: int) -> datasets.Dataset:
    """Round r's training set: the reference subset with round r - 1's token classes (trained with `ignore`, so
    only the tokens that round marked positive are learned: token cleaning, self-evolving)."""
    return with_classes(tokens, classes).select(reference_subset(len(tokens), rc.fraction, rc.size, seed))


def cross_fit_folds(n: int, folds: int, fraction: float, size: Optional[int], seed: int) -> dict[str, list]:
    """Seeded K-fold plan: `fold_of[i]` is example i's fold; `trained_on[k]` the sorted examples reference k
    trains on, `size` (or round(fraction x n)) drawn from the examples of the other folds (all when fewer).

    Raises:
        ConfigError: fewer examples than folds.
    """
    if n < folds:
        raise ConfigError(f"config field 'reference.folds': {folds} folds need at least {folds} examples, got {n}")
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds  # sizes differ by at most 1
    want = size if size is not None else max(1, round(fraction * n))
    trained_on = []
    for k in range(folds):
        others = np.flatnonzero(fold_of != k)
        pick = np.random.default_rng([seed, k]).choice(others, min(want, len(others)), replace=False)
        trained_on.append(sorted(int(i) for i in pick))
    return {"fold_of": fold_of.tolist(), "trained_on": trained_on}


def train_folds(
    setup: FitSetup, tokens: datasets.Dataset, rc: ReferenceConfig, fp: str, work: Path, log: Callable[[str], None]
) -> dict[str, list]:
    """Train the cross-fitted references into `work/fold-<k>/`; a fold already there is kept, so a killed run
    retrains only the unfinished folds. Returns the fold plan (`cross_fit_folds`)."""
    plan = cross_fit_folds(len(tokens), rc.folds, rc.fraction, rc.size, setup.seed)
    for k, trained_on in enumerate(plan["trained_on"]):
        done = work / f"fold-{k}"
        if done.is_dir():
            log(f"[reference] fold {k} already trained, reusing it")
            continue
        log(f"[reference] fold {k} of {rc.folds}: SFT on {len(trained_on)} examples from the other folds")
        trainer = fit(setup, sft_classes(tokens.select(trained_on)), rc.training, setup.objective("sft"),
                      f"reference-fold{k}", fp)
        if setup.folder.ranks.is_main:
            tmp = work / f".fold-{k}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(trainer.model, setup.base.tokenizer, tmp, merged=False)
            os.replace(tmp, done)
        del trainer
        release_memory()
        setup.folder.ranks.barrier()
    return plan


def write_folds(plan: dict[str, list], work: Path, out: Path) -> dict[str, Any]:
    """Copy the finished folds and `folds.json` into the stage folder `out`; the stage record."""
    for k in range(len(plan["trained_on"])):
        shutil.copytree(work / f"fold-{k}", out / f"fold-{k}")
    (out / FOLDS_FILE).write_text(json.dumps(plan))
    return {"examples": [len(t) for t in plan["trained_on"]], "folds": len(plan["trained_on"])}


def _prompt_key(record: Record) -> str:
    """The prompt of a record (every message before its last assistant message), whitespace-normalised; a
    tokenized record's: its tokens before the first one with a weight."""
    if record.tokens is not None:
        first = next((i for i, w in enumerate(record.tokens.weights) if w != 0), len(record.tokens.weights))
        return "tokens:" + ",".join(map(str, record.tokens.input_ids[:first]))
    last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    return " ".join(" ".join(m["content"].split()) for m in record.messages[:last])


def check_disjoint(trusted: Sequence[Record], scored: Sequence[Record], field_name: str) -> None:
    """Refuse a trusted set that shares a prompt with the scored data: a reference that saw a scored example
    would find it easy by memory, and the scores would measure memorisation, not quality."""
    seen = {_prompt_key(r): r.where for r in scored}
    for r in trusted:
        if _prompt_key(r) in seen:
            raise DataError(
                f"{field_name}: {r.where} has the same prompt as the scored example {seen[_prompt_key(r)]}; "
                "the trusted set must be disjoint from data.path"
            )


def reference_subset(n: int, fraction: float, size: Optional[int], seed: int) -> list[int]:
    """Sorted indices of the seeded random subset the reference model trains on."""
    k = size if size is not None else max(1, round(fraction * n))
    if k > n:
        raise DataError(f"reference.size={k} is larger than the data set ({n} examples)")
    return sorted(random.Random(seed).sample(range(n), k))


# ---------------------------------------------------------------- the stages: the reference, the noisy references


def _fingerprint(run: StageRun, rnd: Arg) -> str:
    c = run.cfg
    if rnd != 1:  # round r's reference: trained on round r - 1's partition
        return fingerprint("reference-round", run.fp("partition", rnd - 1), to_dict(c.reference.training),  # type: ignore[operator]
                           to_dict(c.lora), c.seed)
    if c.reference.checkpoint:
        return fingerprint("reference-checkpoint", folder_digest(checkpoint_dir(c.reference)), stable_view("model", to_dict(c.model)))
    ref = {k: v for k, v in stable_view("reference", to_dict(c.reference)).items()
           if k not in ("rounds", "noisy_folds", "noisy_fraction")}  # the noisy reference is a stage of its own
    return fingerprint("reference", run.fp("data"), ref, file_digest(c.reference.path), to_dict(c.lora), c.seed)


def _needs(_run: StageRun, rnd: Arg) -> list[Need]:
    return [("data", None), *([("partition", rnd - 1)] if rnd != 1 else [])]  # type: ignore[operator]


def _make(run: StageRun, rnd: Arg) -> Path:
    """The reference model's folder: SFT of the base on a subset (`reference.folds` > 1: one per fold; round
    `rnd` > 1: a self-evolving round's, trained with `ignore` on round `rnd - 1`'s positive tokens)."""
    assert isinstance(rnd, int)
    rc, name, fp, folder = run.cfg.reference, round_stage("reference", rnd), run.fp("reference", rnd), run.folder
    tokens = run.need("data")
    if run.selection.reads_known_noise:  # refused before any reference trains
        known_noise(tokens, run.cfg.partition.selection)
    if rnd > 1:
        subset = evolved_subset(tokens, run.need("partition", rnd - 1), rc, run.cfg.seed)
        run.log(f"[{name}] ignore-training on {len(subset)} examples, round {rnd - 1}'s positive tokens")
        return fit_stage(run.setup, name, fp, subset, rc.training, "ignore", {"examples": len(subset), "round": rnd})
    if rc.checkpoint:
        return checkpoint_dir(rc)
    if rc.folds > 1:
        return _folds(run, name, fp, tokens, rc)
    if folder.done_on_main(name, fp):  # (reference_examples may tokenize a whole file)
        folder.skip(name)
        return folder.stage_dir(name)
    subset = reference_examples(tokens, rc, run.cfg.data, run.base.tokenizer, run.cfg.seed)
    run.log(f"[{name}] SFT on {len(subset)} examples")
    return fit_stage(run.setup, name, fp, sft_classes(subset), rc.training, "sft", {"examples": len(subset)})


def _folds(run: StageRun, name: str, fp: str, tokens: datasets.Dataset, rc: ReferenceConfig) -> Path:
    """The stage `name` of `rc.folds` references, each trained outside one fold (`train_folds`)."""
    build = lambda: train_folds(run.setup, tokens, rc, fp, run.folder.work_dir(name, fp), run.log)  # noqa: E731
    commit = lambda plan, d: write_folds(plan, run.folder.root / f".{name}.work", d)  # noqa: E731
    out = run.folder.ensure(name, fp, build, commit, every_rank=True)
    run.folder.release_work(name)
    return out


def _plan(run: StageRun, rnd: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    cfg, name = run.cfg, round_stage("reference", rnd)  # type: ignore[arg-type]
    if cfg.reference.checkpoint and rnd == 1:
        return StagePlan(name, fp, reuse, 0, 0, "read reference.checkpoint (no training)", 0.0)
    plan = training_plan(name, fp, reuse, inputs.sets.reference, cfg.reference.training, cfg.seed, inputs.timing)
    folds = cfg.reference.folds
    if folds > 1 and rnd == 1:  # K references, each on a subset of the same size
        plan.work, plan.seconds, plan.trainings = f"{folds} references x {plan.work}", plan.seconds * folds, folds
    return plan


REFERENCE = Stage("reference", _needs, _fingerprint, _make, _plan)


def _noisy_fingerprint(run: StageRun, _arg: Arg) -> str:
    """The noisy references' (`reference.noisy_folds`): cross-fitted on the data, as `reference.folds` would be."""
    c, rc = run.cfg, run.cfg.reference
    return fingerprint("reference-noisy", run.fp("data"), rc.noisy_folds, rc.noisy_fraction, to_dict(rc.training),
                       to_dict(c.lora), c.seed)


def _noisy_make(run: StageRun, _arg: Arg) -> Path:
    """The noisy references (`reference.noisy_folds`), stage `reference-noisy/`: cross-fitted on the training
    data itself, each example scored by the one that did not see it, for the two-reference scores."""
    rc = run.cfg.reference
    folds = replace(rc, folds=rc.noisy_folds, fraction=rc.noisy_fraction, size=None, path=None, noisy_folds=0)
    return _folds(run, "reference-noisy", run.fp("reference-noisy"), run.need("data"), folds)


def _noisy_plan(run: StageRun, _arg: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    rc, sets = run.cfg.reference, inputs.sets
    n = len(sets.all)  # `cross_fit_folds`: round(fraction x n), at most the other folds' examples
    share = min(max(1, round(rc.noisy_fraction * n)), n - math.ceil(n / rc.noisy_folds))
    plan = training_plan("reference-noisy", fp, reuse, sets.all[:share], rc.training, run.cfg.seed, inputs.timing)
    plan.work, plan.seconds = f"{rc.noisy_folds} noisy references x {plan.work}", plan.seconds * rc.noisy_folds
    plan.trainings = rc.noisy_folds
    return plan


NOISY_REFERENCE = Stage("reference-noisy", lambda _run, _arg: [("data", None)], _noisy_fingerprint, _noisy_make, _noisy_plan)
STAGES = (REFERENCE, NOISY_REFERENCE)
