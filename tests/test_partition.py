"""The global partition on hand-made score lists."""

import numpy as np
import pytest

from tokenforget.partition import global_partition, n_positive, token_classes

SCORES = np.array([0.5, 0.1, 0.5, 0.9, 0.1])
# descending, ties kept in data order: 0.9 (i3), 0.5 (i0), 0.5 (i2), 0.1 (i1), 0.1 (i4)


def test_top_rho_are_positive():
    """rho 0.6 of 5 tokens = 3 positives: i3, i0, i2."""
    assert global_partition(SCORES, 0.6).tolist() == [True, False, True, True, False]


def test_tie_at_the_cut_goes_to_the_earlier_token():
    """rho 0.3 of 5 = 1.5 -> 2 positives (half rounds up): i3, then i0 wins the tie with i2."""
    assert global_partition(SCORES, 0.3).tolist() == [True, False, False, True, False]


def test_rho_zero_and_one():
    assert not global_partition(SCORES, 0.0).any()
    assert global_partition(SCORES, 1.0).all()


def test_counts_are_exact():
    """0.7 * 10 is 7.000000000000001 in floating point; still exactly 7. 0.7 * 1000 = 700."""
    assert n_positive(10, 0.7) == 7
    assert global_partition(np.linspace(0, 1, 1000), 0.7).sum() == 700
    assert global_partition(np.zeros(1000), 0.7).sum() == 700  # all tied


def test_rejects_bad_rho_and_nan():
    with pytest.raises(ValueError, match="rho"):
        global_partition(SCORES, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        global_partition(np.array([0.1, np.nan]), 0.5)


def test_token_classes_rank_across_examples():
    """Two examples; only response tokens (mask 1) are ranked, globally.
    Response scores in data order: ex0 -> 0.2, 0.8 ; ex1 -> 0.5, -1.0, 0.3. rho 0.4 of 5 = 2 positives:
    0.8 (ex0) and 0.5 (ex1). Prompt positions (mask 0) get class 0 whatever their score."""
    scores = [np.array([9.0, 0.2, 0.8]), np.array([9.0, 9.0, 0.5, -1.0, 0.3])]
    masks = [[0, 1, 1], [0, 0, 1, 1, 1]]
    classes, stats = token_classes(scores, masks, 0.4)
    assert classes[0].tolist() == [0, -1, 1]
    assert classes[1].tolist() == [0, 0, 1, -1, -1]
    assert (stats.n_tokens, stats.n_positive, stats.n_negative) == (5, 2, 3)
    assert stats.threshold == pytest.approx(0.5)


def test_streaming_cut_counts_exactly_and_reports_achieved_rho():
    """10,000 distinct scores in 7 shards, rho 0.7: exact selection keeps the top 7,000. With 64 bins the
    streaming cut is a bin edge, so it keeps every exact positive plus at most the tokens of one bin
    (here ~156 per bin on a uniform grid), and its count of scores >= threshold is exact."""
    from tokenforget.partition import streaming_threshold

    scores = np.random.default_rng(0).permutation(10_000).astype(np.float32) / 10_000
    shards = lambda: np.array_split(scores, 7)  # noqa: E731
    cut = streaming_threshold(shards, 0.7, bins=64)
    exact = global_partition(scores, 0.7)
    assert cut.n_tokens == 10_000 and cut.n_positive == int((scores >= cut.threshold).sum())
    assert exact.sum() <= cut.n_positive <= exact.sum() + 10_000 / 64 + 1
    assert np.all(scores[exact] >= cut.threshold)
    assert 0.7 <= cut.achieved_rho <= 0.7 + 1 / 64 + 1e-4
