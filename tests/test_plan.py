"""Dry run: nothing written, stages to run or reuse by fingerprint, counts and steps worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import config  # noqa: F401  (fixture: a run config on the tiny model)
from tokenforget.cli import main, parse_config
from tokenforget.config import TrainingConfig
from tokenforget.pipeline import Run
from tokenforget.plan import optimizer_steps, plan_run, score_padded_tokens, train_padded_tokens


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file and folder under `root`."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def test_dry_run_writes_nothing_and_reports_what_would_run(config: Path, capsys):  # noqa: F811
    run = config.parent / "run"
    assert main(["run", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not run.exists()
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] and line.split()[0] in
            ("data", "reference", "scores", "partition", "labels", "train-forget")}
    assert rows == dict.fromkeys(["data", "reference", "scores", "partition", "labels", "train-forget"], "run")
    assert "Estimated wall time" in out and "training micro-batch (4, " in out and "scoring forward (8, " in out

    assert main(["reference", str(config)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["run", str(config), "--dry-run", "--partition.rho", "0.5"]) == 0
    out = capsys.readouterr().out
    assert snapshot(run) == before
    status = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] and line.split()[0] in
              ("data", "reference", "scores", "train-forget")}
    assert status == {"data": "reuse", "reference": "reuse", "scores": "run", "train-forget": "run"}


def test_predicted_steps_and_tokens_match_the_real_run(config: Path):  # noqa: F811
    """The plan's example count is the data stage's, and its optimizer steps are what the Trainer then does
    (24 examples, batch 4, 1 epoch: 6 steps). The reference trains on round(0.25 x 24) = 6 examples: 2 steps."""
    _, cfg, _ = parse_config(["run", str(config)])
    plans, _ = plan_run(Run(cfg), ["forget", "sft"], measure=False)
    by = {p.name: p for p in plans}
    assert list(by) == ["data", "reference", "scores", "partition", "labels", "train-forget", "train-sft"]
    assert by["reference"].examples == 6 and by["reference"].work.startswith("2 optimizer steps")
    assert main(["train", str(config), "--train.mode", "sft"]) == 0
    run = config.parent / "run"
    assert by["data"].examples == json.loads((run / "data" / "stage.json").read_text())["kept"] == 24
    history = json.loads((run / "train-sft" / "log_history.json").read_text())
    assert by["train-sft"].work.startswith("6 optimizer steps") and history[-1]["step"] == 6


def test_counts_by_hand():
    """Steps: 10 examples in batches of 4 are 3 micro-batches an epoch; with grad_accum 2 that is
    ceil(3/2) = 2 steps an epoch, ceil(1.5 x 2) = 3 steps for 1.5 epochs; max_steps wins when set.
    Padded tokens, all examples 5 long: batches 4, 4, 2 per epoch -> 50 tokens, two epochs 100.
    Scoring lengths 3, 5, 2, 4 in batches of 2: length groups (5, 4) and (3, 2) -> 2x5 + 2x3 = 16."""
    assert optimizer_steps(10, TrainingConfig(batch_size=4, grad_accum=2, epochs=1)) == 2
    assert optimizer_steps(10, TrainingConfig(batch_size=4, grad_accum=2, epochs=1.5)) == 3
    assert optimizer_steps(10, TrainingConfig(batch_size=4, max_steps=7)) == 7
    assert train_padded_tokens([[0] * 5] * 10, TrainingConfig(batch_size=4, epochs=2), seed=0) == 100
    assert score_padded_tokens([[0] * 3, [0] * 5, [0] * 2, [0] * 4], 2) == 16
