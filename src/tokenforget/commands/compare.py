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

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tokenforget.config import RunConfig, to_dict
from tokenforget.model.loading import BaseModel
from tokenforget.training.objectives import needs_partition
from tokenforget.report.tables import RESULTS_FILE, TABLE_FILE, format_compare
from tokenforget.pipeline import variants
from tokenforget.pipeline.resolver import Run, has_corrupt
from tokenforget.version import provenance


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run of one seed: a run folder of its own under the comparison folder."""
    return replace(cfg, run_dir=str(Path(cfg.run_dir) / f"seed-{seed}"), seed=seed)


def run_compare(cfg: RunConfig, log: Callable[[str], None] = print, base: Optional[BaseModel] = None) -> dict[str, Any]:
    """Train every mode for every seed, evaluate them and the base model; write and return every number."""
    from tokenforget.report import summary as report

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
            variants.train(run, mode)
            evals[mode] = variants.evaluate(run, mode)
            samples.setdefault(mode, evals[mode]["samples"])
        per_seed[str(seed)] = {m: r["benchmarks"] for m, r in evals.items()}
        if any(needs_partition(m) for m in modes) and has_corrupt(run):
            detection[str(seed)] = _plain_floats(report.detection_of(run).__dict__)
            for name, sub in _variant_runs(run).items():
                by_variant.setdefault(name, {})[str(seed)] = _plain_floats(report.detection_of(sub).__dict__)
    results = summarize(per_seed, ["base", *modes])
    results.update(detection=detection, detection_by_variant=by_variant, samples=samples, config=to_dict(cfg),
                   **provenance(), wall_s=time.time() - t0)
    root = Path(cfg.run_dir)
    table = format_compare(results)
    if top.ranks.is_main:  # under torchrun every rank has the same results; one writes them
        from tokenforget.report.html import build_report

        (root / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        (root / TABLE_FILE).write_text(table + "\n")
        log(table)
        log(f"Report: {build_report(root, tokenizer=base.tokenizer).resolve()}")
    top.ranks.barrier()  # the other ranks return once the files exist
    return results


def _variant_runs(run: Run) -> dict[str, Run]:
    """The seed's variants that partition on their own (another score method, rho, selection or reference),
    as their run folders; variants that only change the training share the seed's partition."""
    subs = {name: variants.variant(run, name)[0] for name in run.cfg.compare.variants}
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
    from tokenforget.metrics import token_weighted_mean

    counts = np.asarray(a["per_example"]["tokens"], dtype=np.float64)
    r = np.asarray(a["per_example"]["nll_sum"]) - np.asarray(b["per_example"]["nll_sum"])
    return token_weighted_mean(r, counts).stderr


def _plain_floats(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in d.items()}


# ---------------------------------------------------------------- variants: one run with other settings
