"""The weaker model's natural noise: grading written answers step by step, the mix, and `tokenforget weak`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tokenforget.stages.weak import Grade, RowSeededSampler, choose_mix, grade, sample_seed

GOLD = "She buys 3 * 4 = 12 apples.\nShe then has 5 + 12 = 17 apples.\nThe answer is 17."


def test_grade_marks_the_first_wrong_number_and_what_follows():
    """Written answers against GOLD (numbers 3 4 12 5 12 17 17):
    - the same numbers, other words: right, nothing marked;
    - '3 * 4 = 14': the 3rd number differs, at offset 17 ('She buys 3 * 4 = ' is 17 characters); everything from
      there is the noise, the steps after it too;
    - the total wrong only (5 + 12 = 18): at the 6th number;
    - a step left out, cut after the first: fewer numbers and none differs: incomplete, not kept;
    - an extra step after a right answer: wrong at the first extra number."""
    right = "She buys 3 * 4 = 12 apples.\nSo she has 5 + 12 = 17 apples.\nThe answer is 17."
    assert grade(right, GOLD) == Grade(True, None, True) and grade(right, GOLD).spans(right) == []
    bad = "She buys 3 * 4 = 14 apples.\nShe then has 5 + 14 = 19 apples.\nThe answer is 19."
    g = grade(bad, GOLD)
    assert g == Grade(False, 17, True) and bad[17:19] == "14" and g.spans(bad) == [[17, len(bad)]]
    total = "She buys 3 * 4 = 12 apples.\nShe then has 5 + 12 = 18 apples.\nThe answer is 18."
    at = total.index("18")
    assert grade(total, GOLD) == Grade(False, at, True) and at == 50
    assert grade("She buys 3 * 4 = 12 apples.", GOLD) == Grade(False, None, False)
    extra = GOLD + " Then 17 + 1 = 18."
    assert grade(extra, GOLD) == Grade(False, len(GOLD) + 6, True)


def test_choose_mix_keeps_the_target_share_of_wrong_answers():
    """Six problems: p0 only wrong (W), p1 wrong then right (B), p2 right (R), p3 right then wrong (B), p4 only an
    incomplete answer (dropped), p5 right (R). At target 0.5: W can all stay (1 <= 0.5 x 4 / 0.5 = 4), n = 5,
    k = round(2.5) = 3: p0 and both B problems take their wrong sample (p1's first, p3's second): 3 of 5 wrong.
    At 0.4: k = round(2.0) = 2: p0 and one seeded B problem. At 0.2: w_max = floor(0.2 x 4 / 0.8) = 1, k = 1: p0 only."""
    W, R, X = Grade(False, 0, True), Grade(True, None, True), Grade(False, None, False)
    grades = [[W], [W, R], [R], [R, W], [X], [R]]
    assert choose_mix(grades, 0.5, seed=0) == [0, 0, 0, 1, None, 0]
    at_04 = choose_mix(grades, 0.4, seed=0)
    wrong = [i for i, c in enumerate(at_04) if c is not None and not grades[i][c].correct]
    assert len(wrong) == 2 and wrong[0] == 0 and at_04[4] is None
    assert choose_mix(grades, 0.4, seed=0) == at_04  # seeded
    at_02 = choose_mix(grades, 0.2, seed=0)
    assert [i for i, c in enumerate(at_02) if c is not None and not grades[i][c].correct] == [0]
    # more wrong-only problems than the target allows: some are dropped
    many = [[W]] * 4 + [[R]] * 2
    kept = choose_mix(many, 0.5, seed=1)
    assert sum(c is not None for c in kept[:4]) == 2 and kept[4:] == [0, 0]


def test_row_seeded_sampler_draws_each_row_from_its_own_seed():
    """The same seed gives the same draws whatever the batch's other rows; only the drawn token is left (0 logit)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    a = RowSeededSampler([sample_seed(0, 0, 0), 5, 6], 0.8)
    b = RowSeededSampler([sample_seed(0, 0, 0), 7, 8], 0.8)
    for _ in range(4):
        xa, xb = a(None, logits), b(None, logits)  # type: ignore[arg-type]
        assert torch.equal(xa[0], xb[0]) and (torch.isfinite(xa) == (xa == 0)).all()
        assert torch.isfinite(xa).sum(dim=1).tolist() == [1, 1, 1]
    assert sample_seed(0, 1, 0) != sample_seed(0, 0, 1)


def test_weak_command_on_a_tiny_model_that_answers_nothing_right(tmp_path: Path, tiny_model_dir: Path, capsys):
    """`tokenforget weak` end to end: the weak SFT, sampling, grading. The random tiny model answers nothing right,
    so no mix exists: exit 2, one line saying what to change, and no set written."""
    from tokenforget.cli import main

    out = tmp_path / "weak"
    assert main(["weak", "--out_dir", str(out), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
                 "--n_train", "6", "--n_sft", "8", "--samples", "2", "--max_new_tokens", "8"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "none of the weak model's 12 sampled answers is right" in err[0] and "--n_sft" in err[0]
    assert not (out / "noisy.jsonl").exists() and not (out / "manifest.json").exists()
    sft = {json.loads(x)["prompt"] for x in (out / "weak-sft.jsonl").read_text().splitlines()}
    from tokenforget.stages.demo_task import make_task

    assert len(sft) == 8 and not sft & {r["prompt"] for r in make_task(6, 0, 0.0)[1]}  # no SFT problem a training one


def test_weak_sets_from_graded_answers(tmp_path: Path):
    """The sets from hand-made answers to 4 generated problems: problem 0 answered right, 1 with its first result
    off by one (wrong from there), 2 right and wrong (the mix picks), 3 cut short (incomplete: dropped). At 50% wrong:
    3 kept, round(1.5) = 2 wrong (1, and 2's wrong sample); noisy's spans are each answer's first error onwards;
    correct_only its right answers; gold the generator's answers to the same problems."""
    import re

    from tokenforget.command_config import WeakConfig
    from tokenforget.stages.demo_task import make_task
    from tokenforget.commands.weak import write_sets
    from tokenforget.stages.weak import choose_mix, grade

    gold = make_task(4, 3, 0.0)[1]
    first = lambda t: re.search(r"= (\d+)", t)  # noqa: E731  (the first step's result)
    def off(t: str) -> str:
        m = first(t)
        return t[: m.start(1)] + str(int(m.group(1)) + 1) + t[m.end(1):]
    answers = [[gold[0]["completion"]], [off(gold[1]["completion"])], [gold[2]["completion"], off(gold[2]["completion"])],
               [gold[3]["completion"].split("=")[0]]]
    answers = [row + [row[0]] * (2 - len(row)) for row in answers]  # 2 samples a problem
    grades = [[grade(a, g["completion"]) for a in row] for row, g in zip(answers, gold)]
    assert [[(g.complete, g.correct) for g in gs] for gs in grades] == [
        [(True, True)] * 2, [(True, False)] * 2, [(True, True), (True, False)], [(False, False)] * 2]
    choice = choose_mix(grades, 0.5, seed=0)
    assert choice == [0, 0, 1, None]
    manifest = write_sets(WeakConfig(out_dir=str(tmp_path)), tmp_path, gold, answers, grades, choice, 0.0)
    read = lambda n: [json.loads(x) for x in (tmp_path / f"{n}.jsonl").read_text().splitlines()]  # noqa: E731
    noisy = read("noisy")
    # the wrong answers' first result is off by one but their final answer is the gold one: the outcome verdict
    # (is_correct) says right, the process grade wrong: every kept answer is right by outcome, 2 disagree; rft holds
    # every distinct outcome-right sample (problem 0: 1, problem 1: 1, problem 2: 2), rft_process the process-right
    # ones (problem 0 and problem 2's right one)
    assert manifest["counts"] == {"noisy": 3, "correct_only": 3, "rft": 4, "rft_process": 2, "gold": 3}
    assert [(r["is_correct"], r["process_correct"]) for r in noisy] == [(True, True), (True, False), (True, False)]
    assert manifest["verdicts_disagree"] == 2 and manifest["wrong_share"] == 0.0
    assert manifest["process_wrong_share"] == 2 / 3
    assert [r["completion"] for r in read("rft_process")] == [answers[0][0], answers[2][0]]
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in read("gold")] == [gold[i]["prompt"] for i in (0, 1, 2)]
    assert noisy[0]["corrupt_spans"] == [] and read("correct_only") == noisy
    for r in noisy[1:]:  # wrong from the first result's first character to the end
        start = first(r["completion"]).start(1)
        assert r["corrupt_spans"] == [[start, len(r["completion"])]]


def test_outcome_verdict_reads_the_final_answer_only():
    """The verdict users have: "3 * 4 = 12" in place of the gold's "4 * 3 = 12" is right when the final answer is;
    a right computation with a wrong final answer is wrong; an answer without any number is wrong."""
    from tokenforget.commands.weak import outcome_correct

    assert outcome_correct("She buys 3 * 4 = 12 apples.\nThe answer is 12.", "12")
    assert not outcome_correct("She buys 4 * 3 = 12 apples.\nThe answer is 13.", "12")
    assert not outcome_correct("She buys apples.", "12")
