"""The tables of a `tokenforget compare` comparison, from its `compare_results.json` (see `compare`): as text
(`format_compare`) and as rows for the HTML report (`compare_tables`). No model, no run folder: numbers in,
tables out.
"""

from __future__ import annotations

import math
from typing import Any, Optional

RESULTS_FILE = "compare_results.json"
TABLE_FILE = "compare_table.txt"


# ---------------------------------------------------------------- tables


def _cell(entry: dict[str, Any], signed: bool = False) -> str:
    mean, std = entry["mean"], entry["std"]
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "nan"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    if std is not None:
        return f"{text} ± {std:.4f}"
    se = entry.get("stderr")
    return text if se is None or math.isnan(se) else f"{text} (se {se:.4f})"


def _signed(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:+.4f}"


def compare_tables(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparison as tables `{"title", "header", "rows"}`: the mean ± std table over seeds, the paired
    differences to sft per seed, and the detection of corrupted tokens when there is one. The text table
    (`format_compare`) and the HTML report (`tokenforget.report.html`) both show these."""
    bench = results["benchmarks"]
    seeds = [str(s) for s in results["seeds"]]
    cols = [*bench, *(["average"] if "average" in results["table"]["sft"] else [])]
    head = [_header(b, bench.get(b)) for b in cols]
    rows = [[m, *[_cell(results["table"][m][b]) if b in results["table"][m] else "-" for b in cols]] for m in results["models"]]
    tables = [{
        "title": f"Comparison over seeds {', '.join(seeds)}: mean ± sample std over seeds; where there is one "
                 "evaluation (the base model, or a single seed), its standard error over examples (se)",
        "header": ["model", *head], "rows": rows,
    }]
    prow = []
    for m, per_b in results["paired_vs_sft"].items():
        for b in cols:
            d = per_b[b]
            se = d.get("stderr_per_seed", {})
            cells = [_signed(d["per_seed"][s]) + (f" (se {se[s]:.4f})" if s in se else "") for s in seeds]
            prow.append([b, m, *cells, _cell(d, signed=True)])
    tables.append({
        "title": "Paired difference to sft, per seed (model - sft; for gold NLL lower is better, and se is the "
                 "standard error of the difference paired question by question)",
        "header": ["benchmark", "model", *[f"seed {s}" for s in seeds], "mean ± std"], "rows": prow,
    })
    det = {"ignore/forget": results.get("detection") or {}, **(results.get("detection_by_variant") or {})}
    if det["ignore/forget"]:
        tables.append({
            "title": "Finding the corrupted tokens (training data), per seed and partition (the modes' own, and "
                     "each variant that partitions on its own)",
            "header": ["partition of", "seed", "AUROC", "recall of negatives", "precision of negatives", "chance precision"],
            "rows": [[name, s, d["auroc"], d["recall"], d["precision"], d["corrupt_share"]]
                     for name, per_seed in det.items() for s, d in per_seed.items()],
        })
    return tables


def format_compare(results: dict[str, Any]) -> str:
    """The tables of `compare_tables` as text, then versions, machine and wall time."""
    from tokenforget.text_table import format_table

    out = []
    for t in compare_tables(results):
        out += ["", t["title"], format_table(t["header"], t["rows"])]
    out.append("")
    out.append(f"versions: {results.get('versions')}  machine: {results.get('machine')}  wall: {results.get('wall_s', 0):.0f} s")
    return "\n".join(out)


def _header(name: str, meta: Optional[dict[str, Any]]) -> str:
    if meta is None:
        return "average (acc)"
    metric = "" if meta["metric"] == name else f"{meta['metric']}, "
    return f"{name} ({metric}n={meta['n']})"
