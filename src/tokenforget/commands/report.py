"""`tokenforget report`: the HTML report of a run folder (`tokenforget.report.html`)."""

from __future__ import annotations

from pathlib import Path

from tokenforget.command_config import ReportConfig


def run_report(cfg: ReportConfig) -> None:
    from tokenforget.report.html import build_report

    out = Path(cfg.out_dir) if cfg.out_dir else None
    print(f"Report: {build_report(Path(cfg.run_dir), out, cfg.max_samples).resolve()}")
