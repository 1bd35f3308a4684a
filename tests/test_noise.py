"""Corrupting GSM8K answers: one step's result gets one wrong digit, reproducibly by seed."""

import random

import pytest

from tokenforget.data import Record
from tokenforget.noise import corrupt_answer, corrupt_records, step_results, wrong_number

ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


def test_step_results_find_both_copies_and_skip_the_final_line():
    steps = step_results(ANSWER)
    assert [[ANSWER[s:e] for s, e in spans] for spans in steps] == [["24", "24"], ["72", "72"]]
    assert all(e <= ANSWER.index("####") for spans in steps for _, e in spans)
    plain = "She buys 3 * 4 = 12 apples.\nShe has 5 + 12 = 17 apples.\nThe answer is 17."
    assert [[plain[s:e] for s, e in sp] for sp in step_results(plain)] == [["12"], ["17"]]
    assert step_results("No steps here.\n#### 5") == []


def test_wrong_number_changes_one_digit_and_keeps_the_format():
    rng = random.Random(0)
    for right in ["24", "1,200", "0.2", "-15", "7", "100"]:
        for _ in range(50):
            wrong = wrong_number(right, rng)
            assert wrong != right and len(wrong) == len(right)
            assert sum(a != b for a, b in zip(wrong, right)) == 1  # one character changed...
            assert [c.isdigit() for c in wrong] == [c.isdigit() for c in right]  # ...a digit, for a digit
            digits = wrong.lstrip("-")
            assert not (digits[0] == "0" and len(digits.split(".")[0].replace(",", "")) > 1)  # no leading 0


def test_corrupt_answer_changes_one_step_consistently():
    text, spans = corrupt_answer(ANSWER, random.Random(3))
    values = {text[s:e] for s, e in spans}
    assert len(spans) == 2 and len(values) == 1  # both copies of the result, the same wrong number
    wrong = values.pop()
    assert wrong not in ("24", "72")
    assert text.endswith("#### 72")  # the final answer is left as it was
    assert sum(a != b for a, b in zip(text, ANSWER)) == 2 and len(text) == len(ANSWER)


def test_corrupt_records_fraction_and_seed():
    records = [Record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": ANSWER}], f"f:{i}") for i in range(10)]
    records.append(Record([{"role": "user", "content": "q"}, {"role": "assistant", "content": "no step\n#### 1"}], "f:10"))
    out, n = corrupt_records(records, 0.3, seed=7)
    changed = [i for i, (a, b) in enumerate(zip(records, out)) if a != b]
    assert n == 3 == len(changed)  # round(0.3 * 11) = 3, chosen among the 10 with a step
    for i in changed:
        content = out[i].messages[-1]["content"]
        assert out[i].corrupt_spans and all(content[s:e] != ANSWER[s:e] for s, e in out[i].corrupt_spans)
    again, _ = corrupt_records(records, 0.3, seed=7)
    assert again == out
    other, _ = corrupt_records(records, 0.3, seed=8)
    assert other != out
    assert corrupt_records(records, 1.0, seed=0)[1] == 10  # all that can be corrupted


def test_corrupted_tokens_reach_the_corrupt_mask(tiny_tokenizer):
    from tokenforget.config import DataConfig
    from tokenforget.data import tokenize_records

    rec = Record([{"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER}], "f:0")
    (bad,), _ = corrupt_records([rec], 1.0, seed=1)
    cols, _ = tokenize_records(tiny_tokenizer, [bad], DataConfig())
    ids, corrupt = cols["input_ids"][0], cols["corrupt"][0]
    marked = tiny_tokenizer.decode([t for t, c in zip(ids, corrupt) if c])
    wrong = bad.messages[-1]["content"][slice(*bad.corrupt_spans[0])]
    assert wrong in marked and sum(corrupt) >= 2
