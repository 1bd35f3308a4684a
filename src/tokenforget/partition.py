"""Partition: rank every response token of the data set by score; the top rho are positive.

Ranking is global (the paper's choice): one threshold for the whole data set, not per example.
Exactly round(rho * N) tokens are positive (halves round up). Ties are broken by data order: among
equal scores the token that comes first (earlier example, then earlier position) ranks higher, so
the partition is deterministic and the counts are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from tokenforget.losses import FORGET, LEARN, NO_LOSS


def n_positive(n_tokens: int, rho: float) -> int:
    """How many of `n_tokens` are positive at ratio `rho`: round half up of rho * n."""
    return min(n_tokens, int(math.floor(rho * n_tokens + 0.5)))


def global_partition(scores: np.ndarray, rho: float) -> np.ndarray:
    """Boolean (N,) mask: True for the round(rho*N) highest scores, ties to the earlier token.

    Args:
        scores: (N,) scores of all response tokens in data order.
        rho: share of positive tokens, in [0, 1].
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    order = np.argsort(-scores, kind="stable")  # stable: equal scores keep data order
    positive = np.zeros(scores.shape[0], dtype=bool)
    positive[order[: n_positive(scores.shape[0], rho)]] = True
    return positive


@dataclass
class PartitionStats:
    n_tokens: int
    n_positive: int
    n_negative: int
    threshold: float  # lowest positive score (nan when no token is positive)
    quantiles: dict[str, float]


def token_classes(
    scores: Sequence[np.ndarray], response_masks: Sequence[Sequence[int]], rho: float
) -> tuple[list[np.ndarray], PartitionStats]:
    """Per-example class arrays (+1 learn, -1 forget, 0 no loss) from per-example score arrays."""
    masks = [np.asarray(m, dtype=bool) for m in response_masks]
    flat = np.concatenate([np.asarray(s, np.float64)[m] for s, m in zip(scores, masks)])
    positive = global_partition(flat, rho)
    classes, start = [], 0
    for m in masks:
        cls = np.full(m.shape[0], NO_LOSS, dtype=np.int8)
        n = int(m.sum())
        cls[m] = np.where(positive[start : start + n], LEARN, FORGET)
        classes.append(cls)
        start += n
    return classes, _stats(flat, positive)


def _stats(flat: np.ndarray, positive: np.ndarray) -> PartitionStats:
    qs = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    values = np.quantile(flat, qs) if flat.size else np.full(len(qs), np.nan)
    return PartitionStats(
        n_tokens=int(flat.size),
        n_positive=int(positive.sum()),
        n_negative=int(flat.size - positive.sum()),
        threshold=float(flat[positive].min()) if positive.any() else float("nan"),
        quantiles={f"q{int(q * 100)}": float(v) for q, v in zip(qs, values)},
    )
