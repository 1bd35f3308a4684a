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
    """Histogram of response-token scores, stacked by class, with the cut; below it, when the data marks
    corrupted tokens, their score distribution against the other tokens'.

    Args:
        scores: (N,) score of every response token.
        positive: (N,) bool, True for class +1; None before the partition.
        threshold: the lowest positive score (the cut); rho: the positive share it comes from.
        corrupt: (N,) bool, True for tokens the data marks as corrupted; None or all False when unknown.
    """
    lo, hi = clip_range(scores)
    bins = np.linspace(lo, hi, 61)
    clipped = np.clip(scores, lo, hi)
    with_corrupt = corrupt is not None and bool(corrupt.any())
    fig = Figure(figsize=(9, 6.5 if with_corrupt else 4), dpi=110, layout="constrained")
    axes = fig.subplots(2 if with_corrupt else 1, 1, sharex=True, squeeze=False).ravel()
    _class_histogram(axes[0], clipped, positive, bins)
    if with_corrupt:
        _corrupt_histogram(axes[1], clipped, corrupt, bins)
    for ax in axes:
        if threshold is not None and math.isfinite(threshold):
            ax.axvline(threshold, color="black", linestyle="--", label=f"cut: ρ = {rho} (score {threshold:.4g})")
        ax.legend(fontsize=8, loc="upper right")
    axes[0].set_title(f"Scores of {scores.size} response tokens (x clipped to the central 99%)")
    axes[-1].set_xlabel("score = CE(base) − CE(reference), nats")
    fig.savefig(path)


def _class_histogram(ax: Any, clipped: np.ndarray, positive: Optional[np.ndarray], bins: np.ndarray) -> None:
    """Token counts per score bin, stacked green (learned) over red (forgotten); log scale, because
    most tokens sit near score 0 (the base already predicts them) and would flatten the rest."""
    if positive is None:
        ax.hist(clipped, bins=bins, color="#888888", label="response tokens")
    else:
        ax.hist([clipped[positive], clipped[~positive]], bins=bins, stacked=True, color=[LEARN_COLOR, FORGET_COLOR],
                label=[f"positive: learned ({positive.sum()})", f"negative: forgotten ({(~positive).sum()})"])
    ax.set_yscale("log")
    ax.set_ylabel("tokens (log scale)")


def _corrupt_histogram(ax: Any, clipped: np.ndarray, corrupt: np.ndarray, bins: np.ndarray) -> None:
    """Share of each group (known corrupted, the rest) per score bin: the groups differ in size by far,
    so shares, not counts, show whether corrupted tokens score lower."""
    for mask, colour, name in ((corrupt, "black", "known corrupted"), (~corrupt, "#7a8794", "other response tokens")):
        values = clipped[mask]
        ax.hist(values, bins=bins, weights=np.full(values.size, 1 / values.size), histtype="step", linewidth=1.5,
                color=colour, label=f"{name} ({values.size})")
    ax.set_ylabel("share of the group")
    ax.set_title("Do the known corrupted tokens score lower?", fontsize=10)


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
