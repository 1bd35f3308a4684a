"""Any two rows of a fair grid paired, from its committed cells: the figures docs/results.md quotes beside the table.

`tokenforget fair`'s table holds each setting against `sft`, the strongest baseline and its matching baselines.
Results.md also pairs other rows (λ 0.5 against the paper's 0.25, forgetting against ignoring the same tokens); this
prints them from the cells (`seed-S/cells/tT-e1.json`; `-e2` with `--epochs 2`): per run the paired difference on the
test problems with its problem-level standard error, then the mean over the runs with the standard errors of
`report.fair.paired`.

    python scripts/fair_pairs.py docs/fair/weak-outcome oracle_forget_lam0.5:oracle_forget oracle_first_forget:sft
    python scripts/fair_pairs.py docs/fair/weak-outcome verified_tail_base:rft --all-training-seeds
    python scripts/fair_pairs.py docs/fair/weak-outcome verified_tail_base:rft --epochs 2
    python scripts/fair_pairs.py docs/fair/weak-outcome verified_tail_base:rft --chosen 1,2,3

`--chosen`: each row at its own epochs, chosen per run on validation among those values (both rows among the values
both have cells for: `report.fair.candidates`), as the table's chosen-epochs section, over the runs given.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from tokenforget.report.fair import candidates, chosen_pick, paired

CELL = re.compile(r"t(\d+)-e[\d.]+\.json")  # training seed, epochs of sft's steps (the table's equal-steps cells)


def read_runs(grid: Path, all_training_seeds: bool, epochs: float = 1) -> list[tuple[int, int, dict[str, Any]]]:
    """(data seed, training seed, cell) of every cell at `epochs` of `sft`'s steps (both rows of a pair at the same
    steps); only each data seed's own training seed unless `all_training_seeds`."""
    runs = []
    for folder in sorted(grid.glob("seed-*"), key=lambda p: int(p.name.split("-")[1])):
        seed = int(folder.name.split("-")[1])
        for cell in sorted((folder / "cells").glob(f"t*-e{epochs:g}.json")):
            train_seed = int(CELL.fullmatch(cell.name).group(1))  # type: ignore[union-attr]
            if all_training_seeds or train_seed == seed:
                runs.append((seed, train_seed, json.loads(cell.read_text())))
    return runs


def chosen_runs(grid: Path, all_training_seeds: bool, epochs: list[float], a: str,
                b: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(data seed, training seed, {a: cell row, b: cell row, "chose": "ea vs eb"}) of every run where both rows have
    a cell at `epochs[0]`: each row at its epochs chosen on validation among the values both have."""
    cells = {(s, t, e): c for e in epochs for s, t, c in read_runs(grid, all_training_seeds, e)}
    runs = []
    for s, t in sorted({(s, t) for s, t, _ in cells}):
        k = min(candidates(cells, (s, t), [a], epochs), candidates(cells, (s, t), [b], epochs))
        if k:
            (_, ea), (_, eb) = chosen_pick(cells, (s, t), [a], epochs[:k]), chosen_pick(cells, (s, t), [b], epochs[:k])
            runs.append((s, t, {a: cells[(s, t, ea)][a], b: cells[(s, t, eb)][b], "chose": f"{ea:g} vs {eb:g}"}))
    return runs


def pair_lines(runs: list[tuple[int, int, dict[str, Any]]], a: str, b: str) -> list[str]:
    """`a` − `b` in every run that has both: one line per run, then the mean."""
    both = [(s, t, c) for s, t, c in runs if a in c and b in c]
    lines = []
    for s, t, c in both:
        one = paired([c[a]["correct"]], [c[b]["correct"]], [s])
        chose = f" (epochs {c['chose']})" if "chose" in c else ""
        lines.append(f"  data seed {s}, training seed {t}{chose}: {one.mean:+.3f} ± {one.se_problems:.3f}")
    p = paired([c[a]["correct"] for *_, c in both], [c[b]["correct"] for *_, c in both], [s for s, *_ in both])
    seeds = "" if math.isnan(p.se_seeds) else f", ± {p.se_seeds:.3f} (data seeds)"  # NaN: one run a data seed
    return [f"{a} − {b}:", *lines,
            f"  mean {p.mean:+.3f} ± {p.se_runs:.3f} (runs){seeds}, ± {p.se_problems:.3f} (problems), {p.runs} runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", type=Path, help="a fair grid's folder: docs/fair/weak-outcome, docs/fair/recurring")
    parser.add_argument("pairs", nargs="+", help="a:b, the row a against the row b")
    parser.add_argument("--all-training-seeds", action="store_true", help="every training seed, not the data seed's own")
    parser.add_argument("--epochs", type=float, default=1, help="the cells at this many epochs of sft's steps (default 1)")
    parser.add_argument("--chosen", help="each row at its epochs chosen on validation among these: 1,2,3")
    args = parser.parse_args()
    runs = read_runs(args.grid, args.all_training_seeds, args.epochs)
    for pair in args.pairs:
        a, _, b = pair.partition(":")
        if args.chosen:
            runs = chosen_runs(args.grid, args.all_training_seeds, [float(e) for e in args.chosen.split(",")], a, b)
        print("\n".join(pair_lines(runs, a, b)))


if __name__ == "__main__":
    main()
