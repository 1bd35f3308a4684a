"""TensorBoard logs through the Trainer's own `report_to`: the event files hold what log_history holds."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from conftest import write_jsonl
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tokenforget.cli import main
from tokenforget.stages.demo_task import make_examples

LOGGED = ["loss", "loss_pos", "loss_neg", "lambda", "n_pos", "n_neg"]


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the event files under `log_dir`."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    """conftest.tiny_run: 22 examples, batch 4, one epoch, a log entry at every optimizer step."""
    return tiny_run


def test_events_match_log_history(run_dir: Path):
    history = [h for h in json.loads((run_dir / "train-forget" / "log_history.json").read_text()) if "loss" in h]
    events = scalars(run_dir / "tensorboard" / "train-forget")
    assert len(history) == 6  # 22 examples / batch 4 = 6 steps (the last of 2 examples), each logged
    for key in LOGGED:
        expected = {h["step"]: h[key] for h in history}
        # TB stores float32 (relative error <= 2**-24 ~ 6e-8); step 1 has no negative token, loss_neg is nan
        assert events[f"train/{key}"] == pytest.approx(expected, rel=1e-6, nan_ok=True)


def test_token_counts_add_up_to_the_partition(run_dir: Path):
    """One epoch, every step logged: the logged n_pos (n_neg) add up to the +1 (-1) tokens of the data."""
    classes = datasets.load_from_disk(str(run_dir / "partition" / "classes"))["token_class"]
    n_pos = sum(c.count(1) for c in classes)
    n_neg = sum(c.count(-1) for c in classes)
    stats = json.loads((run_dir / "partition" / "stats.json").read_text())
    assert (n_pos, n_neg) == (stats["n_positive"], stats["n_negative"])
    events = scalars(run_dir / "tensorboard" / "train-forget")
    assert sum(events["train/n_pos"].values()) == n_pos
    assert sum(events["train/n_neg"].values()) == n_neg


def test_reference_training_is_logged_too(run_dir: Path):
    events = scalars(run_dir / "tensorboard" / "reference")
    assert len(events["train/loss"]) == 6  # 0.5 * 22 = 11 examples: 3 steps of 4, 4, 3; 2 epochs
    assert "train/loss_neg" in events and "train/lambda" not in events  # sft: no lambda


def test_report_to_none_writes_no_events(tmp_path: Path, tiny_model_dir: Path):
    data = write_jsonl(tmp_path / "train.jsonl", make_examples(8, seed=0, noise=0.0))
    args = ["train", "--run_dir", str(tmp_path / "run"), "--model.name_or_path", str(tiny_model_dir),
            "--model.precision", "fp32", "--data.path", str(data), "--train.objective.mode", "sft",
            "--train.training.batch_size", "4", "--lora.r", "4", "--report_to", "[none]"]
    assert main(args) == 0
    assert (tmp_path / "run" / "train-sft" / "log_history.json").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()
