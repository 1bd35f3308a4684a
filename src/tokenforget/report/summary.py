"""The summary printed at the end: the demo's table, the detection of known corrupted tokens, one screen a run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tokenforget.metrics import Detection, detection
from tokenforget.objectives import FORGET
from tokenforget.runfolder import round_stage
from tokenforget.text_table import format_table


def detection_of(run: Any) -> Detection:
    """How well the run's scores and partition find the tokens its data marks as corrupted."""
    tokens, scores, classes = run.data(), run.score(), run.partition()
    masks = [np.asarray(m, bool) for m in tokens["response_mask"]]

    def flat(column: Sequence[Sequence[float]]) -> np.ndarray:
        return np.concatenate([np.asarray(v)[m] for v, m in zip(column, masks)])

    return detection(flat(scores["score"]), flat(tokens["corrupt"]), flat(classes["token_class"]) == FORGET)


def demo_table(results: dict[str, Any]) -> str:
    """The demo's comparison: accuracy and gold NLL per model, then detection of corrupted tokens."""
    rows = [
        [name, f"{m['accuracy']:.3f} ± {m['stderr']:.3f} (n={m['n']})", m["gold_nll"]]
        for name, m in results["models"].items()
    ]
    out = ["", "Held-out clean split", format_table(["model", "answer accuracy", "gold NLL (nats/token)"], rows)]
    methods = results.get("detection_methods")
    if methods:
        untrained = set(results.get("detected_only", []))
        rows = [[name + (" (no model trained)" if name in untrained else ""), d["auroc"], d["recall"], d["precision"],
                 d["mean_corrupt"], d["mean_clean"], d["corrupt_share"]] for name, d in methods.items()]
        out += ["", "Finding the known corrupted tokens (training data), each setting with its own score method, "
                "reference and rho; `paper` on a slice of the noisy data, the others on a small trusted set; `filter` "
                "counts whole examples (a wrong one has a corrupted token)",
                format_table(["setting", "AUROC (low score = corrupted)", "recall of negative set",
                              "precision of negative set", "mean score corrupt", "mean score clean", "chance precision"], rows)]
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


def _final_losses(stage: Path) -> dict[str, float]:
    """The last logged loss, positive and negative CE and lambda of a train stage. A NaN is left out: it
    means no token of that class was logged (`loss_neg` of `sft`, which has no negative tokens)."""
    history = json.loads((stage / "log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    last = logged[-1] if logged else {}
    return {k: last[k] for k in ("loss", "loss_pos", "loss_neg", "lambda") if k in last and not math.isnan(last[k])}


def run_summary(run: Any, train_stages: Sequence[str]) -> str:
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
