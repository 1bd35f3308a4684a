"""Arrow list columns of per-token values (one list per example), read and written without a Python loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def has_base_ce(scores: Any) -> bool:
    """Whether per-token scores (a Dataset with `ce_base`) hold a measured CE_base; a scoring pass without the
    base model (`score.base_pass`) stores it as NaN."""
    values = flat_list_column(scores.data.column("ce_base"))[0]
    return not (values.size and np.isnan(values).all())



def flat_list_column(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of an Arrow list column: row i is values[offsets[i]:offsets[i + 1]]."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy() - arr.offsets[0].as_py()
    return arr.flatten().to_numpy(zero_copy_only=False), offsets



def list_column(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """A list-per-example Arrow column from flat `values` and where each example starts (`offsets`)."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
