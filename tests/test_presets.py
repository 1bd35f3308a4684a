"""Named presets (`--preset paper`): what they set, and in which order they meet the config file and flags."""

from __future__ import annotations

import json
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
    from tokenforget.config import ReferenceConfig

    with_clean_file = RunConfig(reference=ReferenceConfig(path="clean.jsonl"))  # `trusted` needs one (data: not a preset's)
    base = to_dict(with_clean_file)
    for name, values in PRESETS.items():
        assert set(values) <= {"lora", "reference", "score", "partition", "train"}, name  # never data, model, run_dir
        cfg = apply_preset(with_clean_file, name)
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


def test_the_trusted_preset_is_the_demos_contrastive_detector():
    """`trusted` sets the two-reference detector the demo measures (`contrastive`): two noisy references on a quarter
    of the answers each, CE_noisy - CE_trusted decided per number, negative below -1 nat, the negatives ignored. It
    needs the clean file (`reference.path`): without one both references learn the noise, refused at the edge."""
    from tokenforget.commands.demo import CONTRASTIVE_PRESET
    from tokenforget.config import ReferenceConfig

    cfg = apply_preset(RunConfig(reference=ReferenceConfig(path="clean.jsonl")), "trusted")
    assert CONTRASTIVE_PRESET == "trusted"
    assert (cfg.reference.noisy_folds, cfg.reference.noisy_fraction, cfg.reference.path) == (2, 0.25, "clean.jsonl")
    assert (cfg.score.method, cfg.score.spans, cfg.partition.selection, cfg.partition.threshold) == \
        ("contrastive", "number", "threshold", -1.0)
    assert cfg.train.objective.mode == "ignore"
    with pytest.raises(ConfigError, match="reference.path"):
        apply_preset(RunConfig(), "trusted")


def test_the_trusted_preset_end_to_end_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path, capsys):
    """`tokenforget run CONFIG --preset trusted` with a clean file as the trusted reference's data and as the trusted
    set: the noisy references train, every scored token below -1 nat (and only those) is ignored, and the final
    training learns the 24 noisy answers' kept tokens plus the 8 clean answers whole: 32 answers, ceil(32 / 4) = 8
    steps."""
    import pyarrow.parquet as pq
    from conftest import tiny_run_config, write_jsonl

    from tokenforget.stages.demo_task import make_examples

    noisy = make_examples(24, seed=0, noise=0.25)
    taken = {r["prompt"] for r in noisy}  # the trusted set shares no prompt with the data (else refused)
    clean = write_jsonl(tmp_path / "clean.jsonl", [r for r in make_examples(40, seed=5, noise=0.0) if r["prompt"] not in taken][:8])
    raw = tiny_run_config(tmp_path, tiny_model_dir, rows=noisy, reference={"path": str(clean)},
                          train={"trusted_path": str(clean)}, report_to=["none"])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["run", str(config), "--preset", "trusted"]) == 0
    run = tmp_path / "run"
    out = capsys.readouterr().out
    assert "[reference-noisy]" in out and "[train-ignore] training on 32 examples" in out
    history = json.loads((run / "train-ignore" / "log_history.json").read_text())
    assert history[-1]["step"] == 8
    # the negatives are the response tokens below -1 nat, not a share of them (with rho's 30% this fails): the tiny
    # model's references barely differ, so here there are none
    rows = pq.read_table(run / "labels" / "labels.parquet").to_pylist()
    scored = [(c, s) for r in rows for c, s in zip(r["token_class"], r["score"]) if c != 0]
    stats = json.loads((run / "partition" / "stats.json").read_text())
    assert stats["n_negative"] == sum(c == -1 for c, _ in scored) == sum(s < -1.0 for _, s in scored)
    assert stats["n_tokens"] == len(scored) > 0
