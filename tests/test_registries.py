"""Every registry's names are the config's: each `Literal` a config field is typed with (what the CLI and a YAML
file accept, kept in the torch-free config modules) lists exactly the names of the registry that serves it, in
the registry's order. A name added to one and not the other fails here, not in a user's run."""

from __future__ import annotations

from typing import Any, Callable, get_args

import pytest

from tokenforget import command_config as cc
from tokenforget import config


def _registries() -> dict[str, tuple[Any, Callable[[], list[str]]]]:
    def names(module: str, attr: str) -> Callable[[], list[str]]:
        def read() -> list[str]:
            import importlib

            return list(getattr(importlib.import_module(f"tokenforget.{module}"), attr))
        return read

    def demo_settings() -> list[str]:
        from tokenforget.commands.demo import DEMO_SETTINGS, SIM_MODES

        return [*DEMO_SETTINGS, *SIM_MODES]

    return {
        "train.objective.mode": (config.Mode, names("training.objectives", "OBJECTIVES")),
        "train.objective.forget_term": (config.ForgetObjective, names("training.objectives", "FORGET_TERMS")),
        "train.objective.schedule": (config.LambdaSchedule, names("training.objectives", "SCHEDULES")),
        "partition.selection": (config.Selection, names("stages.partition", "SELECTIONS")),
        "score.spans": (config.SpanUnit, names("score_methods", "SPAN_UNITS")),
        "data.format": (config.DataFormat, lambda: ["auto", *names("stages.data", "FORMAT_FIELDS")()]),
        "data.noise": (config.NoiseKind, names("stages.noise", "NOISE_KINDS")),
        "audit.measure": (config.AuditMeasure, lambda: ["auto", *names("commands.audit", "MEASURES")()]),
        "demo.settings": (cc.DemoSetting, demo_settings),
        "demo.detectors": (cc.DemoDetector, names("commands.demo", "PARTITIONING")),
        "plan.gpu": (cc.GpuName, names("model.memory", "GPUS")),
        "plan.sharding": (cc.Sharding, names("model.memory", "SHARDINGS")),
    }


@pytest.mark.parametrize("field", list(_registries()))
def test_each_literal_lists_its_registrys_names(field: str):
    literal, registry = _registries()[field]
    assert list(get_args(literal)) == registry(), field
