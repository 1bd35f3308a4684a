"""The global partition for scores that never sit in memory together: a cut from per-shard histograms.

`streaming_threshold` finds the cut in three passes over the shards, then counts exactly against it and reports the
rho it achieves; `partition_streaming` is the partition stage (`partition.streaming: true`) over it, a block of
examples at a time. The exact partition and the other selections are in `tokenforget.stages.partition`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa

from tokenforget.columns import flat_list_column, list_column
from tokenforget.config.tokens import PartitionConfig
from tokenforget.errors import ConfigError
from tokenforget.training.objectives import FORGET, LEARN


def n_positive(n_tokens: int, rho: float) -> int:
    """How many of `n_tokens` are positive at ratio `rho`: round half up of rho * n."""
    return min(n_tokens, int(math.floor(rho * n_tokens + 0.5)))


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
        hist += np.histogram(s, bins=bins, range=(lo, hi))[0]  # uniform bins: O(n), no search
    from_top = np.cumsum(hist[::-1])  # tokens in the top j+1 bins
    b = bins - 1 - int(np.searchsorted(from_top, k))  # bin holding the k-th highest score
    threshold = float(edges[b])
    positive = sum(int((s >= threshold).sum()) for s in shards())
    return StreamingCut(threshold, n, positive, rho)



def partition_streaming(tokens: Any, scores: Any, pc: PartitionConfig) -> tuple[pa.Table, dict[str, Any]]:
    """Scores read a block of examples at a time: histogram cut, exact count, achieved rho reported."""
    rows = pc.stream_rows
    if "data_weight" in tokens.column_names:
        raise ConfigError("config field 'partition.streaming': the streaming cut does not read the data's weights; "
                          "set partition.streaming: false")

    def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for lo in range(0, len(scores), rows):
            hi = min(lo + rows, len(scores))
            sc, offsets = flat_list_column(scores.data.slice(lo, hi - lo).column("score"))
            resp, _ = flat_list_column(tokens.data.slice(lo, hi - lo).column("response_mask"))
            yield sc, resp.astype(bool), offsets

    cut = streaming_threshold(lambda: (sc[resp] for sc, resp, _ in blocks()), pc.rho)
    parts = []
    for sc, resp, offsets in blocks():
        cls = np.where(resp, np.where(sc >= cut.threshold, LEARN, FORGET), 0).astype(np.int8)
        parts.append(pa.table({"token_class": list_column(offsets, cls)}))
    stats = {"n_tokens": cut.n_tokens, "n_positive": cut.n_positive, "n_negative": cut.n_tokens - cut.n_positive,
             "threshold": cut.threshold, "target_rho": cut.target_rho, "achieved_rho": cut.achieved_rho,
             "quantiles": {}}
    return pa.concat_tables(parts), stats
