"""The summary printed at the end: the demo's table, the detection of known corrupted tokens, one screen a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from tokenforget.config import RunConfig
from tokenforget.metrics import Detection, detection
from tokenforget.training.objectives import FORGET
from tokenforget.runfolder import round_stage
from tokenforget.text_table import format_table


class ScoredRun(Protocol):
    """What a detection summary reads of a run: its tokens, scores and token classes (`pipeline.resolver.Run`)."""

    def data(self) -> Any: ...
    def score(self) -> Any: ...
    def partition(self) -> Any: ...


class FinishedRun(Protocol):
    """What a run's summary reads: its folder, its stages, its config, the self-evolving rounds, the stages reused."""

    cfg: RunConfig
    rounds: int
    root: Path
    skipped: list[str]

    def stage_dir(self, name: str) -> Path: ...


def detection_of(run: ScoredRun) -> Detection:
    """How well the run's scores and partition find the tokens its data marks as corrupted."""
    tokens, scores, classes = run.data(), run.score(), run.partition()
    masks = [np.asarray(m, bool) for m in tokens["response_mask"]]

    def flat(column: Sequence[Sequence[float]]) -> np.ndarray:
        return np.concatenate([np.asarray(v)[m] for v, m in zip(column, masks)])

    return detection(flat(scores["score"]), flat(tokens["corrupt"]), flat(classes["token_class"]) == FORGET)


def verdict(diff: float, se: float, n: int, baseline: str = "sft") -> str:
    """A paired difference in words: better or worse than `baseline` where it is over 2 standard errors from 0."""
    if math.isnan(se) or abs(diff) <= 2 * se:
        return f"not distinguishable from {baseline} at n = {n}"
    return f"{'better' if diff > 0 else 'worse'} than {baseline}: {diff:+.3f} ± {se:.3f} ({abs(diff) / se:.1f} se)"


def demo_table(results: dict[str, Any], baseline: str = "sft") -> str:
    """The demo's comparison: each model's accuracy, its paired difference to `baseline` problem by problem with the
    standard error and a verdict in words, gold NLL; what each setting is; then how each setting's negatives find
    the known corrupted tokens (only the columns that hold a number)."""
    from tokenforget.report.fair import paired

    models = results["models"]
    base = models.get(baseline)
    rows = []
    for name, m in models.items():
        vs, words = "", ""
        if base is not None and name not in (baseline, "base"):
            d = paired([m["correct"]], [base["correct"]])
            vs, words = f"{d.mean:+.3f} ± {d.se_problems:.3f}", verdict(d.mean, d.se_problems, m["n"], baseline)
        rows.append([name, f"{m['accuracy']:.3f} ± {m['stderr']:.3f}", vs, words, m["gold_nll"]])
    first = next(iter(models.values()))
    n, nll_n = first["n"], first.get("nll_n", first["n"])  # older results hold no nll_n: every problem
    nll = "gold NLL (nats/token" + ("" if nll_n >= n else f", first {nll_n}") + ")"
    out = ["", f"Held-out clean problems (n = {n}): each model's answers against {baseline}'s on the same problems",
           format_table(["model", "accuracy", f"vs {baseline} (paired)", "verdict", nll], rows)]
    described = results.get("descriptions", {})
    if described:
        out += ["", "What each model is:", *(f"  {k}: {v}" for k, v in described.items() if k in models)]
    methods = results.get("detection_methods")
    if methods:
        untrained = set(results.get("detected_only", []))
        cols = {"auroc": "AUROC (low score = corrupted)", "recall": "recall of its negatives",
                "precision": "precision of its negatives", "mean_corrupt": "mean score corrupt",
                "mean_clean": "mean score clean", "corrupt_share": "chance precision"}
        shown = [k for k in cols if any(not _nan(d.get(k)) for d in methods.values())]
        rows = [[name + (" (no model trained)" if name in untrained else ""),
                 *("-" if _nan(d.get(k)) else d.get(k) for k in shown)] for name, d in methods.items()]
        out += ["", "How each setting's negatives find the tokens known to be corrupted in the training answers "
                "(each with its own score)", format_table(["setting", *(cols[k] for k in shown)], rows)]
        return "\n".join(out)
    d = results.get("detection")
    if d:
        out += [
            "",
            "Finding the known corrupted tokens (training data)",
            format_table(
                ["AUROC (low score = corrupted)", "recall of negative set", "precision of negative set", "chance precision"],
                [[d["auroc"], d["recall"], d["precision"], d["corrupt_share"]]],
            ),
        ]
    return "\n".join(out)


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _final_losses(stage: Path) -> dict[str, float]:
    """The last logged loss, positive and negative CE and lambda of a train stage. A NaN is left out: it
    means no token of that class was logged (`loss_neg` of `sft`, which has no negative tokens)."""
    history = json.loads((stage / "log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    last = logged[-1] if logged else {}
    return {k: last[k] for k in ("loss", "loss_pos", "loss_neg", "lambda") if k in last and not math.isnan(last[k])}


def run_summary(run: FinishedRun, train_stages: Sequence[str]) -> str:
    """One screen: tokens scored, class counts, score quantiles, final losses, where the outputs are."""
    lines = ["", f"Run folder: {run.root.resolve()}"]
    part = run.stage_dir(round_stage("partition", run.rounds)) / "stats.json"  # the last round's
    if part.is_file():
        s = json.loads(part.read_text())
        lines.append(
            f"Tokens scored: {s['n_tokens']}  positive: {s['n_positive']}  negative: {s['n_negative']}  "
            f"(rho={run.cfg.partition.rho}, threshold score {s['threshold']:.4f})"
        )
        lines.append("Score quantiles: " + "  ".join(f"{k}={v:.3f}" for k, v in s["quantiles"].items()))
    for name in train_stages:
        stage = run.stage_dir(name)
        if (stage / "log_history.json").is_file():
            losses = "  ".join(f"{k}={v:.4f}" for k, v in _final_losses(stage).items())
            lines.append(f"{name}: final {losses}")
            lines.append(f"  adapter: {stage / 'adapter'}  merged model: {stage / 'model'}")
    if run.skipped:
        lines.append("Reused finished stages: " + ", ".join(run.skipped))
    return "\n".join(lines)
