"""Detection metrics and answer extraction against hand-computed values."""

import numpy as np
import pytest

from tokenforget.metrics import answer_accuracy, answer_settled, auroc, detection, extract_answer


def test_auroc_hand_value():
    """bad scores {0.1, 0.4}, good scores {0.2, 0.3, 0.5}. Pairs with score_bad < score_good:
    0.1 < all three (3), 0.4 < 0.5 only (1) -> 4 of 6 pairs -> 0.6667."""
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    bad = np.array([1, 0, 0, 1, 0])
    assert auroc(scores, bad) == pytest.approx(4 / 6)


def test_auroc_ties_count_half():
    """One bad and one good token with equal scores: 1/2."""
    assert auroc(np.array([0.3, 0.3]), np.array([1, 0])) == pytest.approx(0.5)
    assert np.isnan(auroc(np.array([0.3, 0.3]), np.array([0, 0])))
    # a score that was not measured (NaN) makes the AUROC unmeasured, not a number from NaN's rank
    assert np.isnan(auroc(np.array([0.1, np.nan, 0.3]), np.array([1, 0, 0])))


def test_detection_recall_precision():
    """4 tokens, bad = {0, 1}, negative = {1, 2}: recall 1/2, precision 1/2, chance 2/4."""
    d = detection(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    assert (d.recall, d.precision, d.corrupt_share, d.auroc) == pytest.approx((0.5, 0.5, 0.5, 1.0))


def test_extract_answer_and_accuracy():
    assert extract_answer("2 * 3 = 6.\nThe answer is 1,200.") == "1200"
    assert extract_answer("so #### 42") == "42"
    assert extract_answer("first 3 then 7") == "7"
    assert extract_answer("no numbers") is None
    acc = answer_accuracy(["The answer is 5.", "The answer is 6."], ["The answer is 5.", "The answer is 7."])
    assert (acc.accuracy, acc.n, acc.correct) == (0.5, 2, [1, 0])
    assert acc.stderr == pytest.approx((0.25 / 2) ** 0.5)


def test_answer_settled_only_where_no_continuation_can_change_the_answer():
    """'The answer is 12.' may go on to 12.5 and '1,2' to 1,200: not settled; a newline, a word or ', so' after the
    number ends it. A completion without 'answer is' is graded on its last number, never settled."""
    settled = ["The answer is 12.\n", "The answer is 12 apples", "#### 7\n", "The answer is 12, so"]
    open_ = ["The answer is 12", "The answer is 12.", "The answer is 1,2", "The answer is 12,", "The answer is", "5 6"]
    assert [answer_settled(t) for t in settled] == [True] * 4 and not any(map(answer_settled, open_))
    for t in settled:  # what follows a settled answer leaves it as it was
        assert extract_answer(t + "5.5 and the answer is 3") == extract_answer(t)


def test_auroc_with_ties_hand_value():
    """bad {0.2, 0.5}, good {0.2, 0.5, 0.9}. Bad 0.2: tie with 0.2 (1/2), below 0.5 and 0.9 (2) -> 2.5;
    bad 0.5: above 0.2 (0), tie with 0.5 (1/2), below 0.9 (1) -> 1.5. (2.5 + 1.5) / 6 = 0.6667."""
    scores = np.array([0.2, 0.5, 0.2, 0.5, 0.9])
    assert auroc(scores, np.array([1, 1, 0, 0, 0])) == pytest.approx(4 / 6)
    assert auroc(np.full(4, 1.0), np.array([1, 0, 1, 0])) == pytest.approx(0.5)  # all tied: chance
