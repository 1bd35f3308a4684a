"""What the data says is wrong, and the token selections that read it (`partition.selection`: `verified_tail`,
`verified_random`, `verified_whole`, `oracle_first`; registered in `tokenforget.stages.partition.SELECTIONS`).

`known_noise` reads the data stage's `corrupt` mask (injected noise, or a process grade's first wrong number on) and
its `is_correct` labels (an outcome verifier's verdict per answer); the verdict selections cut the answers known
wrong: at the reference's least likely token (`verified_tail`), at a random token (`verified_random`, the control
for where to cut), or whole (`verified_whole`); `oracle_first` forgets each example's first known noisy token alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenforget.columns import flat_list_column
from tokenforget.errors import ConfigError


@dataclass(frozen=True)
class KnownNoise:
    """What the data says is wrong, flat over its tokens: `bad` (N,) the tokens known to be noise (the oracle's
    negatives) and `wrong` (N,) the tokens of the examples known to be wrong (the verdicts the `verified_*`
    selections read)."""

    bad: np.ndarray
    wrong: np.ndarray


def known_noise(tokens: Any, selection: str = "verified_tail") -> KnownNoise:
    """The data's known noise. A verdict per example: `is_correct` where the data labels it (an outcome verifier's
    verdict), else whether it holds a `corrupt` token (injected noise, or a process grade's first wrong number on).
    The bad tokens: the `corrupt` mask, and every token of a wrong example that marks none (a per-example label
    alone). An error when there is none."""
    corrupt, offsets = flat_list_column(tokens.data.column("corrupt"))
    corrupt = corrupt.astype(bool)
    lengths = np.diff(offsets)
    marked = np.bincount(np.repeat(np.arange(len(lengths)), lengths), corrupt, minlength=len(lengths)) > 0  # (E,)
    wrong = marked.copy()
    if "is_correct" in tokens.column_names:
        label = np.asarray(tokens["is_correct"])  # (E,) 1, 0, or -1 unlabelled
        wrong = np.where(label >= 0, label == 0, marked)
    bad = corrupt | np.repeat(wrong & ~marked, lengths)
    if not bad.any() and not wrong.any():
        raise ConfigError(f"config field 'partition.selection': '{selection}' needs data with known noise "
                          "(data.corrupt_fraction > 0, corrupt_spans, or records labelled is_correct: false)")
    return KnownNoise(bad, np.repeat(wrong, lengths))


def worst_tokens(scores: np.ndarray, example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((E,) flat index of each example's lowest-scored token, the earlier of tied ones; (N,) each token's
    example as 0..E-1) for scores (N,) and a non-decreasing example index (N,)."""
    ids, first = np.unique(example, return_index=True)
    order = np.lexsort((np.arange(scores.shape[0]), scores, example))  # by example, then score, then position
    return order[first], np.searchsorted(ids, example)  # groups keep their places in `order`


def verified_tail_partition(scores: np.ndarray, example: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """Boolean (N,) mask: in each example known to be wrong (`wrong` set on its tokens), every token from its
    lowest-scored one to its end is negative; every other token is positive. Within an example the earlier of
    tied tokens starts the tail.

    For data whose answers carry a verdict but not the place of the error (graded model answers, rejection
    sampling: `is_correct: false`): the verdict says which answers are wrong, the score says where each goes
    wrong, and the right start of a wrong answer is still learned, where keeping only the right answers
    (`correct_only`) loses it. The tail of `tail_partition` with the verdict in place of the ranking of
    examples; the first-error view of process supervision (Lightman et al., 2023, arXiv 2305.20050).

    Args:
        scores: (N,) scores of all response tokens in data order (low = suspicious).
        example: (N,) non-decreasing example index of each token.
        wrong: (N,) flags: the token's example is known wrong (`known_noise`); only which examples is read.
    """
    worst, of = worst_tokens(scores, example)
    return _cut_wrong(worst, of, wrong)


def verified_first_partition(scores: np.ndarray, example: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, no loss) boolean (N,) masks: `verified_tail`'s cut with the mistake alone forgotten. In each
    example known wrong, the lowest-scored token (where the cut starts: the best guess at the mistake) is the one
    negative, the rest of its tail gets no loss; every other token is positive.

    `oracle_first` on the tails a user can find: the verdict says which answers are wrong, the score where the
    mistake is (`first_wrong_partition` over the tails of `verified_tail_partition`).

    Args: as `verified_tail_partition`.
    """
    return first_wrong_partition(~verified_tail_partition(scores, example, wrong), example)


def _cut_wrong(start: np.ndarray, of: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """(N,) positive flags: each example known wrong negative from flat index `start[e]` to its end."""
    is_wrong = np.zeros(len(start), dtype=bool)
    np.logical_or.at(is_wrong, of, wrong.astype(bool))  # (E,) the verdicts
    return ~is_wrong[of] | (np.arange(of.shape[0]) < start[of])


def verified_random_partition(example: np.ndarray, wrong: np.ndarray, seed: int) -> np.ndarray:
    """Boolean (N,) mask: each example known wrong is negative from a token drawn uniformly among its own (seeded)
    to its end; every other token is positive. The control for `verified_tail`'s choice of where to cut: the
    same verdicts, the place of the cut at random."""
    ids, first, counts = np.unique(example, return_index=True, return_counts=True)
    draws = np.random.default_rng(seed).integers(0, counts)  # (E,) an offset within each example
    return _cut_wrong(first + draws, np.searchsorted(ids, example), wrong)


def verified_whole_partition(wrong: np.ndarray) -> np.ndarray:
    """Boolean (N,) mask: every token of an example known wrong is negative, every other one positive. With
    `ignore`, sft on the right answers at the same number of optimizer steps (rejection sampling's filter); with
    a forgetting term, likelihood on the right answers and unlikelihood on the wrong ones (UFT, arXiv 2504.11364)."""
    return ~wrong.astype(bool)


def first_wrong_partition(bad: np.ndarray, example: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, no loss) boolean (N,) masks: the first token known bad of each example is the only negative (the
    mistake itself: a process grade's first wrong number starts there), the example's other bad tokens get no loss
    (what follows a mistake builds on it, neither learned nor pushed), every other token is positive.

    Why: forgetting every known wrong token (`oracle`) spends most of its push on the prose after the mistake, which
    it makes unlikely, and barely moves the mistake (docs/results.md, the forgotten spans' NLL); here the whole
    negative mean falls on the mistakes.

    Args:
        bad: (N,) the tokens known to be noise, in data order.
        example: (N,) non-decreasing example index of each token.
    """
    bad = bad.astype(bool)
    idx = np.flatnonzero(bad)
    first = np.zeros_like(bad)
    if idx.size:
        starts = idx[np.r_[True, example[idx][1:] != example[idx][:-1]]]  # the first bad token of each example
        first[starts] = True
    return ~bad, bad & ~first
