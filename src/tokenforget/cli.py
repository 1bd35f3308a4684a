"""The `tokenforget` command: `run`, `reference`, `score`, `partition`, `train`, `demo`, `report`.

Each command takes an optional YAML config (`tokenforget run CONFIG.yaml`) and any field as an override
(`--partition.rho 0.6`, `--train.training.learning_rate 2e-4`). `report` takes the run folder instead
(`tokenforget report runs/demo`). jsonargparse builds the parser from the
dataclasses in `config.py`, so type errors and unknown keys are reported for free.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable, Optional, Sequence

from jsonargparse import ActionConfigFile, ArgumentParser

from tokenforget.config import ConfigError, DemoConfig, ReportConfig, RunConfig

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError,)


def _run_stage(stage: str) -> Callable[[RunConfig], None]:
    def command(cfg: RunConfig) -> None:
        from tokenforget import report
        from tokenforget.pipeline import Run

        run = Run(cfg)
        if stage == "run":
            run.run_all()
        else:
            getattr(run, stage)()
        trained = [f"train-{cfg.train.mode}"] if stage in ("run", "train") else []
        print(report.run_summary(run, trained))
        if stage == "run":
            from tokenforget.html_report import build_report

            print(f"Report: {build_report(run.root, tokenizer=run.base.tokenizer).resolve()}")

    return command


def _demo(cfg: DemoConfig) -> None:
    from tokenforget.demo import run_demo

    run_demo(cfg)


def _report(cfg: ReportConfig) -> None:
    from pathlib import Path

    from tokenforget.html_report import build_report

    out = Path(cfg.out_dir) if cfg.out_dir else None
    print(f"Report: {build_report(Path(cfg.run_dir), out, cfg.max_samples).resolve()}")


COMMANDS: dict[str, tuple[type, str, Callable]] = {
    "run": (RunConfig, "Every stage: reference, score, partition, train.", _run_stage("run")),
    "reference": (RunConfig, "Train the reference model (LoRA SFT on a subset).", _run_stage("reference")),
    "score": (RunConfig, "Score every response token: CE_base - CE_ref.", _run_stage("score")),
    "partition": (RunConfig, "Split response tokens into positive and negative by global ranking.", _run_stage("partition")),
    "train": (RunConfig, "Train from the base model with train.mode (forget, sft or ignore).", _run_stage("train")),
    "demo": (DemoConfig, "Offline demo on a generated task with known corrupted steps.", _demo),
    "report": (ReportConfig, "HTML report of a run folder: token highlights, plots, results.", _report),
}
POSITIONAL = {"report": "--run_dir"}  # what a command's first positional argument is (default: --config)


def build_parser() -> ArgumentParser:
    root = ArgumentParser(prog="tokenforget", description="Token-level forgetting for LLM fine-tuning.")
    sub = root.add_subcommands(dest="command")
    for name, (cls, help_text, _) in COMMANDS.items():
        p = ArgumentParser(description=help_text)
        first = POSITIONAL.get(name, "--config").lstrip("-")
        p.add_argument("--config", action=ActionConfigFile, help=f"YAML config file (the first argument is {first})")
        p.add_class_arguments(cls, nested_key=None, fail_untyped=True)
        sub.add_subcommand(name, p, help=help_text)
    return root


def _positional_config(argv: list[str]) -> list[str]:
    """`tokenforget run cfg.yaml ...` -> `tokenforget run --config cfg.yaml ...`;
    `tokenforget report RUN_DIR` -> `tokenforget report --run_dir RUN_DIR`."""
    if len(argv) >= 2 and argv[0] in COMMANDS and not argv[1].startswith("-"):
        return [argv[0], POSITIONAL.get(argv[0], "--config"), argv[1], *argv[2:]]
    return argv


def _user_errors() -> tuple[type[Exception], ...]:
    from tokenforget.data import DataError
    from tokenforget.html_report import ReportError
    from tokenforget.models import ModelLoadError

    return (*USER_ERRORS, DataError, ModelLoadError, ReportError)


def _quiet_known_warnings() -> None:
    """Warnings that say nothing to a tokenforget user (deprecations inside transformers, peft's note that a
    GGUF folder has no config.json)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file")


def main(argv: Optional[Sequence[str]] = None) -> int:
    _quiet_known_warnings()
    argv = _positional_config(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    ns = parser.parse_args(argv)
    name = ns.command
    try:
        init = parser.instantiate(ns)
        cls, _, command = COMMANDS[name]
        fields = {k: v for k, v in vars(init[name]).items() if k != "config"}
        command(cls(**fields))
    except _user_errors() as e:
        print(f"tokenforget {name}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
