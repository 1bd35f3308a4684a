"""Partition: rank every response token of the data set by score; the top rho are positive.

Ranking is global (the paper's choice): one threshold for the whole data set, not per example.
Exactly round(rho * N) tokens are positive (halves round up). Ties are broken by data order: among
equal scores the token that comes first (earlier example, then earlier position) ranks higher, so
the partition is deterministic and the counts are exact. Selection is O(N) (`np.partition`), on flat
arrays read straight from Arrow, so 25 million scores take well under a second.

For score sets that do not fit in memory, `streaming_threshold` finds the cut from per-shard
histograms merged across shards, then counts exactly against it and reports the rho it achieves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

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
    n, k = scores.shape[0], n_positive(scores.shape[0], rho)
    if k in (0, n):
        return np.full(n, k == n, dtype=bool)
    cut = np.partition(scores, n - k)[n - k]  # the k-th highest score
    positive = scores > cut
    ties = np.flatnonzero(scores == cut)[: k - int(positive.sum())]  # earliest tied tokens fill the rest
    positive[ties] = True
    return positive


@dataclass
class PartitionStats:
    n_tokens: int
    n_positive: int
    n_negative: int
    threshold: float  # lowest positive score (nan when no token is positive)
    quantiles: dict[str, float]


def flat_list_column(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of an Arrow list column: row i is values[offsets[i]:offsets[i + 1]]."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy() - arr.offsets[0].as_py()
    return arr.flatten().to_numpy(zero_copy_only=False), offsets


def flat_token_classes(scores: np.ndarray, response: np.ndarray, rho: float) -> tuple[np.ndarray, PartitionStats]:
    """Flat int8 classes (+1 learn, -1 forget, 0 no loss) for flat per-token scores and response flags."""
    resp = response.astype(bool)
    chosen = scores[resp]
    positive = global_partition(chosen, rho)
    classes = np.full(scores.shape[0], NO_LOSS, dtype=np.int8)
    classes[resp] = np.where(positive, LEARN, FORGET)
    return classes, _stats(chosen, positive)


def token_classes(
    scores: Sequence[np.ndarray], response_masks: Sequence[Sequence[int]], rho: float
) -> tuple[list[np.ndarray], PartitionStats]:
    """Per-example class arrays from per-example score arrays (convenience over `flat_token_classes`)."""
    lengths = [len(m) for m in response_masks]
    flat, stats = flat_token_classes(
        np.concatenate([np.asarray(s, np.float32) for s in scores]),
        np.concatenate([np.asarray(m, np.int8) for m in response_masks]),
        rho,
    )
    return np.split(flat, np.cumsum(lengths)[:-1]), stats


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


@dataclass
class StreamingCut:
    """The cut a streaming partition found: tokens with score >= threshold are positive."""

    threshold: float
    n_tokens: int
    n_positive: int
    target_rho: float

    @property
    def achieved_rho(self) -> float:
        return self.n_positive / max(self.n_tokens, 1)


def streaming_threshold(shards: Callable[[], Iterable[np.ndarray]], rho: float, bins: int = 1 << 20) -> StreamingCut:
    """Global cut for scores that never sit in memory together, in three passes over `shards()`.

    Pass 1: min and max. Pass 2: per-shard histograms on one shared grid of `bins` bins, summed; the
    threshold is the lower edge of the bin where the count from the top first reaches round(rho*N).
    Pass 3: exact count of scores >= threshold. The achieved rho differs from the target by at most
    the mass of one bin (ties in that bin are all positive).

    Args:
        shards: called once per pass; yields 1-D arrays of response-token scores.
    """
    lo, hi, n = math.inf, -math.inf, 0
    for s in shards():
        if s.size:
            lo, hi, n = min(lo, float(s.min())), max(hi, float(s.max())), n + s.size
    k = n_positive(n, rho)
    if k == 0 or n == 0:
        return StreamingCut(math.inf, n, 0, rho)
    edges = np.linspace(lo, hi, bins + 1)
    hist = np.zeros(bins, dtype=np.int64)
    for s in shards():
        hist += np.histogram(s, bins=edges)[0]
    from_top = np.cumsum(hist[::-1])  # tokens in the top j+1 bins
    b = bins - 1 - int(np.searchsorted(from_top, k))  # bin holding the k-th highest score
    threshold = float(edges[b])
    positive = sum(int((s >= threshold).sum()) for s in shards())
    return StreamingCut(threshold, n, positive, rho)
