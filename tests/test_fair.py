"""The fair comparison (`tokenforget fair`): its numbers worked out by hand, its protocol (equal steps, the extra-data
rule, the seed grid, epochs chosen on validation) and one tiny grid end to end."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from unittest.mock import ANY

import pytest

from tokenforget.report.fair import chosen_epochs, fair_table, grid_settings, paired
from tokenforget.version import code_commit, machine


def test_paired_difference_and_its_two_standard_errors():
    """Two runs of 4 problems. Run 1: a = 1 1 1 0, b = 1 0 0 0, d = 0 1 1 0, mean 0.5, std (ddof 1) sqrt(1/3),
    se 0.2887. Run 2: a = 1 1 0 0, b = 1 1 0 0, d = 0, mean 0, se 0. Over runs: mean 0.25; std of (0.5, 0) = 0.3536,
    se over runs 0.3536 / sqrt 2 = 0.25; the mean problem-level se (0.2887 + 0) / 2 = 0.1443."""
    p = paired([[1, 1, 1, 0], [1, 1, 0, 0]], [[1, 0, 0, 0], [1, 1, 0, 0]])
    assert p.runs == 2 and p.mean == 0.25
    assert p.se_runs == pytest.approx(0.25, abs=1e-12)
    assert p.se_problems == pytest.approx(math.sqrt(1 / 3) / 2 / 2, abs=1e-12)
    one = paired([[1, 0]], [[0, 0]])  # one run: no standard error over runs
    assert one.mean == 0.5 and math.isnan(one.se_runs)


def test_runs_of_one_data_seed_are_averaged_before_the_standard_error_over_seeds():
    """2 data seeds x 2 training seeds, 4 problems, b always 0000. Data seed 1: a = 1100, 1000 (differences 0.5,
    0.25); data seed 2: 0000, 1000 (0, 0.25). Over the 4 runs: mean 0.25, std (ddof 1) sqrt(0.125 / 3) = 0.2041, se
    0.1021. Over the data seeds: their means 0.375 and 0.125, std 0.1768, se 0.125 (larger: runs of one data seed are
    not independent). With one training seed a data seed the two would be the same: no second figure."""
    zero = [0, 0, 0, 0]
    p = paired([[1, 1, 0, 0], [1, 0, 0, 0], zero, [1, 0, 0, 0]], [zero] * 4, seeds=[1, 1, 2, 2])
    assert p.mean == 0.25 and p.se_runs == pytest.approx(math.sqrt(0.125 / 3) / 2, abs=1e-12)
    assert p.se_seeds == pytest.approx(0.125, abs=1e-12)
    assert math.isnan(paired([[1, 0], [0, 0]], [[0, 0], [0, 0]], seeds=[1, 2]).se_seeds)
    from tokenforget.report.fair import _pm

    # the problem-level se: (sqrt(1/3) / 2 + 0.25 + 0 + 0.25) / 4 = 0.197
    assert _pm(asdict(p)) == "+0.250 ± 0.102 (runs), ± 0.125 (data seeds), ± 0.197 (problems), 4 runs"


def test_a_paired_difference_in_words():
    """Over 2 standard errors from 0 is a verdict; 2 or fewer is not (the demo's table, `report.summary.verdict`)."""
    from tokenforget.report.summary import verdict

    assert verdict(0.17, 0.03, 240) == "better than sft: +0.170 ± 0.030 (5.7 se)"
    assert verdict(-0.09, 0.03, 240, "rft") == "worse than rft: -0.090 ± 0.030 (3.0 se)"
    assert verdict(0.06, 0.03, 240) == "not distinguishable from sft at n = 240"  # exactly 2 se
    assert verdict(0.0, math.nan, 1) == "not distinguishable from sft at n = 1"


def test_extra_data_brings_its_baseline_and_sft_comes_first():
    assert grid_settings(["rft", "verified_tail", "contrastive"]) == ["sft", "rft", "verified_tail", "contrastive",
                                                                      "sft_plus_trusted"]
    assert grid_settings(["verified_whole", "sft"]) == ["sft", "verified_whole"]  # nothing extra read


def test_the_demo_accumulates_micro_batches_and_the_grid_trains_whole_ones(tmp_path: Path):
    """The demo: batches of 8 as 4 micro-batches of 2 (grad_accum 4), still ceil(160 / 8) = 20 optimizer steps and
    9 a reference epoch on 72 answers. A fair cell: whole batches of 8, as its cells were trained before."""
    from tokenforget.command_config import DemoConfig, FairConfig
    from tokenforget.commands.fair import cell_config
    from tokenforget.stages.demo_task import demo_run_config
    from tokenforget.stages.stage import optimizer_steps

    train = tmp_path / "train.jsonl"
    train.write_text("{}\n" * 160)
    demo = demo_run_config(DemoConfig(run_dir=str(tmp_path)), train)
    t = demo.train.training
    assert (t.batch_size, t.grad_accum, optimizer_steps(160, t), optimizer_steps(72, demo.reference.training)) == (2, 4, 20, 18)
    cell = cell_config(FairConfig(run_dir=str(tmp_path)), seed=1, train_seed=1, epochs=1.0)
    assert (cell.micro_batch_size, demo_run_config(cell, train).train.training.grad_accum) == (8, 1)


def _cell(correct: list[int], val: float) -> dict:
    return {"correct": correct, "gold_nll": 0.1, "val_accuracy": val}


def test_epochs_are_chosen_on_validation_and_the_table_reads_test():
    """One run (seed 1, training seed 1), epochs 1 and 2. Validation: sft 0.5 then 0.7 (chooses 2); rft 0.6 then 0.6
    (a tie: the fewer, 1); x 0.4 then 0.9 (chooses 2). Test (4 problems): sft e1 1000, e2 1100; rft e1 1110, e2 0000;
    x e1 0000, e2 1111. Equal steps at 1 epoch: rft - sft = (0 1 1 0) mean 0.5; x - sft = -0.25. Chosen: sft at 2
    (0.5), rft at 1 (0.75): +0.25; x at 2 (1.0): +0.5. Strongest baseline by chosen accuracy: rft (0.75 > 0.5);
    x against it: 1111 - 1110 = +0.25. At equal steps the strongest baseline is chosen per epochs value: at 1 rft
    (0.75 > 0.25), x - rft = -0.75; at 2 sft (0.5 > 0), x - sft = +0.5."""
    cells = {
        (1, 1, 1.0): {"sft": _cell([1, 0, 0, 0], 0.5), "rft": _cell([1, 1, 1, 0], 0.6), "x": _cell([0, 0, 0, 0], 0.4)},
        (1, 1, 2.0): {"sft": _cell([1, 1, 0, 0], 0.7), "rft": _cell([0, 0, 0, 0], 0.6), "x": _cell([1, 1, 1, 1], 0.9)},
    }
    assert chosen_epochs(cells, (1, 1), "rft", [1.0, 2.0]) == 1.0
    assert chosen_epochs(cells, (1, 1), "sft", [1.0, 2.0]) == 2.0
    assert chosen_epochs(cells, (1, 1), "y", [1.0, 2.0]) is None  # never trained
    t = fair_table(cells, ["sft", "rft", "x"], [1.0, 2.0])
    eq = t["equal_steps"]["1"]
    assert eq["rft"]["vs_baseline"]["mean"] == 0.5 and eq["x"]["vs_baseline"]["mean"] == -0.25
    assert t["strongest_at_equal_steps"] == {"1": "rft", "2": "sft"} and eq["x"]["vs_strongest"]["mean"] == -0.75
    assert t["equal_steps"]["2"]["x"]["vs_strongest"]["mean"] == 0.5
    ch = t["chosen_epochs"]
    assert (ch["sft"]["epochs"], ch["rft"]["epochs"], ch["x"]["epochs"]) == ([2.0], [1.0], [2.0])
    assert ch["rft"]["vs_baseline"]["mean"] == 0.25 and ch["x"]["vs_baseline"]["mean"] == 0.5
    assert t["strongest"] == "rft" and ch["x"]["vs_strongest"]["mean"] == 0.25
    assert ch["x"]["vs_matching"] == {} and ch["rft"]["vs_matching"] == {}  # x reads nothing; rft is the baseline


def test_a_row_without_every_epochs_value_chooses_among_those_it_has():
    """A grid half-way through its 2-epoch cells: run (1, 1) has sft and rft at 1 and 2 epochs and x at 1 only; run
    (2, 2) has all three at 1 epoch only. 4 problems. Run 1: sft e1 1000 (val 0.5), e2 1100 (0.7): 2; rft e1 1110
    (0.6), e2 1111 (0.8): 2; x e1 0110 (0.9). Run 2: sft 1000, rft 1100, x 0111. sft: 1100, 1000, accuracy 0.375;
    rft: 1111, 1100, 0.75, and against sft +0.5 and +0.25: +0.375. x chose among 1 epoch only, so sft is chosen among
    1 epoch too when held against it: run 1 0110 - 1000 = +0.25 (not 0110 - 1100 = 0), run 2 0111 - 1000 = +0.5:
    +0.375. The strongest is rft (0.75), chosen among 1 epoch against x: 0110 - 1110 = -0.25 and 0111 - 1100 = +0.25,
    0. Before this rule x, without a 2-epoch cell, had no row at all."""
    from tokenforget.report.fair import format_fair

    def run(cells: dict[str, tuple[list[int], float]]) -> dict:
        return {s: _cell(c, v) for s, (c, v) in cells.items()}

    cells = {(1, 1, 1.0): run({"sft": ([1, 0, 0, 0], 0.5), "rft": ([1, 1, 1, 0], 0.6), "x": ([0, 1, 1, 0], 0.9)}),
             (1, 1, 2.0): run({"sft": ([1, 1, 0, 0], 0.7), "rft": ([1, 1, 1, 1], 0.8)}),
             (2, 2, 1.0): run({"sft": ([1, 0, 0, 0], 0.5), "rft": ([1, 1, 0, 0], 0.5), "x": ([0, 1, 1, 1], 0.5)})}
    t = fair_table(cells, ["sft", "rft", "x"], [1.0, 2.0])
    ch = t["chosen_epochs"]
    assert (ch["sft"]["epochs"], ch["sft"]["of"], ch["sft"]["accuracy"]) == ([2.0, 1.0], [2.0, 1.0], 0.375)
    assert (ch["rft"]["accuracy"], ch["rft"]["vs_baseline"]["mean"]) == (0.75, 0.375)
    assert (ch["x"]["epochs"], ch["x"]["of"], ch["x"]["accuracy"]) == ([1.0, 1.0], [1.0, 1.0], 0.625)
    assert ch["x"]["vs_baseline"]["mean"] == 0.375 and ch["x"]["vs_baseline"]["runs"] == 2
    assert t["strongest"] == "rft" and ch["x"]["vs_strongest"]["mean"] == 0.0
    assert list(t["equal_steps"]["2"]) == ["sft", "rft"] and t["equal_steps"]["2"]["rft"]["vs_baseline"]["mean"] == 0.5
    text = format_fair(t)
    assert "| `sft` | 2 (of ≤2); 1 (of ≤1) | 0.375 |" in text and "| `x` | 1, 1 (of ≤1) | 0.625 |" in text
    assert "`(of ≤N)`: chosen among the epochs values up to N" in text
    again = fair_table(cells | {(3, 3, 2.0): cells[(1, 1, 2.0)], (3, 3, 1.0): cells[(1, 1, 1.0)]}, ["sft"], [1.0, 2.0])
    assert "| `sft` | 2, 2 (of ≤2); 1 (of ≤1) |" in format_fair(again)  # grouped, not in the runs' order
    whole = fair_table({k: v for k, v in cells.items() if k[:2] == (1, 1)}, ["sft", "rft"], [1.0, 2.0])
    assert "(of ≤" not in format_fair(whole)  # every row has every epochs value: the table reads as before


def test_a_setting_is_held_against_the_baselines_that_read_what_it_reads():
    """One run, 1 epoch, 4 problems: sft 1000, rft 1100, sft_plus_trusted 1110, verified_tail_base 1101 (verdicts),
    contrastive 0111 (trusted set), verified_tail 1111 (both). verified_tail_base - rft = 0001: +0.25; contrastive -
    sft_plus_trusted = (-1 0 0 1): 0; verified_tail - sft_plus_trusted = 0001: +0.25, - rft = 0011: +0.5."""
    from tokenforget.report.fair import format_fair, matching_baselines

    assert matching_baselines("verified_tail") == ["sft_plus_trusted", "rft"] and matching_baselines("rft") == []
    cell = {"sft": [1, 0, 0, 0], "rft": [1, 1, 0, 0], "sft_plus_trusted": [1, 1, 1, 0], "verified_tail_base": [1, 1, 0, 1],
            "contrastive": [0, 1, 1, 1], "verified_tail": [1, 1, 1, 1]}
    t = fair_table({(1, 1, 1.0): {k: _cell(v, 0.5) for k, v in cell.items()}}, list(cell), [1.0])
    m = {s: {b: p["mean"] for b, p in r["vs_matching"].items()} for s, r in t["chosen_epochs"].items()}
    assert m["verified_tail_base"] == {"rft": 0.25} and m["contrastive"] == {"sft_plus_trusted": 0.0}
    assert m["verified_tail"] == {"sft_plus_trusted": 0.25, "rft": 0.5} and m["sft"] == {}
    assert "| `verified_tail_base` | 1 | 0.750 |" in format_fair(t) and "`rft` +0.250, ± 0.250 (problems), 1 run" in format_fair(t)


def test_a_new_setting_is_one_record_and_the_table_reads_its_fields(monkeypatch):
    """A setting added to `DEMO_SETTINGS` alone: one that reads the trusted set brings `sft_plus_trusted` into the
    grid and is held against it; one marked `baseline` competes for the strongest. One run, 4 problems: sft 1000,
    sft_plus_trusted 1100, mine 1110 (reads the trusted set), theirs 1101 (a baseline, 0.75: the strongest, above
    sft_plus_trusted's 0.5). mine - sft_plus_trusted = 0010: +0.25; mine - theirs = (0 0 1 -1): 0."""
    from tokenforget.pipeline import settings
    from tokenforget.report.fair import matching_baselines

    records = {**settings.DEMO_SETTINGS, "mine": settings.Setting(lambda r: (r.run, "ignore"), reads=settings.TRUSTED),
               "theirs": settings.Setting(lambda r: (r.run, "sft"), baseline=True)}
    monkeypatch.setattr(settings, "DEMO_SETTINGS", records)
    monkeypatch.setattr("tokenforget.report.fair.DEMO_SETTINGS", records)
    assert grid_settings(["mine", "theirs"]) == ["sft", "mine", "theirs", "sft_plus_trusted"]
    assert matching_baselines("mine") == ["sft_plus_trusted"] and matching_baselines("theirs") == []
    settings.check_settings(["mine", "theirs"])  # declared: no refusal
    cell = {"sft": [1, 0, 0, 0], "sft_plus_trusted": [1, 1, 0, 0], "mine": [1, 1, 1, 0], "theirs": [1, 1, 0, 1]}
    t = fair_table({(1, 1, 1.0): {k: _cell(v, 0.5) for k, v in cell.items()}}, list(cell), [1.0])
    mine = t["chosen_epochs"]["mine"]
    assert t["strongest"] == "theirs" and mine["vs_strongest"]["mean"] == 0.0
    assert {b: p["mean"] for b, p in mine["vs_matching"].items()} == {"sft_plus_trusted": 0.25}


def test_a_tuned_row_takes_the_variant_validation_chose_in_each_run():
    """Two runs, 4 problems, 1 epoch; sft 1000 in both (val 0.5). kto: run 1 0000 (val 0.25), run 2 1100 (val 0.75);
    kto_lr1e-4: run 1 1110 (val 0.5), run 2 0000 (val 0.5). `kto (tuned)` takes kto_lr1e-4 in run 1 and kto in run 2:
    1110 and 1100, +0.5 and +0.25 over sft, mean +0.375, se over runs std(0.5, 0.25) / sqrt(2) = 0.125; its
    accuracy 0.625 is the highest of the baselines, so it is the strongest. A tie on validation takes the setting
    itself before its variant."""
    from tokenforget.report.fair import chosen_pick, format_fair, tunings

    assert tunings(["kto", "kto_lr1e-4", "oracle_forget_lam0.5"]) == {"kto": ["kto", "kto_lr1e-4"]}  # a variant alone: no row
    assert tunings(["kto_sft_lr1e-4", "kto_sft_lr1e-5"]) == {"kto_sft": ["kto_sft_lr1e-4", "kto_sft_lr1e-5"]}
    answers = {(1, 1): {"sft": ([1, 0, 0, 0], 0.5), "kto": ([0, 0, 0, 0], 0.25), "kto_lr1e-4": ([1, 1, 1, 0], 0.5)},
               (2, 2): {"sft": ([1, 0, 0, 0], 0.5), "kto": ([1, 1, 0, 0], 0.75), "kto_lr1e-4": ([0, 0, 0, 0], 0.5)}}
    cells = {(*r, 1.0): {s: _cell(c, v) for s, (c, v) in row.items()} for r, row in answers.items()}
    t = fair_table(cells, ["sft", "kto", "kto_lr1e-4"], [1.0])
    row = t["chosen_epochs"]["kto (tuned)"]
    assert row["chose"] == ["kto_lr1e-4", "kto"] and row["accuracy"] == 0.625
    assert row["vs_baseline"]["mean"] == 0.375 and abs(row["vs_baseline"]["se_runs"] - 0.125) < 1e-12
    assert t["strongest"] == "kto (tuned)" and "kto (tuned)" not in t["equal_steps"]["1"]
    assert "| `kto (tuned)` | 1 `kto_lr1e-4`, 1 `kto` | 0.625 |" in format_fair(t)
    tie = {(1, 1, 1.0): {"kto": _cell([0, 0, 0, 0], 0.5), "kto_lr1e-4": _cell([1, 1, 1, 1], 0.5)}}
    assert chosen_pick(tie, (1, 1), ["kto", "kto_lr1e-4"], [1.0]) == ("kto", 1.0)


def test_every_setting_reads_only_what_the_table_has_a_baseline_for():
    """`Setting.reads` names only `READS`, each with its matching baseline declared as a setting that is a baseline;
    `Setting.tunes` names a declared setting."""
    from tokenforget.pipeline.settings import DEMO_SETTINGS, READS
    from tokenforget.report.fair import MATCHING

    assert set(MATCHING) == set(READS) and all(DEMO_SETTINGS[b].baseline for b in MATCHING.values())
    assert {k for s in DEMO_SETTINGS.values() for k in s.reads} == set(READS)
    # a variant tunes a declared setting and reads what it reads: its tuned row is held against the same baselines
    tuned = {name: s.tunes for name, s in DEMO_SETTINGS.items() if s.tunes}
    assert set(tuned) >= {"kto_lr1e-4", "dpo_lr1e-5", "oracle_forget_lam0.5", "oracle_forget_lam1", "oracle_forget_lam0.05",
                          "oracle_forget_lam0.01"}
    assert all((DEMO_SETTINGS[f].reads, DEMO_SETTINGS[f].baseline) == (DEMO_SETTINGS[v].reads, DEMO_SETTINGS[v].baseline)
               for v, f in tuned.items())


def test_a_fair_grid_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path):
    """One data seed x two training seeds x epochs (1, 2) on a tiny model: every cell trains sft, rft and
    verified_tail (which adds sft_plus_trusted) at sft's optimizer steps; the references are trained once per data
    seed; a rerun trains nothing; the table holds 2 runs (the data seeds' dimension: the hand-worked tests above).
    Without `keep_models` a cell's final trainings are deleted once it is written: a third training seed's cell
    leaves no training stage, the first two's (kept) and the references stay."""
    from tokenforget.cli import main

    root = tmp_path / "fair"
    args = ["fair", "--run_dir", str(root), "--demo.model.name_or_path", str(tiny_model_dir),
            "--demo.model.precision", "fp32", "--demo.n_train", "16", "--demo.n_test", "3", "--demo.n_val", "3",
            "--demo.n_trusted", "8", "--demo.max_new_tokens", "4", "--demo.report_to", "[none]",
            "--settings", "[rft, verified_tail]", "--data_seeds", "[1]", "--train_seeds", "[5, 6]",
            "--epochs", "[1, 2]"]
    assert main([*args, "--keep_models", "true"]) == 0
    seed1 = root / "seed-1"
    for setting, folder in (("sft", "."), ("rft", "rft"), ("verified_tail", "verified_tail"),
                            ("sft_plus_trusted", "sft_plus_trusted")):
        mode = "ignore" if setting == "verified_tail" else "sft"
        for stage, steps in ((f"train-{mode}-t5", 2), (f"train-{mode}-e2-t6", 4)):  # 16 answers / batch 8 = 2 a epoch
            args_file = seed1 / folder / stage / "training_args.json"
            assert json.loads(args_file.read_text())["max_steps"] == steps, (setting, stage)
            history = json.loads((seed1 / folder / stage / "log_history.json").read_text())
            assert history[-1]["step"] == steps, (setting, stage)
    assert sorted(p.name for p in (seed1 / "cells").iterdir()) == ["t5-e1.json", "t5-e2.json", "t6-e1.json", "t6-e2.json"]
    ref = json.loads((seed1 / "trusted" / "reference" / "stage.json").read_text())
    table = json.loads((root / "fair_results.json").read_text())["table"]
    assert table["runs"] == [[1, 5], [1, 6]]
    assert set(table["chosen_epochs"]) == {"sft", "rft", "verified_tail", "sft_plus_trusted"}
    assert all(r["vs_baseline"]["runs"] == 2 for r in table["equal_steps"]["1"].values())
    assert (root / "fair_table.md").read_text().count("| `rft` |") == 4  # two epochs values, the chosen table, how made
    made = json.loads((seed1 / "cells" / "t6-e2.json").read_text())["verified_tail"]["made"]  # how, where, how long
    stage = json.loads((seed1 / "verified_tail" / "train-ignore-e2-t6" / "stage.json").read_text())["made"]
    assert made == {**stage, "train_runtime": round(history_runtime(seed1 / "verified_tail" / "train-ignore-e2-t6"), 1)}
    assert made["commit"] == code_commit() and made["machine"] == machine() and made["versions"].startswith("torch ")
    assert 0 < made["train_runtime"] <= made["seconds"]  # the trainer's runtime is part of the stage's wall time
    text = (root / "fair_table.md").read_text()
    assert f"| `sft_plus_trusted` | 4 | " in text and "\nThe grid: tokenforget fair --run_dir " in text
    assert text.rstrip().endswith('--settings "[rft, verified_tail]" --data_seeds "[1]" --train_seeds "[5, 6]"')  # epochs: the default
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("stage.json")}
    assert main(args) == 0  # a rerun: every cell on disk, nothing retrained
    assert {p: p.stat().st_mtime_ns for p in root.rglob("stage.json")} == mtimes
    assert json.loads((seed1 / "trusted" / "reference" / "stage.json").read_text()) == ref
    kept = sorted(seed1.glob("**/train-*"))
    assert main([*args[:-4], "--train_seeds", "[7]", "--epochs", "[1]"]) == 0  # by default a cell's trainings go
    assert (seed1 / "cells" / "t7-e1.json").is_file() and sorted(seed1.glob("**/train-*")) == kept
    assert (seed1 / "trusted" / "reference" / "stage.json").is_file()
    cell = json.loads((seed1 / "cells" / "t7-e1.json").read_text())
    stages = sorted(root.rglob("stage.json"))
    assert main([*args[:-8], "--settings", "[rft, verified_tail, verified_whole]", "--data_seeds", "[1]",
                 "--train_seeds", "[7]", "--epochs", "[1]", "--keep_models", "true"]) == 0  # one setting more
    new = sorted(p.parent for p in set(root.rglob("train-*/stage.json")) - set(stages))  # sft not trained again
    assert [p.relative_to(seed1).as_posix() for p in new] == ["verified_whole/train-ignore-t7"]
    assert json.loads((seed1 / "cells" / "t7-e1.json").read_text()) == {**cell, "verified_whole": ANY}


def test_trl_preference_rows_by_hand():
    """KTO's label is the verdict (`is_correct`, else no corrupted span); DPO's rows carry the system turn."""
    from tokenforget.stages.preference import dpo_rows, kto_rows

    recs = [{"prompt": "q1", "completion": "a1", "is_correct": False, "corrupt_spans": []},
            {"prompt": "q2", "completion": "a2", "corrupt_spans": [[0, 2]]},
            {"prompt": "q3", "completion": "a3", "corrupt_spans": []}]
    rows = kto_rows(recs, "Solve.")
    assert [r["label"] for r in rows] == [False, False, True]
    assert rows[0]["prompt"] == [{"role": "system", "content": "Solve."}, {"role": "user", "content": "q1"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "a1"}]
    pair = dpo_rows([{"prompt": "q", "chosen": "right", "rejected": "wrong"}], None)[0]
    assert pair["prompt"] == [{"role": "user", "content": "q"}] and pair["rejected"][0]["content"] == "wrong"


def test_kto_and_dpo_stages_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path):
    """TRL's KTOTrainer on 8 labelled answers (batch 4, 2 steps), from the base and after the run's sft, and
    DPOTrainer on 4 pairs after the run's sft: each a train stage with a merged model, its optimizer steps the run's,
    reused on a second call."""
    from conftest import tiny_run_config
    from tokenforget.stages.demo_task import make_examples
    from tokenforget.config import RunConfig, from_dict
    from tokenforget.errors import UserError
    from tokenforget.pipeline.resolver import Run

    rows = [{**r, "is_correct": i % 2 == 0} for i, r in enumerate(make_examples(8, seed=0, noise=0.0))]
    cfg = tiny_run_config(tmp_path, tiny_model_dir, rows=rows)
    cfg["train"]["training"] = {**cfg["train"]["training"], "max_steps": 2}
    cfg["report_to"] = ["none"]
    run = Run(from_dict(RunConfig, cfg))
    kto = run.need("preference", ("kto", "", None))
    assert (kto / "model" / "config.json").is_file()
    assert json.loads((kto / "log_history.json").read_text())[-1]["step"] == 2
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"], "rejected": "The answer is 0."})
                             + "\n" for r in rows[:4]))
    with pytest.raises(UserError, match="does not exist"):  # refused before its warm start trains
        run.need("preference", ("dpo", "", str(tmp_path / "missing.jsonl")))
    assert not (run.root / "train-sft").exists()
    dpo = run.need("preference", ("dpo", "", str(pairs)))
    assert json.loads((dpo / "stage.json").read_text())["warm_start"].endswith("train-sft")
    assert json.loads((dpo / "log_history.json").read_text())[-1]["step"] == 2
    before = (dpo / "stage.json").stat().st_mtime_ns
    again = Run(from_dict(RunConfig, cfg))  # a new process: the stage is reused by its fingerprint
    assert again.need("preference", ("dpo", "", str(pairs))) == dpo and (dpo / "stage.json").stat().st_mtime_ns == before
    # a learning rate of its own (the 4th element): a stage of its own beside the run's, the same warm start
    assert json.loads((dpo / "stage.json").read_text())["learning_rate"] == cfg["train"]["training"]["learning_rate"]
    slow = run.need("preference", ("dpo", "", str(pairs), 1e-5))
    assert slow == run.root / "train-dpo-lr1e-05" and json.loads((slow / "stage.json").read_text())["learning_rate"] == 1e-5
    assert run.fp("preference", ("dpo", "", str(pairs), 1e-5)) != run.fp("preference", ("dpo", "", str(pairs)))
    assert run.fp("preference", ("dpo", "", str(pairs), None)) == run.fp("preference", ("dpo", "", str(pairs)))
    # KTO after sft: the same warm start as DPO (sft made once, reused), the run's answers and verdicts, its own folder
    kto_sft = run.need("preference", ("kto_sft", "", None))
    stage = json.loads((kto_sft / "stage.json").read_text())
    assert kto_sft == run.root / "train-kto_sft" and stage["warm_start"].endswith("train-sft") and stage["rows"] == 8
    assert json.loads((kto_sft / "log_history.json").read_text())[-1]["step"] == 2
    assert run.fp("preference", ("kto_sft", "", None)) != run.fp("preference", ("kto", "", None))


def test_the_demo_trains_kto_as_a_stage_of_its_run(tmp_path: Path, tiny_model_dir: Path):
    """`demo --settings [sft, kto]`: TRL's KTO trained through the registry (`Run.need("preference", ...)`) into the
    demo's folder beside `train-sft`, evaluated like any setting; its stage fingerprinted like a training."""
    from tokenforget.cli import main

    root = tmp_path / "demo"
    assert main(["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
                 "--n_train", "16", "--n_test", "2", "--max_new_tokens", "2", "--report_to", "[none]",
                 "--settings", "[sft, kto]"]) == 0
    res = json.loads((root / "demo_results.json").read_text())
    assert list(res["models"]) == ["sft", "kto"] and res["stages"]["kto"] == str(root / "train-kto")
    stage = json.loads((root / "train-kto" / "stage.json").read_text())
    assert stage["mode"] == "kto" and stage["warm_start"] is None and len(stage["fingerprint"]) == 16


def history_runtime(stage: Path) -> float:
    return json.loads((stage / "log_history.json").read_text())[-1]["train_runtime"]


def test_how_the_trainings_were_made_by_hand(tmp_path: Path):
    """The table's provenance rows: runtimes 100, 300, 200 s -> median 200 (100-300); a training made before stages
    recorded their commit gives its runtime alone (`made_of` reads the trainer's log)."""
    from tokenforget.commands.fair import made_of
    from tokenforget.report.fair import format_made, made_summary

    old = tmp_path / "train-sft-t1"
    old.mkdir()
    (old / "stage.json").write_text(json.dumps({"stage": "train-sft-t1", "fingerprint": "ab"}))
    (old / "log_history.json").write_text(json.dumps([{"loss": 1.0, "step": 1}, {"train_runtime": 99.96, "step": 2}]))
    assert made_of(old) == {"train_runtime": 100.0}
    new = {"seconds": 320.0, "commit": "abc1234", "machine": "CPU X, 2 cores", "versions": "torch 2.13.0"}
    cells = {(1, 1, 1.0): {"sft": {"made": made_of(old)}, "rft": {}},
             (2, 2, 1.0): {"sft": {"made": {**new, "train_runtime": 300.0}}},
             (2, 2, 2.0): {"sft": {"made": {**new, "commit": "def5678", "train_runtime": 200.0}}}}
    made = made_summary(cells, ["sft", "rft"])
    assert made == {"sft": {"train_runtime": [100.0, 300.0, 200.0], "commit": ["abc1234", "def5678"],
                            "machine": ["CPU X, 2 cores"], "versions": ["torch 2.13.0"]}}  # rft: nothing recorded
    lines = format_made(made)
    assert "| `sft` | 3 | 200 (100-300) | abc1234, def5678 |" in lines
    assert lines[-2:] == ["\nMachine: CPU X, 2 cores", "\nVersions: torch 2.13.0"]


def test_the_machine_names_the_vector_instructions_of_its_kernels():
    """Two CPUs of one model name ("AMD EPYC") may run torch's kernels with AVX2 or with AVX512, which moves figures:
    the machine a stage records says which."""
    import torch

    assert machine().split(" cores, ")[1].startswith(torch.backends.cpu.get_cpu_capability())


def test_the_grid_as_one_command_line():
    """Only what differs from the defaults, lists in brackets, a path with braces quoted; the demo's fields each cell
    sets for itself (its settings, seed, run folder) are not the grid's."""
    from tokenforget.command_config import DemoConfig, FairConfig
    from tokenforget.commands.fair import grid_command

    cfg = FairConfig(run_dir="/g", demo=DemoConfig(noise_kind="weak", weak_dir="/w", n_test=240, n_val=120, report_to=["none"],
                                                   settings=["sft", "x"], seed=7), settings=["rft"],
                     epochs=[1.0], weak_dir="/w/seed-{seed}")
    assert grid_command(cfg) == ("tokenforget fair --run_dir /g --demo.noise_kind weak --demo.weak_dir /w --settings \"[rft]\" "
                                 "--epochs \"[1]\" --weak_dir '/w/seed-{seed}'")


def test_a_stage_records_the_commit_it_was_made_by():
    """`code_commit` is the checkout's HEAD (with `+changes` when tracked files differ), as git says."""
    import subprocess

    from tokenforget.version import code_commit

    src = Path(__file__).resolve().parents[1] / "src" / "tokenforget"
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert code_commit().removesuffix("+changes") == head.stdout.strip()


def test_an_installed_copy_in_another_repository_gives_its_version(tmp_path: Path):
    """A copy of the package inside a user's own git repository (a venv in their project), untracked there: the
    commit is not theirs, so it says the package's version."""
    import importlib.util
    import shutil
    import subprocess

    git = ["git", "-C", str(tmp_path), "-c", "user.name=u", "-c", "user.email=u@example.org"]
    if subprocess.run(["git", "init", "-q", str(tmp_path)], capture_output=True).returncode != 0:
        pytest.skip("no git")
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "their project"], check=True)  # a HEAD of theirs
    copy = tmp_path / "venv" / "tokenforget" / "version.py"
    copy.parent.mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "src" / "tokenforget" / "version.py", copy)
    spec = importlib.util.spec_from_file_location("installed_version", copy)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.code_commit() == f"tokenforget {module.__version__}"


def test_a_cell_lacks_the_settings_its_file_does_not_hold(tmp_path: Path):
    """A grid that adds settings runs its finished cells again for the new settings alone, in the grid's order; a
    cell file is done for a grid whose settings it holds all of."""
    from tokenforget.commands.fair import cell_missing

    cell = tmp_path / "t1-e1.json"
    assert cell_missing(cell, ["sft", "rft"]) == ["sft", "rft"]
    cell.write_text(json.dumps({"base": {}, "sft": {}, "rft": {}}))
    assert cell_missing(cell, ["sft", "rft"]) == []
    assert cell_missing(cell, ["sft", "kto", "rft", "dpo"]) == ["kto", "dpo"]


def test_a_second_grid_adds_its_settings_to_the_cell(tmp_path: Path):
    """Two grids on one run folder (p2: contrastive, p2b: rft): the second's cell keeps the first's models, and a
    model both trained keeps the first record, the one the landed rows were paired with."""
    from tokenforget.commands.fair import cell_missing, write_cell

    cell = tmp_path / "cells" / "t1-e1.json"
    write_cell(cell, {"sft": {"correct": [1, 0]}, "contrastive": {"correct": [1, 1]}})
    write_cell(cell, {"sft": {"correct": [0, 0]}, "rft": {"correct": [0, 1]}})
    assert json.loads(cell.read_text()) == {"sft": {"correct": [1, 0]}, "contrastive": {"correct": [1, 1]},
                                           "rft": {"correct": [0, 1]}}
    assert cell_missing(cell, ["sft", "contrastive", "rft"]) == [] and not (tmp_path / "cells" / "t1-e1.tmp").exists()


def test_a_reference_on_the_files_own_right_answers(tmp_path: Path, tiny_tokenizer):
    """`reference.disjoint_from: wrong` (verified_tail_self): the trusted set may hold the file's right answers, never
    one of its wrong ones; with any other selection it is refused at the edge."""
    from conftest import write_jsonl

    from tokenforget.config import ConfigError, DataConfig, PartitionConfig, ReferenceConfig, RunConfig
    from tokenforget.stages.labels_in_data import DataError
    from tokenforget.stages.reference import reference_examples

    rows = [{"prompt": "q1", "completion": "a1", "is_correct": True}, {"prompt": "q2", "completion": "a2", "is_correct": False}]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    right = write_jsonl(tmp_path / "right.jsonl", rows[:1])
    wrong = write_jsonl(tmp_path / "wrong.jsonl", rows[1:])
    dc = DataConfig(path=str(data))
    assert len(reference_examples(None, ReferenceConfig(path=str(right), disjoint_from="wrong"), dc, tiny_tokenizer, 0)) == 1
    with pytest.raises(DataError, match="same prompt as the scored example"):
        reference_examples(None, ReferenceConfig(path=str(wrong), disjoint_from="wrong"), dc, tiny_tokenizer, 0)
    with pytest.raises(DataError, match="same prompt as the scored example"):  # the default: disjoint from all
        reference_examples(None, ReferenceConfig(path=str(right)), dc, tiny_tokenizer, 0)
    with pytest.raises(ConfigError, match="reference.disjoint_from"):
        RunConfig(reference=ReferenceConfig(path=str(right), disjoint_from="wrong"), partition=PartitionConfig())


def test_the_self_reference_leaves_out_the_problems_it_judges():
    """verified_tail_self's reference: of the right answers, those whose problem also has a wrong answer in the file
    are left out (the verdict `is_correct` first, else the corrupt spans; whitespace does not hide a problem). q1 is
    right once and wrong once, q2 right, q3 wrong by its spans, q4 right by its verdict despite spans: q2 and q4 stay."""
    from tokenforget.stages.demo_task import unjudged_answers

    train = [{"prompt": "q1", "corrupt_spans": [], "is_correct": True}, {"prompt": " q1 ", "corrupt_spans": [], "is_correct": False},
             {"prompt": "q2", "corrupt_spans": []}, {"prompt": "q3", "corrupt_spans": [[0, 1]]},
             {"prompt": "q4", "corrupt_spans": [[0, 1]], "is_correct": True}]
    right = [train[0], train[2], train[4]]
    assert [r["prompt"] for r in unjudged_answers(right, train)] == ["q2", "q4"]


def test_the_mechanism_check_by_hand():
    """A generated problem's kind from its wording; the gain split by kind and the wrong answers at gold + 10
    (scripts/mechanism.py) on 4 problems: kinds 0, 1, 2, 3; setting right on 0 and 1, sft right on 1 only: the
    total-ending problems (0, 2) +0.5 (d = 1, 0), the others 0 (d = 0, 0); sft's wrong answers 25 (gold 15, +10),
    7 (gold 8) and 40 (gold 30, +10): 2 of 3."""
    import importlib.util

    from tokenforget.stages.demo_task import _worded, problem_kind

    import random

    for kind in range(4):
        q = _worded(random.Random(kind), kind, "Mia", "she", "She")[0]
        assert problem_kind(q) == kind
    spec = importlib.util.spec_from_file_location("mechanism", Path(__file__).parents[1] / "scripts" / "mechanism.py")
    mech = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mech)
    parts = mech.split([1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 2, 3])
    assert parts["total-ending"][0] == 0.5 and parts["total-ending"][2] == 2 and parts["other"][0] == 0.0
    assert mech.plus_offset_share(["25", "9", "7", "40"], ["15", "9", "8", "30"], [0, 1, 0, 0]) == (2, 3)


def test_any_two_rows_paired_from_the_cells_by_hand(tmp_path: Path):
    """scripts/fair_pairs.py on two data seeds of 4 problems: seed 1 a 1100, b 1000 (d 0100: +0.250, se sqrt(0.25 / 4)
    = 0.250); seed 2 a 1110, b 0010 (d 1100: +0.500, se sqrt((1/3) / 4) = 0.289); the mean +0.375 ± 0.125 over runs
    (std(0.25, 0.5) / sqrt 2), ± 0.269 over problems. Seed 1's training seed 101 (d 1111: +1.000 ± 0.000) joins only
    with --all-training-seeds: mean +0.583 ± 0.220 (runs), ± 0.062 (data seeds: 0.625 and 0.5), ± 0.180 (problems).
    Seed 1's 2-epoch cell joins only with --epochs 2."""
    import importlib.util

    cells = {("seed-1", "t1"): ([1, 1, 0, 0], [1, 0, 0, 0]), ("seed-2", "t2"): ([1, 1, 1, 0], [0, 0, 1, 0]),
             ("seed-1", "t101"): ([1, 1, 1, 1], [0, 0, 0, 0])}
    for (seed, train), (a, b) in cells.items():
        (tmp_path / seed / "cells").mkdir(parents=True, exist_ok=True)
        (tmp_path / seed / "cells" / f"{train}-e1.json").write_text(json.dumps({"a": {"correct": a}, "b": {"correct": b}}))
    (tmp_path / "seed-1" / "cells" / "t1-e2.json").write_text(json.dumps(  # 2 epochs: read only when asked
        {"a": {"correct": [0, 1, 1, 1]}, "b": {"correct": [0, 0, 0, 1]}}))
    spec = importlib.util.spec_from_file_location("fair_pairs", Path(__file__).parents[1] / "scripts" / "fair_pairs.py")
    pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pairs)
    assert pairs.pair_lines(pairs.read_runs(tmp_path, False), "a", "b") == [
        "a − b:", "  data seed 1, training seed 1: +0.250 ± 0.250", "  data seed 2, training seed 2: +0.500 ± 0.289",
        "  mean +0.375 ± 0.125 (runs), ± 0.269 (problems), 2 runs"]
    assert pairs.pair_lines(pairs.read_runs(tmp_path, True), "a", "b")[-1] == (
        "  mean +0.583 ± 0.220 (runs), ± 0.062 (data seeds), ± 0.180 (problems), 3 runs")
    # 2 epochs, seed 1 only: a 0111, b 0001, d 0110: +0.500, se sqrt((1/3) / 4) = 0.289
    assert pairs.pair_lines(pairs.read_runs(tmp_path, False, 2), "a", "b")[1:] == [
        "  data seed 1, training seed 1: +0.500 ± 0.289", "  mean +0.500 ± nan (runs), ± 0.289 (problems), 1 runs"]
    # --chosen 1,2: seed 1 has both epochs; a's validation picks 2 (0.9 > 0.5): 0111, b's picks 1 (0.5 > 0.1): 1000,
    # d = (-1, 1, 1, 1): +0.500, std 1, se 0.500. Seed 2 has 1 epoch only: both at 1, a 1110 - b 0010: +0.500 ± 0.289.
    chosen = tmp_path / "chosen"
    for seed, e, a, b in [(1, 1, ([1, 1, 0, 0], 0.5), ([1, 0, 0, 0], 0.5)), (1, 2, ([0, 1, 1, 1], 0.9), ([0, 0, 0, 1], 0.1)),
                          (2, 1, ([1, 1, 1, 0], 0.5), ([0, 0, 1, 0], 0.5))]:
        (chosen / f"seed-{seed}" / "cells").mkdir(parents=True, exist_ok=True)
        (chosen / f"seed-{seed}" / "cells" / f"t{seed}-e{e}.json").write_text(json.dumps(
            {"a": {"correct": a[0], "val_accuracy": a[1]}, "b": {"correct": b[0], "val_accuracy": b[1]}}))
    assert pairs.pair_lines(pairs.chosen_runs(chosen, False, [1.0, 2.0], "a", "b"), "a", "b")[1:] == [
        "  data seed 1, training seed 1 (epochs 2 vs 1): +0.500 ± 0.500",
        "  data seed 2, training seed 2 (epochs 1 vs 1): +0.500 ± 0.289",
        "  mean +0.500 ± 0.000 (runs), ± 0.394 (problems), 2 runs"]


def test_extra_training_seeds_train_only_the_rows_that_need_them():
    """MEASURING.md's training seeds for sft, the strongest baseline and the best candidate: data seed 2 trains every
    setting at its own training seed 2, and sft, rft and verified_tail (with the baseline its trusted set brings) at
    the extra seeds 7 and 8."""
    from tokenforget.command_config import FairConfig
    from tokenforget.commands.fair import cell_settings, train_seeds_of

    cfg = FairConfig(settings=["rft", "verified_tail", "verified_random"], extra_train_seeds=[7, 8],
                     extra_seed_settings=["rft", "verified_tail"])
    assert train_seeds_of(cfg, 2) == [2, 7, 8]
    assert cell_settings(cfg, 2, 2) == ["sft", "rft", "verified_tail", "verified_random", "sft_plus_trusted"]
    assert cell_settings(cfg, 2, 7) == ["sft", "rft", "verified_tail", "sft_plus_trusted"]


def test_the_forgotten_token_sets_by_hand(tmp_path: Path):
    """scripts/forgotten_nll.py's token sets on 2 answers: a wrong one (response tokens 2-5, wrong from token 4 on)
    and a right one (response 1-3): wrong tokens {4, 5}, the first wrong token {4}, the right tokens before it
    {2, 3}, the right answer's tokens {1, 2, 3}; every response token spans them all."""
    import importlib.util

    import datasets

    datasets.Dataset.from_dict({
        "input_ids": [[9, 8, 7, 6, 5, 4], [3, 2, 1, 0]],
        "response_mask": [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1]],
        "corrupt": [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0]],
    }).save_to_disk(str(tmp_path / "data" / "tokens"))
    spec = importlib.util.spec_from_file_location("forgotten", Path(__file__).parents[1] / "scripts" / "forgotten_nll.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ids, (every, wrong, first, before, right) = script.token_sets(tmp_path)
    assert ids == [[9, 8, 7, 6, 5, 4], [3, 2, 1, 0]]
    assert every == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 1]]
    assert wrong == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0]]
    assert first == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0]]
    assert before == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0]]
    assert right == [[0, 0, 0, 0, 0, 0], [0, 1, 1, 1]]
    assert script.SETS[0] == "every response token" and len(script.SETS) == 5


def test_every_shipped_grid_parses_and_names_declared_settings():
    """The grids in configs/fair/ load as `FairConfig`s and every setting they name has a record (a renamed setting
    would otherwise surface hours into a grid, or never)."""
    import yaml

    from tokenforget.command_config import FairConfig
    from tokenforget.config import from_dict
    from tokenforget.pipeline.settings import check_settings

    grids = sorted((Path(__file__).parents[1] / "configs" / "fair").glob("*.yaml"))
    assert len(grids) >= 4
    for path in grids:
        cfg = from_dict(FairConfig, yaml.safe_load(path.read_text()))
        check_settings(cfg.settings)
        check_settings(cfg.extra_seed_settings, "extra_seed_settings")
        assert set(cfg.extra_seed_settings) <= set(grid_settings(cfg.settings)), path.name  # with the added baselines


def test_the_table_from_the_cells_on_disk_alone(tmp_path: Path, capsys):
    """`tokenforget fair --table_only true` trains nothing: a grid of epochs 1 and 2 stopped after its 1-epoch cell
    (seed 1: sft 1000, rft 1110 on test) gets the table at 1 epoch, rft - sft = (0 1 1 0) = +0.5, rft is the
    strongest baseline, and the chosen section says 2 epochs were declared and not trained. A run folder without a
    cell is refused naming run_dir, exit 2, writing nothing."""
    from tokenforget.cli import main

    root = tmp_path / "fair"
    (root / "seed-1" / "cells").mkdir(parents=True)
    (root / "seed-1" / "cells" / "t1-e1.json").write_text(json.dumps(
        {"sft": _cell([1, 0, 0, 0], 0.5), "rft": _cell([1, 1, 1, 0], 0.6)}))
    args = ["fair", "--run_dir", str(root), "--settings", "[rft]", "--data_seeds", "[1]", "--epochs", "[1, 2]",
            "--table_only", "true"]
    assert main(args) == 0
    table = json.loads((root / "fair_results.json").read_text())["table"]
    assert list(table["equal_steps"]) == ["1"] and table["strongest"] == "rft"
    assert table["equal_steps"]["1"]["rft"]["vs_baseline"]["mean"] == 0.5
    assert table["grid"] == f'tokenforget fair --run_dir {root} --settings "[rft]" --data_seeds "[1]"'  # not a mode
    text = (root / "fair_table.md").read_text()
    assert text.startswith("Equal steps, 1 epoch(s)")
    assert "the grid also declares 2 epochs, no cell trained yet: every row is chosen among 1 only" in text
    assert sorted(p.name for p in root.rglob("*")) == ["cells", "fair_results.json", "fair_table.md", "seed-1",
                                                      "t1-e1.json"]  # no model, no stage
    empty = tmp_path / "empty"
    assert main([*args[:2], str(empty), *args[3:]]) == 2
    assert "config field 'run_dir': no finished cell in" in capsys.readouterr().err
    assert not (empty / "fair_table.md").exists()


def test_the_grids_dry_run_lists_the_cells_still_to_run(tmp_path: Path, capsys):
    """`tokenforget fair --dry-run` reads the cell files only: data seed 1's own cell holds sft and rft, so it still
    lacks verified_whole; its training seed 101 (rft only) lacks sft and rft: 0 of 2 cells done, at most 3
    trainings. Nothing is written and no model is loaded."""
    from tokenforget.cli import main

    root = tmp_path / "fair"
    (root / "seed-1" / "cells").mkdir(parents=True)
    (root / "seed-1" / "cells" / "t1-e1.json").write_text(json.dumps({"sft": {}, "rft": {}}))
    before = sorted(p.name for p in root.rglob("*"))
    args = ["fair", "--run_dir", str(root), "--settings", "[rft, verified_whole]", "--data_seeds", "[1]",
            "--epochs", "[1]", "--extra_train_seeds", "[101]", "--extra_seed_settings", "[rft]", "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["data seed 1, training seed 1, 1 epochs: to run, 1 settings: verified_whole",
                   "data seed 1, training seed 101, 1 epochs: to run, 2 settings: sft, rft",
                   "0 of 2 cells done; 2 to run, at most 3 trainings"]
    assert sorted(p.name for p in root.rglob("*")) == before
    assert main([*args[:4], "[rft, verified_hole]", *args[5:]]) == 2  # a misspelt setting: one line, exit 2
    assert "config field 'settings': unknown 'verified_hole'" in capsys.readouterr().err
