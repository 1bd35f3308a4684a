"""A name a config field holds is declared once, by its registry's record: a config field holding a selection, an
objective, a forgetting term, a schedule, a span unit or a demo setting is a plain `str`, checked against the
registry before any work. A name no record declares is refused naming its field; every declared name passes; so a
new record needs no second list. The few fixed vocabularies that stay `Literal`s (data formats, noise kinds, audit
measures, GPUs, shardings: the command line lists their choices) list exactly their registry's names."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Callable, get_args

import pytest

from tokenforget import command_config as cc
from tokenforget import config
from tokenforget.config import CompareConfig, ObjectiveConfig, PartitionConfig, RunConfig, ScoreConfig, TrainConfig


def _names(module: str, attr: str) -> Callable[[], list[str]]:
    def read() -> list[str]:
        import importlib

        return list(getattr(importlib.import_module(f"tokenforget.{module}"), attr))
    return read


def _literals() -> dict[str, tuple[Any, Callable[[], list[str]]]]:
    return {
        "data.format": (config.DataFormat, lambda: ["auto", *_names("stages.data", "FORMAT_FIELDS")()]),
        "data.noise": (config.NoiseKind, _names("stages.noise", "NOISE_KINDS")),
        "audit.measure": (config.AuditMeasure, lambda: ["auto", *_names("commands.audit", "MEASURES")()]),
        "plan.gpu": (cc.GpuName, _names("model.memory", "GPUS")),
        "plan.sharding": (cc.Sharding, _names("model.memory", "SHARDINGS")),
    }


@pytest.mark.parametrize("field", list(_literals()))
def test_each_literal_lists_its_registrys_names(field: str):
    literal, registry = _literals()[field]
    assert list(get_args(literal)) == registry(), field


def _run_check(**sections: Any) -> Callable[[], None]:
    from tokenforget.pipeline.names import check_names

    return lambda: check_names(RunConfig(**sections))


def _objective(**knobs: str) -> TrainConfig:
    return TrainConfig(objective=ObjectiveConfig(**knobs))


def _checks() -> dict[str, tuple[Callable[[str], Callable[[], Any]], Callable[[], list[str]]]]:
    """field -> (a check of one value of it, the registry's names): the check raises or passes, no work done."""
    from tokenforget.pipeline.settings import check_settings

    return {
        "partition.selection": (lambda v: _run_check(partition=PartitionConfig(selection=v)),
                                _names("stages.partition", "SELECTIONS")),
        "train.objective.mode": (lambda v: _run_check(train=_objective(mode=v)), _names("training.objectives", "OBJECTIVES")),
        "train.objective.forget_term": (lambda v: _run_check(train=_objective(forget_term=v)),
                                        _names("training.objectives", "FORGET_TERMS")),
        "train.objective.schedule": (lambda v: _run_check(train=_objective(schedule=v)),
                                     _names("training.objectives", "SCHEDULES")),
        "compare.modes": (lambda v: _run_check(compare=CompareConfig(modes=["sft", v])),
                          _names("training.objectives", "OBJECTIVES")),
        "score.spans": (lambda v: lambda: ScoreConfig(spans=v), _names("score_methods", "SPAN_UNITS")),
        "settings": (lambda v: lambda: check_settings([v]),
                     lambda: [*_names("pipeline.settings", "DEMO_SETTINGS")(), *_names("pipeline.settings", "SIM_MODES")()]),
        "detectors": (lambda v: lambda: check_settings([], detectors=[v]), _names("pipeline.settings", "PARTITIONING")),
    }


@pytest.mark.parametrize("field", list(_checks()))
def test_a_name_no_record_declares_is_refused_naming_its_field(field: str):
    check, registry = _checks()[field]
    with pytest.raises(config.ConfigError) as e:
        check("bogus")()
    assert str(e.value).startswith(f"config field '{field}': unknown 'bogus', choose from {registry()}")


@pytest.mark.parametrize("field", list(_checks()))
def test_every_name_a_record_declares_passes(field: str):
    check, registry = _checks()[field]
    names = registry()
    assert len(names) >= 2, names  # a check that reads an empty registry would refuse nothing here
    for name in names:
        check(name)()


def test_a_variants_names_are_checked_with_the_run():
    from tokenforget.pipeline.names import check_names

    def refused(variants: dict[str, Any]) -> str:
        with pytest.raises(config.ConfigError) as e:
            check_names(RunConfig(compare=CompareConfig(variants=variants)))
        return str(e.value)

    assert refused({"w": {"objective": {"forget_term": "bogus"}}}).startswith(
        "config field 'compare.variants.w.objective.forget_term': unknown 'bogus'")
    assert refused({"s": {"partition": {"selection": "bogus"}}}).startswith(
        "config field 'compare.variants.s.partition.selection': unknown 'bogus'")
    assert "not a mode's" in refused({"ignore": {"objective": {"beta": 2.0}}})
    check_names(RunConfig(compare=CompareConfig(variants={"w": {"objective": {"forget_term": "wga"}}})))


def test_base_pass_false_is_refused_when_the_forgetting_term_reads_the_base():
    from tokenforget.pipeline.names import check_names

    tnpo = replace(RunConfig(), train=_objective(forget_term="tnpo"), score=ScoreConfig(method="ref_loss", base_pass=False))
    with pytest.raises(config.ConfigError, match="config field 'score.base_pass': false, but .* 'tnpo'"):
        check_names(tnpo)
    check_names(replace(tnpo, train=_objective(forget_term="wga")))


@pytest.mark.parametrize("argv, field", [
    (["run", "--partition.selection", "bogus"], "partition.selection"),
    (["run", "--train.objective.forget_term", "bogus"], "train.objective.forget_term"),
    (["demo", "--settings", "[sft, bogus]"], "settings"),
])
def test_the_command_line_refuses_an_undeclared_name_in_one_line_before_any_work(tmp_path, capsys, argv, field):
    from tokenforget.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    out = tmp_path / "out"
    extra = ["--data.path", str(data)] if argv[0] == "run" else []
    assert main([*argv, *extra, "--run_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tokenforget {argv[0]}: error: config field '{field}': unknown 'bogus'"), err
    assert "\n" not in err
    assert not out.exists()  # refused before a folder was made or a model loaded


def test_a_misspelt_run_name_is_refused_before_the_pipeline_is_imported(tmp_path):
    """The command line checks a run's names with the two registries alone (`pipeline.names`): transformers, datasets
    and peft are not imported before the one-line refusal (in a fresh process: this one has them)."""
    import subprocess
    import sys

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    code = ("import sys; from tokenforget.cli import main; "
            f"rc = main(['run', '--data.path', {str(data)!r}, '--run_dir', {str(tmp_path / 'out')!r}, "
            "'--train.objective.mode', 'bogus']); "
            "print(rc, sorted(m for m in ('transformers', 'datasets', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split("\n")[0] == "2 []", out.stdout + out.stderr[-2000:]
    assert "config field 'train.objective.mode': unknown 'bogus'" in out.stderr


def test_a_new_selection_or_objective_is_one_record(monkeypatch):
    """What "one record" means: a selection added to `SELECTIONS` alone is accepted by the run's checks and decides
    the partition; an objective added to `OBJECTIVES` alone is accepted and bound. Here a selection that learns the
    first half of each example's tokens (4 tokens in 2 examples: +1 -1 +1 -1) and an objective that is sft at half
    weight (token losses 1, 3 over 2 tokens: 0.5 x 2 = 1.0). No other list is edited."""
    import numpy as np
    import torch

    from tokenforget.pipeline.names import check_names
    from tokenforget.stages import partition as part
    from tokenforget.training import objectives as obj

    def first_half(r: "part.Ranking") -> "part.Selected":
        pos = np.zeros(len(r.example), dtype=bool)
        for e in np.unique(r.example):
            idx = np.flatnonzero(r.example == e)
            pos[idx[: len(idx) // 2]] = True
        return part.Selected(pos)

    monkeypatch.setitem(part.SELECTIONS, "first_half", part.Selection(first_half, needs_scores=False))
    monkeypatch.setitem(obj.OBJECTIVES, "half_sft", obj.Objective(
        lambda token_loss, token_class, lam, counts=None, **_: obj.LossParts(
            0.5 * obj.sft_loss(token_loss, token_class, lam, counts).loss, torch.tensor(0.0), torch.tensor(0.0)),
        needs_partition=False))
    check_names(RunConfig(partition=PartitionConfig(selection="first_half"), train=_objective(mode="half_sft")))
    classes, _, _ = part.select_tokens(np.zeros(4), np.ones(4), np.array([0, 2, 4]), "first_half", 0.7)
    assert classes.tolist() == [1, -1, 1, -1]
    loss = obj.OBJECTIVES["half_sft"].bound(ObjectiveConfig(mode="half_sft"))(
        torch.tensor([[0.0, 1.0, 3.0]]), torch.tensor([[0, 1, 1]]), 0.0)
    assert float(loss.loss) == pytest.approx(1.0)
