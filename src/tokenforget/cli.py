"""The `tokenforget` command: `run`, `reference`, `score`, `partition`, `train`, `eval`, `compare`, `detect`,
`audit`, `demo`, `fair`, `prepare`, `weak`, `report`.

Each command takes an optional YAML config (`tokenforget run CONFIG.yaml`) and any field as an override
(`--partition.rho 0.6`, `--train.training.learning_rate 2e-4`). `report` takes the run folder instead
(`tokenforget report runs/demo`). jsonargparse builds the parser from the
dataclasses in `tokenforget.config` and `tokenforget.command_config`, so type errors and unknown keys are reported for free.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, get_args

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

from tokenforget.command_config import DemoConfig, FairConfig, GpuName, PlanConfig, PrepareConfig, ReportConfig, Sharding, WeakConfig
from tokenforget.config import RunConfig
from tokenforget.errors import ConfigError, UserError
from tokenforget.config.training import FLAT_OBJECTIVE
from tokenforget.presets import PRESETS


DRY_RUN_COMMANDS = ("run", "compare")  # the commands that take --dry-run (`commands.plan.dry_run_command`)
DRY_RUN_FLAGS = ("dry_run", "dry_run_timing", "plan_gpus", "gpu", "plan_sharding", "plan_mfu")


def _lazy(target: str, *args: str) -> Callable[[object], None]:
    """The command function `module:function` (called with `args` and the config), imported only when it runs:
    parsing a command line loads no torch."""
    def call(cfg: object) -> None:
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(*args, cfg)
    return call


def _stage(stage: str) -> Callable[[object], None]:
    return _lazy("tokenforget.commands.run_stages:run_stage", stage)


C = "tokenforget.commands."  # the command modules
# Each command: its config, its help line, and the function in its own module that runs it.
COMMANDS: dict[str, tuple[type, str, Callable]] = {
    "run": (RunConfig, "Every stage: reference, score, partition, train.", _stage("run")),
    "reference": (RunConfig, "Train the reference model (LoRA SFT on a subset).", _stage("reference")),
    "score": (RunConfig, "Score every response token: CE_base - CE_ref.", _stage("score")),
    "partition": (RunConfig, "Split response tokens into positive and negative by global ranking; export "
                  "labels.parquet.", _stage("partition")),
    "train": (RunConfig, "Train from the base model with train.objective.mode (forget, sft or ignore).", _stage("train")),
    "eval": (RunConfig, "Evaluate the base model or eval.checkpoint with lm-evaluation-harness (offline).",
             _lazy(C + "evaluate:run_eval")),
    "compare": (RunConfig, "Train sft, ignore and forget for every compare.seeds; evaluate them and the base.",
                _lazy(C + "compare:run_compare")),
    "detect": (RunConfig, "Inject known noise (detect.kinds), score, and report how well every score method finds it.",
               _lazy(C + "detect:run_detect")),
    "audit": (RunConfig, "Rank the examples by how suspicious the reference finds them; write a table to review.",
              _lazy(C + "audit:run_audit")),
    "demo": (DemoConfig, "Offline demo on a generated task with known corrupted steps.", _lazy(C + "demo:run_demo")),
    "fair": (FairConfig, "The fair comparison on the demo's task: settings x data seeds x training seeds x epochs at "
             "sft's steps, epochs chosen on validation, paired differences on test.", _lazy(C + "fair:run_fair")),
    "prepare": (PrepareConfig, "Natural-noise SFT sets from model-written GSM8K solutions (noisy, correct_only, gold) "
                "and held-out splits from GSM8K train.", _lazy(C + "prepare:run_prepare")),
    "weak": (WeakConfig, "Natural-noise training sets on the demo's task: a weak model's sampled answers, graded "
             "(outcome and step by step), the first wrong number and what follows marked.", _lazy(C + "weak:run_weak")),
    "report": (ReportConfig, "HTML report of a run folder: token highlights, plots, results.",
               _lazy(C + "report:run_report")),
}
POSITIONAL = {"report": "--run_dir"}  # what a command's first positional argument is (default: --config)


def build_parser() -> ArgumentParser:
    root = ArgumentParser(
        prog="tokenforget", description="Token-level forgetting for LLM fine-tuning.", exit_on_error=False
    )
    sub = root.add_subcommands(dest="command")
    for name, (cls, help_text, _) in COMMANDS.items():
        p = ArgumentParser(description=help_text, exit_on_error=False)
        first = POSITIONAL.get(name, "--config").lstrip("-")
        p.add_argument("--config", action=ActionConfigFile, help=f"YAML config file (the first argument is {first})")
        p.add_class_arguments(cls, nested_key=None, fail_untyped=True)
        if cls is RunConfig:  # expanded by `_expand_preset` before parsing; declared here for --help
            p.add_argument("--preset", choices=list(PRESETS), help="named method settings applied after the config "
                           "file (paper: the paper's exact setting; recommended: the best we measured, docs/results.md)")
        if name in DRY_RUN_COMMANDS:
            p.add_argument("--dry-run", action="store_true", help="print the stages to run or reuse, their token "
                           "counts and optimizer steps, in seconds; load no model, write nothing")
            p.add_argument("--dry-run-timing", action="store_true", help="--dry-run plus an estimated wall time: "
                           "loads the model and times a few training micro-batches and scoring forwards here")
            p.add_argument("--plan-gpus", type=int, help="--dry-run plus a cost plan on this many GPUs: per stage "
                           "tokens, model FLOPs, memory per GPU and wall time (formulas: tokenforget.model.memory)")
            p.add_argument("--gpu", choices=list(get_args(GpuName)), default="h100", help="GPU of the cost plan")
            p.add_argument("--plan-sharding", choices=list(get_args(Sharding)), default="fsdp",
                           help="sharding of the cost plan's trainings over the GPUs")
            p.add_argument("--plan-mfu", type=float, help="share of the GPUs' peak the cost plan assumes (default: "
                           "the measured 0.17 with LoRA, 0.34 fully fine-tuned; docs/paper-scale.md)")
        if name == "fair":
            p.add_argument("--dry-run", action="store_true", help="print the cells still to run and the settings each "
                           "would train, from the results on disk; load no model, write nothing")
        sub.add_subcommand(name, p, help=help_text)
    return root


def _positional_config(argv: list[str]) -> list[str]:
    """`tokenforget run cfg.yaml ...` -> `tokenforget run --config cfg.yaml ...`;
    `tokenforget report RUN_DIR` -> `tokenforget report --run_dir RUN_DIR`."""
    if len(argv) >= 2 and argv[0] in COMMANDS and not argv[1].startswith("-"):
        return [argv[0], POSITIONAL.get(argv[0], "--config"), argv[1], *argv[2:]]
    return argv


def _expand_preset(argv: list[str]) -> list[str]:
    """`--preset NAME` -> `--config <the preset as YAML>`, placed after the last config file, so the preset's
    values replace the file's and later command-line overrides replace both."""
    import yaml

    from tokenforget.presets import preset

    args = list(argv)
    found = [i for i, a in enumerate(args) if a == "--preset" or a.startswith("--preset=")]
    if not found:
        return args
    if len(found) > 1:  # the parser would take the second silently, unexpanded
        raise UserError("--preset given more than once; choose one of: " + ", ".join(PRESETS))
    at = found[0]
    if "=" in args[at]:
        name = args.pop(at).split("=", 1)[1]
    else:
        args.pop(at)
        if at >= len(args):
            raise UserError("--preset needs a name: " + ", ".join(PRESETS))
        name = args.pop(at)
    text = yaml.safe_dump(preset(name), default_flow_style=True, width=10**6).strip()
    configs = [i + 2 for i, a in enumerate(args) if a == "--config"] + [i + 1 for i, a in enumerate(args) if a.startswith("--config=")]
    where = max([1, *configs])
    return [*args[:where], "--config", text, *args[where:]]


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field name of a config dataclass: `partition.rho`, `train.training.learning_rate`, ..."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = f.type if isinstance(f.type, type) else None
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
        elif sub is None or not dataclasses.is_dataclass(sub):
            keys.append(prefix + f.name)
    return keys


def explain_parse_error(message: str, cls: type) -> str:
    """One line for a parse error, with a 'did you mean' for an unknown key."""
    first = " ".join(message.split())
    m = re.search(r"does not accept option '([\w.]+)'|unrecognized arguments: --([\w.]+)", message)
    if m:
        key = m.group(1) or m.group(2)
        old = key.removeprefix("train.")
        if key.startswith("train.") and old in FLAT_OBJECTIVE:  # moved by issue 29
            return f"unknown config key '{key}': it is 'train.objective.{FLAT_OBJECTIVE[old]}' now (see CHANGELOG)"
        close = difflib.get_close_matches(key, config_keys(cls), n=1, cutoff=0.6)
        first = f"unknown config key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    return first


def _quiet_known_warnings() -> None:
    """Warnings that say nothing to a tokenforget user (deprecations inside transformers, peft's note that a
    GGUF folder has no config.json)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file")


def parse_config(argv: Sequence[str]) -> tuple[str, object, Optional[PlanConfig]]:
    """(command, its config dataclass, the dry run asked for or None) from a command line; `ArgumentError` or
    `UserError` when bad."""
    argv = _positional_config(list(argv))
    name = argv[0] if argv and argv[0] in COMMANDS else ""
    cls = COMMANDS[name][0] if name else RunConfig
    parser = build_parser()
    ns = parser.parse_args(_expand_preset(argv) if cls is RunConfig else argv)
    init = vars(parser.instantiate(ns)[name])
    fields = {k: v for k, v in init.items() if k not in ("config", "preset", *DRY_RUN_FLAGS)}
    return name, cls(**fields), _dry_run_asked(init)


def _dry_run_asked(init: dict) -> Optional[PlanConfig]:
    """The dry run the flags ask for: `--plan-gpus` is a dry run of its own (with or without --dry-run)."""
    costed = init.get("plan_gpus") is not None
    if not (init.get("dry_run") or init.get("dry_run_timing") or costed):
        return None
    if "gpu" not in init:  # a command whose dry run has no cost plan (`fair`)
        return PlanConfig()
    return PlanConfig(gpus=init["plan_gpus"] if costed else 1, gpu=init["gpu"], sharding=init["plan_sharding"],
                      mfu=init["plan_mfu"], timed=bool(init.get("dry_run_timing")), costed=costed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    name = argv[0] if argv and argv[0] in COMMANDS else ""
    try:
        try:
            name, cfg, dry = parse_config(argv)
        except ArgumentError as e:
            cls = COMMANDS[name][0] if name in COMMANDS else RunConfig
            print(f"tokenforget {name}: error: {explain_parse_error(str(e), cls)}".replace("  ", " "), file=sys.stderr)
            return 2
        if isinstance(cfg, RunConfig):  # a name no registry declares: one line, before the command's imports
            from tokenforget.pipeline.names import check_names

            check_names(cfg)
        if dry and isinstance(cfg, FairConfig):  # the grid's cells still to run, from the cell files
            print(importlib.import_module("tokenforget.commands.fair").format_pending(cfg))
        elif dry:
            importlib.import_module("tokenforget.commands.plan").dry_run_command(name, cfg, dry)  # loads no torch before
        else:
            check_writable(*output_folder(cfg))
            from tokenforget.model.memory import lean_allocator

            lean_allocator()  # freed activations leave resident memory at once (process-wide: set here, first)
            COMMANDS[name][2](cfg)
    except UserError as e:
        print(f"tokenforget {name}: error: {e}", file=sys.stderr)
        return 2
    finally:
        _end_process_group()
    return 0


def output_folder(cfg: object) -> tuple[str, str]:
    """(config field, folder) where a command writes: `report` its `out_dir` or `run_dir/report`, every other
    command its `run_dir`."""
    if isinstance(cfg, ReportConfig):
        return ("out_dir", cfg.out_dir) if cfg.out_dir else ("run_dir", os.path.join(cfg.run_dir, "report"))
    if isinstance(cfg, (PrepareConfig, WeakConfig)):
        return "out_dir", cfg.out_dir
    return "run_dir", cfg.run_dir  # type: ignore[attr-defined]


def check_writable(field_name: str, folder: str) -> None:
    """Refuse, naming the field, a folder that cannot be created or written, before any model is loaded.

    A real write probe: a temporary file in the deepest part of `folder` that exists, removed at once.
    Permission bits alone say nothing under root, and /proc or a read-only mount refuse writes whatever
    they say.
    """
    target = Path(folder).expanduser().absolute()
    existing = next(p for p in (target, *target.parents) if os.path.exists(p))
    where = f"config field '{field_name}': cannot write to '{folder}'"
    if not existing.is_dir():
        raise ConfigError(f"{where}: '{existing}' is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".tokenforget-write-probe-", dir=existing)
    except OSError as e:
        raise ConfigError(f"{where}: creating a file in '{existing}' fails ({e.strerror})") from None
    os.close(fd)
    os.remove(probe)


def _end_process_group() -> None:
    """Under torchrun: wait for every rank, then tear the group down (avoids a crash at interpreter exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
