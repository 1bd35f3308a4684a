"""`tokenforget eval`: the base model or `eval.checkpoint` through lm-evaluation-harness, offline."""

from __future__ import annotations

from tokenforget.config import RunConfig


def run_eval(cfg: RunConfig) -> None:
    from tokenforget.pipeline import variants
    from tokenforget.pipeline.resolver import Run
    from tokenforget.stages.evaluate import results_table
    from tokenforget.stages.harness import check_installed

    check_installed(cfg.eval)  # before a model loads or a stage it needs trains
    results = variants.evaluate(Run(cfg), cfg.eval.checkpoint)
    print(f"\nModel: {cfg.eval.checkpoint or 'base (' + cfg.model.name_or_path + ')'}")
    print(results_table(results))
