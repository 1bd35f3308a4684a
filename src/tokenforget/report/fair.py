"""The fair comparison's table (`tokenforget fair`, `tokenforget.commands.demo.run_fair`; issue 36): numbers in,
table out, no model.

The protocol's rules read each setting's record (`tokenforget.pipeline.settings.Setting`): a setting that reads data
beyond the user's noisy file brings the baseline given that same data, and one that reads the answers' verdicts is
held against `rft`, which reads them too (`MATCHING`, by `Setting.reads`); the settings marked `baseline` (what a user
would train anyway) are the candidates for the strongest baseline; a setting that others tune (`Setting.tunes`:
another learning rate, another lambda) gets a row with the variant chosen per run on validation.
`fair_table`: per setting, the mean over runs (data seed x training seed) of its paired test difference to `sft`,
to the strongest baseline and to its matching baselines, with the standard error over runs (and over data seeds,
where a data seed has several training seeds) and the mean problem-level paired standard error beside it, at equal steps (each epochs value) and at each setting's own epochs,
chosen per run on the validation split (`chosen_epochs`) among the epochs values the row has cells for (`candidates`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from tokenforget.pipeline.settings import DEMO_SETTINGS, READS

# What a setting reads beyond the noisy answers (`Setting.reads`) -> the baseline that reads the same (MEASURING.md):
# `sft` on the noisy answers plus the trusted set; the right answers alone at sft's steps.
MATCHING = {"trusted": "sft_plus_trusted", "verdicts": "rft"}


def _reads(setting: str) -> tuple[str, ...]:
    record = DEMO_SETTINGS.get(setting)  # a simulated detector's name has no record: it reads nothing declared
    return () if record is None else record.reads


def is_baseline(setting: str) -> bool:
    """Whether `setting` is what a user would train anyway (`Setting.baseline`): a candidate strongest baseline."""
    record = DEMO_SETTINGS.get(setting)
    return record is not None and record.baseline


def matching_baselines(setting: str) -> list[str]:
    """The baselines that know what `setting` reads beyond the noisy answers (`MATCHING`, in `READS`'s order):
    `sft_plus_trusted` for the trusted set, `rft` for the verdicts; none for a setting that reads neither."""
    return [MATCHING[k] for k in READS if k in _reads(setting) and MATCHING[k] != setting]


def grid_settings(settings: Sequence[str], baseline: str = "sft") -> list[str]:
    """The settings to train: `baseline` first, then `settings` in order, the matching baseline of each setting that
    reads the trusted set (data beyond the user's file) added after the last setting (once)."""
    out = [baseline, *(s for s in settings if s != baseline)]
    for s in settings:
        match = MATCHING["trusted"] if "trusted" in _reads(s) else None
        if match and match not in out:
            out.append(match)
    return out


@dataclass(frozen=True)
class Paired:
    """A setting against another over runs: the mean paired test difference, its standard error over runs
    (std / sqrt(runs), NaN for one run), the mean over runs of the problem-level paired standard error, runs; and
    where some data seed has several training seeds, the standard error over data seeds (each seed's runs averaged
    first: runs of one data seed share its problems and noise, so the runs' own standard error is too small)."""

    mean: float
    se_runs: float
    se_problems: float
    runs: int
    se_seeds: float = math.nan


def paired(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]], seeds: Optional[Sequence[int]] = None) -> Paired:
    """`a` against `b`: per run, the mean over problems of a_i - b_i and its standard error std(d, ddof 1) / sqrt(n);
    then their mean over runs, and the standard error of that mean over runs. `seeds`: each run's data seed; where
    they are fewer than the runs, the standard error over the data seeds' mean differences too."""
    diffs = [np.asarray(x, float) - np.asarray(y, float) for x, y in zip(a, b)]
    if not diffs:
        return Paired(math.nan, math.nan, math.nan, 0)
    means = np.array([d.mean() for d in diffs])
    se_prob = float(np.mean([d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan for d in diffs]))
    se_runs = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else math.nan
    se_seeds = math.nan
    if seeds is not None and 1 < len(set(seeds)) < len(means):
        per_seed = np.array([means[[i for i, s in enumerate(seeds) if s == seed]].mean() for seed in sorted(set(seeds))])
        se_seeds = float(per_seed.std(ddof=1) / math.sqrt(len(per_seed)))
    return Paired(float(means.mean()), se_runs, se_prob, len(means), se_seeds)


Pick = tuple[str, float]  # what one run chose: (the setting trained, its epochs)
TUNED = " (tuned)"  # a tuned row's name: the setting's, then this


def chosen_pick(cells: dict[tuple[int, int, float], dict[str, Any]], run: tuple[int, int], members: Sequence[str],
                epochs: Sequence[float]) -> Optional[Pick]:
    """Of `members` (a setting, then the variants that tune it: `Setting.tunes`) at each epochs value, the one with
    the highest validation accuracy in `run` (data seed, training seed); on a tie the fewer epochs, then the earlier
    member; None where a cell or its validation is missing."""
    vals = []
    for i, s in enumerate(members):
        for e in epochs:
            m = cells.get((*run, e), {}).get(s)
            if m is None or m.get("val_accuracy") is None:
                return None
            vals.append((-m["val_accuracy"], e, i))
    _, e, i = min(vals)
    return members[i], e


def chosen_epochs(cells: dict[tuple[int, int, float], dict[str, Any]], run: tuple[int, int], setting: str,
                  epochs: Sequence[float]) -> Optional[float]:
    """The epochs value of `setting` with the highest validation accuracy in `run`; the fewer epochs on a tie."""
    pick = chosen_pick(cells, run, [setting], epochs)
    return None if pick is None else pick[1]


def tunings(settings: Sequence[str]) -> dict[str, list[str]]:
    """Each setting that two or more of `settings` tune (`Setting.tunes`: another learning rate, another lambda;
    the setting itself counts where it is among them) -> them, in order: the table's tuned rows, the variant chosen
    per run on validation."""
    out: dict[str, list[str]] = {}
    for s in settings:
        record = DEMO_SETTINGS.get(s)
        if record is not None and record.tunes:
            out.setdefault(record.tunes, [record.tunes] if record.tunes in settings else []).append(s)
    return {family: members for family, members in out.items() if len(members) > 1}


def _answers(cells: dict[tuple[int, int, float], dict[str, Any]], run: tuple[int, int], pick: Pick) -> list[int]:
    return cells[(*run, pick[1])][pick[0]]["correct"]


def candidates(cells: dict[tuple[int, int, float], dict[str, Any]], run: tuple[int, int], members: Sequence[str],
               epochs: Sequence[float]) -> int:
    """How many of `epochs`, from the first, `members` have every validated cell for in `run`: the epochs values
    its choice is made among (0: none). A grid finishes its epochs values row by row; a row with cells at 1 and 2
    epochs in a table of 1, 2 and 3 chooses between 1 and 2, and says so."""
    return max((k for k in range(1, len(epochs) + 1) if chosen_pick(cells, run, members, epochs[:k])), default=0)


def _equal_steps(cells: dict[tuple[int, int, float], dict[str, Any]], runs: Sequence[tuple[int, int]],
                 settings: Sequence[str], e: float, baseline: str) -> tuple[dict[str, Any], Optional[str]]:
    """Each setting at `e` epochs of the baseline's steps, over the runs that have both: its mean test accuracy, its
    paired difference to `baseline` and to the strongest baseline at these steps (the `is_baseline` row of the
    highest accuracy); with that row's name."""
    have = [r for r in runs if baseline in cells.get((*r, e), {})]
    rows = {}
    for s in settings:
        rs = [r for r in have if s in cells[(*r, e)]]
        if rs:
            rows[s] = {"accuracy": float(np.mean([np.mean(cells[(*r, e)][s]["correct"]) for r in rs])),
                       "vs_baseline": asdict(_paired_at(cells, rs, e, s, baseline)), "runs": [list(r) for r in rs]}
    top = max((b for b in rows if is_baseline(b)), key=lambda b: rows[b]["accuracy"], default=None)
    for s, row in rows.items():  # over the runs both have
        rs = [r for r in map(tuple, row["runs"]) if top is not None and top in cells[(*r, e)]]
        if rs:
            row["vs_strongest"] = asdict(_paired_at(cells, rs, e, s, top))  # type: ignore[arg-type]
    return rows, top


def _paired_at(cells: dict[tuple[int, int, float], dict[str, Any]], rs: Sequence[tuple[int, int]], e: float, a: str,
               b: str) -> Paired:
    return paired([cells[(*r, e)][a]["correct"] for r in rs], [cells[(*r, e)][b]["correct"] for r in rs],
                  [r[0] for r in rs])


def fair_table(cells: dict[tuple[int, int, float], dict[str, Any]], settings: Sequence[str],
               epochs: Sequence[float], baseline: str = "sft") -> dict[str, Any]:
    """For each setting: its mean test accuracy and its paired difference to `baseline` at equal steps (each epochs
    value, over the runs that have it) and at its own chosen epochs against the baseline's own chosen epochs; for a
    setting that others tune, a row `<setting> (tuned)` with the variant and epochs chosen per run on validation; then
    each against the strongest baseline (of the `is_baseline` rows present, the highest mean accuracy at chosen
    epochs: the table's choice of rival favours the rival). A row chooses among the epochs values it has every cell
    for (`candidates`, recorded per run as `of`, the largest); two rows are compared with both chosen among the
    epochs values both have, so neither is chosen among more than the other."""
    runs = sorted({(s, t) for s, t, _ in cells})
    at_epochs: dict[str, dict[str, Any]] = {}
    strongest_at: dict[str, Optional[str]] = {}  # each epochs value's strongest baseline at equal steps
    for e in epochs:
        at_epochs[f"{e:g}"], strongest_at[f"{e:g}"] = _equal_steps(cells, runs, settings, e, baseline)
    members = {s: [s] for s in settings} | {s + TUNED: m for s, m in tunings(settings).items()}
    reach = {row: {r: k for r in runs if (k := candidates(cells, r, m, epochs))} for row, m in members.items()}

    def pick(row: str, run: tuple[int, int], k: int) -> Pick:
        return chosen_pick(cells, run, members[row], epochs[:k])  # type: ignore[return-value]  # k <= reach

    def against(row: str, other: str, rs: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """`row` against `other` over the runs `rs` where both have a choice, each among the epochs both have."""
        rs = [r for r in rs if r in reach[other]]
        ks = [min(reach[row][r], reach[other][r]) for r in rs]
        return asdict(paired([_answers(cells, r, pick(row, r, k)) for r, k in zip(rs, ks)],
                             [_answers(cells, r, pick(other, r, k)) for r, k in zip(rs, ks)], [r[0] for r in rs]))

    chosen: dict[str, dict[str, Any]] = {}
    for row, m in members.items():
        rs = [r for r in runs if r in reach[row] and r in reach[baseline]]
        if not rs:
            continue
        mine = [pick(row, r, reach[row][r]) for r in rs]
        chosen[row] = {"accuracy": float(np.mean([np.mean(_answers(cells, r, p)) for r, p in zip(rs, mine)])),
                       "vs_baseline": against(row, baseline, rs), "epochs": [p[1] for p in mine],
                       "of": [epochs[reach[row][r] - 1] for r in rs], "runs": [list(r) for r in rs]}
        if len(m) > 1:
            chosen[row]["chose"] = [p[0] for p in mine]
    for row, record in chosen.items():  # against the baselines that read what it reads, where the grid trained them
        rs = [tuple(r) for r in record["runs"]]
        record["vs_matching"] = {b: against(row, b, rs) for b in matching_baselines(members[row][0]) if b in chosen}
    present = [b for b in chosen if is_baseline(members[b][0])]
    strongest = max(present, key=lambda b: chosen[b]["accuracy"]) if present else None
    if strongest is not None:
        for row, record in chosen.items():
            record["vs_strongest"] = against(row, strongest, [tuple(r) for r in record["runs"]])
    return {"baseline": baseline, "strongest": strongest, "runs": [list(r) for r in runs], "equal_steps": at_epochs,
            "strongest_at_equal_steps": strongest_at, "chosen_epochs": chosen, "made": made_summary(cells, settings)}


def made_summary(cells: dict[tuple[int, int, float], dict[str, Any]], settings: Sequence[str]) -> dict[str, Any]:
    """Per setting, over its trainings in every cell: the trainer's runtimes (s), and the commits, machines and
    versions their stages record (`commands.fair.made_of`; trainings made before these were recorded have none)."""
    out = {}
    for s in settings:
        made = [cell[s]["made"] for cell in cells.values() if s in cell and cell[s].get("made")]
        if made:
            out[s] = {"train_runtime": [m["train_runtime"] for m in made if "train_runtime" in m],
                      **{k: sorted({m[k] for m in made if k in m}) for k in ("commit", "machine", "versions")}}
    return out


def format_made(made: dict[str, Any]) -> list[str]:
    """The table's provenance: a row per setting (its trainings' runtime and commits), then the machines and
    versions they ran on."""
    if not made:
        return []
    lines = ["\nHow the trainings were made (the trainer's runtime of each final training, s: median, min-max; the "
             "commits, machines and versions their stages record, where they do):\n",
             "| setting | trainings timed | runtime, s | commits |", "|---|---|---|---|"]
    for s, m in made.items():
        t = m["train_runtime"]
        runtime = f"{np.median(t):.0f} ({min(t):.0f}-{max(t):.0f})" if t else ""
        lines.append(f"| `{s}` | {len(t)} | {runtime} | {', '.join(m['commit']) or 'not recorded'} |")
    for key in ("machine", "versions"):
        found = sorted({v for m in made.values() for v in m[key]})
        lines.append(f"\n{key.capitalize()}: {'; '.join(found) if found else 'not recorded'}")
    return lines


def _pm(p: dict[str, Any]) -> str:
    if p["runs"] == 0 or math.isnan(p["mean"]):
        return ""
    runs = "" if math.isnan(p["se_runs"]) else f" ± {p['se_runs']:.3f} (runs)"
    if not math.isnan(p.get("se_seeds", math.nan)):
        runs += f", ± {p['se_seeds']:.3f} (data seeds)"
    return f"{p['mean']:+.3f}{runs}, ± {p['se_problems']:.3f} (problems), {p['runs']} run{'s' * (p['runs'] > 1)}"


def _epochs_chosen(row: dict[str, Any], last: float) -> str:
    """Each run's chosen epochs (and, for a tuned row, variant); where the row lacks cells at the table's last epochs
    values, the runs grouped by the most epochs they chose among (in the order of the runs' first appearance):
    "2, 2 (of ≤2); 1 (of ≤1)"."""
    chose = row.get("chose", [""] * len(row["epochs"]))
    picks = [f"{e:g}" + (f" `{c}`" if c else "") for e, c in zip(row["epochs"], chose)]
    of = row.get("of", [last] * len(picks))
    if all(o == last for o in of):
        return ", ".join(picks)
    groups: dict[float, list[str]] = {}
    for o, p in zip(of, picks):
        groups.setdefault(o, []).append(p)
    return "; ".join(", ".join(ps) + f" (of ≤{o:g})" for o, ps in groups.items())


def format_fair(table: dict[str, Any]) -> str:
    """The table as Markdown: equal steps per epochs value, then each setting at its chosen epochs."""
    b, lines = table["baseline"], []
    for e, rows in table["equal_steps"].items():
        top = table.get("strongest_at_equal_steps", {}).get(e)
        lines += [f"\nEqual steps, {e} epoch(s) of `{b}`'s steps (test; strongest baseline at these steps: `{top}`):\n",
                  f"| setting | accuracy | vs `{b}` | vs `{top}` |", "|---|---|---|---|"]
        lines += [f"| `{s}` | {r['accuracy']:.3f} | {_pm(r['vs_baseline'])} | "
                  f"{_pm(r['vs_strongest']) if 'vs_strongest' in r else ''} |" for s, r in rows.items()]
    strongest = table["strongest"]
    last = max((float(e) for e in table["equal_steps"]), default=1.0)  # the table's most epochs
    notes = ("; a row `X (tuned)`: the variant of `X` chosen per run on validation, named after its epochs"
             if any("chose" in r for r in table["chosen_epochs"].values()) else "")
    if any(o != last for r in table["chosen_epochs"].values() for o in r.get("of", [])):
        notes += ("; `(of ≤N)`: chosen among the epochs values up to N, those that row has cells for in those runs; "
                  "each comparison chooses both rows among the epochs values both have")
    if table.get("untrained_epochs"):
        notes += (f"; the grid also declares {', '.join(f'{e:g}' for e in table['untrained_epochs'])} epochs, no "
                  f"cell trained yet: every row is chosen among {', '.join(table['equal_steps'])} only")
    lines += [f"\nEach setting at its own epochs, chosen on validation (test; strongest baseline: `{strongest}`; "
              "the matching baselines: `sft_plus_trusted` for a setting that reads the trusted set, `rft` for one "
              f"that reads the verdicts{notes}):\n",
              f"| setting | epochs chosen | accuracy | vs `{b}` | vs `{strongest}` | vs the matching baselines |",
              "|---|---|---|---|---|---|"]
    for s, r in table["chosen_epochs"].items():
        epochs = _epochs_chosen(r, last)
        matching = "; ".join(f"`{m}` {_pm(p)}" for m, p in r.get("vs_matching", {}).items())
        lines.append(f"| `{s}` | {epochs} | {r['accuracy']:.3f} | {_pm(r['vs_baseline'])} | "
                     f"{_pm(r['vs_strongest']) if 'vs_strongest' in r else ''} | {matching} |")
    lines += format_made(table.get("made", {}))
    if "grid" in table:
        lines.append(f"\nThe grid: {table['grid']}")
    return "\n".join(lines).strip()
