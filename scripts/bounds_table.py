"""Every finished model of a comparison folder against sft (the floor) and sft on cleaner data (the ceilings).

    python scripts/bounds_table.py runs/gsm8k-natural --ceiling gold=runs/gsm8k-natural-gold [--seeds 1 2 3]

Reads the evaluation stages as they are on disk, so it works on a comparison that is still running or was
stopped: `seed-<s>/eval-<m>/results.json`, `seed-<s>/variant-<m>/eval-<m>/results.json`, and for each ceiling
`<folder>/seed-<s>/eval-sft/results.json` (an `sft` training of the same seed on other data). Only models
finished in every listed seed are shown. Per NLL benchmark (lower is better) it prints, as Markdown:

- each model's mean ± std over seeds;
- its paired difference to sft per seed, with the paired standard error over examples (`compare.paired_nll_stderr`);
- R = (m_sft - m_model) / (m_sft - m_ceiling), the share of the damage the model recovers, per seed and as
  mean ± std, for the first ceiling; with the gap m_sft - m_ceiling and its paired standard error, since R
  means nothing when the gap is inside its own error (../shared/MEASURING.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

from tokenforget.commands.compare import mean_std, paired_nll_stderr


def finished(seed_dir: Path) -> dict[str, dict[str, Any]]:
    """{model: benchmarks} of every evaluation finished in one seed folder (variants in their own folders)."""
    out = {}
    for results in [*seed_dir.glob("eval-*/results.json"), *seed_dir.glob("variant-*/eval-*/results.json")]:
        out[results.parent.name.removeprefix("eval-")] = json.loads(results.read_text())["benchmarks"]
    return out


def collect(root: Path, ceilings: dict[str, Path], seeds: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
    per_seed = {}
    for s in seeds:
        models = finished(root / f"seed-{s}")
        for name, folder in ceilings.items():
            ceiling = folder / f"seed-{s}" / "eval-sft" / "results.json"
            if ceiling.is_file():
                models[f"ceiling:{name}"] = json.loads(ceiling.read_text())["benchmarks"]
        if "sft" in models:
            per_seed[s] = models
    return per_seed


def recovered(floor: float, model: float, ceiling: float) -> float:
    """R = (floor - model) / (floor - ceiling) for a lower-is-better measure; NaN for a zero gap."""
    gap = floor - ceiling
    return (floor - model) / gap if gap else math.nan


def damaged(sft: dict[str, Any], ceiling: dict[str, Any]) -> bool:
    """Whether the ceiling beats sft by more than 2 paired standard errors (a gap R can be a share of)."""
    se = paired_nll_stderr(ceiling, sft)
    return sft["value"] - ceiling["value"] > 2 * (se or 0.0)


def r_cell(seeds: list[dict[str, dict[str, Any]]], model: str, ceiling: str, bench: str) -> str:
    """R per seed ('–' in a seed without damage), and its mean ± std when every seed has one."""
    r = [recovered(s["sft"][bench]["value"], s[model][bench]["value"], s[ceiling][bench]["value"])
         if damaged(s["sft"][bench], s[ceiling][bench]) else None for s in seeds]
    cell = ", ".join("–" if x is None else f"{x:.2f}" for x in r)
    known = [x for x in r if x is not None]
    return cell + (f" (mean {fmt(*mean_std(known), 2)})" if len(known) == len(r) > 1 else "")


def fmt(mean: float, std: Optional[float], digits: int = 4) -> str:
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def tables(per_seed: dict[int, dict[str, dict[str, Any]]], ceiling: Optional[str]) -> str:
    seeds = sorted(per_seed)
    models = [m for m in per_seed[seeds[0]] if all(m in per_seed[s] for s in seeds)]
    order = ["base", "sft", *sorted(m for m in models if m.startswith("ceiling:")),
             *[m for m in models if m not in ("base", "sft") and not m.startswith("ceiling:")]]
    models = [m for m in order if m in models]
    benches = [b for b, e in per_seed[seeds[0]]["sft"].items() if e.get("kind") == "nll"]
    lines = [f"Seeds: {seeds}. NLL in nats per token (lower is better)."]
    for b in benches:
        lines += ["", f"#### {b}", "",
                  "| model | mean ± std over seeds | minus sft, per seed (paired se) | mean ± std | R (recovered share) |",
                  "|---|---|---|---|---|"]
        ceil = per_seed[seeds[0]].get(f"ceiling:{ceiling}") and f"ceiling:{ceiling}"
        for m in models:
            vals = [per_seed[s][m][b]["value"] for s in seeds]
            row = [m, fmt(*mean_std(vals))]
            if m == "sft":
                row += ["", "", ""]
            else:
                diffs = [per_seed[s][m][b]["value"] - per_seed[s]["sft"][b]["value"] for s in seeds]
                ses = [paired_nll_stderr(per_seed[s][m][b], per_seed[s]["sft"][b]) for s in seeds]
                row.append(", ".join(f"{d:+.4f} ({se:.4f})" if se is not None else f"{d:+.4f}" for d, se in zip(diffs, ses)))
                row.append(fmt(*mean_std(diffs)))
                row.append(r_cell([per_seed[s] for s in seeds], m, ceil, b) if ceil and m not in ("base", ceil) else "")
            lines.append("| " + " | ".join(row) + " |")
        if ceil:
            lines.append(f"\nR where {ceil} beats sft by more than 2 paired se in that seed; – where it does not "
                         "(no damage to recover: R would divide by noise).")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--ceiling", action="append", default=[], help="NAME=FOLDER (the first one is R's ceiling)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    a = p.parse_args()
    ceilings = dict(c.split("=", 1) for c in a.ceiling)
    per_seed = collect(a.root, {k: Path(v) for k, v in ceilings.items()}, a.seeds)
    if not per_seed:
        raise SystemExit(f"{a.root}: no seed folder with a finished eval-sft")
    print(tables(per_seed, next(iter(ceilings), None)))


if __name__ == "__main__":
    main()
