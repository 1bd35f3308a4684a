"""`tokenforget prepare`: noisy / correct-only / gold SFT sets from model-written GSM8K solutions
(`tokenforget.stages.natural`)."""

from __future__ import annotations

from tokenforget.command_config import PrepareConfig


def run_prepare(cfg: PrepareConfig) -> None:
    from tokenforget.stages.natural import prepare_natural

    out = prepare_natural(cfg)
    print(f"{out.counts['gold']} questions, {out.counts['noisy']} solutions, {out.wrong_share:.1%} of the "
          f"'{cfg.solution_source}' solutions wrong")
    for name, path in out.files.items():
        print(f"  {name:<13}{out.counts[name]:>6}  {path}")
