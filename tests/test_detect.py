"""`tokenforget detect` end to end on the tiny model; trusted set disjointness; checkpoint and precomputed
references; the method changing without a new scoring pass."""

from __future__ import annotations

import json
from pathlib import Path

from dataclasses import asdict

import datasets
import numpy as np
import pytest
from conftest import tiny_run_config, write_config, write_jsonl

from tokenforget.cli import main
from tokenforget.stages.demo_task import make_examples
from tokenforget.commands.detect import measure
from tokenforget.stages.score import response_arrays
from tokenforget.score_methods import NEEDS_NOISY, SCORE_METHODS


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """30 records: the first 20 are scored, the next 6 are the trusted split."""
    cfg = tiny_run_config(tmp_path, tiny_model_dir, n_examples=30, noise=0.0, run_dir=str(tmp_path / "detect"),
                          data={"limit": 20}, detect={"fraction": 0.2, "trusted_size": 6}, report_to=["none"])
    return write_config(tmp_path, cfg)


def test_detect_every_kind_reference_and_method(config: Path, capsys):
    root = config.parent / "detect"
    assert main(["detect", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Detection of known corrupted tokens" in out and "recall can reach 1" in out
    res = json.loads((root / "detection.json").read_text())
    kinds, refs = ["number", "recurring", "wrong_prompt"], ["slice", "trusted"]
    assert [(r["kind"], r["reference"], r["method"]) for r in res["rows"]] == [
        (k, ref, m) for k in kinds for ref in refs for m in SCORE_METHODS if m not in NEEDS_NOISY
    ]
    # each row is `measure` over the scoring pass its folder holds (the figures themselves: test below, by hand)
    tokens = datasets.load_from_disk(str(root / "number-trusted" / "data" / "tokens"))
    scores = datasets.load_from_disk(str(root / "number-trusted" / "scores" / "scores"))
    arrays = response_arrays(tokens, scores)
    want = measure(arrays, list(SCORE_METHODS)[:3], res["rho"], "number", "trusted")
    got = {r["method"]: r for r in res["rows"] if (r["kind"], r["reference"]) == ("number", "trusted")}
    for row in want:
        figures = {k: v for k, v in asdict(row).items() if k not in ("kind", "reference", "method")}
        assert {k: got[row.method][k] for k in figures} == pytest.approx(figures, nan_ok=True), row.method
    assert all(r["n_corrupt"] > 0 for r in res["rows"])
    # one trusted reference, trained once on the 6 records after the 20 scored ones, reused as a checkpoint
    trusted = [json.loads(line) for line in (root / "trusted.jsonl").read_text().splitlines()]
    scored = [json.loads(line) for line in Path(res["data"]).read_text().splitlines()][:20]
    assert len(trusted) == 6 and not {t["prompt"] for t in trusted} & {s["prompt"] for s in scored}
    assert (root / "number-trusted" / "reference" / "stage.json").is_file()
    assert not (root / "recurring-trusted" / "reference").exists()
    # rerun: every scoring pass reused
    assert main(["detect", str(config)]) == 0
    assert "[scores] up to date" in capsys.readouterr().out
    again = json.loads((root / "detection.json").read_text())
    assert again["rows"] == res["rows"]


def test_detection_figures_worked_by_hand_on_six_tokens():
    """CE_ref [0.1, 2.0, 0.3, 1.5, 0.2, 0.4], tokens 1 and 5 corrupted, `ref_loss` (score = -CE_ref), rho 0.6:
    4 of 6 positive (round(3.6)), so the negatives are the two lowest scores, tokens 1 (-2.0) and 3 (-1.5).
    recall = 1/2 (token 1 found, 5 missed), precision = 1/2 (token 3 is clean). AUROC = P(corrupt score < clean
    score): -2.0 is below all 4 clean scores, -0.4 below 3 of them (-0.1, -0.3, -0.2, not -1.5): 7/8.
    Mean scores: corrupt (-2.0 - 0.4) / 2 = -1.2, clean (-0.1 - 0.3 - 1.5 - 0.2) / 4 = -0.525."""
    ce_ref = np.array([0.1, 2.0, 0.3, 1.5, 0.2, 0.4])
    arrays = {"ce_base": np.zeros(6), "ce_ref": ce_ref, "token_id": np.arange(6), "example": np.zeros(6, dtype=int),
              "corrupt": np.array([0, 1, 0, 0, 0, 1], dtype=bool)}
    (row,) = measure(arrays, ["ref_loss"], 0.6, "number", "trusted")
    assert (row.recall, row.precision, row.auroc) == (0.5, 0.5, 0.875)
    # the method's scores are float32, as the scores stage stores them: the means agree to float32's rounding
    assert (row.mean_corrupt, row.mean_clean) == pytest.approx((-1.2, -0.525), rel=float(np.finfo(np.float32).eps))
    assert (row.corrupt_share, row.n_corrupt, row.n_tokens) == (pytest.approx(2 / 6), 2, 6)


def test_trusted_file_sharing_a_prompt_is_refused(config: Path, tmp_path: Path, capsys):
    leaked = write_jsonl(tmp_path / "trusted.jsonl", make_examples(30, seed=0, noise=0.0)[18:24])  # 18, 19 are scored
    args = ["reference", str(config), "--reference.path", str(leaked)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "reference.path" in err and "trusted.jsonl:1" in err and "disjoint" in err


def test_method_change_reuses_the_scoring_pass(config: Path, capsys):
    import datasets

    root = config.parent / "detect"
    args = ["score", str(config), "--run_dir", str(root / "run")]
    assert main(args) == 0
    paper = datasets.load_from_disk(str(root / "run" / "scores" / "scores"))
    capsys.readouterr()
    assert main([*args, "--score.method", "ref_loss"]) == 0
    out = capsys.readouterr().out
    assert "rescoring without a forward pass" in out
    ref = datasets.load_from_disk(str(root / "run" / "scores" / "scores"))
    resp = np.concatenate(datasets.load_from_disk(str(root / "run" / "data" / "tokens"))["response_mask"]).astype(bool)
    ce_ref = np.concatenate(ref["ce_ref"])
    assert np.array_equal(np.concatenate(paper["ce_ref"]), ce_ref)
    assert np.allclose(np.concatenate(ref["score"])[resp], -ce_ref[resp])


def test_a_reference_loss_method_scores_without_the_base_model(config: Path, capsys):
    """`ref_loss` reads CE_ref only: its pass skips the base model (CE_base NaN); `paper` then needs a pass of
    its own (the same CE_ref), and `ref_loss` again is rescored from that full pass without a forward pass."""
    import datasets

    run = config.parent / "detect" / "run"
    args = ["score", str(config), "--run_dir", str(run), "--score.method", "ref_loss"]
    assert main(args) == 0
    alone = datasets.load_from_disk(str(run / "scores" / "scores"))
    assert np.isnan(np.concatenate(alone["ce_base"])).all()
    ref_only_pass = json.loads((run / "scores" / "stage.json").read_text())["raw_fingerprint"]
    capsys.readouterr()
    assert main([*args[:-1], "paper"]) == 0
    assert "rescoring without a forward pass" not in capsys.readouterr().out
    full = datasets.load_from_disk(str(run / "scores" / "scores"))
    assert np.isfinite(np.concatenate(full["ce_base"])).all()
    assert np.array_equal(np.concatenate(full["ce_ref"]), np.concatenate(alone["ce_ref"]))
    assert json.loads((run / "scores" / "stage.json").read_text())["raw_fingerprint"] != ref_only_pass
    assert main(args) == 0
    assert "rescoring without a forward pass" in capsys.readouterr().out
    again = datasets.load_from_disk(str(run / "scores" / "scores"))
    assert np.array_equal(np.concatenate(again["ce_base"]), np.concatenate(full["ce_base"]))
    assert main([*args, "--score.base_pass", "true"]) == 0  # asked for: the full pass is there already
    assert "rescoring without a forward pass" in capsys.readouterr().out


def test_checkpoint_and_precomputed_scores(config: Path, capsys):
    """A finished reference stage as `reference.checkpoint` gives the same CE as training it; its labels file
    as `score.precomputed_path` gives the same scores; a file of other data is refused with its row."""
    import datasets

    root = config.parent / "detect"
    assert main(["partition", str(config), "--run_dir", str(root / "a")]) == 0
    a = datasets.load_from_disk(str(root / "a" / "scores" / "scores"))
    assert main(["score", str(config), "--run_dir", str(root / "b"), "--reference.checkpoint", str(root / "a" / "reference")]) == 0
    b = datasets.load_from_disk(str(root / "b" / "scores" / "scores"))
    assert not (root / "b" / "reference").exists()
    assert np.allclose(np.concatenate(a["ce_ref"]), np.concatenate(b["ce_ref"]), atol=1e-5)
    labels = root / "a" / "labels" / "labels.parquet"
    assert main(["score", str(config), "--run_dir", str(root / "c"), "--score.precomputed_path", str(labels)]) == 0
    c = datasets.load_from_disk(str(root / "c" / "scores" / "scores"))
    assert np.array_equal(np.concatenate(a["score"]), np.concatenate(c["score"]))
    capsys.readouterr()
    assert main(["score", str(config), "--run_dir", str(root / "d"), "--score.precomputed_path", str(labels), "--data.limit", "19"]) == 2
    assert "labels.parquet: 20 rows, but the data has 19" in capsys.readouterr().err
