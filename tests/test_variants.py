"""Beyond the paper, end to end on the tiny model: forgetting terms, token selections, cross-fitted and
self-evolving references, through the CLI, with stage reuse by fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from conftest import gsm8k_rows, tiny_run_config

from tokenforget.cli import main
from tokenforget.config import RunConfig, from_dict, to_dict
from tokenforget.pipeline.resolver import Run
from tokenforget.runfolder import file_digest, fingerprint
from tokenforget.stages.reference import cross_fit_folds


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    cfg = tiny_run_config(tmp_path, tiny_model_dir, n_examples=18)
    cfg["report_to"] = ["none"]
    cfg["score"]["shard_size"] = 7  # shards that mix folds
    cfg["train"]["save_merged"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_cfg(path: Path, **sections: dict) -> RunConfig:
    raw = yaml.safe_load(path.read_text())
    for sec, values in sections.items():
        raw[sec] = {**raw.get(sec, {}), **values}
    return from_dict(RunConfig, raw)


def test_default_fingerprints_are_the_ones_before_the_new_fields(config: Path):
    """Finished runs stay reusable: with every added field at its default, the reference, partition and train
    fingerprints are the formulas of the version before them (written out here), which hashed the config
    sections without those fields."""
    cfg = load_cfg(config)
    run = Run(cfg)
    drop = lambda d, *keys: {k: v for k, v in d.items() if k not in keys}  # noqa: E731
    data = drop(to_dict(cfg.data), "noise", "noise_sentence", "sample", "sample_seed", "num_proc")
    old_data = fingerprint("data", data, file_digest(cfg.data.path),
                           drop(to_dict(cfg.model), "weights", "attn_implementation"))
    assert run.fp("data") == old_data
    ref = drop(to_dict(cfg.reference), "folds", "rounds", "checkpoint", "noisy_folds", "noisy_fraction", "disjoint_from")
    old_ref = fingerprint("reference", old_data, ref, file_digest(None), to_dict(cfg.lora), cfg.seed)
    assert run.fp("reference") == old_ref
    old_score = fingerprint("score", old_ref, drop(to_dict(cfg.score), "method", "precomputed_path", "base_pass", "spans"),
                            run.bf16)
    assert run.fp("scores") == old_score
    old_part = fingerprint("partition", old_score, drop(to_dict(cfg.partition), "selection", "threshold", "recall",
                                                        "precision", "false_positives", "seed"))
    assert run.fp("partition") == old_part
    # the train section as it was before `train.objective`: the objective's knobs flat, the added ones left out
    train = {**drop(to_dict(cfg.train), "objective", "seed", "trusted_path"), "mode": "forget", "lambda_schedule": "linear", "t_min": 0.0, "t_max": 0.25}
    old_train = fingerprint("train", "forget", old_part, "none", train, to_dict(cfg.lora), cfg.seed, run.bf16)
    assert run.train_fp("forget") == old_train


def test_each_option_retrains_only_what_depends_on_it(config: Path, capsys):
    """objective.forget_term: only train-forget reruns (sft, ignore keep their fingerprints); selection: the
    partition reruns, the scores are reused; beta does not touch `unlikelihood`, which has none."""
    base = load_cfg(config)
    fps = lambda cfg: {m: Run(cfg).train_fp(m) for m in ("sft", "ignore", "forget")}  # noqa: E731
    before = fps(base)
    wga = fps(load_cfg(config, train={"objective": {"forget_term": "wga"}}))
    assert wga["sft"] == before["sft"] and wga["ignore"] == before["ignore"] and wga["forget"] != before["forget"]
    ul = load_cfg(config, train={"objective": {"forget_term": "unlikelihood"}})
    assert Run(ul).train_fp("forget") == Run(load_cfg(config, train={"objective": {"forget_term": "unlikelihood", "beta": 3.0}})).train_fp("forget")
    soft = Run(load_cfg(config, partition={"selection": "soft"}))
    assert soft.fp("scores") == Run(base).fp("scores") and soft.fp("partition") != Run(base).fp("partition")
    thr = lambda t: Run(load_cfg(config, partition={"selection": "global", "threshold": t})).fp("partition")  # noqa: E731
    assert thr(0.0) == thr(5.0)  # the threshold is read only by the threshold selection


@pytest.mark.parametrize("objective", ["unlikelihood", "wga", "tnpo"])
def test_every_forgetting_term_trains_from_the_cli(config: Path, objective: str):
    """Each term trains two steps on the tiny model; the logged loss is finite."""
    assert main(["train", str(config), "--train.objective.forget_term", objective, "--train.objective.beta", "2.0",
                 "--train.training.max_steps", "2"]) == 0
    log = json.loads((config.parent / "run" / "train-forget" / "log_history.json").read_text())
    losses = [h["loss"] for h in log if "loss" in h]
    assert len(losses) == 2 and np.all(np.isfinite(losses))  # logging_steps 1: one entry per step


def test_tnpo_train_set_carries_the_base_models_ce(config: Path):
    """p_base comes from the scores stage: the train set's `ce_base` is the scores' `ce_base`, token for token."""
    run = Run(load_cfg(config, train={"objective": {"forget_term": "tnpo"}}))
    train_set = run.train_set("forget")
    assert train_set["ce_base"] == run.score()["ce_base"]
    assert "ce_base" not in Run(load_cfg(config)).train_set("forget").column_names
    labels = str(config.parent / "run" / "labels")  # the exported file carries the same ce_base
    from_labels = Run(load_cfg(config, train={"objective": {"forget_term": "tnpo"}, "labels_path": labels})).train_set("forget")
    np.testing.assert_allclose(np.concatenate(from_labels["ce_base"]), np.concatenate(train_set["ce_base"]))


def test_tnpo_refuses_labels_scored_without_the_base_model(config: Path):
    """`ref_loss` reads CE_ref only, so its labels carry CE_base as NaN; `tnpo` from them is refused, naming the file."""
    from dataclasses import replace

    from tokenforget.stages.labels_in_data import DataError

    folder = config.parent / "rl"
    Run(replace(load_cfg(config, score={"method": "ref_loss"}), run_dir=str(folder))).labels()
    tnpo = load_cfg(config, train={"objective": {"forget_term": "tnpo"}, "labels_path": str(folder / "labels")})
    with pytest.raises(DataError, match=r"train.labels_path: .*rl/labels' has ce_base NaN"):
        Run(tnpo).train_set("forget")


def test_soft_selection_weights_reach_the_labels_and_the_trainer(config: Path):
    """The soft partition writes `token_weight` (0 off the response, |w| in (0, 1] on it), exported in
    labels.parquet, and training on the exported labels gets them in its batches."""
    assert main(["train", str(config), "--partition.selection", "soft", "--train.training.max_steps", "1"]) == 0
    run = config.parent / "run"
    classes = datasets.load_from_disk(str(run / "partition" / "classes"))
    cls, w = np.concatenate(classes["token_class"]), np.concatenate(classes["token_weight"])
    assert np.all((w > 0) == (cls != 0)) and w.max() == pytest.approx(1.0)
    assert json.loads((run / "partition" / "stats.json").read_text())["selection"] == "soft"
    labels = run / "labels" / "labels.parquet"
    assert main(["train", str(config), "--train.labels_path", str(labels), "--run_dir", str(run.parent / "from-labels"),
                 "--train.training.max_steps", "1"]) == 0
    cfg = load_cfg(config, train={"labels_path": str(labels)})
    assert "token_weight" in Run(cfg).train_set("forget").column_names


def test_per_sample_and_threshold_partitions_in_the_pipeline(config: Path):
    """per_sample: every example has round(0.7 n_i) positives; threshold 0: positive iff score >= 0."""
    run = config.parent / "run"
    assert main(["partition", str(config), "--partition.selection", "per_sample"]) == 0
    classes = datasets.load_from_disk(str(run / "partition" / "classes"))["token_class"]
    for cls in map(np.asarray, classes):
        n = int((cls != 0).sum())
        assert int((cls == 1).sum()) == int(np.floor(0.7 * n + 0.5))
    assert main(["partition", str(config), "--partition.selection", "threshold", "--partition.threshold", "0"]) == 0
    classes = np.concatenate(datasets.load_from_disk(str(run / "partition" / "classes"))["token_class"])
    scores = np.concatenate(datasets.load_from_disk(str(run / "scores" / "scores"))["score"])
    assert np.array_equal(classes[classes != 0] == 1, scores[classes != 0] >= 0)


def test_cross_fit_plan_by_hand():
    """10 examples, 3 folds: fold sizes 4, 3, 3; reference k trains on round(0.5 x 10) = 5 examples, none
    from fold k; with fraction 1 on all the other folds' examples."""
    plan = cross_fit_folds(10, 3, 0.5, None, seed=0)
    assert sorted(np.bincount(plan["fold_of"]).tolist()) == [3, 3, 4]
    for k, trained in enumerate(plan["trained_on"]):
        assert len(trained) == 5 and all(plan["fold_of"][i] != k for i in trained)
    full = cross_fit_folds(10, 3, 1.0, None, seed=0)
    assert [len(t) for t in full["trained_on"]] == [10 - n for n in np.bincount(full["fold_of"]).tolist()]


def test_cross_fitted_references_never_score_their_own_examples(config: Path, capsys):
    """3 folds over 18 examples (shards of 7, so a shard mixes folds): each example is scored by its fold's
    reference (`scored_by` = `fold_of`), which was not trained on it; the base CE is the base model's
    whatever the fold (equal to a 1-reference run's). A rerun reuses everything."""
    assert main(["score", str(config), "--reference.folds", "3", "--reference.fraction", "0.5"]) == 0
    run = config.parent / "run"
    plan = json.loads((run / "reference" / "folds.json").read_text())
    scores = datasets.load_from_disk(str(run / "scores" / "scores"))
    assert scores["scored_by"] == plan["fold_of"] and len(scores) == 18
    for i, k in enumerate(scores["scored_by"]):
        assert i not in plan["trained_on"][k]
    assert [len(t) for t in plan["trained_on"]] == [9, 9, 9]
    assert all((run / "reference" / f"fold-{k}" / "adapter" / "adapter_config.json").is_file() for k in range(3))
    cross_fitted_base = scores["ce_base"]
    capsys.readouterr()
    assert main(["score", str(config), "--reference.folds", "3", "--reference.fraction", "0.5"]) == 0
    assert "[scores] up to date" in capsys.readouterr().out
    assert main(["score", str(config)]) == 0  # one reference: a different reference, the same base CE
    single = datasets.load_from_disk(str(run / "scores" / "scores"))
    for a, b in zip(single["ce_base"], cross_fitted_base):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_self_evolving_rounds_are_stages_that_resume(config: Path, capsys):
    """rounds 3: reference/scores/partition, then -round2 and -round3 of each; training uses round 3's
    partition. Removing round 3's scores redoes only round 3's scores."""
    args = ["partition", str(config), "--reference.rounds", "3"]
    assert main(args) == 0
    run = config.parent / "run"
    for name in ("reference", "scores", "partition"):
        for stage in (name, f"{name}-round2", f"{name}-round3"):
            assert (run / stage / "stage.json").is_file(), stage
    assert json.loads((run / "reference-round3" / "stage.json").read_text())["round"] == 3
    from tokenforget.report.reading import read_run

    assert read_run(run).stats == json.loads((run / "partition-round3" / "stats.json").read_text())  # the report's
    labels = datasets.Dataset.from_parquet(str(run / "labels" / "labels.parquet"))
    last = datasets.load_from_disk(str(run / "partition-round3" / "classes"))
    assert labels["token_class"] == last["token_class"]
    import shutil

    shutil.rmtree(run / "scores-round3")
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[reference-round3] up to date" in out and "[partition-round2] up to date" in out
    assert "[scores-round3] up to date" not in out and (run / "scores-round3" / "stage.json").is_file()
    # the partition's inputs (their fingerprints) did not change, so it is reused as it should be
    assert "[partition-round3] up to date" in out


def test_bad_new_options_exit_2_naming_the_field(config: Path, capsys):
    for args, field in [
        (["--reference.folds", "0"], "reference.folds"),
        (["--reference.folds", "2", "--reference.rounds", "2"], "reference.rounds"),
        (["--train.objective.beta", "0"], "train.objective.beta"),
        (["--train.objective.warmup", "0"], "train.objective.warmup"),
        (["--partition.selection", "soft", "--partition.streaming", "true"], "partition.selection"),
        (["--train.objective.forget_term", "npo"], "train.objective.forget_term"),
        (["--reference.folds", "2", "--lora.enabled", "false"], "reference.folds"),
        (["--reference.folds", "40"], "reference.folds"),  # more folds than examples: found after the data stage
    ]:
        assert main(["run", str(config), *args]) == 2, args
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(errors) == 1 and field in errors[0], errors  # one line (beside progress bars), no traceback


def test_dry_run_lists_every_round_and_the_fold_count(config: Path):
    """The plan names each round's stages (reused after they ran, by the same fingerprints the stages
    write) and counts K reference trainings for cross-fitting."""
    from tokenforget.commands.plan import plan_run

    rounds = load_cfg(config, reference={"rounds": 2})
    names = [p.name for p in plan_run(Run(rounds), ["forget"], measure=False)[0]]
    assert names == ["data", "reference", "scores", "partition", "reference-round2", "scores-round2",
                     "partition-round2", "labels", "train-forget"]
    assert main(["partition", str(config), "--reference.rounds", "2"]) == 0
    plans = plan_run(Run(rounds), ["forget"], measure=False)[0]
    assert [p.name for p in plans if not p.reuse] == ["train-forget"]
    folds = load_cfg(config, reference={"folds": 3})
    ref = next(p for p in plan_run(Run(folds), ["forget"], measure=False)[0] if p.name == "reference")
    assert ref.work.startswith("3 references x")


def test_compare_trains_and_tables_named_variants(tmp_path: Path, tiny_model_dir: Path, capsys):
    """One seed, modes sft + forget, variants `wga` (objective.forget_term wga, beta 2) and `cos` (cosine schedule):
    each trains as train-<name> on the seed's one partition, with the fingerprint a plain run with those
    train fields gets, and appears in the tables and the paired differences. A rerun does nothing."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir, n_examples=12)
    cfg.update(run_dir=str(tmp_path / "cmp"), report_to=["none"])
    cfg["eval"] = {"gsm8k": str(write_test_set(tmp_path, gsm8k_rows(2, 1))), "limit": 2, "max_new_tokens": 4,
                   "batch_size": 2, "gsm8k_nll": True}
    cfg["compare"] = {"seeds": [1], "modes": ["sft", "forget"],
                      "variants": {"wga": {"objective": {"forget_term": "wga", "beta": 2.0}}, "cos": {"objective": {"schedule": "cosine"}}}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # variants in the order written
    assert main(["compare", str(path)]) == 0
    res = json.loads((tmp_path / "cmp" / "compare_results.json").read_text())
    assert res["models"] == ["base", "sft", "forget", "wga", "cos"]
    assert set(res["paired_vs_sft"]) == {"forget", "wga", "cos"}
    seed = tmp_path / "cmp" / "seed-1"
    fp = lambda stage: json.loads((seed / stage / "stage.json").read_text())["fingerprint"]  # noqa: E731
    plain = from_dict(RunConfig, {**cfg, "run_dir": str(seed), "seed": 1, "train": {**cfg["train"], "objective": {"forget_term": "wga", "beta": 2.0}}})
    assert fp("train-wga") == Run(plain).train_fp("forget") != fp("train-forget")
    lambdas = lambda stage: [h["lambda"] for h in json.loads((seed / stage / "log_history.json").read_text()) if "lambda" in h]  # noqa: E731
    assert lambdas("train-cos") != lambdas("train-forget") and lambdas("train-cos")[0] == 0.0
    capsys.readouterr()
    assert main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    assert "training on" not in out and "[eval-wga] up to date" in out
    assert main(["compare", str(path), "--compare.variants", "{bad: {objective: {beta: 0}}}"]) == 2
    assert "compare.variants.bad" in capsys.readouterr().err
    assert main(["compare", str(path), "--compare.variants", "{sft: {objective: {beta: 2}}}"]) == 2
    assert main(["compare", str(path), "--compare.variants", "{x: {learning_rate: 2}}"]) == 2
    assert "compare.variants.x.learning_rate" in capsys.readouterr().err


def test_compare_variants_with_a_partition_or_reference_of_their_own(tmp_path: Path, tiny_model_dir: Path, capsys):
    """`soft` (partition.selection soft) and `cf` (reference.folds 2) run in seed-1/variant-<name>/: `soft`
    starts from copies of the seed's data, reference and scores (same fingerprints, nothing retrained),
    `cf` from its data only and trains 2 fold references. Both are tabled; a rerun does nothing. `rl` comes
    before `paper`, the seed's own forgetting: the seed's reference and scores are made first and copied, not
    made twice (the seed's mode list, `sft`, needs none of them)."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir, n_examples=12)
    cfg.update(run_dir=str(tmp_path / "cmp"), report_to=["none"])
    cfg["eval"] = {"gsm8k": str(write_test_set(tmp_path, gsm8k_rows(2, 1))), "limit": 2, "max_new_tokens": 4, "batch_size": 2}
    cfg["compare"] = {"seeds": [1], "modes": ["sft"],
                      "variants": {"rl": {"objective": {"mode": "ignore"}, "score": {"method": "ref_loss"}},
                                   "soft": {"partition": {"selection": "soft"}}, "cf": {"reference": {"folds": 2}},
                                   "paper": {"objective": {"mode": "forget"}}}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    seed = tmp_path / "cmp" / "seed-1"
    fp = lambda folder, stage: json.loads((folder / stage / "stage.json").read_text())["fingerprint"]  # noqa: E731
    soft, cf = seed / "variant-soft", seed / "variant-cf"
    assert fp(soft, "reference") == fp(seed, "reference") and fp(soft, "scores") == fp(seed, "scores")
    assert f"[reference] copied from {seed / 'reference'}" in out and fp(soft, "partition") != fp(seed, "partition")
    assert "token_weight" in datasets.load_from_disk(str(soft / "partition" / "classes")).column_names
    assert (cf / "reference" / "folds.json").is_file() and fp(cf, "data") == fp(seed, "data")
    assert (soft / "train-soft" / "stage.json").is_file() and (cf / "eval-cf" / "results.json").is_file()
    # `rl` (score.method ref_loss): the seed's scoring pass, rescored without a forward pass; score = -CE_ref
    rl = seed / "variant-rl"
    assert f"[scores] copied from {seed / 'scores'}" in out and "rescoring without a forward pass" in out
    mine, theirs = (datasets.load_from_disk(str(d / "scores" / "scores")) for d in (rl, seed))
    assert mine["ce_ref"] == theirs["ce_ref"] and fp(rl, "scores") != fp(seed, "scores")
    tokens = datasets.load_from_disk(str(seed / "data" / "tokens"))
    for m, r, ce in zip(tokens["response_mask"], mine["score"], mine["ce_ref"]):
        assert [s for k, s in zip(m, r) if k] == pytest.approx([-c for k, c in zip(m, ce) if k])
    assert (rl / "train-rl" / "stage.json").is_file()
    res = json.loads((tmp_path / "cmp" / "compare_results.json").read_text())
    assert res["models"] == ["base", "sft", "rl", "soft", "cf", "paper"]
    assert set(res["paired_vs_sft"]) == {"paper", "soft", "cf", "rl"}
    assert out.count("[reference] SFT on") == 1 and out.count("[reference] fold") == 2  # the seed's; cf's folds
    # detection per partition: `rl` ranks -CE_ref, so its AUROC is that of the reference's CE (high CE = corrupt),
    # recomputed here from the files; the seed's own entry ranks the paper's score
    from tokenforget.metrics import auroc

    flat = lambda col: np.concatenate([np.asarray(v)[np.asarray(m, bool)] for v, m in zip(col, tokens["response_mask"])])  # noqa: E731
    corrupt = flat(tokens["corrupt"]).astype(bool)
    assert set(res["detection_by_variant"]) == {"soft", "cf", "rl"} and set(res["detection_by_variant"]["rl"]) == {"1"}
    assert res["detection_by_variant"]["rl"]["1"]["auroc"] == pytest.approx(auroc(-flat(mine["ce_ref"]), corrupt))
    assert res["detection"]["1"]["auroc"] == pytest.approx(auroc(flat(theirs["score"]), corrupt))
    assert "partition of" in out and any(line.split()[:2] == ["rl", "1"] for line in out.splitlines())
    assert main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    assert "training on" not in out and "copied" not in out and "[eval-cf] up to date" in out
    assert main(["compare", str(path), "--compare.variants", "{x: {partition: {streaming: true}}}"]) == 2
    assert "compare.variants.x.partition" in capsys.readouterr().err


def write_test_set(tmp_path: Path, rows: list[dict]) -> Path:
    from conftest import write_jsonl

    return write_jsonl(tmp_path / "test.jsonl", rows)


def test_the_objectives_old_flat_names_are_refused_naming_the_new_one(config: Path, capsys, tmp_path: Path):
    """`train.forget_objective` (before `train.objective`) on the command line and in a file: exit 2, one line naming
    `train.objective.forget_term`; an old run record (`config.json`) still loads with its objective."""
    from tokenforget.config import ObjectiveConfig, TrainConfig

    assert main(["run", str(config), "--train.forget_objective", "wga"]) == 2
    assert "it is 'train.objective.forget_term' now" in capsys.readouterr().err
    old = yaml.safe_load(config.read_text())
    old["train"] = {**old.get("train", {}), "mode": "sft"}
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    assert main(["run", str(tmp_path / "old.yaml")]) == 2
    assert "it is 'train.objective.mode' now" in capsys.readouterr().err
    record = from_dict(TrainConfig, {"mode": "ignore", "forget_objective": "wga", "lambda_warmup": 0.5, "t_max": 0.1})
    assert record.objective == ObjectiveConfig(mode="ignore", forget_term="wga", warmup=0.5, t_max=0.1)
    # an old record's compare variants set the knobs flat: read as the objective's; given so now, refused naming it
    old_run = from_dict(RunConfig, {"compare": {"variants": {"o": {"mode": "ignore", "partition": {"selection": "oracle"}}}}})
    assert old_run.compare.variants["o"] == {"partition": {"selection": "oracle"}, "objective": {"mode": "ignore"}}
    assert main(["compare", str(config), "--compare.variants", "{o: {forget_objective: wga}}"]) == 2
    assert "compare.variants.o.forget_objective': it is 'objective: {forget_term: ...}' now" in capsys.readouterr().err
