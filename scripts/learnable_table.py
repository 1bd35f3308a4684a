"""The learnable task's models over seeds: accuracy against sft (the floor) and the clean ceiling.

    python scripts/learnable_table.py runs/learnable/noise-0.4 [--seeds 1 2 3]

Reads `seed-<s>/demo_results.json` (written by `tokenforget demo`, one per seed). Per model, as Markdown: held-out
answer accuracy (mean ± std over seeds), its paired difference to sft per seed with the paired standard error
over problems (the same problems, `models.<m>.correct`), and R = (acc_model - acc_sft) / (acc_clean - acc_sft),
the share of the damage recovered, where the clean ceiling beats sft by more than 2 paired se in that seed
('–' where it does not). Gold NLL (mean over seeds) beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional


def paired(a: list[int], b: list[int]) -> tuple[float, float]:
    """(mean of a - b, its standard error over the pairs)."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return mean, se


def mean_std(v: list[float]) -> str:
    return f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")


def recovered(model: list[int], sft: list[int], clean: Optional[list[int]]) -> Optional[float]:
    if clean is None:
        return None
    gap, se = paired(clean, sft)
    return (paired(model, sft)[0] / gap) if gap > 2 * se else None


def table(per_seed: dict[int, dict[str, Any]]) -> str:
    seeds = sorted(per_seed)
    models = [m for m in per_seed[seeds[0]] if all(m in per_seed[s] for s in seeds)]
    lines = [f"Seeds {seeds}; {per_seed[seeds[0]]['sft']['n']} held-out problems per seed.", "",
             "| model | accuracy | − sft, per seed (paired se) | R, per seed | gold NLL |", "|---|---|---|---|---|"]
    for m in models:
        acc = [per_seed[s][m]["accuracy"] for s in seeds]
        nll = [per_seed[s][m]["gold_nll"] for s in seeds]
        diffs = r = ""
        if m not in ("base", "sft"):
            pairs = [paired(per_seed[s][m]["correct"], per_seed[s]["sft"]["correct"]) for s in seeds]
            diffs = ", ".join(f"{d:+.3f} ({se:.3f})" for d, se in pairs)
            if m != "clean":
                rs = [recovered(per_seed[s][m]["correct"], per_seed[s]["sft"]["correct"],
                                per_seed[s].get("clean", {}).get("correct")) for s in seeds]
                r = ", ".join("–" if x is None else f"{x:.2f}" for x in rs)
        lines.append(f"| {m} | {mean_std(acc)} | {diffs} | {r} | {mean_std(nll)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    a = p.parse_args()
    per_seed = {}
    for s in a.seeds:
        f = a.root / f"seed-{s}" / "demo_results.json"
        models = json.loads(f.read_text())["models"] if f.is_file() else {}
        if models and all("correct" in m for m in models.values()):
            per_seed[s] = models
    if not per_seed:
        raise SystemExit(f"{a.root}: no seed folder with per-problem results (demo_results.json with 'correct')")
    print(table(per_seed))


if __name__ == "__main__":
    main()
