"""End to end: every command on a tiny model built in code and a local JSONL file."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import stage_dirs, write_jsonl
from transformers import AutoModelForCausalLM

from tokenforget.cli import main
from tokenforget.stages.demo_task import make_examples

STAGES = ["data", "reference", "scores", "partition", "labels", "train-forget"]


def test_run_every_stage_then_reuse(config: Path, capsys):
    run = config.parent / "run"
    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert all((run / s / "stage.json").is_file() for s in STAGES)
    assert "Tokens scored:" in out and "train-forget: final loss=" in out
    assert f"Report: {run / 'report' / 'report.html'}" in out and (run / "report" / "report.html").is_file()
    merged = AutoModelForCausalLM.from_pretrained(run / "train-forget" / "model", dtype=torch.float32)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    stats = json.loads((run / "partition" / "stats.json").read_text())
    assert stats["n_positive"] == int(0.7 * stats["n_tokens"] + 0.5)

    assert main(["run", str(config)]) == 0
    out = capsys.readouterr().out
    assert all(f"[{s}] up to date" in out for s in STAGES)

    assert main(["run", str(config), "--partition.rho", "0.5"]) == 0  # scores reused, partition redone
    out = capsys.readouterr().out
    assert "[scores] up to date" in out and "[partition] " in out and "[partition] up to date" not in out
    stats = json.loads((run / "partition" / "stats.json").read_text())
    assert stats["n_positive"] == int(0.5 * stats["n_tokens"] + 0.5)


def test_changed_data_file_redoes_every_stage(config: Path, capsys):
    assert main(["score", str(config)]) == 0
    data = Path(yaml.safe_load(config.read_text())["data"]["path"])
    write_jsonl(data, make_examples(24, seed=1, noise=0.25))
    capsys.readouterr()
    assert main(["score", str(config)]) == 0
    assert "up to date" not in capsys.readouterr().out


def test_a_stage_never_replaces_a_folder_of_other_files(config: Path, capsys):
    """A user's files where a stage would go (here the output of `tokenforget weak` written to run_dir/data): exit 2
    naming the folder, before any work, and the files are still there."""
    theirs = config.parent / "run" / "data"
    theirs.mkdir(parents=True)
    (theirs / "noisy.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["score", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"'{theirs}' holds files that are not a tokenforget stage" in err and "nothing was deleted" in err
    assert (theirs / "noisy.jsonl").read_text() == '{"prompt": "a", "completion": "b"}\n'
    assert sorted(p.name for p in theirs.iterdir()) == ["noisy.jsonl"]


def test_stage_commands_write_only_their_stages(config: Path):
    run = config.parent / "run"
    assert main(["reference", str(config)]) == 0
    assert stage_dirs(run) == ["data", "reference"]
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["reference"]
    assert main(["partition", str(config)]) == 0
    assert stage_dirs(run) == ["data", "labels", "partition", "reference", "scores"]
    assert main(["train", str(config), "--train.objective.mode", "ignore"]) == 0
    assert (run / "train-ignore" / "adapter" / "adapter_config.json").is_file()


def test_sft_needs_no_reference(config: Path, capsys):
    run = config.parent / "run"
    assert main(["train", str(config), "--train.objective.mode", "sft"]) == 0
    assert stage_dirs(run) == ["data", "train-sft"]
    (final,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train-sft: final ")]
    assert re.fullmatch(r"train-sft: final loss=\d+\.\d{4}  loss_pos=\d+\.\d{4}", final), final  # no loss_neg=nan


def test_user_errors_exit_2_with_the_field(config: Path, tmp_path: Path, capsys):
    assert main(["run", str(config), "--partition.rho", "1.5"]) == 2
    assert "partition.rho" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    assert main(["run", str(config), "--data.path", str(bad)]) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert main(["run", str(config), "--model.name_or_path", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", str(config), "--partition.rhoo", "0.5"]) == 2
    assert "did you mean 'partition.rho'" in capsys.readouterr().err
    assert main(["run", str(config), "--score.base_pass", "false"]) == 2  # score.method paper reads CE_base
    assert "score.base_pass" in capsys.readouterr().err
    assert main(["run", str(config), "--score.base_pass", "false", "--score.method", "ref_loss",
                 "--train.objective.forget_term", "tnpo"]) == 2
    err = capsys.readouterr().err
    assert "score.base_pass" in err and "tnpo" in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_demo_on_a_tiny_model(tmp_path: Path, tiny_model_dir: Path, capsys):
    """Every kind of setting the demo can train: sft, the paper, the preset, the sample filter, an oracle bound and
    the clean ceiling."""
    import datasets

    args = ["demo", "--run_dir", str(tmp_path / "demo"), "--model.name_or_path", str(tiny_model_dir),
            "--model.precision", "fp32", "--n_train", "24", "--n_test", "4", "--evaluate_base", "true", "--max_new_tokens", "4",
            "--settings", "[sft, paper, ref_loss_wga, filter, filter_max, ignore_tail, ignore_tail_numbers, verified_tail, "
            "verified_tail_base, oracle_forget, clean]"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "vs sft (paired)" in out and "AUROC" in out
    assert "[train-sft] done in " in out and "[reference] done in " in out  # each stage's time, one line
    assert "What each model is:" in out and "  sft: every response token learned" in out
    # every setting but sft (and the base) has its paired difference and a verdict in words
    assert out.count("distinguishable from sft at n = 4") + out.count("than sft: ") == 10
    assert "{'loss'" not in captured.out + captured.err and "'train_runtime'" not in captured.out + captured.err
    assert " nan " not in out.split("How each setting's negatives")[1]  # no column of nan
    assert f"Report: {tmp_path / 'demo' / 'report' / 'report.html'}" in out
    table = out.split("with the baselines at equal steps: ")[1].split(" ")[0]  # where the full table lives: it does
    assert (Path(__file__).parents[1] / table).is_file()
    assert "Finding the known corrupted tokens" in (tmp_path / "demo" / "report" / "report.html").read_text()
    res = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert list(res["models"]) == ["base", "sft", "paper", "ref_loss_wga", "filter", "filter_max", "ignore_tail",
                                   "ignore_tail_numbers", "verified_tail", "verified_tail_base", "oracle_forget", "clean"]
    assert all(len(m["correct"]) == 4 and m["accuracy"] == sum(m["correct"]) / 4 for m in res["models"].values())
    from tokenforget.presets import PRESETS

    side_by_side = res["detection_methods"]  # paper (slice reference) beside the trusted reference's settings
    assert list(side_by_side) == ["paper", "ref_loss_wga", "filter", "filter_max", "ignore_tail", "ignore_tail_numbers",
                                  "verified_tail", "verified_tail_base"]
    assert side_by_side["paper"]["n_corrupt"] > 0
    # the clean twin: the same prompts, nothing corrupted; the noisy copy: the total-ending problems corrupted
    task = tmp_path / "demo" / "task"
    noisy = [json.loads(line) for line in (task / "train.jsonl").read_text().splitlines()]
    clean = [json.loads(line) for line in (task / "clean.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in clean] and not any(r["corrupt_spans"] for r in clean)
    # round(0.4 x 24) = 10 asked; seed 0's 24 problems have 9 that end in a total (Python's seeded `random`), so 9
    assert sum(bool(r["corrupt_spans"]) for r in noisy) == 9
    # the oracle's negatives are exactly the corrupted tokens
    oracle = tmp_path / "demo" / "variant-oracle_forget"
    tokens = datasets.load_from_disk(str(oracle / "data" / "tokens"))
    classes = datasets.load_from_disk(str(oracle / "partition" / "classes"))
    for resp, bad, cls in zip(tokens["response_mask"], tokens["corrupt"], classes["token_class"]):
        assert cls == [(-1 if b else 1) * r for r, b in zip(resp, bad)]
    # the ref_loss_wga model trained with the preset: its score method, its rho, a trusted reference
    rec = json.loads((tmp_path / "demo" / "trusted" / "config.json").read_text())
    want = PRESETS["ref_loss_wga"]
    assert rec["score"]["method"] == want["score"]["method"] and rec["partition"]["rho"] == want["partition"]["rho"]
    assert rec["train"]["objective"]["forget_term"] == want["train"]["objective"]["forget_term"]
    assert rec["reference"]["path"].endswith("trusted.jsonl")
    stats = json.loads((tmp_path / "demo" / "trusted" / "partition" / "stats.json").read_text())
    assert stats["n_negative"] == round((1 - want["partition"]["rho"]) * stats["n_tokens"])
    wga = side_by_side["ref_loss_wga"]
    negatives = wga["recall"] * wga["n_corrupt"] / wga["precision"]
    assert negatives == pytest.approx(stats["n_negative"])  # its detection is measured on its own partition
    # the filter: round(0.3 x 24) = 7 whole examples dropped, on the trusted run's reference (copied, not retrained);
    # its detection counts examples: 7 dropped, recall x wrong examples / precision = 7
    f = side_by_side["filter"]
    assert f["n_tokens"] == 24 and f["recall"] * f["n_corrupt"] / f["precision"] == pytest.approx(7)
    filt = tmp_path / "demo" / "filter"
    classes = datasets.load_from_disk(str(filt / "partition" / "classes"))["token_class"]
    dropped = [c for c in classes if -1 in c]
    assert len(dropped) == 7 and all(set(c) <= {0, -1} for c in dropped)
    assert json.loads((filt / "reference" / "stage.json").read_text()) == json.loads(
        (tmp_path / "demo" / "trusted" / "reference" / "stage.json").read_text())
    # the max filter drops the 7 examples whose worst response token the trusted reference finds least likely
    # (of equal ones the later: ties keep the earlier example)
    scores = datasets.load_from_disk(str(tmp_path / "demo" / "trusted" / "scores" / "scores"))["ce_ref"]
    masks = datasets.load_from_disk(str(tmp_path / "demo" / "trusted" / "data" / "tokens"))["response_mask"]
    worst = [max(c for c, m in zip(ce, mask) if m) for ce, mask in zip(scores, masks)]
    classes = datasets.load_from_disk(str(tmp_path / "demo" / "filter_max" / "partition" / "classes"))["token_class"]
    dropped = [i for i, c in enumerate(classes) if -1 in c]
    assert sorted(dropped) == sorted(sorted(range(24), key=lambda i: (-worst[i], -i))[:7])
    # the tail: the same 7 examples kept, each from its first worst response token to its end ignored
    classes = datasets.load_from_disk(str(tmp_path / "demo" / "ignore_tail" / "partition" / "classes"))["token_class"]
    for i, (ce, mask, cls) in enumerate(zip(scores, masks, classes)):
        cut = next(t for t, (c, m) in enumerate(zip(ce, mask)) if m and c == worst[i]) if i in dropped else len(mask)
        assert cls == [m * (1 if t < cut else -1) for t, m in enumerate(mask)]
    # the verified tail: the 9 answers with a corrupted token (the verdicts), each cut at its first worst token
    verified = tmp_path / "demo" / "verified_tail"
    classes = datasets.load_from_disk(str(verified / "partition" / "classes"))["token_class"]
    corrupt = datasets.load_from_disk(str(verified / "data" / "tokens"))["corrupt"]
    assert sum(any(b) for b in corrupt) == 9
    for i, (ce, mask, cls, bad) in enumerate(zip(scores, masks, classes, corrupt)):
        cut = next(t for t, (c, m) in enumerate(zip(ce, mask)) if m and c == worst[i]) if any(bad) else len(mask)
        assert cls == [m * (1 if t < cut else -1) for t, m in enumerate(mask)]
    # the base model as the reference (`--preset verified`'s fields): the same 9 answers, each cut at its first
    # token of the largest CE_base
    base_cut = tmp_path / "demo" / "verified_tail_base"
    vcfg, want = json.loads((base_cut / "config.json").read_text()), PRESETS["verified"]
    assert (vcfg["score"]["method"], vcfg["partition"]["selection"]) == (want["score"]["method"],
                                                                         want["partition"]["selection"])
    ce_base = datasets.load_from_disk(str(base_cut / "scores" / "scores"))["ce_base"]
    classes = datasets.load_from_disk(str(base_cut / "partition" / "classes"))["token_class"]
    for ce, mask, cls, bad in zip(ce_base, masks, classes, corrupt):
        top = max(c for c, m in zip(ce, mask) if m)
        cut = next(t for t, (c, m) in enumerate(zip(ce, mask)) if m and c == top) if any(bad) else len(mask)
        assert cls == [m * (1 if t < cut else -1) for t, m in enumerate(mask)]
    # ... and it reads no reference: none trained or copied into its folder, its pass the base model's forward alone
    # (CE_ref not measured), whose CE is the tiny model's own -log softmax of the next token
    assert not (base_cut / "reference").exists() and not (base_cut / "reference-noisy").exists()
    base_scores = datasets.load_from_disk(str(base_cut / "scores" / "scores"))
    assert all(math.isnan(c) for ce in base_scores["ce_ref"] for c in ce)
    import torch
    from transformers import AutoModelForCausalLM

    ids0 = torch.tensor([datasets.load_from_disk(str(base_cut / "data" / "tokens"))["input_ids"][0]])
    with torch.no_grad():
        logp = torch.log_softmax(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))(ids0).logits[0, :-1], -1)
    own = -logp.gather(1, ids0[0, 1:, None])[:, 0]
    m0 = torch.tensor(masks[0][1:], dtype=torch.bool)
    assert torch.tensor(ce_base[0][1:])[m0].tolist() == pytest.approx(own[m0].tolist(), abs=1e-5)
    # the tail by numbers: the same reference's -CE, every digit run of an answer one score (at most its tokens'
    # own), and each of the 7 answers with the lowest such score cut from its first lowest-scored token on
    tail = tmp_path / "demo" / "ignore_tail_numbers"
    ids = datasets.load_from_disk(str(tail / "data" / "tokens"))["input_ids"]
    pooled = datasets.load_from_disk(str(tail / "scores" / "scores"))["score"]
    classes = datasets.load_from_disk(str(tail / "partition" / "classes"))["token_class"]
    from tokenforget.config import ModelConfig
    from tokenforget.model.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    for name, cut in (("ignore_tail", tmp_path / "demo" / "ignore_tail"), ("ignore_tail_numbers", tail),
                      ("verified_tail", verified)):
        # the detection figures are of the cut itself: its negative tokens against the known wrong ones
        cls = datasets.load_from_disk(str(cut / "partition" / "classes"))["token_class"]
        bad = datasets.load_from_disk(str(cut / "data" / "tokens"))["corrupt"]
        pairs = [(c == -1, bool(b)) for cs, bs in zip(cls, bad) for c, b in zip(cs, bs)]
        hit, neg, wrong = sum(n and b for n, b in pairs), sum(n for n, _ in pairs), sum(b for _, b in pairs)
        d = side_by_side[name]
        assert neg > 0 and (d["recall"], d["precision"]) == pytest.approx((hit / wrong, hit / neg))
    runs = 0
    for ce, mask, row, sc in zip(scores, masks, ids, pooled):
        digit = [bool(m) and tok.decode([t]).strip().isdigit() for t, m in zip(row, mask)]
        for a in (t for t in range(len(row)) if digit[t] and not (t and digit[t - 1])):
            e = next((t for t in range(a, len(row)) if not digit[t]), len(row))
            runs += 1
            assert len(set(sc[a:e])) == 1 and sc[a] <= min(-c for c in ce[a:e]) + 1e-6
    assert runs > 0
    low = [min(s for s, m in zip(sc, mask) if m) for sc, mask in zip(pooled, masks)]
    cut_at = sorted(range(24), key=lambda i: (low[i], -i))[:7]  # ties: the earlier stays whole
    for i, (sc, mask, cls) in enumerate(zip(pooled, masks, classes)):
        cut = next(t for t, (v, m) in enumerate(zip(sc, mask)) if m and v == low[i]) if i in cut_at else len(mask)
        assert cls == [m * (1 if t < cut else -1) for t, m in enumerate(mask)]


def test_demo_measures_a_detector_without_training_on_it(tmp_path: Path, tiny_model_dir: Path, capsys):
    """The default settings: sft and the verified tail cut by the base model trained and evaluated; with `--detectors
    [ref_loss_wga]` that detector's finding measured beside it (a scoring pass of the trusted reference alone: its score reads no base CE), no model
    trained on it."""
    import datasets

    root = tmp_path / "demo"
    assert main(["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision",
                 "fp32", "--n_train", "24", "--n_test", "4", "--n_trusted", "8", "--max_new_tokens", "4",
                 "--detectors", "[ref_loss_wga]"]) == 0
    out = capsys.readouterr().out
    res = json.loads((root / "demo_results.json").read_text())
    assert list(res["models"]) == ["sft", "verified_tail_base"]  # the default settings
    assert list(res["detection_methods"]) == ["verified_tail_base", "ref_loss_wga"]
    assert res["detected_only"] == ["ref_loss_wga"]
    assert "ref_loss_wga (no model trained)" in out
    assert (root / "trusted" / "reference" / "stage.json").is_file() and (root / "trusted" / "scores" / "stage.json").is_file()
    ce_base = datasets.load_from_disk(str(root / "trusted" / "scores" / "scores"))["ce_base"]
    assert np.isnan(np.concatenate(ce_base)).all()  # the base model was not run
    assert not [d for d in (root / "trusted").iterdir() if d.name.startswith("train-")]


def test_demo_sweeps_lambda_on_the_oracles_negatives(tmp_path: Path, tiny_model_dir: Path):
    """`oracle_forget_lam1`: the oracle's partition (the known corrupted tokens), forgotten with the paper's term and
    lambda linear 0 -> 1 instead of 0 -> 0.25. 24 answers in batches of 4 are 6 optimizer steps, logged at the 5th,
    which runs after t = 4 finished steps: lambda there is 4/6 x 0.25 for `oracle_forget` and 4/6 x 1 for the sweep,
    trained in the oracle's folder."""
    root = tmp_path / "demo"
    args = ["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
            "--n_train", "24", "--n_test", "2", "--max_new_tokens", "2", "--batch_size", "4", "--micro_batch_size", "4",
            "--settings", "[sft, oracle_forget, oracle_forget_lam1]"]
    assert main(args) == 0
    res = json.loads((root / "demo_results.json").read_text())
    oracle = root / "variant-oracle_forget"
    assert res["stages"]["oracle_forget_lam1"] == str(oracle / "train-forget_ga_lam1")

    def lambdas(stage: str) -> list[float]:
        return [e["lambda"] for e in json.loads((oracle / stage / "log_history.json").read_text()) if "lambda" in e]

    assert lambdas("train-oracle_forget") == pytest.approx([4 / 6 * 0.25])
    assert lambdas("train-forget_ga_lam1") == pytest.approx([4 / 6 * 1.0])


def test_demo_forgets_the_first_wrong_token_alone(tmp_path: Path, tiny_model_dir: Path):
    """`oracle_first_forget`: in each answer with known corrupted tokens, the first one is forgotten and the rest get
    no loss; every other response token is learned (the classes checked against the data's corrupt masks). It trains
    in `oracle_first/` with the paper's term, no reference trained and no token scored."""
    import datasets

    root = tmp_path / "demo"
    args = ["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
            "--n_train", "24", "--n_test", "2", "--max_new_tokens", "2", "--batch_size", "8",
            "--settings", "[sft, oracle_first_forget]"]
    assert main(args) == 0
    res = json.loads((root / "demo_results.json").read_text())
    folder = root / "oracle_first"
    assert res["stages"]["oracle_first_forget"] == str(folder / "train-forget_ga")
    tokens = datasets.load_from_disk(str(folder / "data" / "tokens"))
    classes = datasets.load_from_disk(str(folder / "partition" / "classes"))["token_class"]
    n_wrong = 0
    for mask, bad, cls in zip(tokens["response_mask"], tokens["corrupt"], classes):
        marked = [t for t, (m, b) in enumerate(zip(mask, bad)) if m and b]
        n_wrong += bool(marked)
        want = [(-1 if marked and t == marked[0] else 0 if t in marked else 1) if m else 0 for t, m in enumerate(mask)]
        assert cls == want
    assert n_wrong > 0 and sum(c.count(-1) for c in classes) == n_wrong
    assert not (folder / "reference" / "stage.json").exists()


def test_demo_forgets_the_verified_cut_token_alone(tmp_path: Path, tiny_model_dir: Path):
    """`verified_first_base_forget`: in each answer known wrong (here: one with a corrupted token), the response token
    the base model finds least likely (the earlier of ties) is forgotten and the rest of the answer from it gets no
    loss; every other response token is learned. It trains in `verified_first_base/` with the paper's term on the
    base model's scores, no reference trained."""
    import datasets

    root = tmp_path / "demo"
    args = ["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
            "--n_train", "24", "--n_test", "2", "--max_new_tokens", "2", "--batch_size", "8",
            "--settings", "[sft, verified_first_base_forget]"]
    assert main(args) == 0
    folder = root / "verified_first_base"
    assert json.loads((root / "demo_results.json").read_text())["stages"]["verified_first_base_forget"] == str(
        folder / "train-forget_ga")
    tokens = datasets.load_from_disk(str(folder / "data" / "tokens"))
    scores = datasets.load_from_disk(str(folder / "scores" / "scores"))["score"]
    classes = datasets.load_from_disk(str(folder / "partition" / "classes"))["token_class"]
    n_wrong = 0
    for mask, bad, score, cls in zip(tokens["response_mask"], tokens["corrupt"], scores, classes):
        resp = [t for t, m in enumerate(mask) if m]
        wrong = any(bad[t] for t in resp)
        n_wrong += wrong
        cut = min(resp, key=lambda t: (score[t], t)) if wrong else len(mask)
        assert cls == [(1 if t < cut else -1 if t == cut else 0) if m else 0 for t, m in enumerate(mask)]
    assert n_wrong > 0 and sum(c.count(-1) for c in classes) == n_wrong
    assert not (folder / "reference" / "stage.json").exists()


def test_demo_trusted_reference_setting_also_trains_on_the_trusted_set(tmp_path: Path, tiny_model_dir: Path, capsys):
    """`verified_tail_plus_trusted`: `verified_tail` on the noisy answers plus the trusted ones, as a user with a
    trusted set would train: its reference trained on the same trusted set with the same seed (a stage of its own),
    so the noisy answers get exactly `verified_tail`'s classes; each trusted answer is learned whole."""
    import datasets

    root = tmp_path / "demo"
    args = ["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
            "--n_train", "24", "--n_test", "2", "--n_trusted", "8", "--max_new_tokens", "2", "--batch_size", "8",
            "--detectors", "[]", "--settings", "[verified_tail, verified_tail_plus_trusted]"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("[reference] done in") == 2  # the trusted reference, and this one
    mine = datasets.load_from_disk(str(root / "verified_tail_plus_trusted" / "partition" / "classes"))["token_class"]
    theirs = datasets.load_from_disk(str(root / "verified_tail" / "partition" / "classes"))["token_class"]
    tokens = datasets.load_from_disk(str(root / "verified_tail_plus_trusted" / "data" / "tokens"))
    assert len(mine) == 24 + 8 and mine[:24] == theirs and any(-1 in c for c in theirs)
    for cls, mask in zip(mine[24:], tokens["response_mask"][24:]):
        assert cls == [1 if m else 0 for m in mask]
    res = json.loads((root / "demo_results.json").read_text())
    assert res["stages"]["verified_tail_plus_trusted"] == str(root / "verified_tail_plus_trusted" / "train-ignore")


def test_demo_simulated_detectors_and_a_validation_split(tmp_path: Path, tiny_model_dir: Path, capsys):
    """`sim_ignore` at recall 1 and precision 0.5 (random right tokens): its negatives are every corrupted token and
    as many right ones; `sim_forget` shares that partition. A validation split is evaluated beside the test. A rerun
    with one setting more evaluates only the new model (the others' results are stages of the folder, reused). The gold NLL over the
    first 2 problems of each split (`nll_problems`): the token mean of the sft model's own NLL on those 2."""
    import datasets

    from tokenforget.command_config import DemoConfig
    from tokenforget.config import ModelConfig
    from tokenforget.model.loading import load_tokenizer
    from tokenforget.stages import data as data_mod
    from tokenforget.stages.demo_task import demo_run_config
    from tokenforget.stages.evaluate import load_trained, response_nll

    root = tmp_path / "demo"
    args = ["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
            "--n_train", "24", "--n_test", "4", "--n_val", "3", "--n_trusted", "8", "--max_new_tokens", "4",
            "--nll_problems", "2",
            "--detectors", "[]", "--sim_recall", "[1.0]", "--sim_precision", "[0.5]", "--settings", "[sft, sim_ignore]"]
    assert main(args) == 0
    res = json.loads((root / "demo_results.json").read_text())
    assert list(res["models"]) == ["sft", "sim_ignore_r1_p0.5"]
    assert list(res["validation"]) == list(res["models"]) and res["validation"]["sft"]["n"] == 3
    assert res["models"]["sft"]["nll_n"] == res["validation"]["sft"]["nll_n"] == 2
    dcfg = demo_run_config(DemoConfig(run_dir=str(root)), root / "task" / "train.jsonl").data  # the demo's rendering
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"))
    cols, _ = data_mod.tokenize_records(tok, data_mod.load_records(dcfg, str(root / "task" / "test.jsonl")), dcfg)
    sums, counts = response_nll(load_trained(Path(res["stages"]["sft"])), cols["input_ids"], cols["response_mask"],
                                16, False, tok.pad_token_id)
    assert counts[2:].sum() > 0 and res["models"]["sft"]["gold_nll"] == pytest.approx(sums[:2].sum() / counts[:2].sum(), rel=1e-6)
    det = res["detection_methods"]["sim_ignore_r1_p0.5"]
    assert det["recall"] == 1.0 and det["precision"] == pytest.approx(0.5, abs=0.05)
    tokens = datasets.load_from_disk(str(root / "sim_r1_p0.5" / "data" / "tokens"))
    classes = datasets.load_from_disk(str(root / "sim_r1_p0.5" / "partition" / "classes"))["token_class"]
    bad = sum(sum(c) for c in tokens["corrupt"])
    negatives = sum(c.count(-1) for c in classes)
    assert negatives == bad + bad  # round(bad / 0.5) - bad right tokens beside the bad ones
    assert not (root / "trusted" / "reference").exists()  # random false positives: no reference trained
    capsys.readouterr()
    assert main([*args[:-1], "[sft, sim_ignore, sim_forget]"]) == 0
    out = capsys.readouterr().out
    assert "[held-out-test-train-sft] up to date" in out and "[held-out-val-train-sft] up to date" in out
    assert "[evaluate] sft: generating" not in out and "[evaluate] sim_forget_r1_p0.5: generating" in out
    assert (root / "sim_r1_p0.5" / "train-forget" / "stage.json").is_file()


def test_demo_contrastive_detector_with_two_references(tmp_path: Path, tiny_model_dir: Path, capsys):
    """`contrastive`: the trusted reference copied from the trusted run, two noisy references cross-fitted on the
    training answers; the scoring pass stores both CEs, the score is CE_noisy - CE_trusted pooled over numbers
    (every digit of a number shares one score, at most its tokens' own); its negatives are the tokens below -1 nat.
    `contrastive_mixture` copies that scoring pass and its references (none trained again) and records the
    mixture's share. `contrastive_plus_trusted` adopts that detector (no reference trained again, the same classes)
    and trains on the 24 noisy answers and the 8 trusted ones."""
    import datasets

    from tokenforget.stages.score import token_kinds

    root = tmp_path / "demo"
    assert main(["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
                 "--n_train", "24", "--n_test", "4", "--n_trusted", "8", "--max_new_tokens", "4", "--detectors", "[]",
                 "--settings", "[contrastive, contrastive_mixture, contrastive_plus_trusted]"]) == 0
    res = json.loads((root / "demo_results.json").read_text())
    assert list(res["models"]) == ["contrastive", "contrastive_mixture", "contrastive_plus_trusted"]
    assert {"contrastive", "contrastive_mixture"} <= set(res["detection_methods"])
    run = root / "contrastive"
    assert json.loads((run / "reference" / "stage.json").read_text()) == json.loads(
        (root / "trusted" / "reference" / "stage.json").read_text())
    assert json.loads((run / "reference-noisy" / "folds.json").read_text())["trained_on"][0]  # 2 folds, trained
    scores = datasets.load_from_disk(str(run / "scores" / "scores"))
    tokens = datasets.load_from_disk(str(run / "data" / "tokens"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for ids, mask, ref, noisy, score in zip(tokens["input_ids"], tokens["response_mask"], scores["ce_ref"],
                                            scores["ce_noisy"], scores["score"]):
        resp = np.flatnonzero(mask)
        own = np.asarray(noisy)[resp] - np.asarray(ref)[resp]
        got = np.asarray(score)[resp]
        digit, _ = token_kinds(tok, np.asarray(ids)[resp])
        assert np.allclose(got[~digit], own[~digit], atol=1e-5) and np.all(got[digit] <= own[digit] + 1e-5)
    below = sum(int((np.asarray(sc)[np.flatnonzero(m)] < -1.0).sum()) for sc, m in zip(scores["score"], tokens["response_mask"]))
    assert json.loads((run / "partition" / "stats.json").read_text())["n_negative"] == below
    mixture = root / "contrastive_mixture"
    log = capsys.readouterr().out
    assert f"[reference-noisy] copied from {run / 'reference-noisy'}" in log
    assert log.count("[reference-noisy] done in") == 1  # trained once, for `contrastive`; copied with its scores
    assert log.count("[reference] done in") == 1  # the trusted one
    plus = root / "contrastive_plus_trusted"
    assert datasets.load_from_disk(str(plus / "partition" / "classes"))["token_class"] == datasets.load_from_disk(
        str(run / "partition" / "classes"))["token_class"]
    assert log.count("[train-ignore] training on 24 examples") == 2 and "[train-ignore] training on 32 examples" in log
    assert json.loads((mixture / "scores" / "stage.json").read_text()) == json.loads((run / "scores" / "stage.json").read_text())
    stats = json.loads((mixture / "partition" / "stats.json").read_text())
    assert 0.0 <= stats["estimated_negative_share"] <= 1.0
    assert stats["n_negative"] == int(np.floor(stats["estimated_negative_share"] * stats["n_tokens"] + 0.5))


def test_demo_held_out_splits_share_no_problem_with_training(tmp_path: Path):
    """The small number ranges repeat problems; test and validation hold distinct problems, none a training one."""
    from tokenforget.command_config import DemoConfig
    from tokenforget.commands.demo import write_task

    write_task(DemoConfig(run_dir=str(tmp_path), seed=1, n_test=240, n_val=240), tmp_path)
    read = lambda n: [json.loads(x)["prompt"] for x in (tmp_path / "task" / f"{n}.jsonl").read_text().splitlines()]  # noqa: E731
    train, test, val = read("train"), set(read("test")), set(read("val"))
    assert len(test) == 240 and len(val) == 240 and not (test & val) and not (set(train) & (test | val))


def test_python_m_entry_point():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-m", "tokenforget", "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "demo" in out.stdout and "partition" in out.stdout


def test_streaming_partition_in_the_pipeline(config: Path):
    """Blocks of 5 examples: every token positive in the exact partition is positive in the streaming one,
    and the stats report the rho actually achieved (>= the target by at most one histogram bin)."""
    import datasets
    import numpy as np

    run = config.parent / "run"
    assert main(["partition", str(config)]) == 0
    exact = datasets.load_from_disk(str(run / "partition" / "classes"))["token_class"]
    assert main(["partition", str(config), "--partition.streaming", "true", "--partition.stream_rows", "5"]) == 0
    streamed = datasets.load_from_disk(str(run / "partition" / "classes"))["token_class"]
    stats = json.loads((run / "partition" / "stats.json").read_text())
    assert 0.7 <= stats["achieved_rho"] < 0.72
    e, s = np.concatenate(exact), np.concatenate(streamed)
    assert np.all(s[e == 1] == 1) and np.array_equal(e == 0, s == 0)


def test_the_readme_quickstart_runs_as_written(tmp_path: Path, tiny_model_dir: Path, monkeypatch, capsys):
    """Every line of the README's quickstart, in order, in an empty folder; only the model is the tiny one."""
    import shlex

    from conftest import readme_block

    monkeypatch.chdir(tmp_path)
    src = Path(__file__).parents[1] / "src"
    for line in readme_block("make_examples(40").strip().splitlines():
        if line.startswith("python "):  # writes my.jsonl
            env = {**os.environ, "PYTHONPATH": str(src)}
            subprocess.run(line.replace("python ", f"{sys.executable} ", 1), shell=True, check=True, env=env)
            continue
        args = [str(tiny_model_dir) if a == "smollm2" else a for a in shlex.split(line, comments=True)]
        assert args[0] == "tokenforget" and main(args[1:]) == 0, line
    assert len(Path("my.jsonl").read_text().splitlines()) == 40
    run = Path("runs/my-run")
    assert (run / "train-forget" / "stage.json").is_file() and (run / "train-sft" / "stage.json").is_file()
    assert (run / "report" / "report.html").is_file()


def test_demo_trains_on_a_weak_models_answers(tmp_path: Path):
    """`noise_kind: weak`: the weak folder's noisy answers are the training set, its gold answers the clean twin, its
    right answers `correct_only`; the held-out problems exclude its problems. A missing folder is one clear error."""
    from tokenforget.command_config import DemoConfig
    from tokenforget.config import ConfigError
    from tokenforget.stages.labels_in_data import DataError
    from tokenforget.commands.demo import write_task
    from tokenforget.stages.demo_task import make_task, write_jsonl

    noisy, gold = make_task(12, seed=2, noise=0.4)
    weak = tmp_path / "weak"
    write_jsonl(noisy, weak / "noisy.jsonl")
    write_jsonl(gold, weak / "gold.jsonl")
    write_task(DemoConfig(run_dir=str(tmp_path), noise_kind="weak", weak_dir=str(weak), n_test=20), tmp_path)
    read = lambda n: [json.loads(x) for x in (tmp_path / "task" / f"{n}.jsonl").read_text().splitlines()]  # noqa: E731
    assert read("train") == noisy and read("clean") == gold
    assert read("correct_only") == [r for r in noisy if not r["corrupt_spans"]] and len(read("correct_only")) < 12
    assert not {r["prompt"] for r in read("test")} & {r["prompt"] for r in noisy}
    with pytest.raises(ConfigError, match="weak_dir"):
        DemoConfig(noise_kind="weak")
    with pytest.raises(DataError, match="tokenforget weak"):
        write_task(DemoConfig(run_dir=str(tmp_path), noise_kind="weak", weak_dir=str(tmp_path / "none")), tmp_path)
