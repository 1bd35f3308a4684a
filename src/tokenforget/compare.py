"""`tokenforget compare`: sft, ignore and forget against each other and the base model, over seeds.

Layout of the comparison folder (`run_dir`):

    run_dir/
      config.json            the RunConfig of the comparison
      eval-base/             the base model's evaluation (once: it does not depend on the seed)
      seed-<s>/              a complete run folder per seed: data, reference, scores, partition,
                             train-<mode>/ and eval-<mode>/ for every mode, all with `seed: s`
      compare_results.json   every number (schema below)
      compare_table.txt      the tables printed at the end
      report/                the HTML report: these tables, and the first seed's tokens and training curves

Within a seed every mode trains from the same base model; `ignore` and `forget` share that seed's
reference model, scores and partition (`sft` needs none). Across seeds everything random changes: the
reference subset, the reference training, the LoRA initialisation and the data order, so the spread over
seeds is the spread of the whole method. Every stage is reused by fingerprint, so a rerun (or more seeds
added to the list) only does what is missing. `tokenforget run --run_dir run_dir/seed-3 --seed 3` works on
the same folder.

compare_results.json (a plain dict; float values may be NaN, written as `NaN`):

    {
      "schema": 1,
      "seeds": [1, 2, 3],
      "models": ["base", "sft", "ignore", "forget"],
      "benchmarks": {name: {"metric": str, "higher_is_better": bool | null,
                            "kind": "accuracy" | "nll" | "diversity" | "other", "n": int}},
      "per_seed": {"<seed>": {model: {benchmark: {"value", "stderr", "n", ...}}}},
                                  # the base model's one evaluation is repeated under every seed
      "table": {model: {benchmark | "average": {"mean": float, "std": float | null, "n_seeds": int,
                                               "stderr": float (only when std is null)}}},
                                  # std: sample std over seeds (null with one seed or for the base model,
                                  # which then carry their one evaluation's standard error over examples);
                                  # "average": the mean over the accuracy-kind benchmarks, per seed first
      "paired_vs_sft": {model: {benchmark | "average": {"per_seed": {"<seed>": model - sft},
                                                       "mean": float, "std": float | null,
                                                       "stderr_per_seed": {"<seed>": float}}}},
                                  # stderr_per_seed: NLL benchmarks only, paired example by example
                                  # (their per_seed entries carry "per_example": {"nll_sum", "tokens"})
      "detection": {"<seed>": {"auroc", "recall", "precision", "corrupt_share", "n_corrupt", "n_tokens"}},
                                  # only when the training data has known corrupted tokens
      "detection_by_variant": {name: {"<seed>": {...as detection}}},
                                  # variants with a partition of their own (score.method, partition, reference)
      "samples": {model: {task: [first outputs]}},   # from the first seed
      "config": RunConfig as a dict,
      "versions": {"python", "torch", "transformers", "peft", "lm_eval", "tokenforget"},
      "machine": str, "date": ISO 8601, "wall_s": float
    }
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tokenforget.compare_tables import RESULTS_FILE, TABLE_FILE, compare_tables, format_compare  # noqa: F401
from tokenforget.config import VARIANT_SECTIONS, RunConfig, to_dict
from tokenforget.losses import PARTITION_FREE
from tokenforget.models import BaseModel
from tokenforget.pipeline import Run
from tokenforget.runfolder import STAGE_FILE
from tokenforget.score import raw_fingerprint_of



def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run of one seed: a run folder of its own under the comparison folder."""
    return replace(cfg, run_dir=str(Path(cfg.run_dir) / f"seed-{seed}"), seed=seed)


def run_compare(cfg: RunConfig, log: Callable[[str], None] = print, base: Optional[BaseModel] = None) -> dict[str, Any]:
    """Train every mode for every seed, evaluate them and the base model; write and return every number."""
    from tokenforget import report

    t0 = time.time()
    base = base or BaseModel(cfg.model, qlora=cfg.lora.qlora)  # loaded once, shared by every training (4-bit: reloaded)
    modes = [*cfg.compare.modes, *cfg.compare.variants]  # variants train and table like modes
    top = Run(cfg, base=base, log=log)
    base_results = top.evaluate(None)
    per_seed: dict[str, dict[str, Any]] = {}
    detection: dict[str, Any] = {}
    by_variant: dict[str, dict[str, Any]] = {}  # variants with a partition of their own (score, rho, reference)
    samples: dict[str, Any] = {"base": base_results["samples"]}
    for seed in cfg.compare.seeds:
        log(f"[compare] seed {seed}")
        run = Run(seed_config(cfg, seed), base=base, log=log)
        evals = {"base": base_results}
        for mode in modes:
            train(run, mode)
            evals[mode] = evaluate(run, mode)
            samples.setdefault(mode, evals[mode]["samples"])
        per_seed[str(seed)] = {m: r["benchmarks"] for m, r in evals.items()}
        if any(m not in PARTITION_FREE for m in modes) and has_corrupt(run):
            detection[str(seed)] = _plain_floats(report.detection_of(run).__dict__)
            for name, sub in _variant_runs(run).items():
                by_variant.setdefault(name, {})[str(seed)] = _plain_floats(report.detection_of(sub).__dict__)
    results = summarize(per_seed, ["base", *modes])
    results.update(detection=detection, detection_by_variant=by_variant, samples=samples, config=to_dict(cfg),
                   **provenance(), wall_s=time.time() - t0)
    root = Path(cfg.run_dir)
    table = format_compare(results)
    if top.ranks.is_main:  # under torchrun every rank has the same results; one writes them
        from tokenforget.html_report import build_report

        (root / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        (root / TABLE_FILE).write_text(table + "\n")
        log(table)
        log(f"Report: {build_report(root, tokenizer=base.tokenizer).resolve()}")
    top.ranks.barrier()  # the other ranks return once the files exist
    return results


def has_corrupt(run: Any) -> bool:
    """Whether the run's data has known noise (a `corrupt` mask with a set token)."""
    return any(any(c) for c in run.data()["corrupt"])


def _variant_runs(run: Any) -> dict[str, Any]:
    """The seed's variants that partition on their own (another score method, rho, selection or reference),
    as their run folders; variants that only change the training share the seed's partition."""
    subs = {name: variant(run, name)[0] for name in run.cfg.compare.variants}
    return {name: sub for name, sub in subs.items() if sub.root != run.root}


# ---------------------------------------------------------------- numbers


def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof 1; None for fewer than two values)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def seed_average(benchmarks: dict[str, dict[str, Any]]) -> Optional[float]:
    """The mean over one model's accuracy-kind benchmarks in one seed (None when it has none)."""
    accs = [e["value"] for e in benchmarks.values() if e["kind"] == "accuracy"]
    return float(np.mean(accs)) if accs else None


def summarize(per_seed: dict[str, dict[str, dict[str, dict[str, Any]]]], models: list[str]) -> dict[str, Any]:
    """The `seeds`, `models`, `benchmarks`, `per_seed`, `table` and `paired_vs_sft` parts of the results."""
    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    names = list(first["sft"])
    values = {m: {b: [per_seed[s][m][b]["value"] for s in seeds] for b in names} for m in models}
    for m in models:
        averages = [seed_average(per_seed[s][m]) for s in seeds]
        if all(a is not None for a in averages):
            values[m]["average"] = averages  # type: ignore[assignment]
    table: dict[str, Any] = {}
    for m in models:
        once = m == "base"  # one evaluation, repeated under every seed
        table[m] = {}
        for b, v in values[m].items():
            mean, std = mean_std(v[:1] if once else v)
            table[m][b] = {"mean": mean, "std": std, "n_seeds": 1 if once else len(v)}
            if std is None and b != "average":  # one evaluation: its own standard error is the spread we have
                table[m][b]["stderr"] = per_seed[seeds[0]][m][b]["stderr"]
    paired: dict[str, Any] = {}
    for m in models:
        if m in ("base", "sft"):
            continue
        paired[m] = {}
        for b in values[m]:
            diffs = [x - y for x, y in zip(values[m][b], values["sft"][b])]
            mean, std = mean_std(diffs)
            paired[m][b] = {"per_seed": dict(zip(seeds, diffs)), "mean": mean, "std": std}
            se = {s: paired_nll_stderr(per_seed[s][m].get(b), per_seed[s]["sft"].get(b)) for s in seeds}
            if all(v is not None for v in se.values()):
                paired[m][b]["stderr_per_seed"] = se
    benchmarks = {
        b: {k: first["sft"][b].get(k) for k in ("metric", "higher_is_better", "kind", "n")} for b in names
    }
    return {
        "schema": 1,
        "seeds": [int(s) for s in seeds],
        "models": models,
        "benchmarks": benchmarks,
        "per_seed": per_seed,
        "table": table,
        "paired_vs_sft": paired,
    }


def paired_nll_stderr(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]]) -> Optional[float]:
    """Standard error of NLL(a) - NLL(b) on the same examples, paired example by example.

    Both are token-weighted means over the same tokens, so the difference is sum_i r_i / sum_i c_i with
    r_i = a's NLL sum - b's NLL sum on example i: a ratio estimator like each mean, with the same standard
    error (`evaluate.token_weighted_mean`). What all models find hard cancels, so this is far smaller than
    either model's own standard error. None when the entries carry no per-example numbers.
    """
    if not (a and b and "per_example" in a and "per_example" in b):
        return None
    from tokenforget.evaluate import token_weighted_mean

    counts = np.asarray(a["per_example"]["tokens"], dtype=np.float64)
    r = np.asarray(a["per_example"]["nll_sum"]) - np.asarray(b["per_example"]["nll_sum"])
    return token_weighted_mean(r, counts).stderr


def provenance() -> dict[str, Any]:
    """Versions, machine and date, for every figure we publish."""
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    from tokenforget import __version__

    versions = {p: version(p) for p in ("torch", "transformers", "peft", "lm_eval")}
    return {
        "versions": {"python": platform.python_version(), **versions, "tokenforget": __version__},
        "machine": machine(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def machine() -> str:
    """CPU model and core count (and the GPU, if any)."""
    import os

    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}"


def _plain_floats(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


# ---------------------------------------------------------------- variants: one run with other settings


def variant(run: Run, name: str, adopt: bool = True) -> tuple[Run, str]:
    """A `compare.variants` entry: `run` with its `train` fields overridden, and the mode it trains.

    A variant that also overrides `partition`, `reference` or `score` gets a run folder of its own,
    `run_dir/variant-<name>/`, seeded (with `adopt`) with copies of `run`'s finished stages it shares.
    """
    cfg = run.cfg
    overrides = dict(cfg.compare.variants[name])
    sections = {sec: replace(getattr(cfg, sec), **overrides.pop(sec)) for sec in VARIANT_SECTIONS if sec in overrides}
    train_cfg = replace(cfg.train, **overrides)
    if not sections:
        return Run(replace(cfg, train=train_cfg), base=run.base, log=run.log, ranks=run.ranks), train_cfg.mode
    no_recursion = replace(cfg.compare, variants={**cfg.compare.variants, name: overrides})
    sub_cfg = replace(cfg, run_dir=str(run.root / f"variant-{name}"), train=train_cfg, compare=no_recursion, **sections)
    sub = Run(sub_cfg, base=run.base, log=run.log, ranks=run.ranks)
    if adopt:
        adopt_stages(sub, run)
    return sub, train_cfg.mode


def adopt_stages(child: Run, parent: Run) -> None:
    """Copy `parent`'s finished data, reference and scores stages that `child`'s fingerprints match, so a
    variant that changes only the partition does not train the reference again, and one that changes only
    `score.method` does not score again. Where `parent` needs a partition anyway, its matching stages are made
    first, so a variant listed before the mode that needs them does not make a copy of its own."""
    if needs_partition(parent):
        make_shared_first(child, parent)
    for stage, fp in zip(ADOPTED_STAGES, (child.data_fp, child.reference_fp, child.score_fp)):
        mine = fp()
        if child.ranks.is_main and not child.is_done(stage, mine) and adoptable(child, parent, stage, mine):
            child.folder.copy_stage(stage, parent.stage_dir(stage))
    child.ranks.barrier()


ADOPTED_STAGES = ("data", "reference", "scores")


def needs_partition(run: Run) -> bool:
    """Whether a mode `compare` trains in `run`'s own folder (a mode, or a variant that changes only training)
    needs the partition, and so the reference and the scores, whatever the variants before it do."""
    variants = run.cfg.compare.variants
    own = [mode for sub, mode in (variant(run, name, adopt=False) for name in variants) if sub.root == run.root]
    return any(m not in PARTITION_FREE for m in [*run.cfg.compare.modes, *own])


def make_shared_first(child: Run, parent: Run) -> None:
    """Make `parent`'s reference and scores now where `child` would copy them (the same reference; the same
    scoring pass or one its method is rescored from), instead of `child` training and scoring its own."""
    if child.reference_fp() == parent.reference_fp():
        parent.reference()
    if child.score_fp() == parent.score_fp() or parent.raw_score_fp() in child.reusable_score_fps():
        parent.score(1)


def adoptable(child: Run, parent: Run, stage: str, fp: str) -> bool:
    """Whether `adopt_stages` copies `parent`'s `stage` (of fingerprint `fp` in `child`) instead of running it."""
    if stage not in ADOPTED_STAGES:
        return False
    if parent.is_done(stage, fp):
        return True
    # another score.method over the same scoring pass: rescored from it without a forward pass
    done = parent.stage_dir(stage) / STAGE_FILE
    return stage == "scores" and done.is_file() and raw_fingerprint_of(done) in child.reusable_score_fps()


def train(run: Run, mode: str) -> Path:
    """`run.train(mode)`, where `mode` may also be a `compare.variants` name (its stage: `train-<name>`)."""
    if mode not in run.cfg.compare.variants:
        return run.train(mode)
    sub, sub_mode = variant(run, mode)
    return sub.train(sub_mode, stage=f"train-{mode}")


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
