"""Score methods: how the per-token losses of one scoring pass become the score the partition ranks.

Every method is a pure function of flat arrays over the response tokens of the whole data set, so all
of them come from one scoring pass (`tokenforget detect` reports them side by side):

    ce_base  (N,) CE of each token under the base model
    ce_ref   (N,) CE of each token under the reference model
    token_id (N,) the token's id
    example  (N,) the index of the example the token belongs to (tokens of one example are contiguous)

and return (N,) float64 scores: a HIGH score means "learn this token", a LOW score "suspicious". Methods
are looked up by name in `SCORE_METHODS` (`score.method` in the config). The two-reference methods
(`NEEDS_NOISY`) also read

    ce_noisy (N,) CE of each token under a second, noisy reference (`reference.noisy_folds`: cross-fitted on the
                  noisy training data), the first reference being the trusted one (`reference.path`)

and `span_decisions` pools any method's scores over a number, or a step, so that its tokens are decided together.

Why more than the paper's score: CE_base - CE_ref is largest where the base loss is high, i.e. where
there is room to fall, and a reference trained on noisy data learns recurring noise, so at small scale
corrupted tokens get *higher* scores than clean ones (issue 9). The reference's own loss is the practice
of Rho-1 (Lin et al., 2024, arXiv 2404.07965) and TokenCleaning (Pang et al., 2025, arXiv 2502.01968)
when the reference is trained on trusted data.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

ScoreFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]

RELATIVE_FLOOR = 0.1  # nats: keeps the relative score finite on tokens the base already predicts
BINS = 10  # groups of similar base loss for `binned`
MIN_COUNT = 5  # occurrences a token id needs for its own mean and std (`token_z`); else the global ones
WINDOW = 9  # response tokens in the moving average of `ref_loss_window` (odd: centred)


def paper(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = CE_base - CE_ref (Taheri et al., 2025, arXiv 2508.04329): what the reference learned."""
    return ce_base.astype(np.float64) - ce_ref


def relative(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = (CE_base - CE_ref) / max(CE_base, 0.1): the share of the base loss the reference removed,
    so a hard token is not favoured just because it had more loss to lose."""
    b = ce_base.astype(np.float64)
    return (b - ce_ref) / np.maximum(b, RELATIVE_FLOOR)


def binned(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = percentile rank of CE_base - CE_ref among the tokens of the same base-loss decile, in (0, 1].

    Decile edges are quantiles of CE_base; a token is compared only with tokens that were about as hard
    for the base model. Ranks within a bin are 1..n over n (ties share the average rank)."""
    diff = paper(ce_base, ce_ref, token_id, example)
    edges = np.quantile(ce_base, np.linspace(0, 1, BINS + 1)[1:-1])
    group = np.searchsorted(edges, ce_base, side="right")
    out = np.empty_like(diff)
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        out[members] = average_ranks(diff[members]) / members.size
    return out


def token_z(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = (d - mean_id(d)) / std_id(d) with d = CE_base - CE_ref, standardised per token id.

    A token id seen fewer than 5 times uses the mean and std of all tokens; a std of 0 counts as 1."""
    return _standardise(paper(ce_base, ce_ref, token_id, example), token_id)


def ref_loss(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = -CE_ref: a token the (trusted) reference finds unlikely is suspicious (Rho-1, TokenCleaning)."""
    return -ce_ref.astype(np.float64)


def base_loss(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = -CE_base: the base model as the reference, no reference of one's own read (a token the model finds
    unlikely before any training is suspicious; issue 36's third reference for `verified_tail`)."""
    return -ce_base


def ref_loss_z(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = -(CE_ref - mean_id(CE_ref)) / std_id(CE_ref): the reference's loss standardised per token
    id, so a digit is compared with other occurrences of that digit, not with easy function words."""
    return -_standardise(ce_ref.astype(np.float64), token_id)


def ref_loss_window(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = -max(CE_ref[t], mean of CE_ref over the 9 response tokens centred on t, within its example).

    Inserted or mismatched text is surprising as a stretch, not only at its first token; the window mean
    lifts the fluent continuation of a surprising stretch, the max keeps a lone wrong digit as it was."""
    r = ce_ref.astype(np.float64)
    return -np.maximum(r, _window_mean(r, example, WINDOW))


def ref_loss_example(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = -(CE_ref[t] + mean of CE_ref over t's example): token and example evidence added, so every
    token of a response that does not fit its prompt sinks together."""
    r = ce_ref.astype(np.float64)
    return -(r + _example_mean(r, example))


def ref_loss_copy(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = inherit_copies(-CE_ref): a token that repeats an earlier token pair of its response takes the
    lowest score of those earlier occurrences.

    A wrong value is surprising where it first appears and cheap to predict where it is copied (GSM8K writes
    each result twice, `<<48/2=24>>24`, and later steps reuse it); the copy is as wrong as the original."""
    return inherit_copies(ref_loss(ce_base, ce_ref, token_id, example), token_id, example)


def ref_loss_z_copy(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = inherit_copies(ref_loss_z): the per-token-id standardised reference loss, copies inheriting."""
    return inherit_copies(ref_loss_z(ce_base, ce_ref, token_id, example), token_id, example)


def example_ref_loss(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = -(mean of CE_ref over the token's example): sample-level perplexity filtering (Marion et al., 2023,
    arXiv 2309.04564) spread over the tokens; a response paired with the wrong prompt is surprising throughout."""
    return -_example_mean(ce_ref.astype(np.float64), example)


def example_max_ref_loss(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = -(max of CE_ref over the token's example): an example is as suspicious as its least likely token.

    One wrong number in a long right answer barely moves the mean loss; it is the example's worst token. On the
    demo's learnable task (trusted reference, 2 seeds) the max ranked the wrong answers at example AUROC 0.85 and
    0.81, the mean at 0.71 and 0.63 (docs/results.md). With `partition.selection: example` it is the max filter."""
    _, inverse = np.unique(example, return_inverse=True)
    worst = np.full(inverse.max() + 1 if inverse.size else 0, -np.inf)
    np.maximum.at(worst, inverse, ce_ref.astype(np.float64))
    return -worst[inverse]


def ref_loss_min_rank(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """score = min(rank(ref_loss_z_copy), rank(ref_loss_window), rank(example_ref_loss)) / N, ranks 1..N ascending.

    A token is as suspicious as the most suspicious of three views: its own loss with copies inheriting (a changed
    number), the stretch around it (inserted text), its whole response (a wrong prompt). Ties share ranks."""
    views = (ref_loss_z_copy, ref_loss_window, example_ref_loss)
    ranks = [average_ranks(v(ce_base, ce_ref, token_id, example)) for v in views]
    return np.minimum.reduce(ranks) / len(ce_ref)


def contrastive(ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray,
                ce_noisy: Optional[np.ndarray] = None) -> np.ndarray:
    """score = -(CE_trusted - CE_noisy) = CE_noisy - CE_trusted, with CE_trusted = `ce_ref` (the reference trained
    on the small clean set, `reference.path`) and CE_noisy = `ce_noisy` (references cross-fitted on the noisy data).

    The paper's cross-model influence, CE_base - CE_ref (Taheri et al., 2025, arXiv 2508.04329), with the base model
    replaced by a trusted one: CE_trusted - CE_noisy is what training on the noisy data taught beyond what clean
    data teaches. A recurring error is learned by the noisy reference and not by the trusted one, so it is large
    there; a hard right number is hard for both and cancels; an easy token is easy for both. That is suspicion, so
    the score (high = learn) is its negative.
    """
    if ce_noisy is None:
        raise ValueError("score method 'contrastive' needs the noisy reference's CE (reference.noisy_folds >= 2)")
    return ce_noisy.astype(np.float64) - ce_ref


SCORE_METHODS: dict[str, ScoreFn] = {
    "paper": paper,
    "relative": relative,
    "binned": binned,
    "token_z": token_z,
    "ref_loss": ref_loss,
    "base_loss": base_loss,
    "ref_loss_z": ref_loss_z,
    "ref_loss_window": ref_loss_window,
    "ref_loss_example": ref_loss_example,
    "ref_loss_copy": ref_loss_copy,
    "ref_loss_z_copy": ref_loss_z_copy,
    "example_ref_loss": example_ref_loss,
    "example_max_ref_loss": example_max_ref_loss,
    "ref_loss_min_rank": ref_loss_min_rank,
    "contrastive": contrastive,
}
NEEDS_NOISY = frozenset({"contrastive"})  # methods that read a second, noisy reference's CE (`ce_noisy`)


# Methods that read CE_ref only: their scoring pass skips the base model's forward passes (half the work).
REF_ONLY = frozenset({
    "ref_loss", "ref_loss_z", "ref_loss_window", "ref_loss_example", "ref_loss_copy", "ref_loss_z_copy",
    "example_ref_loss", "example_max_ref_loss", "ref_loss_min_rank", "contrastive",
})


# Methods that read CE_base only: their scoring pass runs the base model alone, and no reference is trained for it.
BASE_ONLY = frozenset({"base_loss"})


def reads_reference(name: str) -> bool:
    """Whether score method `name` reads a trained reference's CE (its scoring pass needs the reference)."""
    return name not in BASE_ONLY


def reads_base(name: str) -> bool:
    """Whether score method `name` reads CE_base (its scoring pass must run the base model too)."""
    return name not in REF_ONLY


def apply_method(name: str, ce_base: np.ndarray, ce_ref: np.ndarray, token_id: np.ndarray, example: np.ndarray,
                 ce_noisy: Optional[np.ndarray] = None) -> np.ndarray:
    """The scores of method `name` (a key of `SCORE_METHODS`), as float32, checked finite; `ce_noisy` goes to the
    two-reference methods (`NEEDS_NOISY`) only."""
    fn = SCORE_METHODS[name]
    out = fn(ce_base, ce_ref, token_id, example, ce_noisy=ce_noisy) if name in NEEDS_NOISY else fn(ce_base, ce_ref, token_id, example)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"score method '{name}' produced NaN or infinite scores")
    return out.astype(np.float32)


# ---------------------------------------------------------------- helpers


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _standardise(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """(x - group mean) / group std, groups with fewer than MIN_COUNT members using the global ones."""
    ids, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    mean = np.bincount(inverse, x) / counts
    std = np.sqrt(np.maximum(np.bincount(inverse, x * x) / counts - mean**2, 0.0))
    small = counts < MIN_COUNT
    mean[small], std[small] = x.mean(), x.std()
    std[std == 0] = 1.0
    return (x - mean[inverse]) / std[inverse]


def _example_mean(x: np.ndarray, example: np.ndarray) -> np.ndarray:
    """Each token's value replaced by the mean over its example."""
    _, inverse, counts = np.unique(example, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, x) / counts)[inverse]


def _window_mean(x: np.ndarray, example: np.ndarray, width: int) -> np.ndarray:
    """Mean of x over the `width` tokens centred on each token, cut at its example's ends (contiguous examples)."""
    half = width // 2
    csum = np.r_[0.0, np.cumsum(x)]
    starts = np.flatnonzero(np.r_[True, example[1:] != example[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(x)]))  # index of each token's example start
    last = np.repeat(np.r_[starts[1:], len(x)], np.diff(np.r_[starts, len(x)]))  # one past its end
    idx = np.arange(len(x))
    lo, hi = np.maximum(idx - half, first), np.minimum(idx + half + 1, last)
    return (csum[hi] - csum[lo]) / (hi - lo)


def inherit_copies(score: np.ndarray, token_id: np.ndarray, example: np.ndarray) -> np.ndarray:
    """Each token's score lowered to the lowest score of the earlier tokens of its example that share its
    pair with the previous token, or its pair with the next token (both within the example).

    Pairs, not single ids: a digit matches another digit only in the same two-token context, so a copied number
    (`7`,`4` ... `7`,`4`) is matched token by token while unrelated digits are not. One pass per example."""
    out = score.astype(np.float64).copy()
    bounds = np.flatnonzero(np.r_[True, example[1:] != example[:-1], True])
    for a, e in zip(bounds[:-1], bounds[1:]):
        ids = token_id[a:e].tolist()
        own = score[a:e].tolist()
        back: dict[tuple[int, int], float] = {}  # (previous id, id) -> lowest score seen with it
        fwd: dict[tuple[int, int], float] = {}  # (id, next id) -> lowest score seen with it
        for t in range(e - a):
            kb = (ids[t - 1], ids[t]) if t > 0 else None
            kf = (ids[t], ids[t + 1]) if t + 1 < e - a else None
            out[a + t] = min(out[a + t], back.get(kb, np.inf), fwd.get(kf, np.inf))
            if kb is not None:
                back[kb] = min(back.get(kb, np.inf), own[t])
            if kf is not None:
                fwd[kf] = min(fwd.get(kf, np.inf), own[t])
    return out


# ---------------------------------------------------------------- span decisions

SPAN_UNITS = ("token", "number", "step")


def span_decisions(score: np.ndarray, example: np.ndarray, token_id: np.ndarray, is_digit: np.ndarray,
                   is_newline: np.ndarray, unit: str) -> np.ndarray:
    """Scores pooled so that a unit is decided as one: each token of a unit takes the unit's lowest score.

    unit `token`: unchanged. `number`: a maximal run of digit tokens of one example is a unit, and a number that
    repeats an earlier number of its example (the same token ids) takes min(its own, the earlier one's) score: a
    copied wrong value inherits its source's decision (the final answer repeats the wrong total, and the copy is
    easy to predict, so a loss-based score alone leaves it in). `step`: numbers first, then every token of a line
    (up to and including its newline) takes the line's lowest score.

    Args:
        score: (N,) scores of the response tokens (low = suspicious); example: (N,) contiguous example index.
        token_id: (N,) ids; is_digit, is_newline: (N,) flags of the tokens that are digits / hold a newline.
    """
    out = score.astype(np.float64).copy()
    if unit == "token":
        return out
    bounds = np.flatnonzero(np.r_[True, example[1:] != example[:-1], True])
    for a, e in zip(bounds[:-1], bounds[1:]):
        _pool_numbers(out, token_id, is_digit, a, e)
        if unit == "step":
            _pool_lines(out, is_newline, a, e)
    return out


def _pool_numbers(out: np.ndarray, token_id: np.ndarray, is_digit: np.ndarray, a: int, e: int) -> None:
    """In out[a:e], each run of digits takes its lowest score, lowered to that of an earlier equal number."""
    seen: dict[tuple[int, ...], float] = {}  # number (its token ids) -> lowest score of its earlier occurrences
    t = a
    while t < e:
        if not is_digit[t]:
            t += 1
            continue
        end = t
        while end < e and is_digit[end]:
            end += 1
        key = tuple(token_id[t:end].tolist())
        value = min(float(out[t:end].min()), seen.get(key, np.inf))
        out[t:end] = value
        seen[key] = value
        t = end


def _pool_lines(out: np.ndarray, is_newline: np.ndarray, a: int, e: int) -> None:
    """In out[a:e], every line (its tokens up to and including the newline) takes its lowest score."""
    ends = [t + 1 for t in range(a, e) if is_newline[t]]
    for lo, hi in zip([a, *ends], [*ends, e]):
        if hi > lo:
            out[lo:hi] = out[lo:hi].min()
