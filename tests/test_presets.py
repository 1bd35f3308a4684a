"""Named presets (`--preset paper`): what they set, and in which order they meet the config file and flags."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tokenforget.cli import main, parse_config
from tokenforget.config import ConfigError, RunConfig, to_dict
from tokenforget.presets import PRESETS, apply_preset

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture
def file_config(tmp_path: Path) -> Path:
    """A config file that sets data and model, and method fields a preset replaces (rho 0.5, lr 2e-4)."""
    cfg = {"run_dir": str(tmp_path / "run"), "data": {"path": "train.jsonl", "limit": 10},
           "partition": {"rho": 0.5}, "train": {"objective": {"mode": "sft"}, "training": {"learning_rate": 2.0e-4, "batch_size": 4}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_preset_replaces_the_file_and_flags_replace_the_preset(file_config: Path):
    _, cfg, _ = parse_config(["run", str(file_config), "--preset", "paper"])
    assert (cfg.partition.rho, cfg.train.objective.mode, cfg.train.training.learning_rate) == (0.7, "forget", 1e-4)
    assert cfg.train.training.batch_size == 4 and cfg.data.limit == 10  # what the preset does not fix stays the file's
    assert cfg.reference.training.warmup_ratio == 0.03 and cfg.train.objective.t_max == 0.25 and cfg.lora.dropout == 0.1
    _, flagged, _ = parse_config(["run", str(file_config), "--preset=paper", "--partition.rho", "0.6"])
    assert flagged.partition.rho == 0.6 and flagged.train.objective.mode == "forget"
    _, before, _ = parse_config(["run", "--preset", "paper", "--config", str(file_config)])
    assert before == cfg  # the preset goes after the last config file, wherever it is written


def test_the_shipped_paper_config_is_the_paper_preset():
    """configs/paper.yaml writes the paper's setting out in full: the preset changes nothing in it."""
    _, cfg, _ = parse_config(["run", str(CONFIGS / "paper.yaml")])
    assert apply_preset(cfg, "paper") == cfg
    assert apply_preset(replace(cfg, partition=replace(cfg.partition, rho=0.3)), "paper") == cfg


def test_every_preset_makes_a_valid_config_of_method_fields_only():
    base = to_dict(RunConfig())
    for name, values in PRESETS.items():
        assert set(values) <= {"lora", "reference", "score", "partition", "train"}, name  # never data, model, run_dir
        cfg = apply_preset(RunConfig(), name)
        assert to_dict(cfg)["data"] == base["data"] and to_dict(cfg)["model"] == base["model"]


def test_unknown_or_missing_preset_exits_2_naming_the_choices(file_config: Path, capsys):
    assert main(["run", str(file_config), "--preset", "papr"]) == 2
    err = capsys.readouterr().err
    assert "preset" in err and "'papr'" in err and "paper" in err
    assert main(["run", str(file_config), "--preset"]) == 2
    assert "--preset needs a name" in capsys.readouterr().err
    assert main(["run", str(file_config), "--preset", "paper", "--preset=recommended"]) == 2
    assert "more than once" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="preset"):
        apply_preset(RunConfig(), "nope")


def test_the_recommended_preset_is_a_mode_that_needs_no_reference():
    """What measured best (docs/results.md): plain sft. The demo trains it as a mode of its noisy run."""
    assert PRESETS["recommended"] == {"train": {"objective": {"mode": "sft"}}}
    assert apply_preset(RunConfig(), "recommended").train.objective.mode == "sft"
