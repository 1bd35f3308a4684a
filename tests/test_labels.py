"""Exported token labels: what `partition` writes, training from them without scoring, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import build_tiny, stage_dirs
from safetensors.torch import load_file

from tokenforget.cli import main
from tokenforget.config import ModelConfig
from tokenforget.model.loading import load_tokenizer
from tokenforget.stages.labels_in_data import DataError
from tokenforget.stages.labels import labels_table, read_labels, tokenizer_digest, write_labels


def test_partition_exports_ids_scores_and_classes(config: Path, tiny_tokenizer):
    """Every column equals the stage it comes from, row by row, in data order."""
    run = config.parent / "run"
    assert main(["partition", str(config)]) == 0
    table = pq.read_table(run / "labels" / "labels.parquet")
    got = table.to_pydict()
    tokens = datasets.load_from_disk(str(run / "data" / "tokens"))
    scores = datasets.load_from_disk(str(run / "scores" / "scores"))
    classes = datasets.load_from_disk(str(run / "partition" / "classes"))
    assert got["input_ids"] == tokens["input_ids"] and got["example"] == tokens["example"]
    assert got["token_class"] == classes["token_class"]
    for name in ("score", "ce_base", "ce_ref"):
        for row, want in zip(got[name], scores[name]):
            np.testing.assert_array_equal(np.float32(row), np.float32(want))  # stored as float32, scored as float32
    meta = json.loads(table.schema.metadata[b"tokenforget"])
    assert meta["tokenizer"] == tokenizer_digest(tiny_tokenizer) and meta["rho"] == 0.7


def test_training_from_exported_labels_needs_no_scoring_and_gives_the_same_model(config: Path, tmp_path: Path):
    """Run A trains `forget` the usual way; run B trains on A's labels.parquet with a data path that does not
    exist. B writes only its train stage, and its adapter is bit-identical to A's: same seed, same token
    ids and classes in the same order, same code path."""
    assert main(["train", str(config)]) == 0
    a = config.parent / "run"
    cfg_b = yaml.safe_load(config.read_text())
    cfg_b.update(run_dir=str(tmp_path / "b"), data={"path": str(tmp_path / "no-such-file.jsonl")})
    cfg_b["train"]["labels_path"] = str(a / "labels")
    path_b = tmp_path / "b.yaml"
    path_b.write_text(yaml.safe_dump(cfg_b))
    assert main(["train", str(path_b)]) == 0
    b = tmp_path / "b"
    assert stage_dirs(b) == ["train-forget"]
    wa = load_file(a / "train-forget" / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "train-forget" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    assert main(["train", str(path_b), "--train.objective.mode", "sft"]) == 0  # sft on the same tokens: no forget class
    history = json.loads((b / "train-sft" / "log_history.json").read_text())
    assert {h["n_neg"] for h in history if "n_neg" in h} == {0}


def test_labels_of_another_tokenizer_or_misaligned_are_refused(tmp_path: Path, tiny_tokenizer):
    other = load_tokenizer(ModelConfig(name_or_path=str(build_tiny(tmp_path / "other", vocab_size=300))))
    zeros = {k: [[0.0, 0.0]] for k in ("score", "ce_base", "ce_ref")}
    (tmp_path / "a").mkdir()
    write_labels(labels_table([[1, 2]], [[0, 1]], zeros, [0], {"tokenizer": tokenizer_digest(other)}), tmp_path / "a")
    with pytest.raises(DataError, match="made with another tokenizer"):
        read_labels(str(tmp_path / "a"), tiny_tokenizer)
    assert read_labels(str(tmp_path / "a"), other)["token_class"] == [[0, 1]]

    (tmp_path / "b").mkdir()
    write_labels(labels_table([[1, 2], [3, 4, 5]], [[0, 1], [0, 1]], {k: [[0.0]] * 2 for k in zeros}, [0, 1], {}), tmp_path / "b")
    with pytest.raises(DataError, match=r"row 1: 3 input_ids but 2 token_class"):
        read_labels(str(tmp_path / "b" / "labels.parquet"), tiny_tokenizer)
    with pytest.raises(DataError, match="neither a labels file"):
        read_labels(str(tmp_path / "missing"), tiny_tokenizer)
