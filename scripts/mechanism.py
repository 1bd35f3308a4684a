"""The mechanism behind a gain on the demo's recurring wrong total, checked without training (issue 36, item 5).

For one demo's results (`demo_results.json`, or a cell of `tokenforget fair`: `seed-S/cells/t1-e1.json`): each
setting's paired difference to sft split by problem kind (the kinds whose answer ends in a total, where the noise
puts its +10, and the others), and the share of each model's wrong test answers that are exactly gold + 10 (the
recurring error, learned). Needs the models' answers, kept since issue 36.

    python scripts/mechanism.py runs/fair/recurring/seed-1/cells/t1-e1.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from tokenforget.stages.demo_task import SYSTEMATIC_OFFSET, TOTAL_KINDS, problem_kind


def split(correct: list[int], base: list[int], kinds: list[int]) -> dict[str, tuple[float, float, int]]:
    """Paired difference to the baseline (mean, se, n) on the total-ending problems and on the others."""
    out = {}
    for label, keep in (("total-ending", True), ("other", False)):
        d = [c - b for c, b, k in zip(correct, base, kinds) if (k in TOTAL_KINDS) == keep]
        n = len(d)
        mean = sum(d) / n if n else math.nan
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else math.nan
        out[label] = (mean, math.sqrt(var / n) if n > 1 else math.nan, n)
    return out


def plus_offset_share(answers: list[str | None], golds: list[str], correct: list[int]) -> tuple[int, int]:
    """(wrong answers exactly gold + SYSTEMATIC_OFFSET, wrong answers)."""
    wrong = [(a, g) for a, g, c in zip(answers, golds, correct) if not c]
    hits = sum(1 for a, g in wrong if a is not None and _num(a) == _num(g) + SYSTEMATIC_OFFSET)
    return hits, len(wrong)


def _num(x: str) -> float:
    try:
        return float(x)
    except ValueError:
        return math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="demo_results.json, or a fair cell's seed-S/cells/<cell>.json")
    args = ap.parse_args()
    raw = json.loads(args.results.read_text())
    models = raw.get("models", raw)  # a demo's results, or a cell (models at the top)
    folder = args.results.parent.parent if args.results.parent.name == "cells" else args.results.parent
    test = [json.loads(line) for line in (folder / "task" / "test.jsonl").read_text().splitlines()]
    kinds, golds = [problem_kind(r["prompt"]) for r in test], [r["answer"] for r in test]
    sft = models.get("sft")
    for name, m in models.items():
        if not m.get("answers"):
            print(f"{name}: no answers kept (evaluated before issue 36)")
            continue
        hits, wrong = plus_offset_share(m["answers"], golds, m["correct"])
        line = f"{name}: accuracy {sum(m['correct']) / len(test):.3f}; wrong answers gold + {SYSTEMATIC_OFFSET}: {hits}/{wrong}"
        if sft is not None and name != "sft":
            parts = split(m["correct"], sft["correct"], kinds)
            line += "; vs sft " + ", ".join(f"{k} {v[0]:+.3f} ± {v[1]:.3f} (n={v[2]})" for k, v in parts.items())
        print(line)


if __name__ == "__main__":
    main()
