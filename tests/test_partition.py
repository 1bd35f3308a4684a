"""The global partition on hand-made score lists."""

import numpy as np
import pytest

from tokenforget.stages.verdicts import (
    first_wrong_partition,
    verified_first_partition,
    KnownNoise,
    verified_random_partition,
    verified_tail_partition,
    verified_whole_partition,
)
from tokenforget.stages.partition import (
    example_partition,
    global_partition,
    n_positive,
    oracle_partition,
    select_tokens,
    tail_partition,
    token_classes,
)

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
    from tokenforget.stages.partition_streaming import streaming_threshold

    scores = np.random.default_rng(0).permutation(10_000).astype(np.float32) / 10_000
    shards = lambda: np.array_split(scores, 7)  # noqa: E731
    cut = streaming_threshold(shards, 0.7, bins=64)
    exact = global_partition(scores, 0.7)
    assert cut.n_tokens == 10_000 and cut.n_positive == int((scores >= cut.threshold).sum())
    assert exact.sum() <= cut.n_positive <= exact.sum() + 10_000 / 64 + 1
    assert np.all(scores[exact] >= cut.threshold)
    assert 0.7 <= cut.achieved_rho <= 0.7 + 1 / 64 + 1e-4


# ---------------------------------------------------------------- other selections (partition.selection)


def test_per_sample_ranks_within_each_example_with_ties_to_the_earlier_token():
    """ex0 scores [0.8, 0.2, 0.8], ex1 [0.5, -1.0, 0.3, 0.3], rho 0.4.
    ex0: round(0.4 * 3) = 1 positive: the first 0.8 (tie with the third goes to the earlier) -> [T, F, F].
    ex1: round(0.4 * 4) = round(1.6) = 2: 0.5, then the first 0.3 -> [T, F, T, F].
    Global ranking at rho 0.4 of 7 = 3 would instead take 0.8, 0.8, 0.5 (and nothing else from ex1)."""
    from tokenforget.stages.partition import per_sample_partition

    scores = np.array([0.8, 0.2, 0.8, 0.5, -1.0, 0.3, 0.3])
    example = np.array([0, 0, 0, 1, 1, 1, 1])
    assert per_sample_partition(scores, example, 0.4).tolist() == [True, False, False, True, False, True, False]
    assert global_partition(scores, 0.4).tolist() == [True, False, True, True, False, False, False]


def test_threshold_keeps_scores_at_or_above_it():
    """SCORES [0.5, 0.1, 0.5, 0.9, 0.1], threshold 0.5: both tied 0.5s and the 0.9 are positive."""
    from tokenforget.stages.partition import threshold_partition

    assert threshold_partition(SCORES, 0.5).tolist() == [True, False, True, True, False]


def test_soft_weights_by_rank_from_the_cut():
    """SCORES [0.5, 0.1, 0.5, 0.9, 0.1], rho 0.6: N 5, k 3. Ranks (ties to the earlier token):
    i3 r0, i0 r1, i2 r2, i1 r3, i4 r4. Positives 1 - r/3: i3 1, i0 2/3, i2 1/3;
    negatives -(r - 3 + 1)/2: i1 -1/2, i4 -1. Signs equal the global partition."""
    from tokenforget.stages.partition import soft_weights

    w = soft_weights(SCORES, 0.6)
    assert w.tolist() == pytest.approx([2 / 3, -0.5, 1 / 3, 1.0, -1.0])
    assert ((w > 0) == global_partition(SCORES, 0.6)).all()


def test_select_tokens_flat_classes_and_weights():
    """Two examples, prompt positions (response 0) get class 0 and weight 0 whatever their score.
    Response scores: ex0 0.2, 0.8 ; ex1 0.5, -1.0, 0.3 (N 5). soft, rho 0.4: k 2; ranks 0.8 r0, 0.5 r1,
    0.3 r2, 0.2 r3, -1.0 r4 -> |w|: 0.8 1, 0.5 1/2, 0.3 1/3, 0.2 2/3, -1.0 1.
    per_sample, rho 0.5: ex0 round(1.0) = 1 -> 0.8; ex1 round(1.5) = 2 -> 0.5, 0.3.
    threshold 0.25: 0.8, 0.5, 0.3."""
    from tokenforget.stages.partition import select_tokens

    scores = np.array([9.0, 0.2, 0.8, 9.0, 9.0, 0.5, -1.0, 0.3], dtype=np.float32)
    resp = np.array([0, 1, 1, 0, 0, 1, 1, 1])
    offsets = np.array([0, 3, 8])
    cls, w, stats = select_tokens(scores, resp, offsets, "soft", 0.4)
    assert cls.tolist() == [0, -1, 1, 0, 0, 1, -1, -1]
    assert w.tolist() == pytest.approx([0, 2 / 3, 1, 0, 0, 1 / 2, 1, 1 / 3])
    assert (stats.n_positive, stats.n_negative) == (2, 3)
    cls, w, _ = select_tokens(scores, resp, offsets, "per_sample", 0.5)
    assert cls.tolist() == [0, -1, 1, 0, 0, 1, -1, 1] and w is None
    cls, _, _ = select_tokens(scores, resp, offsets, "threshold", 0.9, threshold=0.25)
    assert cls.tolist() == [0, -1, 1, 0, 0, 1, -1, 1]
    cls, _, _ = select_tokens(scores, resp, offsets, "global", 0.4)
    assert cls.tolist() == [0, -1, 1, 0, 0, 1, -1, -1]


def test_example_selection_keeps_whole_examples_by_mean_score():
    """Three examples: means (0.5 + 0.1)/2 = 0.3, (0.9)/1 = 0.9, (0.1 + 0.1 + 0.4)/3 = 0.2.
    rho 2/3 of 3 examples = 2 kept: example 1 (0.9) and example 0 (0.3); example 2 dropped whole.
    rho 0.5 -> round(1.5) = 2 as well; rho 0.3 -> round(0.9) = 1: example 1 only."""
    scores = np.array([0.5, 0.1, 0.9, 0.1, 0.1, 0.4])
    example = np.array([0, 0, 1, 2, 2, 2])
    assert example_partition(scores, example, 2 / 3).tolist() == [True, True, True, False, False, False]
    assert example_partition(scores, example, 0.5).tolist() == [True, True, True, False, False, False]
    assert example_partition(scores, example, 0.3).tolist() == [False, False, True, False, False, False]


def test_example_selection_tie_goes_to_the_earlier_example():
    """Means (0.2 + 0.2)/2 = 0.2 and (0.1 + 0.3)/2 = 0.2: rho 0.5 keeps one example, the earlier."""
    scores = np.array([0.2, 0.2, 0.1, 0.3])
    assert example_partition(scores, np.array([0, 0, 1, 1]), 0.5).tolist() == [True, True, False, False]


def test_tail_cuts_the_most_suspicious_examples_at_their_worst_token():
    """Three examples (flat offsets 0, 4, 8, 11; the first token of each a prompt token). Response scores and
    their minima by hand: example 0 (-1, -5, -2): -5 at its 2nd response token; example 1 (-0.5, -0.4, -0.9):
    -0.9; example 2 (-3, -6): -6 at its 2nd. rho 0.34 keeps round(1.02) = 1 example whole, the highest minimum
    (example 1); examples 0 and 2 lose the tokens from their minimum to their end: 3 negatives."""
    scores = np.array([0.0, -1.0, -5.0, -2.0, 0.0, -0.5, -0.4, -0.9, 0.0, -3.0, -6.0])
    response = np.array([0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1])
    classes, weights, stats = select_tokens(scores, response, np.array([0, 4, 8, 11]), "tail", 0.34)
    assert classes.tolist() == [0, 1, -1, -1, 0, 1, 1, 1, 0, 1, -1]
    assert weights is None and (stats.n_positive, stats.n_negative) == (5, 3)
    # ties: equal minima keep the earlier example whole; within an example the earlier tied token starts the tail
    tied = tail_partition(np.array([-2.0, -1.0, -2.0, -3.0, -1.0, -3.0]), np.array([0, 0, 0, 1, 1, 1]), 0.5)
    assert tied.tolist() == [True, True, True, False, False, False]  # 1 kept: example 0 (min -2); 1 cut at its 1st -3
    tied = tail_partition(np.array([-2.0, -1.0, -2.0, -2.0, -1.0, -3.0]), np.array([0, 0, 0, 1, 1, 1]), 0.5)
    assert tied.tolist() == [True, True, True, True, True, False]  # example 1 (min -3) loses its last token only
    twin = tail_partition(np.array([-1.0, -2.0, -2.0, -1.0, -2.0, -2.0]), np.array([0, 0, 0, 1, 1, 1]), 0.5)
    assert twin.tolist() == [True, True, True, True, False, False]  # tied minima: example 0 whole; 1 cut at its 1st -2
    assert tail_partition(np.array([-1.0, -2.0]), np.array([0, 1]), 1.0).all()
    assert tail_partition(np.array([-1.0, -2.0]), np.array([0, 1]), 0.0).tolist() == [False, False]


def test_verified_tail_cuts_each_known_wrong_answer_at_its_worst_token():
    """Three examples (flat offsets 0, 4, 8, 11; the first token of each a prompt token). Response scores by hand:
    example 0 (-1, -5, -2), its last token known bad: wrong, cut from its minimum -5 (2nd response token) on;
    example 1 (-0.5, -0.4, -9), nothing bad: learned whole, though its -9 is the lowest score of all; example 2
    (-3, -1), its first token bad: cut from -3, i.e. whole. rho is not read: 4 negatives at rho 0.7 or 0."""
    scores = np.array([0.0, -1.0, -5.0, -2.0, 0.0, -0.5, -0.4, -9.0, 0.0, -3.0, -1.0])
    response = np.array([0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1])
    bad = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0])
    wrong = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1])  # examples 0 and 2 hold a bad token
    for rho in (0.7, 0.0):
        classes, weights, stats = select_tokens(scores, response, np.array([0, 4, 8, 11]), "verified_tail", rho,
                                                noise=KnownNoise(bad, wrong))
        assert classes.tolist() == [0, 1, -1, -1, 0, 1, 1, 1, 0, -1, -1]
        assert weights is None and (stats.n_positive, stats.n_negative) == (4, 4)
    # ties within a wrong example: the earlier lowest token starts the tail; a wrong example's bad token may come
    # after its worst token or before it (only the verdict is read)
    tied = verified_tail_partition(np.array([-1.0, -2.0, -2.0, -1.0]), np.array([0, 0, 0, 0]), np.array([1, 0, 0, 0]))
    assert tied.tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="verified_tail selection needs the known noise"):
        select_tokens(scores, response, np.array([0, 4, 8, 11]), "verified_tail", 0.7)


def test_oracle_negatives_are_exactly_the_known_bad_tokens():
    """Flat tokens of two examples (offsets 0, 3, 6); response flags and bad flags by hand: the classes are
    0 off-response, -1 on a bad response token, +1 on a good one, whatever the scores."""
    scores = np.array([9.0, 9.0, -9.0, 0.0, 5.0, 1.0])
    response = np.array([0, 1, 1, 0, 1, 1])
    bad = np.array([0, 1, 0, 1, 0, 1])
    classes, weights, stats = select_tokens(scores, response, np.array([0, 3, 6]), "oracle", 0.7,
                                            noise=KnownNoise(bad, np.ones(6)))
    assert classes.tolist() == [0, -1, 1, 0, 1, -1]
    assert weights is None and (stats.n_positive, stats.n_negative) == (2, 2)
    assert oracle_partition(np.array([1, 0])).tolist() == [False, True]


def test_the_first_wrong_token_alone_is_forgotten_and_the_rest_of_its_tail_gets_no_loss():
    """Three examples (offsets 0, 5, 8, 11), the first token of each off the response. Response bad flags by hand:
    example 0: right, wrong, wrong, right -> +1 -1 0 +1 (its first bad token the one negative, the second no loss);
    example 1: wrong, wrong -> -1 0; example 2: right, right -> +1 +1. Two negatives, two no-loss, four positive,
    whatever the scores; the off-response token that is flagged bad stays 0."""
    scores = np.array([0.0, 9.0, -9.0, 5.0, 1.0, 0.0, 3.0, 3.0, 0.0, 2.0, -2.0])
    response = np.array([0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    bad = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    classes, weights, stats = select_tokens(scores, response, np.array([0, 5, 8, 11]), "oracle_first", 0.7,
                                            noise=KnownNoise(bad, np.ones(11)))
    assert classes.tolist() == [0, 1, -1, 0, 1, 0, -1, 0, 0, 1, 1]
    assert weights is None and (stats.n_positive, stats.n_negative) == (4, 2)
    positive, no_loss = first_wrong_partition(np.array([0, 1, 1, 1, 1]), np.array([0, 0, 0, 1, 1]))
    assert positive.tolist() == [True, False, False, False, False] and no_loss.tolist() == [False, False, True, False, True]


def test_the_verified_cut_token_alone_is_forgotten():
    """`verified_first`: examples 0 and 2 known wrong (their verdict only), example 1 right. Example 0's response
    scores 9, -9, 5, -1: its lowest (-9) is the cut and the one negative, the two tokens after it no loss: +1 -1 0 0.
    Example 1 (right) learned whatever its scores: +1 +1. Example 2's scores -3, 0: cut at its first token: -1 0.
    Two negatives, three no-loss, three positive."""
    scores = np.array([0.0, 9.0, -9.0, 5.0, -1.0, 0.0, -7.0, 3.0, 0.0, -3.0, 0.0])
    response = np.array([0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1])
    wrong = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    classes, weights, stats = select_tokens(scores, response, np.array([0, 5, 8, 11]), "verified_first", 0.7,
                                            noise=KnownNoise(np.zeros(11), wrong))
    assert classes.tolist() == [0, 1, -1, 0, 0, 0, 1, 1, 0, -1, 0]
    assert weights is None and (stats.n_positive, stats.n_negative) == (3, 2)
    positive, no_loss = verified_first_partition(np.array([2.0, 1.0, 3.0]), np.array([0, 0, 0]), np.array([1, 1, 1]))
    assert positive.tolist() == [True, False, False] and no_loss.tolist() == [False, False, True]


def test_verified_whole_and_random_cut_only_the_answers_known_wrong():
    """Three examples of 3, 2 and 4 response tokens (example index 0 0 0 1 1 2 2 2 2); examples 0 and 2 known wrong.
    `verified_whole`: their 7 tokens negative, example 1's 2 positive. `verified_random` with seed 5: numpy's
    default_rng(5).integers(0, [3, 2, 4]) draws offsets [2, 1, 0] (printed once by hand), so example 0 is cut from
    its 3rd token, example 2 from its 1st (whole); example 1, right, is learned whatever its draw."""
    example = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    wrong = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1])
    assert verified_whole_partition(wrong).tolist() == [False, False, False, True, True, False, False, False, False]
    assert np.random.default_rng(5).integers(0, np.array([3, 2, 4])).tolist() == [2, 1, 0]
    cut = verified_random_partition(example, wrong, seed=5)
    assert cut.tolist() == [True, True, False, True, True, False, False, False, False]
    assert verified_random_partition(example, wrong, seed=5).tolist() == cut.tolist()  # seeded


def test_known_noise_takes_the_outcome_label_over_the_spans():
    """Four examples of 2 tokens each. Example 0: a corrupt token, labelled right (a process error, the outcome
    right): not a wrong answer, its corrupt token still the oracle's. Example 1: corrupt, labelled wrong: wrong, the
    oracle's negative its marked token only. Example 2: no mark, labelled wrong: wrong, every token bad. Example 3:
    unlabelled (-1) and marked: the mark decides."""
    import datasets

    from tokenforget.stages.verdicts import known_noise

    tokens = datasets.Dataset.from_dict({"corrupt": [[0, 1], [1, 0], [0, 0], [0, 1]], "is_correct": [1, 0, 0, -1]})
    noise = known_noise(tokens)
    assert noise.bad.tolist() == [False, True, True, False, True, True, False, True]
    assert noise.wrong.tolist() == [False, False, True, True, True, True, True, True]


def test_simulated_detector_counts_on_a_hand_made_mask():
    """12 response tokens, 4 known wrong (positions 0, 1, 5, 11), 8 right. recall 0.5: round(0.5 x 4) = 2 wrong
    tokens negative; precision 0.4: round(2 / 0.4) = 5 negatives, so 5 - 2 = 3 right ones. With `detector` false
    positives they are the 3 right tokens of lowest score: scores of the right positions 2,3,4,6,7,8,9,10 are
    5,1,7,0,9,1,8,6, so position 6 (score 0), then 3 and 7 (score 1). The same seed draws the same wrong tokens."""
    from tokenforget.stages.partition import simulated_counts, simulated_partition

    bad = np.array([1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], bool)
    scores = np.array([0, 0, 5, 1, 7, 0, 0, 1, 9, 8, 6, 0], np.float32)
    assert simulated_counts(4, 8, 0.5, 0.4) == (2, 3)
    assert simulated_counts(4, 8, 1.0, 0.3) == (4, 8)  # round(4 / 0.3) - 4 = 9, capped at the 8 right tokens
    assert simulated_counts(4, 8, 1.0, 1.0) == (4, 0)  # the oracle
    for fps in ("random", "detector"):
        neg = ~simulated_partition(bad, scores, 0.5, 0.4, fps, seed=3)
        assert (neg & bad).sum() == 2 and (neg & ~bad).sum() == 3
        assert np.array_equal(neg, ~simulated_partition(bad, scores, 0.5, 0.4, fps, seed=3))  # seeded: the same
    neg = ~simulated_partition(bad, scores, 0.5, 0.4, "detector", seed=3)
    assert np.flatnonzero(neg & ~bad).tolist() == [3, 6, 7]
    assert np.array_equal(~simulated_partition(bad, scores, 1.0, 1.0, "random", seed=0), bad)  # recall = precision = 1


def test_simulated_selection_through_the_partition_stage():
    """`partition.selection: simulated` over Arrow columns: response tokens only; the prompt token stays 0."""
    import datasets

    from tokenforget.config import PartitionConfig
    from tokenforget.stages.partition import partition_exact

    tokens = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4], [5, 6, 7]], "response_mask": [[0, 1, 1, 1], [0, 1, 1]],
                                         "corrupt": [[0, 1, 0, 0], [0, 0, 1]]})
    scores = datasets.Dataset.from_dict({"score": [[0.0, 0.0, 3.0, 1.0], [0.0, 2.0, 0.0]]})
    pc = PartitionConfig(selection="simulated", recall=1.0, precision=2 / 3, false_positives="detector")
    table, stats = partition_exact(tokens, scores, pc)
    # 2 wrong, round(2 / (2/3)) - 2 = 1 right token: the right one of lowest score, position 3 of example 0 (1.0)
    assert table.column("token_class").to_pylist() == [[0, -1, 1, -1], [0, 1, -1]]
    assert stats["n_negative"] == 3
