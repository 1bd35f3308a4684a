"""`tokenforget audit`: suspicion measures and worst spans by hand; the command end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import labelled_config

from tokenforget.cli import main
from tokenforget.commands.audit import audit_examples, disagreement, sample_auroc, suspicion_measures, worst_spans
from tokenforget.report.html import build_report, marked


def test_worst_span_is_the_highest_window_mean_within_each_example():
    """ce_ref [1, 2, 3 | 5, 1]. Width 2: example 0 windows 1.5, 2.5 -> 2.5 starting at flat index 1; example 1
    window 3.0 at index 3. Width 8 (longer than both): the whole response, 2.0 at 0 and 3.0 at 3."""
    ce, ex = np.array([1.0, 2.0, 3.0, 5.0, 1.0]), np.array([0, 0, 0, 1, 1])
    best, start = worst_spans(ce, ex, 2, width=2)
    assert best.tolist() == [2.5, 3.0] and start.tolist() == [1, 3]
    best, start = worst_spans(ce, ex, 2, width=8)
    assert best.tolist() == [2.0, 3.0] and start.tolist() == [0, 3]


def test_suspicion_measures_by_hand():
    """Example 0: ce_base [2, 2], ce_ref [1, 3]; example 1: ce_base [1], ce_ref [0].
    ref_loss 2.0, 0.0; base_loss 2.0, 1.0; paper -mean(base - ref) = -0.0, -1.0;
    confidence 1 - (e^-1 + e^-3)/2 = 1 - (0.367879 + 0.049787)/2 = 0.791167, 1 - e^0 = 0."""
    m = suspicion_measures(np.array([2.0, 2.0, 1.0]), np.array([1.0, 3.0, 0.0]), np.array([0, 0, 1]), 2)
    assert m["ref_loss"].tolist() == [2.0, 0.0] and m["base_loss"].tolist() == [2.0, 1.0]
    assert m["paper"].tolist() == [0.0, -1.0]
    assert m["confidence"][0] == pytest.approx(0.791167, abs=1e-6) and m["confidence"][1] == 0.0


def test_disagreement_by_hand():
    """Prompt a: answers 5, 5, 7 -> the 5s disagree with 1 of 2 others (0.5), the 7 with 2 of 2 (1.0); prompt b:
    '1000' and '1000.0' are the same number (0, 0); prompt c has one response (0); a missing answer matches
    nothing (prompt d: 1.0 each)."""
    got = disagreement(["a", "a", "a", "b", "b", "c", "d", "d"], ["5", "5", "7", "1000", "1000.0", "3", None, "4"])
    assert got.tolist() == [0.5, 0.5, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_auto_ranks_by_agreement_where_prompts_repeat_else_by_reference_loss():
    """Three examples of 4 tokens, the last 2 the response; the response's last token is its answer. Mean CE_ref
    1.0, 0.5, 2.0. Prompts (1, 2), (1, 2), (9, 9): answers 4 and 5 disagree, so `auto` ranks by agreement (1, 1, 0:
    examples 0, 1, 2); with every prompt different it ranks by ref_loss (examples 2, 0, 1)."""
    ce_ref = np.array([1.0, 1.0, 0.5, 0.5, 2.0, 2.0])
    arrays = {"ce_ref": ce_ref, "ce_base": ce_ref + 1, "example": np.repeat(np.arange(3), 2),
              "where": np.array([2, 3, 6, 7, 10, 11]), "offsets": np.array([0, 4, 8, 12])}
    masks = [[0, 0, 1, 1]] * 3
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    repeated = audit_examples(arrays, None, decode, [[1, 2, 3, 4], [1, 2, 3, 5], [9, 9, 3, 4]], masks)
    assert repeated.measure == "agreement" and [r["example"] for r in repeated.rows] == [0, 1, 2]
    assert [r["agreement"] for r in repeated.rows] == [1.0, 1.0, 0.0]
    distinct = audit_examples(arrays, None, decode, [[1, 2, 3, 4], [7, 7, 3, 5], [9, 9, 3, 4]], masks)
    assert distinct.measure == "ref_loss" and [r["example"] for r in distinct.rows] == [2, 0, 1]


def test_sample_auroc_against_labels_ignores_unlabelled():
    """Labels [wrong, right, right, unlabelled]. 'up': the wrong one is the most suspicious -> 1.0; 'down': the
    least -> 0.0; 'tie': tied with one right example, above the other -> (0.5 + 1) / 2 = 0.75."""
    labels = np.array([0, 1, 1, -1])
    measures = {"up": np.array([0.9, 0.1, 0.5, 9.0]), "down": np.array([0.1, 0.9, 0.5, -9.0]),
                "tie": np.array([0.5, 0.5, 0.1, 0.0])}
    assert sample_auroc(measures, labels) == {"up": 1.0, "down": 0.0, "tie": 0.75}


def test_audit_command_writes_a_ranked_table(tmp_path: Path, tiny_model_dir: Path, capsys):
    cfg = labelled_config(tmp_path, tiny_model_dir)
    assert main(["audit", str(cfg), "--audit.measure", "ref_loss"]) == 0
    out = tmp_path / "run" / "audit"
    rows = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in rows] == list(range(8)) and sorted(r["example"] for r in rows) == list(range(8))
    sus = [r["suspicion"] for r in rows]
    assert sus == sorted(sus, reverse=True) and sus == [r["ref_loss"] for r in rows]
    assert sorted(r["example"] for r in rows if r["is_correct"] == 0) == [1, 4, 6]
    assert pq.read_table(out / "audit.parquet").num_rows == 8
    summary = json.loads((out / "audit.json").read_text())
    assert summary["n_labelled"] == 8 and set(summary["auroc"]) == {"ref_loss", "base_loss", "paper", "confidence", "worst_span", "agreement"}
    assert "Sample-level AUROC against is_correct (8 labelled examples" in capsys.readouterr().out
    page = build_report(tmp_path / "run").read_text()  # the report's audit section: the same ranking
    section = page[page.index('<section id="audit">'):]
    section = section[:section.index("</section>")]
    assert "Sample-level AUROC against is_correct" in section and section.count("<li>") == 8
    assert f"#1 · example {rows[0]['example']} · " in section and "#2 · example " + str(rows[1]["example"]) in section
    assert section.count("<mark>") == 8  # every example's worst span found in its response and marked
    # a score method that reads CE_ref only still gets the base model's measures: the audit asks for CE_base
    assert main(["audit", str(cfg), "--score.method", "ref_loss", "--run_dir", str(tmp_path / "rl")]) == 0
    ce_base = datasets.load_from_disk(str(tmp_path / "rl" / "scores" / "scores"))["ce_base"]
    assert np.isfinite(np.concatenate(ce_base)).all()


def test_marked_escapes_and_marks_the_first_occurrence():
    assert marked("a < 5 = 7, 5 = 7", " 5 = 7 ") == "a &lt; <mark>5 = 7</mark>, 5 = 7"
    assert marked("no span here", "absent") == "no span here"
    assert marked("x", "  ") == "x"


def test_audit_writes_a_marked_file_that_trains_as_written(tmp_path: Path, tiny_model_dir: Path, capsys):
    """`marked.jsonl`: the 8 input records in their own format and order, the 4 most suspicious (`audit.mark`
    0.5) with their worst span as `spans: [{start, end, weight: 0}]`, the characters of the worst span's tokens
    inside the answer. Trained as written with `partition.selection: data`, the no-loss tokens of each marked
    example are the worst span's tokens inside the answer: the first of them, and none outside [a, b)."""
    from tokenforget.training.objectives import NO_LOSS
    from tokenforget.pipeline.resolver import Run
    from tokenforget.cli import parse_config

    cfg = labelled_config(tmp_path, tiny_model_dir)
    assert main(["audit", str(cfg), "--audit.measure", "ref_loss", "--audit.mark", "0.5"]) == 0
    out = tmp_path / "run" / "audit"
    assert "Marked: 4 examples' worst spans as weight 0" in capsys.readouterr().out
    source = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    marked = [json.loads(line) for line in (out / "marked.jsonl").read_text().splitlines()]
    ranking = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    flagged = {r["example"]: r for r in ranking[:4]}  # rows = examples here: every record has a response
    assert [{k: v for k, v in m.items() if k != "spans"} for m in marked] == source
    assert sorted(i for i, m in enumerate(marked) if "spans" in m) == sorted(flagged)
    for i, row in flagged.items():
        (span,) = marked[i]["spans"]
        assert span["weight"] == 0 and span["start"] < span["end"] <= len(source[i]["completion"])
        text = source[i]["completion"][span["start"]:span["end"]]
        assert text.strip() and text.strip() in row["worst_span"]
    args = ["train", str(cfg), "--data.path", str(out / "marked.jsonl"), "--partition.selection", "data",
            "--run_dir", str(tmp_path / "fixed"), "--train.objective.mode", "ignore"]
    assert main(args) == 0
    run = Run(parse_config(args)[1])
    classes, response = run.partition()["token_class"], run.data()["response_mask"]
    for i in range(len(source)):
        no_loss = [t for t, (c, r) in enumerate(zip(classes[i], response[i])) if r and c == NO_LOSS]
        if i not in flagged:
            assert no_loss == []
            continue
        a, b = flagged[i]["span_tokens"]
        assert no_loss[0] == a and all(a <= t < b for t in no_loss)
    assert (tmp_path / "fixed" / "train-ignore" / "stage.json").is_file()
