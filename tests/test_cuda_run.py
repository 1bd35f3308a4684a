"""A whole `tokenforget run` on the GPU (tiny model built in code): every stage, on CUDA, in bf16."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config
from tokenforget.cli import main

STAGES = ["data", "reference", "scores", "partition", "labels", "train-forget"]


@pytest.mark.cuda
def test_run_on_cuda_in_bf16(tmp_path: Path, tiny_model_dir: Path):
    """`run` with model.precision bf16 on a CUDA machine: every stage written, the GPU used (memory was
    allocated on it), and every logged training loss of the forget training finite."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg["model"]["precision"] = "bf16"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torch.cuda.reset_peak_memory_stats()
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    assert all((run / s / "stage.json").is_file() for s in STAGES)
    assert torch.cuda.max_memory_allocated() > 0
    history = json.loads((run / "train-forget" / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses), history
