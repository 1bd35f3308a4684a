"""Dry run: nothing written, stages to run or reuse by fingerprint, counts and steps worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import forbid_loading, tiny_run_config
from transformers import AutoModelForCausalLM

from tokenforget.cli import main, parse_config
from tokenforget.commands.compare import seed_config
from tokenforget.commands.plan import plan_run
from tokenforget.stages.score import score_padded_tokens
from tokenforget.stages.stage import optimizer_steps, train_padded_tokens
from tokenforget.config import TrainingConfig
from tokenforget.pipeline import variants
from tokenforget.pipeline.resolver import Run


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of every file and folder under `root`."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def statuses(out: str, stages: list[str]) -> dict[str, str]:
    """stage -> run/reuse, from the plan's table."""
    return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] and line.split()[0] in stages}


STAGES = ["data", "reference", "scores", "partition", "labels", "train-forget"]


def test_dry_run_writes_nothing_and_reports_what_would_run(config: Path, capsys, monkeypatch):
    run = config.parent / "run"
    with monkeypatch.context() as m:
        forbid_loading(m, AutoModelForCausalLM)  # a plain dry run loads only the tokenizer
        assert main(["run", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not run.exists()
    assert statuses(out, STAGES) == dict.fromkeys(STAGES, "run")
    assert "est. time" not in out and "Warm-up" not in out
    assert out.splitlines()[-1] == ("Wall time not estimated: --dry-run-timing loads the model and times a few "
                                    "training micro-batches and scoring forwards on this machine")

    assert main(["run", str(config), "--dry-run-timing"]) == 0  # the measured estimate, on request
    out = capsys.readouterr().out
    assert not run.exists()
    assert statuses(out, STAGES) == dict.fromkeys(STAGES, "run") and "est. time" in out.splitlines()[1]
    assert "Estimated wall time" in out and "training micro-batch (4, " in out and "scoring forward (8, " in out
    assert " x 2 forwards (base, reference)" in out
    assert main(["run", str(config), "--dry-run", "--score.method", "ref_loss"]) == 0  # reads CE_ref only
    assert " x 1 forward (reference; the method reads no base CE)" in capsys.readouterr().out

    assert main(["reference", str(config)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["run", str(config), "--dry-run", "--partition.rho", "0.5"]) == 0
    out = capsys.readouterr().out
    assert snapshot(run) == before
    assert statuses(out, ["data", "reference", "scores", "train-forget"]) == {
        "data": "reuse", "reference": "reuse", "scores": "run", "train-forget": "run"}


def test_compare_dry_run_plans_the_first_seed_and_copies_nothing(config: Path, capsys, monkeypatch):
    """A comparison fills `run_dir/seed-<s>/`; with the first seed's data, reference and scores finished, its
    plan reuses them. The variant `rho5` has a partition of its own, so a real compare copies those stages
    into `seed-1/variant-rho5/` and partitions and trains there: the plan lists its stages under that folder,
    the copied ones as reused; the dry run copies nothing, writes nothing, loads no model. Steps by hand:
    24 examples in batches of 4 are 6 optimizer steps for each training."""
    root = config.parent / "cmp"
    args = ["--run_dir", str(root), "--compare.seeds", "[1, 2]", "--compare.modes", "[sft, forget]",
            "--compare.variants", "{rho5: {partition: {rho: 0.5}}}"]
    assert main(["score", str(config), "--run_dir", str(root / "seed-1"), "--seed", "1"]) == 0
    before = snapshot(config.parent)
    capsys.readouterr()
    with monkeypatch.context() as m:
        forbid_loading(m, AutoModelForCausalLM)
        assert main(["compare", str(config), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert snapshot(config.parent) == before
    assert out.splitlines()[0] == f"Dry run of {root / 'seed-1'} (nothing is written)"
    v = "variant-rho5/"
    stages = ["data", "reference", "scores", "partition", "labels", "train-sft", "train-forget",
              *(v + s for s in ["data", "reference", "scores", "partition", "labels", "train-rho5"])]
    assert statuses(out, stages) == {"data": "reuse", "reference": "reuse", "scores": "reuse", "partition": "run",
                                     "labels": "run", "train-sft": "run", "train-forget": "run",
                                     v + "data": "reuse", v + "reference": "reuse", v + "scores": "reuse",
                                     v + "partition": "run", v + "labels": "run", v + "train-rho5": "run"}
    works = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in stages}
    assert all("6 optimizer steps of 4 x 1" in works[s] for s in ["train-sft", "train-forget", v + "train-rho5"])

    # a fresh folder: the seed's own stages all run, and a variant copies what they make first (the same
    # reference; the scoring pass, rescored for `rl`'s method, which would need no base CE on its own)
    fresh = ["--run_dir", str(config.parent / "fresh"), "--compare.seeds", "[1]", "--compare.modes", "[sft, forget]",
             "--compare.variants", "{rho5: {partition: {rho: 0.5}}, rl: {objective: {mode: ignore}, score: {method: ref_loss}}}"]
    assert main(["compare", str(config), *fresh, "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = statuses(out, [line.split()[0] for line in out.splitlines()[2:] if line.split()[:1]])
    assert {rows[s] for s in ["data", "reference", "scores", "train-forget"]} == {"run"}
    for variant in ("variant-rho5/", "variant-rl/"):
        assert [rows[variant + s] for s in ("data", "reference", "scores", "partition")] == ["reuse"] * 3 + ["run"]


def test_compare_dry_run_after_the_comparison_reuses_every_stage_and_the_oracle_needs_no_reference(config: Path, capsys):
    """After a real comparison with a variant in a folder of its own, the dry run finds every stage done,
    the variant's training in `variant-<name>/train-<name>` too; an oracle variant's plan has no reference."""
    root = config.parent / "cmp"
    args = ["--run_dir", str(root), "--compare.seeds", "[1]", "--compare.modes", "[sft]",
            "--compare.variants", "{rho5: {partition: {rho: 0.5}}, orc: {objective: {mode: ignore}, partition: {selection: oracle}}}"]
    _, cfg, _ = parse_config(["compare", str(config), *args])
    run = Run(seed_config(cfg, 1))
    for mode in ("sft", "rho5"):  # what `compare` trains for seed 1 (its evaluation left out)
        variants.train(run, mode)
    assert (root / "seed-1" / "variant-rho5" / "train-rho5" / "stage.json").is_file()
    capsys.readouterr()
    assert main(["compare", str(config), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = statuses(out, [line.split()[0] for line in out.splitlines()[2:] if line.split()[:1]])
    assert rows["data"] == rows["variant-rho5/partition"] == rows["variant-rho5/train-rho5"] == "reuse"
    assert rows["train-sft"] == "reuse" and rows["variant-orc/train-orc"] == "run"
    assert [r for r in rows if r.startswith("variant-orc/")] == [
        "variant-orc/data", "variant-orc/scores", "variant-orc/partition", "variant-orc/labels", "variant-orc/train-orc"]


def test_predicted_steps_and_tokens_match_the_real_run(config: Path):
    """The plan's example count is the data stage's, and its optimizer steps are what the Trainer then does
    (24 examples, batch 4, 1 epoch: 6 steps). The reference trains on round(0.25 x 24) = 6 examples: 2 steps."""
    _, cfg, _ = parse_config(["run", str(config)])
    plans, _ = plan_run(Run(cfg), ["forget", "sft"], measure=False)
    by = {p.name: p for p in plans}
    assert list(by) == ["data", "reference", "scores", "partition", "labels", "train-forget", "train-sft"]
    assert by["reference"].examples == 6 and by["reference"].work.startswith("2 optimizer steps")
    assert main(["train", str(config), "--train.objective.mode", "sft"]) == 0
    run = config.parent / "run"
    assert by["data"].examples == json.loads((run / "data" / "stage.json").read_text())["kept"] == 24
    history = json.loads((run / "train-sft" / "log_history.json").read_text())
    assert by["train-sft"].work.startswith("6 optimizer steps") and history[-1]["step"] == 6

    # 8 trusted answers learned too (`train.trusted_path`): 32 examples, 8 steps, planned and done; another training
    from tokenforget.stages.demo_task import make_examples

    trusted = config.parent / "trusted.jsonl"
    trusted.write_text("".join(json.dumps(r) + "\n" for r in make_examples(8, seed=5, noise=0.0)))
    more = ["--train.trusted_path", str(trusted), "--train.objective.mode", "sft"]
    _, cfg, _ = parse_config(["train", str(config), *more])
    plan = next(p for p in plan_run(Run(cfg), ["sft"], measure=False)[0] if p.name == "train-sft")
    assert (plan.examples, plan.reuse) == (32, False) and plan.work.startswith("8 optimizer steps")
    assert main(["train", str(config), *more]) == 0
    assert json.loads((run / "train-sft" / "log_history.json").read_text())[-1]["step"] == 8


def test_counts_by_hand():
    """Steps: 10 examples in batches of 4 are 3 micro-batches an epoch; with grad_accum 2 that is
    ceil(3/2) = 2 steps an epoch, ceil(1.5 x 2) = 3 steps for 1.5 epochs; max_steps wins when set.
    Padded tokens, all examples 5 long: batches 4, 4, 2 per epoch -> 50 tokens, two epochs 100.
    Scoring lengths 3, 5, 2, 4 in batches of 2: length groups (5, 4) and (3, 2) -> 2x5 + 2x3 = 16."""
    assert optimizer_steps(10, TrainingConfig(batch_size=4, grad_accum=2, epochs=1)) == 2
    assert optimizer_steps(10, TrainingConfig(batch_size=4, grad_accum=2, epochs=1.5)) == 3
    assert optimizer_steps(10, TrainingConfig(batch_size=4, max_steps=7)) == 7
    assert train_padded_tokens([[0] * 5] * 10, TrainingConfig(batch_size=4, epochs=2), seed=0) == 100
    assert score_padded_tokens([[0] * 3, [0] * 5, [0] * 2, [0] * 4], 2) == 16


def _executed(monkeypatch) -> dict:
    """Record what a run really does: the stages it builds (not reused), its trainings and its forward passes over
    every example (a scoring pass with the base and a reference runs two; the base alone, one)."""
    import tokenforget.stages.reference as ref_mod
    import tokenforget.stages.score as score_mod
    import tokenforget.training.fit as train_mod
    from tokenforget.runfolder import RunFolder

    seen: dict = {"stages": [], "trainings": 0, "forwards": 0}
    ensure, fit, shards = RunFolder.ensure, train_mod.fit, score_mod.score_shards

    def ensure_logged(self, name, fp, *args, **kwargs):
        if not self.done_on_main(name, fp):
            seen["stages"].append(name)
        return ensure(self, name, fp, *args, **kwargs)

    def fit_counted(*args, **kwargs):
        seen["trainings"] += 1
        return fit(*args, **kwargs)

    def shards_counted(*args, **kwargs):
        seen["forwards"] += 2 if kwargs.get("with_base") and args[1] is not None else 1  # args[1]: the reference
        return shards(*args, **kwargs)

    monkeypatch.setattr(RunFolder, "ensure", ensure_logged)
    monkeypatch.setattr(train_mod, "fit", fit_counted)  # fit_stage's (the references', the final training's)
    monkeypatch.setattr(ref_mod, "fit", fit_counted)  # train_folds'
    monkeypatch.setattr(score_mod, "score_shards", shards_counted)
    return seen


PLAN_CASES = {  # name -> (config sections over the tiny run's, the mode trained)
    "paper": ({}, "forget"),
    "recommended": ({}, "sft"),
    "ref_loss_wga": ({"score": {"method": "ref_loss_min_rank"}, "partition": {"rho": 0.95},
                      "train": {"objective": {"mode": "forget", "forget_term": "wga"}}}, "forget"),
    "contrastive_noisy_folds": ({"reference": {"path": "TRUSTED", "noisy_folds": 2, "noisy_fraction": 0.5},
                                 "score": {"method": "contrastive"}, "partition": {"selection": "threshold", "threshold": -1.0}},
                                "ignore"),
    "data_labels": ({"partition": {"selection": "data"}}, "ignore"),
    "verified": ({"reference": {"path": "TRUSTED"}, "score": {"method": "ref_loss"},
                  "partition": {"selection": "verified_tail"}}, "ignore"),
    "verified_base": ({"reference": {"path": "TRUSTED"}, "score": {"method": "base_loss"},  # no reference trained
                       "partition": {"selection": "verified_tail"}}, "ignore"),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_the_plan_lists_what_the_run_executes(case: str, tmp_path: Path, tiny_model_dir: Path, monkeypatch):
    """For the presets, the contrastive detector with noisy references, labels in the data and the verified tail:
    the stages the dry run plans are the stages the run builds, with the same number of trainings and of forward
    passes over the data (the plan used to miss the noisy references and their forward pass)."""
    from conftest import tiny_run_config, write_jsonl

    from tokenforget.stages.demo_task import make_examples
    from tokenforget.commands.plan import plan_run
    from tokenforget.config import RunConfig, from_dict

    sections, mode = PLAN_CASES[case]
    rows = make_examples(16, seed=0, noise=0.25)
    if case == "data_labels":  # the first answer's tokens labelled no-loss (weight 0), the others unlabelled
        rows = [{"messages": [{"role": "user", "content": r["prompt"]},
                              {"role": "assistant", "content": r["completion"], **({"weight": 0} if i == 0 else {})}]}
                for i, r in enumerate(rows)]
    trusted = write_jsonl(tmp_path / "trusted.jsonl", make_examples(8, seed=5, noise=0.0))
    raw = tiny_run_config(tmp_path, tiny_model_dir, rows=rows)
    for sec, values in sections.items():
        values = {k: (str(trusted) if v == "TRUSTED" else v) for k, v in values.items()}
        raw[sec] = {**raw.get(sec, {}), **values}
    raw["train"]["objective"] = {**raw["train"].get("objective", {}), "mode": mode}
    raw["report_to"] = ["none"]
    cfg = from_dict(RunConfig, raw)
    plans, _ = plan_run(Run(cfg), [mode])
    planned = [p.name for p in plans if not p.reuse]
    seen = _executed(monkeypatch)
    Run(cfg).train(mode)
    assert sorted(seen["stages"]) == sorted(planned), case
    assert seen["trainings"] == sum(p.trainings for p in plans), case
    assert seen["forwards"] == sum(p.forwards for p in plans), case
    if case == "verified_base":  # the base's CE alone: the final training only, one forward over the data
        assert (seen["trainings"], seen["forwards"]) == (1, 1) and "reference" not in seen["stages"]


def test_the_registry_follows_the_journey_and_a_stage_reads_only_what_it_declares(tmp_path: Path, tiny_model_dir: Path):
    """`STAGES` lists each stage record once, from modules in the journey's order (`test_layout.JOURNEY`); a stage
    that reads a stage its record's `needs` does not list is refused (so the dry run, which walks `needs`, cannot
    miss it)."""
    from test_layout import JOURNEY

    from tokenforget.pipeline.resolver import STAGES
    from tokenforget.stages.stage import Stage

    modules = [s.make.__module__.removeprefix("tokenforget.stages.") for s in STAGES.values()]
    assert modules == sorted(modules, key=JOURNEY.index)
    assert list(STAGES) == ["data", "reference", "reference-noisy", "scores", "partition", "labels", "train", "preference", "eval"]
    from tokenforget.config import RunConfig, from_dict

    run = Run(from_dict(RunConfig, {**tiny_run_config(tmp_path, tiny_model_dir), "report_to": ["none"]}))
    sneaky = Stage("sneaky", lambda _r, _a: [("data", None)], lambda _r, _a: "fp", lambda r, _a: r.need("scores"),
                   lambda *_: None)  # type: ignore[arg-type,return-value]
    STAGES["sneaky"] = sneaky
    try:
        with pytest.raises(RuntimeError, match="stage sneaky reads scores 1, which its record's needs do not list"):
            run.need("sneaky")
    finally:
        del STAGES["sneaky"]
