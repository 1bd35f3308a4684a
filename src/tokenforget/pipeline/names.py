"""The names a run's config holds, checked against the registries that declare them (a selection in
`stages.partition.SELECTIONS`; an objective, forgetting term or schedule in `training.objectives`)."""

from __future__ import annotations

from dataclasses import replace

from tokenforget.config import RunConfig
from tokenforget.errors import _check, check_name
from tokenforget.stages.partition import SELECTIONS
from tokenforget.training.objectives import FORGET_TERMS, OBJECTIVES, check_objective


def check_names(cfg: RunConfig) -> None:
    """Refuse, naming the field, a name the registries do not declare. A selection, an objective or a forgetting term
    is declared once, by its record; the config holds a plain `str`, checked here when a run starts (`Run`) and by
    the command line before it imports a command: this module reads the two registries alone (torch, no
    transformers), so a misspelt name costs ~2 s, not the pipeline's imports. The config's own checks stay
    torch-free."""
    check_name(cfg.partition.selection, SELECTIONS, "partition.selection")
    check_objective(cfg.train.objective, "train.objective")
    for mode in cfg.compare.modes:
        check_name(mode, OBJECTIVES, "compare.modes")
    for name, overrides in cfg.compare.variants.items():
        where = f"compare.variants.{name}"
        _check(name not in OBJECTIVES, where, "a variant needs a name of its own, not a mode's")
        check_objective(replace(cfg.train.objective, **overrides.get("objective", {})), f"{where}.objective")
        selection = overrides.get("partition", {}).get("selection", cfg.partition.selection)
        check_name(selection, SELECTIONS, f"{where}.partition.selection")
    term = cfg.train.objective.forget_term  # whatever the mode: a comparison trains `forget` on the same scores
    _check(cfg.score.base_pass is not False or not FORGET_TERMS[term].needs_base_ce, "score.base_pass",
           f"false, but train.objective.forget_term '{term}' reads the base model's CE")
