"""Exported token labels: one Parquet file with the token ids, scores and classes of every example.

    run_dir/labels/labels.parquet
      input_ids    list<int32>    the tokens exactly as the scorer saw them (chat template applied)
      token_class  list<int8>     +1 learn, -1 forget, 0 no loss (prompt, first token)
      score        list<float32>  CE_base - CE_ref per token (0 at position 0)
      ce_base      list<float32>  CE under the base model
      ce_ref       list<float32>  CE under the reference model
      example      int64          row of the source data file
      token_weight list<float32>  |weight| of each token (only with `partition.selection: soft`)

Any trainer can read it (`datasets.load_dataset("parquet", ...)`, pandas, polars); `ForgettingSFTTrainer`
(TRL) and `tokenforget train --train.labels_path` train on it without scoring again. The schema metadata
(`tokenforget` key) records the tokenizer it was made with, so training with another tokenizer stops
with an error instead of learning from misaligned classes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.table import InMemoryTable
from transformers import PreTrainedTokenizerBase

from tokenforget.runfolder import fingerprint
from tokenforget.stages.labels_in_data import DataError
from tokenforget.stages.stage import Arg, PlanInputs, Stage, StagePlan, StageRun

LABELS_FILE = "labels.parquet"
FORMAT = "tokenforget-labels/1"
META_KEY = b"tokenforget"
REQUIRED = ("input_ids", "token_class")


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary (token -> id) and the special tokens: equal digests tokenize alike."""
    blob = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


Column = Union[Sequence[Any], pa.Array, pa.ChunkedArray]


def _column(values: Column, kind: pa.DataType) -> Union[pa.Array, pa.ChunkedArray]:
    """Arrow columns are cast without a trip through Python objects; Python lists are converted."""
    return values.cast(kind) if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, kind)


def table_of_stages(tokens: Any, scores: Any, classes: Any, meta: dict[str, Any]) -> Any:
    """`labels_table` from the data, scores and partition stages' datasets (their Arrow columns: no Python lists)."""
    column = lambda ds, name: ds.data.column(name)  # noqa: E731
    weights = column(classes, "token_weight") if "token_weight" in classes.column_names else None
    return labels_table(column(tokens, "input_ids"), column(classes, "token_class"),
                        {k: column(scores, k) for k in ("score", "ce_base", "ce_ref")}, column(tokens, "example"), meta,
                        weights=weights)


def labels_table(
    input_ids: Column,
    token_class: Column,
    scores: dict[str, Column],
    example: Column,
    meta: dict[str, Any],
    weights: Optional[Column] = None,
) -> pa.Table:
    """The labels as an Arrow table; `scores` holds the `score`, `ce_base` and `ce_ref` columns, `weights`
    the soft selection's per-token |weight| (column `token_weight`, left out when None).

    Columns are Arrow arrays (a stage's `dataset.data.column(...)`) or Python lists, one entry per example.
    """
    floats = pa.list_(pa.float32())
    columns = {
        "input_ids": _column(input_ids, pa.list_(pa.int32())),
        "token_class": _column(token_class, pa.list_(pa.int8())),
        **{name: _column(scores[name], floats) for name in ("score", "ce_base", "ce_ref")},
        "example": _column(example, pa.int64()),
    }
    if weights is not None:
        columns["token_weight"] = _column(weights, floats)
    table = pa.table(columns)
    return table.replace_schema_metadata({META_KEY: json.dumps({"format": FORMAT, **meta}).encode()})


def write_labels(table: pa.Table, folder: Path) -> Path:
    path = folder / LABELS_FILE
    pq.write_table(table, path)
    return path


def labels_file(path: str) -> Path:
    """The Parquet file of `path`: the file itself, or `labels.parquet` inside a labels folder."""
    p = Path(path).expanduser()
    p = p / LABELS_FILE if p.is_dir() else p
    if not p.is_file():
        raise DataError(f"train.labels_path: '{path}' is neither a labels file nor a folder holding {LABELS_FILE}")
    return p


def read_labels(path: str, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """Load exported labels for training, checking columns, alignment and the tokenizer.

    Returns an in-memory data set (nothing is written to a cache) with at least `input_ids`, `token_class`.
    """
    p = labels_file(path)
    table = pq.read_table(p)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"{p}: missing column(s) {missing}; a labels file has {list(REQUIRED)}")
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    ours = tokenizer_digest(tokenizer)
    if meta.get("tokenizer") not in (None, ours):
        raise DataError(
            f"{p}: made with another tokenizer (digest {meta['tokenizer']}, model {meta.get('model')!r}); "
            f"the configured model's tokenizer has digest {ours}, so its token ids would not match"
        )
    n_ids = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)
    n_cls = pc.list_value_length(table["token_class"]).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(n_ids != n_cls)
    if bad.size:
        row = int(bad[0])
        raise DataError(f"{p} row {row}: {n_ids[row]} input_ids but {n_cls[row]} token_class entries")
    return datasets.Dataset(InMemoryTable(table.replace_schema_metadata(None)))


# ---------------------------------------------------------------- the stage


def _make(run: StageRun, _arg: Arg) -> Path:
    """Export ids, scores and classes per example as one Parquet file any trainer can read; returns the file."""
    tokens, scores, classes = run.need("data"), run.need("scores", run.rounds), run.need("partition", run.rounds)

    def build() -> Any:
        meta = {"model": run.cfg.model.name_or_path, "tokenizer": tokenizer_digest(run.base.tokenizer),
                "rho": run.cfg.partition.rho, "data": run.cfg.data.path}
        return table_of_stages(tokens, scores, classes, meta)

    def commit(table: Any, d: Path) -> dict[str, Any]:
        path = write_labels(table, d)
        run.log(f"[labels] {len(tokens)} examples -> {run.folder.stage_dir('labels') / path.name}")
        return {"examples": len(tokens)}

    return run.folder.ensure("labels", run.fp("labels"), build, commit) / LABELS_FILE


def _plan(_run: StageRun, _arg: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    sets = inputs.sets
    return StagePlan("labels", fp, reuse, len(sets.all), sum(map(len, sets.all)), "write labels.parquet", 0.0)


STAGES = (Stage(
    "labels",
    lambda run, _arg: [("data", None), ("scores", run.rounds), ("partition", run.rounds)],
    lambda run, _arg: fingerprint("labels", FORMAT, run.fp("partition", run.rounds)),
    _make,
    _plan,
),)
