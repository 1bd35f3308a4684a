"""scripts/bounds_table.py on a hand-made comparison folder: R and paired differences by hand."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("bounds_table", ROOT / "scripts" / "bounds_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def entry(value: float, sums: list[float], tokens: list[float]) -> dict:
    return {"value": value, "stderr": 0.0, "n": len(sums), "kind": "nll", "per_example": {"nll_sum": sums, "tokens": tokens}}


def write(folder: Path, value: float, sums: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"benchmarks": {"nll:val": entry(value, sums, [2.0, 2.0])}}))


def test_recovered_share_and_paired_differences_by_hand(tmp_path: Path):
    """One seed, two examples of 2 tokens each. sft: sums 2, 2 -> 1.0/token; gold ceiling 1.6, 1.6 -> 0.8;
    dft 1.8, 1.8 -> 0.9; a variant 2.4, 2.0 -> 1.1. R(dft) = (1.0 - 0.9)/(1.0 - 0.8) = 0.5; R(x) = -0.5.
    Paired se of x - sft: residuals 0.4, 0.0 per 2 tokens, mean 0.1/token; r_i - m c_i = 0.2, -0.2;
    se = sqrt(2/1 * 0.08) / 4 = 0.1. The dft - sft residuals are equal, so their se is 0."""
    bt = load_script()
    root, gold = tmp_path / "cmp", tmp_path / "gold"
    write(root / "seed-1" / "eval-sft", 1.0, [2.0, 2.0])
    write(root / "seed-1" / "eval-dft", 0.9, [1.8, 1.8])
    write(root / "seed-1" / "variant-x" / "eval-x", 1.1, [2.4, 2.0])
    write(gold / "seed-1" / "eval-sft", 0.8, [1.6, 1.6])
    per_seed = bt.collect(root, {"gold": gold}, [1, 2])
    assert list(per_seed) == [1] and set(per_seed[1]) == {"sft", "dft", "x", "ceiling:gold"}
    text = bt.tables(per_seed, "gold")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| dft | 0.9000 | -0.1000 (0.0000) | -0.1000 | 0.50 |" == rows["dft"]
    assert "| x | 1.1000 | +0.1000 (0.1000) | 0.1000 | -0.50 |" == rows["x"]
    assert rows["ceiling:gold"].startswith("| ceiling:gold | 0.8000 | -0.2000 (0.0000) |")
    assert bt.recovered(1.0, 1.0, 1.0) != bt.recovered(1.0, 1.0, 1.0)  # a zero gap gives NaN, not a number


def test_no_recovered_share_where_the_ceiling_does_not_beat_sft(tmp_path: Path):
    """Seed 1 as above (gap 0.2, se 0: R shown); seed 2's ceiling is worse than sft (sums 2.2, 2.2 -> 1.1 vs
    1.0): no damage, so R is '–' there and no mean is given."""
    bt = load_script()
    root, gold = tmp_path / "cmp", tmp_path / "gold"
    for s, ceiling in ((1, [1.6, 1.6]), (2, [2.2, 2.2])):
        write(root / f"seed-{s}" / "eval-sft", 1.0, [2.0, 2.0])
        write(root / f"seed-{s}" / "eval-dft", 0.9, [1.8, 1.8])
        write(gold / f"seed-{s}" / "eval-sft", sum(ceiling) / 4, ceiling)
    text = bt.tables(bt.collect(root, {"gold": gold}, [1, 2]), "gold")
    (dft,) = [line for line in text.splitlines() if line.startswith("| dft |")]
    assert dft.endswith("| 0.50, – |")
    assert "– where it does not" in text


def test_learnable_table_by_hand():
    """4 problems. sft right on 1 (0.25), clean on all 4 (1.0), x on 3 (0.75): x - sft = d (0, 1, 1, 0), mean 0.5,
    sd sqrt(1/3), se sqrt(1/3)/2 = 0.289; clean - sft = (0, 1, 1, 1), mean 0.75, sd 0.5, se 0.25,
    gap 0.75 > 2 x 0.25, so R(x) = 0.5 / 0.75 = 0.67."""
    spec = importlib.util.spec_from_file_location("learnable_table", ROOT / "scripts" / "learnable_table.py")
    lt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lt)
    m = lambda c: {"accuracy": sum(c) / 4, "gold_nll": 0.1, "n": 4, "correct": c}  # noqa: E731
    text = lt.table({1: {"base": m([0, 0, 0, 0]), "sft": m([1, 0, 0, 0]), "clean": m([1, 1, 1, 1]), "x": m([1, 1, 1, 0])}})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["x"] == "| x | 0.750 | +0.500 (0.289) | 0.67 | 0.100 |"
    assert rows["clean"] == "| clean | 1.000 | +0.750 (0.250) |  | 0.100 |"
    assert lt.recovered([1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 1]) is None  # gap 0.25 = its se x 1: no damage shown
