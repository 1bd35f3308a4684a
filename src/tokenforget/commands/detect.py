"""`tokenforget detect`: does the score find the bad tokens?

For every noise kind of `detect.kinds` the data gets known, realistic noise (`tokenforget.stages.noise`, seeded, the
corrupted response tokens recorded), then for every reference of `detect.references` one scoring pass gives
CE_base and CE_ref of every response token, and every score method of `score_methods.SCORE_METHODS` is
computed from that one pass and partitioned at rho. Per (noise kind, reference, method):

    auroc          P(score of a corrupted token < score of a clean one), ties 1/2 (low score = corrupted)
    recall         corrupted tokens in the negative set / corrupted tokens
    precision      corrupted tokens in the negative set / negative tokens
    mean_corrupt   mean score of corrupted tokens; mean_clean: of clean ones
    corrupt_share  corrupted tokens / response tokens; recall can reach 1 only when it is < 1 - rho

Run folders: `run_dir/<kind>-<reference>/` (data, reference, scores stages, reused on a rerun);
`run_dir/detection.json` holds every number, `run_dir/trusted.jsonl` the clean trusted split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import numpy as np

from tokenforget.config import RunConfig
from tokenforget.errors import ConfigError
from tokenforget.metrics import detection
from tokenforget.score_methods import NEEDS_NOISY, SCORE_METHODS, apply_method
from tokenforget.stages import data as data_mod
from tokenforget.stages.partition import global_partition

RESULTS_FILE = "detection.json"
TRUSTED_FILE = "trusted.jsonl"


@dataclass
class DetectionRow:
    kind: str
    reference: str
    method: str
    auroc: float
    recall: float
    precision: float
    mean_corrupt: float
    mean_clean: float
    corrupt_share: float
    n_corrupt: int
    n_tokens: int


def measure(arrays: dict[str, np.ndarray], methods: Sequence[str], rho: float, kind: str, reference: str) -> list[DetectionRow]:
    """One row per method from the flat response-token arrays of one scoring pass (`score.response_arrays`)."""
    rows = []
    bad = arrays["corrupt"]
    for m in methods:
        s = apply_method(m, arrays["ce_base"], arrays["ce_ref"], arrays["token_id"], arrays["example"], arrays.get("ce_noisy"))
        d = detection(s, bad, ~global_partition(s, rho))
        rows.append(DetectionRow(
            kind, reference, m, d.auroc, d.recall, d.precision,
            float(s[bad].mean()) if bad.any() else float("nan"), float(s[~bad].mean()) if (~bad).any() else float("nan"),
            d.corrupt_share, d.n_corrupt, d.n_tokens,
        ))
    return rows


def trusted_split(cfg: RunConfig, out: Path) -> str:
    """The clean trusted file: `reference.path` when set, else the `detect.trusted_size` records of `data.path`
    right after the first `data.limit` (the scored ones), written to `out` unchanged. Disjoint by construction;
    the reference stage checks it again (`data.check_disjoint`)."""
    if cfg.reference.path:
        return cfg.reference.path
    dc, n = cfg.data, cfg.detect.trusted_size
    if dc.limit is None:
        raise ConfigError("config field 'data.limit': the trusted split is taken after the first data.limit records; "
                          "set data.limit or reference.path")
    source = data_mod.resolve_source(dc.path or "", dc.hub_fallback)
    raw = data_mod.read_records(source, dc.split, dc.hub_config)
    if len(raw) < dc.limit + n:
        raise ConfigError(f"config field 'detect.trusted_size': {source} has {len(raw)} records, fewer than "
                          f"data.limit + trusted_size = {dc.limit + n}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for _, r in raw[dc.limit : dc.limit + n]))
    tmp.replace(out)
    return str(out)


def run_config(cfg: RunConfig, kind: str, reference: str, trusted: Optional[str], shared: Optional[Path]) -> RunConfig:
    """The RunConfig of one (noise kind, reference) pair; `shared` is a trusted reference already trained."""
    rc = replace(cfg.reference, path=None, checkpoint=None)
    if reference == "trusted":
        rc = replace(rc, checkpoint=str(shared)) if shared else replace(rc, path=trusted)
    elif reference == "checkpoint":
        if not cfg.reference.checkpoint:
            raise ConfigError("config field 'reference.checkpoint': detect.references names 'checkpoint' but none is set")
        rc = replace(rc, checkpoint=cfg.reference.checkpoint)
    data = replace(cfg.data, noise=kind, corrupt_fraction=cfg.detect.fraction)
    return replace(cfg, run_dir=str(Path(cfg.run_dir) / f"{kind}-{reference}"), data=data, reference=rc,
                   score=replace(cfg.score, method="paper"))


def run_detect(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every (noise kind, reference) pair: noisy data, one scoring pass, every method measured. Writes and
    returns the results; prints the table."""
    from tokenforget.model.loading import BaseModel
    from tokenforget.pipeline.resolver import Run
    from tokenforget.stages.score import response_arrays

    if cfg.score.precomputed_path:
        raise ConfigError("config field 'score.precomputed_path': detect injects its own noise, so scores made "
                          "for the clean data cannot match it")
    root = Path(cfg.run_dir)
    methods = cfg.detect.methods or [m for m in SCORE_METHODS if m not in NEEDS_NOISY]  # one reference here
    trusted = trusted_split(cfg, root / TRUSTED_FILE) if "trusted" in cfg.detect.references else None
    base = BaseModel(cfg.model, qlora=cfg.lora.qlora)  # loaded once, shared by every run
    rows: list[DetectionRow] = []
    passes: list[dict[str, Any]] = []
    shared: Optional[Path] = None
    for kind in cfg.detect.kinds:
        for ref in cfg.detect.references:
            t0 = time.time()
            run = Run(run_config(cfg, kind, ref, trusted, shared), base=base, log=log)
            tokens, scores = run.data(), run.score()
            if ref == "trusted" and shared is None:
                shared = run.stage_dir("reference")  # the trusted set is the same for every kind: train once
            rows += measure(response_arrays(tokens, scores), methods, cfg.partition.rho, kind, ref)
            passes.append({"kind": kind, "reference": ref, "run_dir": str(run.root), "examples": len(tokens),
                           "wall_s": round(time.time() - t0, 1), "reused": list(run.skipped)})
    results = {"rho": cfg.partition.rho, "fraction": cfg.detect.fraction, "model": cfg.model.name_or_path,
               "data": cfg.data.path, "trusted": trusted, "passes": passes, "rows": [asdict(r) for r in rows]}
    root.mkdir(parents=True, exist_ok=True)
    (root / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    log(detection_table(results))
    log(f"Results: {(root / RESULTS_FILE).resolve()}")
    return results


def detection_table(results: dict[str, Any]) -> str:
    """Rows = noise kind x reference x method, as text; a note on where the recall target applies."""
    from tokenforget.text_table import format_table

    rho = results["rho"]
    header = ["noise", "reference", "method", "AUROC", f"recall@{rho}", f"precision@{rho}", "mean corrupt",
              "mean clean", "corrupt share"]
    rows = [[r["kind"], r["reference"], r["method"], r["auroc"], r["recall"], r["precision"], r["mean_corrupt"],
             r["mean_clean"], f"{r['corrupt_share']:.3f}{'' if r['corrupt_share'] < 1 - rho else ' *'}"]
            for r in results["rows"]]
    note = (f"Low score = corrupted. Negative set = the lowest {1 - rho:.0%} of response tokens; recall can reach 1 "
            f"only where the corrupted share is < 1 - rho = {1 - rho:.2f} (rows marked * are above it).")
    return "\n".join(["", "Detection of known corrupted tokens", format_table(header, rows), note])


def detection_of_methods(tokens: datasets.Dataset, scores: datasets.Dataset, methods: Sequence[str], rho: float) -> dict[str, dict[str, Any]]:
    """{method: detection figures} for one run's data and scoring pass (the demo's side-by-side table)."""
    from tokenforget.stages.score import response_arrays

    rows = measure(response_arrays(tokens, scores), methods, rho, "", "")
    return {r.method: {k: v for k, v in asdict(r).items() if k not in ("kind", "reference", "method")} for r in rows}
