"""`tokenforget run`, `reference`, `score`, `partition`, `train`: the pipeline up to one stage, and its summary."""

from __future__ import annotations

from tokenforget.config import RunConfig


def run_stage(stage: str, cfg: RunConfig) -> None:
    """Run (or reuse) every stage up to `stage` (`run`: through the final training) and print the run's summary;
    `run` also writes the HTML report."""
    from tokenforget.report import summary as report
    from tokenforget.pipeline.resolver import Run

    run = Run(cfg)
    if stage == "run":
        run.train()
    elif stage == "partition":
        run.labels()  # the partition, and the labels file it makes possible
    else:
        getattr(run, stage)()
    if not run.ranks.is_main:  # under torchrun, one rank reports and writes the page
        return
    trained = [f"train-{cfg.train.objective.mode}"] if stage in ("run", "train") else []
    print(report.run_summary(run, trained))
    if stage == "run":
        from tokenforget.report.html import build_report

        print(f"Report: {build_report(run.root, tokenizer=run.base.tokenizer).resolve()}")
