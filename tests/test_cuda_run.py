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
    """`run` with model.precision bf16 on a CUDA machine: every stage written, the GPU used (its peak
    memory at least the model's weights), and every logged training loss of the forget training finite."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg["model"]["precision"] = "bf16"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torch.cuda.reset_peak_memory_stats()
    assert main(["run", str(path)]) == 0
    run = tmp_path / "run"
    assert all((run / s / "stage.json").is_file() for s in STAGES)
    # the GPU held at least the model's fp32 weights (bf16 is autocast over fp32 weights): the run trained there
    from transformers import AutoModelForCausalLM

    weights = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters()) * 4
    assert torch.cuda.max_memory_allocated() >= weights
    history = json.loads((run / "train-forget" / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses), history


@pytest.mark.cuda
@pytest.mark.parametrize("model", [{"precision": "fp16"}, {"precision": "bf16", "weights": "bf16"}],
                         ids=["fp16-loss-scaling", "bf16-weights"])
def test_train_on_cuda_in_fp16_and_with_bf16_weights(tmp_path: Path, tiny_model_dir: Path, model: dict):
    """`train --train.objective.mode sft` with fp16 autocast and the Trainer's loss scaling over fp32 weights, and with
    the frozen base in bf16 weights (LoRA in fp32): the stage is written and every logged loss is finite."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir)
    cfg["model"].update(model)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--train.objective.mode", "sft"]) == 0
    history = json.loads((tmp_path / "run" / "train-sft" / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses), history
