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
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import numpy as np

from tokenforget.config.data import DataConfig
from tokenforget.errors import ConfigError
from tokenforget.config.training import ReferenceConfig
from tokenforget.model.loading import FOLDS_FILE
from tokenforget.runfolder import release_memory
from tokenforget.stages import data as data_mod
from tokenforget.trainer import FitSetup, fit, save_model, sft_classes, with_classes


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
        data_mod.check_disjoint(records, scored, "reference.path")
        cols, _ = data_mod.tokenize_records(tokenizer, records, dc)
        return datasets.Dataset.from_dict(cols)
    return tokens.select(data_mod.reference_subset(len(tokens), rc.fraction, rc.size, seed))


def train_reference(setup: FitSetup, subset: datasets.Dataset, rc: ReferenceConfig, fp: str) -> Any:
    """SFT of a fresh LoRA copy of the base on `subset`; the finished Trainer."""
    return fit(setup, sft_classes(subset), rc.training, setup.objective("sft"), "reference", fp)


def evolved_subset(tokens: datasets.Dataset, classes: datasets.Dataset, rc: ReferenceConfig, seed: int) -> datasets.Dataset:
    """Round r's training set: the reference subset with round r - 1's token classes (trained with `ignore`, so
    only the tokens that round marked positive are learned: token cleaning, self-evolving)."""
    return with_classes(tokens, classes).select(data_mod.reference_subset(len(tokens), rc.fraction, rc.size, seed))


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


