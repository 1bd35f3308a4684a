"""Corrupting GSM8K answers: one step's result gets one wrong digit, reproducibly by seed."""

import random

import pytest

from tokenforget.stages.labels_in_data import Record
from tokenforget.stages.noise import (
    corrupt_answer,
    corrupt_records,
    inject_noise,
    insert_sentence,
    nearby_number,
    off_by_one,
    one_more,
    set_number,
    step_results,
    wrong_number,
)

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
    from tokenforget.stages.data import tokenize_records

    rec = Record([{"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER}], "f:0")
    (bad,), _ = corrupt_records([rec], 1.0, seed=1)
    cols, _ = tokenize_records(tiny_tokenizer, [bad], DataConfig())
    ids, corrupt = cols["input_ids"][0], cols["corrupt"][0]
    marked = tiny_tokenizer.decode([t for t, c in zip(ids, corrupt) if c])
    wrong = bad.messages[-1]["content"][slice(*bad.corrupt_spans[0])]
    assert wrong in marked and sum(corrupt) >= 2


# ---------------------------------------------------------------- the detection benchmark's noise kinds


def marked_tokens(tokenizer, record: Record) -> list[str]:
    """The token strings the corrupt mask marks, in order."""
    from tokenforget.config import DataConfig
    from tokenforget.stages.data import tokenize_records

    cols, _ = tokenize_records(tokenizer, [record], DataConfig())
    return [tokenizer.decode([t]) for t, c in zip(cols["input_ids"][0], cols["corrupt"][0]) if c]


def qa(answer: str, spans=()) -> Record:
    return Record([{"role": "user", "content": "How many?"}, {"role": "assistant", "content": answer}], "f:1", tuple(spans))


def test_nearby_number_is_close_and_keeps_the_format():
    rng = random.Random(0)
    for right, lo, hi in [("24", 19, 29), ("1,200", 960, 1440), ("0.25", 0.20, 0.30), ("7", 6, 8), ("1", 0, 2)]:
        for _ in range(30):
            wrong = nearby_number(right, rng)
            assert wrong != right and lo <= float(wrong.replace(",", "")) <= hi
            value = float(wrong.replace(",", ""))
            assert ("," in wrong) == ("," in right and value >= 1000) and wrong.count(".") == right.count(".")


def test_set_number_changes_every_copy_on_its_line_and_marks_only_changed_characters():
    """`<<48/2=24>>24` holds the result twice; 24 -> 25 changes only the second digit of each copy; the 24 on
    the next line is another step and stays."""
    text = "Half is 48/2 = <<48/2=24>>24.\nThen 24+1 = <<24+1=25>>25.\n#### 25"
    new, spans = set_number(text, text.index("24"), "25")
    assert new == "Half is 48/2 = <<48/2=25>>25.\nThen 24+1 = <<24+1=25>>25.\n#### 25"
    assert [new[s:e] for s, e in spans] == ["5", "5"] and spans == [(23, 24), (27, 28)]
    longer, spans = set_number("It costs 9 dollars.", 9, "11")
    assert longer == "It costs 11 dollars." and spans == [(9, 11)]


def test_number_change_marks_exactly_the_changed_tokens_even_when_it_splits_a_token(tiny_tokenizer):
    """The tiny BPE has a token ` 12` (from its corpus) but no ` 13`: 12 -> 13 splits it into ` `, `1`, `3`.
    Only `3` is marked: the space and the `1` did not change."""
    text = "She then has 12 apples."
    assert "12" in [tiny_tokenizer.decode([t]).strip() for t in tiny_tokenizer(text)["input_ids"]]
    new, spans = set_number(text, text.index("12"), "13")
    assert [tiny_tokenizer.decode([t]) for t in tiny_tokenizer(new)["input_ids"]][3:6] == [" ", "1", "3"]
    assert marked_tokens(tiny_tokenizer, qa(new, spans)) == ["3"]


def test_recurring_sentence_marks_the_sentence_and_nothing_else(tiny_tokenizer):
    """One sentence, no line break and no `. ` inside: the only boundary is the start."""
    new, spans = insert_sentence("She buys 12 apples.", "The answer is 5.", random.Random(0))
    assert new == "The answer is 5.\nShe buys 12 apples." and spans == [(0, 16)]
    assert "".join(marked_tokens(tiny_tokenizer, qa(new, spans))) == "The answer is 5."
    two_lines, spans = insert_sentence("A.\nB.", "C.", random.Random(2))
    assert two_lines in ("C.\nA.\nB.", "A.\nC.\nB.") and two_lines[slice(*spans[0])] == "C."


def test_wrong_prompt_moves_responses_and_marks_every_response_token(tiny_tokenizer):
    answers = ["She buys 12 apples.", "The change is 5 dollars.", "The answer is 24."]
    records = [Record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": a}], f"f:{i}") for i, a in enumerate(answers)]
    out, n = inject_noise(records, "wrong_prompt", 1.0, seed=0)
    assert n == 3 and [r.messages[-1]["content"] for r in out] == [answers[1], answers[2], answers[0]]
    assert [r.messages[0]["content"] for r in out] == ["q0", "q1", "q2"]
    for r in out:
        assert "".join(marked_tokens(tiny_tokenizer, r)) == r.messages[-1]["content"]


def test_inject_noise_is_seeded_and_counts():
    records = [qa(f"Step {i}: 3 + {i} = {3 + i}.\nSo {3 + i}.") for i in range(10)] + [qa("No number here.")]
    for kind in ("number", "systematic", "recurring", "wrong_prompt"):
        out, n = inject_noise(records, kind, 0.3, seed=4)
        changed = [i for i, (a, b) in enumerate(zip(records, out)) if a != b]
        assert n == 3 == len(changed) and all(out[i].corrupt_spans for i in changed)
        assert inject_noise(records, kind, 0.3, seed=4)[0] == out
    for kind in ("number", "systematic"):
        numbered, n = inject_noise(records, kind, 1.0, seed=0)
        assert n == 10 and numbered[10] == records[10]  # nothing to change
    with pytest.raises(ValueError, match="unknown noise kind 'typo'"):
        inject_noise(records, "typo", 0.3, seed=4)  # not silently another kind


# ---------------------------------------------------------------- systematic: the same off-by-one final answer

GSM8K_ANSWER = "She pays 12 * 8 = <<12*8=96>>96 dollars.\n#### 96"


def test_one_more_adds_one_unit_of_the_last_place_and_keeps_the_format():
    assert [one_more(n) for n in ["9", "96", "1,299", "9,999", "2.50", "0.99", "1,299.99", "07"]] == [
        "10", "97", "1,300", "10,000", "2.51", "1.00", "1,300.00", "08",
    ]


def test_off_by_one_changes_the_final_answer_and_nothing_before_it():
    """"She pays 12 * 8 = <<12*8=96>>96 dollars.\n" is 41 characters, "#### " 5 more: the final 96 is
    [46, 48), and only its "6" -> "7" changes. +1 on the first number would give "13 * 8"; the step's 96s stay."""
    new, spans = off_by_one(GSM8K_ANSWER)
    assert new == "She pays 12 * 8 = <<12*8=96>>96 dollars.\n#### 97"
    assert spans == [(47, 48)] and new[47:48] == "7"


def test_off_by_one_carries_into_several_characters():
    """"The total is 1,299 dollars.\n#### " is 33 characters: 1,299 -> 1,300 keeps "1," and changes "300"."""
    new, spans = off_by_one("The total is 1,299 dollars.\n#### 1,299")
    assert new == "The total is 1,299 dollars.\n#### 1,300"  # the 1,299 on the line above is not a copy
    assert spans == [(35, 38)] and [new[s:e] for s, e in spans] == ["300"]
    assert off_by_one("It costs 9") == ("It costs 10", [(9, 11)])  # 9 -> 10: both characters are new


def test_off_by_one_keeps_decimal_places():
    """"It costs " is 9 characters, 2.50 is [9, 13): its last "0" becomes "1"."""
    assert off_by_one("It costs 2.50") == ("It costs 2.51", [(12, 13)])


def test_off_by_one_changes_every_copy_on_the_final_line_only():
    """"She had 24 pens.\n" is 17 characters; on the last line "So she has " puts the first 24 at 28,
    " pens, and " the second at 41; each changes its "4"."""
    new, spans = off_by_one("She had 24 pens.\nSo she has 24 pens, and 24 is the answer.")
    assert new == "She had 24 pens.\nSo she has 25 pens, and 25 is the answer."
    assert spans == [(29, 30), (42, 43)]
    assert off_by_one("No number here.") is None


def test_systematic_applies_the_same_rule_to_every_chosen_response_and_skips_those_without_a_number():
    records = [qa(f"She buys {i} + 1 = <<{i}+1={i + 1}>>{i + 1} pens.\n#### {i + 1}") for i in range(9)]
    records += [qa("No number here."), qa("None at all.")]
    out, n = inject_noise(records, "systematic", 1.0, seed=0)
    assert n == 9 and out[9:] == records[9:]  # round(1.0 * 11) = 11 asked, only the 9 with a number can change
    for i in range(9):  # the final answer i + 1 becomes i + 2 (the last one 9 -> 10: both characters)
        content = out[i].messages[-1]["content"]
        assert content == f"She buys {i} + 1 = <<{i}+1={i + 1}>>{i + 1} pens.\n#### {i + 2}"
        assert [content[s:e] for s, e in out[i].corrupt_spans] == [str(i + 2)]
    some, n = inject_noise(records, "systematic", 0.4, seed=3)
    assert n == 4 and some[9:] == records[9:]  # round(0.4 * 11) = 4, chosen among the 9 with a number
    assert inject_noise(records, "systematic", 0.4, seed=3)[0] == some
    assert inject_noise(records, "systematic", 0.4, seed=4)[0] != some  # another seed, other responses


def test_systematic_marks_exactly_the_changed_tokens(tiny_tokenizer):
    """The tiny BPE reads "#### 97" as `#`x4, ` `, `9`, `7`: only `7` changed. It has ` 24` and ` 12` but no
    ` 25` or ` 11`: 24 -> 25 splits ` 24` into ` `, `2`, `5` and only `5` is marked; 11 -> 12 merges ` `, `1`, `1`
    into ` 12`, marked as a whole since it holds the change."""
    assert marked_tokens(tiny_tokenizer, qa(*off_by_one(GSM8K_ANSWER))) == ["7"]
    assert marked_tokens(tiny_tokenizer, qa(*off_by_one("#### 1,299"))) == ["3", "0", "0"]
    split = off_by_one("The answer is 24.")
    assert [tiny_tokenizer.decode([t]) for t in tiny_tokenizer("The answer is 24.")["input_ids"]][3] == " 24"
    assert marked_tokens(tiny_tokenizer, qa(*split)) == ["5"]
    assert marked_tokens(tiny_tokenizer, qa(*off_by_one("The answer is 11."))) == [" 12"]
