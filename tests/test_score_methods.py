"""Each score method on hand-made tensors, the working in each docstring."""

import numpy as np
import pytest

from tokenforget.score_methods import SCORE_METHODS, apply_method, average_ranks

ONE_EXAMPLE = np.zeros(2, dtype=np.int64)


def method(name, b, r, ids=None, ex=None):
    b, r = np.asarray(b, np.float64), np.asarray(r, np.float64)
    ids = np.zeros(len(b), np.int64) if ids is None else np.asarray(ids)
    ex = np.zeros(len(b), np.int64) if ex is None else np.asarray(ex)
    return SCORE_METHODS[name](b, r, ids, ex)


def test_paper_and_ref_loss():
    """paper: [2 - 1, 1 - 1.5] = [1, -0.5]; ref_loss: [-1, -1.5]; base_loss: [-2, -1]."""
    assert method("paper", [2, 1], [1, 1.5]) == pytest.approx([1.0, -0.5])
    assert method("ref_loss", [2, 1], [1, 1.5]) == pytest.approx([-1.0, -1.5])
    assert method("base_loss", [2, 1], [1, 1.5]) == pytest.approx([-2.0, -1.0])  # the base's CE, the reference unread


def test_relative_floors_the_base_loss():
    """(2 - 1) / 2 = 0.5; (0.05 - 0) / max(0.05, 0.1) = 0.5: the easy token is not blown up by a tiny CE_base."""
    assert method("relative", [2, 0.05], [1, 0.0]) == pytest.approx([0.5, 0.5])


def test_binned_ranks_within_groups_of_base_loss():
    """CE_base [1, 1, 5, 5] falls in two deciles groups {0, 1} and {2, 3}. d = [0.5, 0.2, 4, 1]: within the
    first group 0.5 ranks 2 of 2 (1.0) and 0.2 ranks 1 of 2 (0.5); the same in the second. The paper's score
    puts token 3 (d = 1) above token 0 (d = 0.5); binned says both are the best of their group."""
    assert method("binned", [1, 1, 5, 5], [0.5, 0.8, 1, 4]) == pytest.approx([1.0, 0.5, 1.0, 0.5])


def test_token_z_standardises_per_id_with_a_global_fallback():
    """Id 7 five times with d = 1..5: mean 3, std sqrt(2), so z = (d - 3) / 1.4142. Id 9 once (fewer than 5)
    with d = 10 uses all six: mean 25/6 = 4.1667, std sqrt(155/6 - 4.1667^2) = 2.9107, z = 2.0040."""
    b = [1, 2, 3, 4, 5, 10]
    z = method("token_z", b, [0] * 6, ids=[7, 7, 7, 7, 7, 9])
    assert z[:5] == pytest.approx([(d - 3) / 2**0.5 for d in [1, 2, 3, 4, 5]])
    assert z[5] == pytest.approx((10 - 25 / 6) / np.sqrt(155 / 6 - (25 / 6) ** 2))


def test_ref_loss_z_of_a_constant_id_is_zero():
    """Id 4 always has CE_ref 2 (std 0 counts as 1): -(2 - 2) / 1 = 0 for each."""
    assert method("ref_loss_z", [0] * 5, [2] * 5, ids=[4] * 5) == pytest.approx([0.0] * 5)


def test_ref_loss_window_and_example():
    """Examples [0, 0, 0, 1, 1], CE_ref [1, 2, 3, 10, 0]. The 9-token window covers each whole example: means
    2 and 5, so window = -max(r, mean) = [-2, -2, -3, -10, -5]; example = -(r + mean) = [-3, -4, -5, -15, -5]."""
    r, ex = [1, 2, 3, 10, 0], [0, 0, 0, 1, 1]
    assert method("ref_loss_window", [0] * 5, r, ex=ex) == pytest.approx([-2, -2, -3, -10, -5])
    assert method("ref_loss_example", [0] * 5, r, ex=ex) == pytest.approx([-3, -4, -5, -15, -5])


def test_window_is_cut_at_the_example_edge():
    """Twelve tokens of one example, CE_ref 0 except 9 at position 0: token 4's window is positions 0..8
    (mean 1), token 5's is 1..9 (mean 0)."""
    r = np.zeros(12)
    r[0] = 9
    s = method("ref_loss_window", np.zeros(12), r)
    assert s[0] == -9 and s[4] == pytest.approx(-1.0) and s[5] == 0


def test_average_ranks_and_apply_method_checks():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])) == pytest.approx([3.5, 1, 3.5, 2])
    assert apply_method("paper", np.array([1.0]), np.array([0.5]), np.zeros(1), np.zeros(1)).dtype == np.float32
    with pytest.raises(ValueError, match="NaN"):
        apply_method("paper", np.array([np.inf]), np.array([0.5]), np.zeros(1), np.zeros(1))


def test_copies_inherit_the_lowest_score_of_the_earlier_occurrence():
    """Ids [5, 7, 4, 9, 7, 4] in one example, CE_ref [0, 6, 3, 0, 0.1, 0.2]: `7 4` at 4-5 copies `7 4` at
    1-2. Token 4 (id 7) shares its pair with the next token, (7, 4), with token 1: min(-0.1, -6) = -6; token 5
    (id 4) shares (7, 4) with token 2: min(-0.2, -3) = -3. Token 3 (id 9) is new and keeps -0. In a second
    example the same pair inherits nothing."""
    ids, r = [5, 7, 4, 9, 7, 4], [0, 6, 3, 0, 0.1, 0.2]
    assert method("ref_loss_copy", [0] * 6, r, ids=ids) == pytest.approx([0, -6, -3, 0, -6, -3])
    split = method("ref_loss_copy", [0] * 6, r, ids=ids, ex=[0, 0, 0, 1, 1, 1])
    assert split == pytest.approx([0, -6, -3, 0, -0.1, -0.2])


def test_example_ref_loss_and_min_rank():
    """Examples [0, 0, 1, 1], ids all different, CE_ref [4, 0, 1, 1]. example_ref_loss = -[2, 2, 1, 1].
    Ascending ranks of the three views (N = 4):
      ref_loss_z_copy: every id is rare, so z = -(r - 1.5) / 1.5 = [-1.667, 1, 0.333, 0.333] -> [1, 4, 2.5, 2.5]
      ref_loss_window: -max(r, example mean) = [-4, -2, -1, -1] -> [1, 2, 3.5, 3.5]
      example_ref_loss: [-2, -2, -1, -1] -> [1.5, 1.5, 3.5, 3.5]
    min per token = [1, 1.5, 2.5, 2.5], over 4 = [0.25, 0.375, 0.625, 0.625]."""
    args = ([0] * 4, [4, 0, 1, 1])
    kw = {"ids": [1, 2, 3, 4], "ex": [0, 0, 1, 1]}
    assert method("example_ref_loss", *args, **kw) == pytest.approx([-2, -2, -1, -1])
    assert method("ref_loss_min_rank", *args, **kw) == pytest.approx([0.25, 0.375, 0.625, 0.625])


def test_example_max_ref_loss_ranks_an_example_by_its_worst_token():
    """Examples [0, 0, 1, 1, 1], CE_ref [4, 0, 1, 3, 2]: example 0's worst token costs 4 (mean 2), example 1's 3
    (mean 2), so the max says example 0 is the more suspicious one where the mean cannot tell them apart. The
    example filter keeping round(0.5 x 2) = 1 example keeps example 1's three tokens."""
    from tokenforget.stages.partition import example_partition

    args, kw = ([0] * 5, [4, 0, 1, 3, 2]), {"ids": [1, 2, 3, 4, 5], "ex": [0, 0, 1, 1, 1]}
    scores = method("example_max_ref_loss", *args, **kw)
    assert scores == pytest.approx([-4, -4, -3, -3, -3])
    assert method("example_ref_loss", *args, **kw) == pytest.approx([-2, -2, -2, -2, -2])
    kept = example_partition(np.asarray(scores), np.asarray(kw["ex"]), 0.5)
    assert kept.tolist() == [False, False, True, True, True]


def test_contrastive_is_the_cross_model_influence_with_a_trusted_base():
    """score = CE_noisy - CE_trusted (ce_ref is the trusted reference's). Four tokens:
    a recurring wrong total: trusted 3.0, noisy 0.5 -> 0.5 - 3.0 = -2.5 (the most suspicious);
    a hard right number:    trusted 2.0, noisy 2.2 -> +0.2 (hard for both: cancels);
    an easy word:           trusted 0.1, noisy 0.1 ->  0.0;
    a right total the noisy reference doubts: trusted 0.2, noisy 1.0 -> +0.8.
    The reference-loss score (-CE_trusted) ranks the hard right number second most suspicious (-2.0); here it is
    third: -2.5 < 0.0 < 0.2 < 0.8."""
    from tokenforget.score_methods import apply_method, contrastive

    trusted = np.array([3.0, 2.0, 0.1, 0.2], np.float32)
    noisy = np.array([0.5, 2.2, 0.1, 1.0], np.float32)
    none = np.zeros(4, np.float32)
    got = apply_method("contrastive", none, trusted, np.arange(4), np.zeros(4, int), noisy)
    assert got == pytest.approx([-2.5, 0.2, 0.0, 0.8], abs=1e-6)
    assert np.argsort(got).tolist() == [0, 2, 1, 3]
    with pytest.raises(ValueError, match="noisy_folds"):
        contrastive(none, trusted, np.arange(4), np.zeros(4, int))


def test_span_decisions_pool_a_number_and_its_copies():
    """One answer, tokens (ids; digits marked d):  '1'd '2'd ' =' '2'd '8'd '\\n' 'is' '2'd '8'd .
    scores:                                          0.5 0.4  1.0  -2.0 0.3  1.0  0.9 0.2  0.1
    number: 12 -> min(0.5, 0.4) = 0.4 on both; 28 -> min(-2.0, 0.3) = -2.0; the final 28 repeats it (same ids):
    min(0.2, 0.1, -2.0) = -2.0. Words keep their own scores. step: line 1 (to its newline) -> min = -2.0;
    line 2 -> min(0.9, -2.0, -2.0) = -2.0. token: unchanged."""
    from tokenforget.score_methods import span_decisions

    ids = np.array([1, 2, 10, 2, 8, 11, 12, 2, 8])
    digit = np.array([1, 1, 0, 1, 1, 0, 0, 1, 1], bool)
    newline = np.array([0, 0, 0, 0, 0, 1, 0, 0, 0], bool)
    s = np.array([0.5, 0.4, 1.0, -2.0, 0.3, 1.0, 0.9, 0.2, 0.1])
    ex = np.zeros(9, int)
    assert span_decisions(s, ex, ids, digit, newline, "number") == pytest.approx([0.4, 0.4, 1.0, -2, -2, 1.0, 0.9, -2, -2])
    assert span_decisions(s, ex, ids, digit, newline, "step") == pytest.approx([-2] * 6 + [-2] * 3)
    assert span_decisions(s, ex, ids, digit, newline, "token") == pytest.approx(s)
    # another example does not inherit: the same number there keeps its own score
    two = span_decisions(np.r_[s[:5], 0.7, 0.6], np.r_[ex[:5], 1, 1], np.r_[ids[:5], 2, 8], np.r_[digit[:5], 1, 1],
                         np.zeros(7, bool), "number")
    assert two[5:] == pytest.approx([0.6, 0.6])


def test_two_gaussians_recover_a_known_negative_share():
    """5,000 scores: a share q from N(-3, 0.7) (the noise), the rest from N(0, 0.5). EM finds q within 0.01 and the
    two means within 0.1; the mixture partition makes round(w_low x N) tokens negative."""
    from tokenforget.metrics import two_gaussians
    from tokenforget.stages.partition import mixture_partition

    rng = np.random.default_rng(0)
    for q in (0.04, 0.1, 0.3):
        k = int(q * 5000)
        x = np.r_[rng.normal(-3, 0.7, k), rng.normal(0, 0.5, 5000 - k)]
        w, m, _ = two_gaussians(x)
        assert w[0] == pytest.approx(q, abs=0.01) and m == pytest.approx([-3, 0], abs=0.1)
        positive, share = mixture_partition(x)
        assert share == w[0] and (~positive).sum() == int(np.floor(share * 5000 + 0.5))
    w, _, _ = two_gaussians(np.ones(10))  # all equal: no second component
    assert w.tolist() == [0.0, 1.0]


def test_contrastive_without_a_noisy_or_a_trusted_reference_is_refused_at_the_edge():
    """One clear line naming the field, before any work (the CLI exits with status 2 on a ConfigError)."""
    from tokenforget.config import ConfigError, ReferenceConfig, RunConfig, ScoreConfig

    with pytest.raises(ConfigError, match="score.method.*reference.noisy_folds >= 2"):
        RunConfig(score=ScoreConfig(method="contrastive"))
    with pytest.raises(ConfigError, match="reference.noisy_folds"):
        ReferenceConfig(noisy_folds=1)
    with pytest.raises(ConfigError, match="reference.path.*trusted one"):
        RunConfig(score=ScoreConfig(method="contrastive"), reference=ReferenceConfig(noisy_folds=2))
    RunConfig(score=ScoreConfig(method="contrastive"), reference=ReferenceConfig(noisy_folds=2, path="clean.jsonl"))
