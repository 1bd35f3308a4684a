"""The report's PNG plots: the score histogram with the rho cut, and the training curves.

matplotlib's object API (`Figure`, no pyplot) keeps no global state and needs no display.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure

LEARN_COLOR = "#2e9e4f"  # the page's colours: green = learn (+1), red = forget (-1)
FORGET_COLOR = "#d6453d"
CURVES = [
    ("loss", "total loss (what the optimizer sees)"),
    ("loss_pos", "CE of positive tokens (learned)"),
    ("loss_neg", "CE of negative tokens (forgotten)"),
    ("lambda", "λ (weight of the forgetting term)"),
]


def clip_range(values: np.ndarray, tail: float = 0.005) -> tuple[float, float]:
    """The central (1 - 2*tail) range of `values`, so a few extreme scores do not squash the histogram."""
    lo, hi = np.quantile(values, [tail, 1 - tail])
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 0.5, float(hi) + 0.5)


def score_histogram(
    scores: np.ndarray,
    positive: Optional[np.ndarray],
    threshold: Optional[float],
    rho: Optional[float],
    corrupt: Optional[np.ndarray],
    path: Path,
) -> None:
    """Histogram of response-token scores, stacked by class, the cut marked; known corrupted tokens on a
    second axis (they are few) when the data marks any.

    Args:
        scores: (N,) score of every response token.
        positive: (N,) bool, True for class +1; None before the partition.
        threshold: the lowest positive score (the cut); rho: the positive share it comes from.
        corrupt: (N,) bool, True for tokens the data marks as corrupted; None or all False when unknown.
    """
    lo, hi = clip_range(scores)
    bins = np.linspace(lo, hi, 61)
    clipped = np.clip(scores, lo, hi)
    fig = Figure(figsize=(9, 4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    if positive is None:
        ax.hist(clipped, bins=bins, color="#888888", label="response tokens")
    else:
        ax.hist([clipped[positive], clipped[~positive]], bins=bins, stacked=True, color=[LEARN_COLOR, FORGET_COLOR],
                label=[f"positive: learned ({positive.sum()})", f"negative: forgotten ({(~positive).sum()})"])
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"cut: ρ = {rho} (score {threshold:.4g})")
    ax.set(xlabel="score = CE(base) − CE(reference), nats", ylabel="tokens",
           title=f"Scores of {scores.size} response tokens (x clipped to the central 99%)")
    handles, labels = ax.get_legend_handles_labels()
    if corrupt is not None and corrupt.any():
        twin = ax.twinx()
        twin.hist(clipped[corrupt], bins=bins, histtype="step", color="black", linewidth=1.5)
        twin.set_ylabel("known corrupted tokens", color="black")
        handles.append(twin.patches[0])
        labels.append(f"known corrupted tokens ({corrupt.sum()}, right axis)")
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    fig.savefig(path)


def curve(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the training log entries (those with a `loss`), skipping NaN."""
    points = [(h["step"], h[key]) for h in history if "loss" in h and key in h]
    points = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    return [s for s, _ in points], [v for _, v in points]


def training_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Four panels (total loss, positive CE, negative CE, λ) against the optimizer step, one line per
    trained variant (`train-forget`, `train-sft`, ...)."""
    fig = Figure(figsize=(10, 6), dpi=110, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title) in zip(axes, CURVES):
        for name, history in histories.items():
            steps, values = curve(history, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=name.removeprefix("train-"))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[2:]:
        ax.set_xlabel("optimizer step")
    fig.savefig(path)
