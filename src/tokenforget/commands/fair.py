"""`tokenforget fair`: the demo over a grid, the comparison a skeptical reviewer accepts (issue 36).

Settings x data seeds x training seeds x epochs, each cell one `run_demo` call in the data seed's folder (its
references and scoring passes shared by the cells; each final training a stage of its own, `train-<mode>-e2-t5`;
every stage and evaluation reused by fingerprint, so the grid resumes wherever it was stopped: a finished cell's
results are kept in `seed-S/cells/`). Every setting at sft's optimizer steps (`DemoConfig.equal_steps`); the epochs
chosen per run on validation; a setting that reads the trusted set brings `sft_plus_trusted`; the table on test
(`tokenforget.report.fair`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from tokenforget.command_config import DemoConfig, FairConfig, WeakConfig
from tokenforget.commands.demo import run_demo
from tokenforget.errors import UserError
from tokenforget.pipeline.settings import check_settings
from tokenforget.report.fair import fair_table, format_fair, grid_settings


def weak_dir_for(cfg: FairConfig, seed: int) -> Path:
    """The weak sets of data seed `seed` (`FairConfig.weak_dir` with `{seed}` filled in)."""
    return Path(cfg.weak_dir.format(seed=seed))


def cell_config(cfg: FairConfig, seed: int, train_seed: int, epochs: float) -> DemoConfig:
    """The demo call of one cell: the data seed's folder, the cell's training seed and epochs, every setting."""
    weak = str(weak_dir_for(cfg, seed)) if cfg.demo.noise_kind == "weak" else cfg.demo.weak_dir
    return replace(cfg.demo, run_dir=str(Path(cfg.run_dir) / f"seed-{seed}"), seed=seed, train_seed=train_seed,
                   epochs=epochs, equal_steps=True, weak_dir=weak, settings=grid_settings(cfg.settings),
                   detectors=[], micro_batch_size=cfg.demo.batch_size,  # whole batches: the grid's cells predate micro-batches
                   nll_problems=None)  # and the gold NLL over every test problem (their cached evaluations)


FAIR_RESULTS, FAIR_TABLE = "fair_results.json", "fair_table.md"


def cell_file(cfg: FairConfig, seed: int, train_seed: int, epochs: float) -> Path:
    return Path(cfg.run_dir) / f"seed-{seed}" / "cells" / f"t{train_seed}-e{epochs:g}.json"


def train_seeds_of(cfg: FairConfig, seed: int) -> list[int]:
    """The training seeds of data seed `seed`: `train_seeds` (else the data seed's own), then `extra_train_seeds`."""
    first = cfg.train_seeds or [seed]
    return [*first, *(t for t in cfg.extra_train_seeds if t not in first)]


def cell_settings(cfg: FairConfig, seed: int, train_seed: int) -> list[str]:
    """What a cell trains: every setting of the grid, or at an extra training seed `extra_seed_settings` (and sft)."""
    if train_seed in (cfg.train_seeds or [seed]) or not cfg.extra_seed_settings:
        return grid_settings(cfg.settings)
    return grid_settings(cfg.extra_seed_settings)


def cell_missing(out: Path, settings: list[str]) -> list[str]:
    """The settings a cell's results on disk lack, in order (empty: done). A grid that adds settings runs the cell
    again for these alone: the models it holds are neither trained nor evaluated again, since `write_cell` keeps
    their first record anyway (a deleted `sft` training is retrained only where a new setting starts from it)."""
    have = set(json.loads(out.read_text())) if out.is_file() else set()
    return [s for s in settings if s not in have]


def pending(cfg: FairConfig) -> list[tuple[int, int, float, list[str]]]:
    """The grid's cells in the order `run_fair` runs them, each with the settings its results on disk still lack
    (empty: done): (data seed, training seed, epochs, missing settings). Reads the cell files only: no model."""
    out = []
    for epochs in cfg.epochs:
        for seed in cfg.data_seeds:
            for train_seed in train_seeds_of(cfg, seed):
                out_file = cell_file(cfg, seed, train_seed, epochs)
                out.append((seed, train_seed, epochs, cell_missing(out_file, cell_settings(cfg, seed, train_seed))))
    return out


def format_pending(cfg: FairConfig) -> str:
    """`tokenforget fair --dry-run`: one line per cell (done, or the settings it would train and evaluate), then the
    counts; a setting whose stages a run folder already holds is reused when the cell runs, so the trainings are at
    most these. A setting without a record is refused, as when the grid runs."""
    check_settings(cfg.settings, detectors=cfg.demo.detectors)
    check_settings(cfg.extra_seed_settings, "extra_seed_settings")
    cells = pending(cfg)
    lines = [f"data seed {s}, training seed {t}, {e:g} epochs: " + (f"to run, {len(m)} settings: {', '.join(m)}" if m
                                                                    else "done") for s, t, e, m in cells]
    todo = [c for c in cells if c[3]]
    missing_sets = [s for s in cfg.data_seeds if cfg.demo.noise_kind == "weak" and not (weak_dir_for(cfg, s) / "manifest.json").is_file()]
    lines.append(f"{len(cells) - len(todo)} of {len(cells)} cells done; {len(todo)} to run, at most "
                 f"{sum(len(c[3]) for c in todo)} trainings" + (f"; weak sets to make first: seeds {missing_sets}"
                                                                  if missing_sets else ""))
    return "\n".join(lines)


def run_fair(cfg: FairConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every cell of the grid not yet on disk (epochs outermost, so that a whole table at one epochs value lands
    first), then the table; returns it. A cell's results are kept in `run_dir/seed-S/cells/`."""
    from tokenforget.commands.weak import make_weak_sets

    check_settings(cfg.settings, detectors=cfg.demo.detectors)  # before any weak set is made
    check_settings(cfg.extra_seed_settings, "extra_seed_settings")
    if cfg.table_only:
        return write_table(cfg, log)
    for epochs in cfg.epochs:
        for seed in cfg.data_seeds:
            if cfg.demo.noise_kind == "weak" and not (weak_dir_for(cfg, seed) / "manifest.json").is_file():
                log(f"[fair] weak sets of seed {seed}: {weak_dir_for(cfg, seed)}")
                make_weak_sets(WeakConfig(out_dir=str(weak_dir_for(cfg, seed)), seed=seed, model=cfg.demo.model,
                                          report_to=["none"]), log)
            for train_seed in train_seeds_of(cfg, seed):
                out = cell_file(cfg, seed, train_seed, epochs)
                missing = cell_missing(out, cell_settings(cfg, seed, train_seed))
                if not missing:
                    continue
                log(f"[fair] data seed {seed}, training seed {train_seed}, {epochs:g} epochs: {', '.join(missing)}")
                results = run_demo(replace(cell_config(cfg, seed, train_seed, epochs), settings=missing), log)
                write_cell(out, cell_record(results))
                if not cfg.keep_models:
                    drop_trainings(results["stages"].values(), log)
    return write_table(cfg, log)


def drop_trainings(stages: Iterable[str], log: Callable[[str], None]) -> None:
    """A written cell's final-training stages deleted (`FairConfig.keep_models`): the cell holds their answers."""
    folders = sorted({Path(s) for s in stages if Path(s).is_dir()})
    size = sum(f.stat().st_size for d in folders for f in d.rglob("*") if f.is_file())
    for folder in folders:
        shutil.rmtree(folder)
    log(f"[fair] the cell's {len(folders)} final trainings deleted ({size / 1e9:.2f} GB; keep_models: true keeps them)")


def write_cell(out: Path, record: dict[str, Any]) -> None:
    """Adds `record`'s models to the cell file `out`, atomically: another grid's settings on the same run folder and
    cell stay (two grids with different settings share a data seed's folder and its cells). A model the cell already
    holds keeps its first record: the rows landed beside it were paired with that one, and a grid resumed in a fresh
    folder or on another machine trains `sft` again, which another CPU's kernels can move."""
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out.read_text()) if out.is_file() else {}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, **kept}))
    tmp.replace(out)


def cell_record(results: dict[str, Any]) -> dict[str, Any]:
    """What the table reads of a demo's results: per model its test answers right (0/1), gold NLL, its validation
    accuracy, its final answers (for `scripts/mechanism.py`) and how its training was made (`made_of`)."""
    val, stages = results.get("validation", {}), results.get("stages", {})
    return {name: {"correct": [int(c) for c in m["correct"]], "gold_nll": m["gold_nll"],
                   "val_accuracy": val.get(name, {}).get("accuracy"), "answers": m.get("answers"),
                   **({"made": made_of(Path(stages[name]))} if name in stages else {})}
            for name, m in results["models"].items()}


def made_of(stage: Path) -> dict[str, Any]:
    """How a training stage was made: the trainer's runtime in seconds (`log_history.json`), and the stage's wall
    time, commit, machine and versions where its `stage.json` records them (`RunFolder.ensure`; not in stages made
    before 2026-12-07)."""
    history = stage / "log_history.json"
    runtime = [h["train_runtime"] for h in json.loads(history.read_text()) if "train_runtime" in h] if history.is_file() else []
    made = json.loads((stage / "stage.json").read_text()).get("made", {})
    return {**made, **({"train_runtime": round(runtime[-1], 1)} if runtime else {})}


def read_cells(cfg: FairConfig) -> dict[tuple[int, int, float], dict[str, Any]]:
    """The finished cells: (data seed, training seed, epochs) -> `cell_record`."""
    cells = {}
    for seed in cfg.data_seeds:
        for train_seed in train_seeds_of(cfg, seed):
            for epochs in cfg.epochs:
                f = cell_file(cfg, seed, train_seed, epochs)
                if f.is_file():
                    cells[(seed, train_seed, epochs)] = json.loads(f.read_text())
    return cells


def write_table(cfg: FairConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`fair_results.json` and `fair_table.md` in `cfg.run_dir` from the cells on disk, at the epochs that have cells
    (a grid stopped before its 2-epoch cells has no strongest baseline at 2 epochs to choose); returns the table.
    Refused when no cell is on disk."""
    cells = read_cells(cfg)
    epochs = [e for e in cfg.epochs if any(k[2] == e for k in cells)]
    if not epochs:
        raise UserError(f"config field 'run_dir': no finished cell in {cfg.run_dir}/seed-*/cells/ for data seeds "
                        f"{cfg.data_seeds} (a grid's cells are t<training seed>-e<epochs>.json)")
    table = {**fair_table(cells, grid_settings(cfg.settings), epochs), "grid": grid_command(cfg),
             "untrained_epochs": [e for e in cfg.epochs if e not in epochs]}  # so the table says what it lacks
    root = Path(cfg.run_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / FAIR_RESULTS).write_text(json.dumps({"config": asdict(cfg), "table": table}, indent=2))
    text = format_fair(table)
    (root / FAIR_TABLE).write_text(text + "\n")
    log(text)
    return table


# the demo's fields each cell sets for itself (`cell_config`): a grid's `demo` section does not choose them
PER_CELL = ("run_dir", "seed", "train_seed", "epochs", "equal_steps", "settings", "detectors",
            "micro_batch_size", "nll_problems")


HOW_RUN = ("table_only", "keep_models")  # how a grid is run, not what it measures: not in its command line


def grid_command(cfg: FairConfig) -> str:
    """The command line of this grid: `tokenforget fair` with every field that differs from its default."""
    def shown(value: Any) -> str:
        if isinstance(value, list):
            return f'"[{", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)}]"'
        return f"'{value}'" if isinstance(value, str) and any(c in value for c in " {}*") else str(value)

    def flags(values: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> list[str]:
        out = []
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(defaults[key], dict):
                out += flags(value, defaults[key], f"{prefix}{key}.")
            elif value != defaults[key] and not (prefix == "demo." and key in PER_CELL) and key not in HOW_RUN:
                out.append(f"--{prefix}{key} {shown(value)}")
        return out

    return " ".join(["tokenforget fair", *flags(asdict(cfg), asdict(FairConfig()))])

