"""Partition: rank every response token of the data set by score; the top rho are positive.

Ranking is global (the paper's choice): one threshold for the whole data set, not per example.
Exactly round(rho * N) tokens are positive (halves round up). Ties are broken by data order: among
equal scores the token that comes first (earlier example, then earlier position) ranks higher, so
the partition is deterministic and the counts are exact. Selection is O(N) (`np.partition`), on flat
arrays read straight from Arrow, so 25 million scores take well under a second.

For score sets that do not fit in memory, `partition.streaming` finds the cut from per-shard histograms
(`tokenforget.stages.partition_streaming`).

Other token selections (`partition.selection`): the registry `SELECTIONS`, each a function of this module
(`per_sample_partition`, `threshold_partition`, `soft_weights`, `example_partition`, `tail_partition`,
`oracle_partition`, `simulated_partition`, `mixture_partition`; `data_classes` reads the data's weights and no
scores; the selections that read the data's verdicts are in `tokenforget.stages.verdicts`). Whatever the
selection, where the data carries weights they win (`with_data_labels`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from tokenforget.columns import flat_list_column, list_column
from tokenforget.config import to_dict
from tokenforget.config.tokens import PartitionConfig
from tokenforget.errors import ConfigError
from tokenforget.metrics import two_gaussians
from tokenforget.training.objectives import FORGET, LEARN, NO_LOSS
from tokenforget.runfolder import fingerprint, round_stage, stable_view
from tokenforget.stages.partition_streaming import n_positive, partition_streaming
from tokenforget.stages.stage import Arg, PlanInputs, Stage, StagePlan, StageRun
from tokenforget.stages.verdicts import (
    KnownNoise, first_wrong_partition, known_noise, verified_first_partition, verified_random_partition, verified_tail_partition,
    verified_whole_partition, worst_tokens,
)


def global_partition(scores: np.ndarray, rho: float) -> np.ndarray:
    """Boolean (N,) mask: True for the round(rho*N) highest scores, ties to the earlier token.

    Args:
        scores: (N,) scores of all response tokens in data order.
        rho: share of positive tokens, in [0, 1].
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinite values")
    n, k = scores.shape[0], n_positive(scores.shape[0], rho)
    if k in (0, n):
        return np.full(n, k == n, dtype=bool)
    cut = np.partition(scores, n - k)[n - k]  # the k-th highest score
    positive = scores > cut
    ties = np.flatnonzero(scores == cut)[: k - int(positive.sum())]  # earliest tied tokens fill the rest
    positive[ties] = True
    return positive


def per_sample_partition(scores: np.ndarray, example: np.ndarray, rho: float) -> np.ndarray:
    """Boolean (N,) mask: within each example, its round(rho * n_i) highest scores, ties to the earlier token.

    Every example keeps the same share of its tokens, however easy or hard it is as a whole (global
    ranking can leave an example with no positive token at all).

    Args:
        scores: (N,) scores of all response tokens in data order.
        example: (N,) non-decreasing example index of each token.
        rho: share of positive tokens per example, in [0, 1].
    """
    n = scores.shape[0]
    order = np.lexsort((np.arange(n), -scores, example))  # by example, then score descending, then position
    starts = np.searchsorted(example[order], example[order], side="left")  # first slot of each token's example
    rank = np.arange(n) - starts  # (N,) rank within its example, in `order`
    n_tokens = np.bincount(example, minlength=int(example.max()) + 1 if n else 0)
    k = np.floor(rho * n_tokens + 0.5).astype(np.int64)  # round half up, per example
    positive = np.empty(n, dtype=bool)
    positive[order] = rank < k[example[order]]
    return positive


def threshold_partition(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean (N,) mask: score >= threshold. The share of positives follows from the scores (rho unused).

    Score = CE_base - CE_ref, in nats: a threshold of 0 keeps every token the reference predicts at least
    as well as the base model.
    """
    return scores >= threshold


def soft_weights(scores: np.ndarray, rho: float) -> np.ndarray:
    """Signed (N,) float32 weights in [-1, 1] from the global ranking: sign = the global partition's class,
    magnitude = how far the token ranks from the cut.

    With r the rank (0 = highest score, ties to the earlier token, as in `global_partition`), N tokens and
    k = round(rho * N) positives:
        r <  k:  w = 1 - r / k              (1 for the best token, 1/k for the last positive)
        r >= k:  w = -(r - k + 1) / (N - k)  (-1/(N - k) for the first negative, -1 for the worst)
    Tokens near the cut, where the ranking is least sure, get little weight either way; the loss uses |w| as
    the token's weight and the sign as its class.
    """
    n, k = scores.shape[0], n_positive(scores.shape[0], rho)
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-scores, kind="stable")] = np.arange(n)
    w = np.where(rank < k, 1.0 - rank / max(k, 1), -(rank - k + 1) / max(n - k, 1))
    return w.astype(np.float32)


def example_partition(scores: np.ndarray, example: np.ndarray, rho: float) -> np.ndarray:
    """Boolean (N,) mask: every token of the round(rho * E) examples with the highest mean score, none of the
    others (a sample filter: with `ignore`, the lowest-scored examples are dropped whole). Ties go to the
    earlier example.

    With score `ref_loss` (-CE_ref) this drops the examples with the highest mean reference loss, the filter a
    user would try first.

    Args:
        scores: (N,) scores of all response tokens in data order.
        example: (N,) non-decreasing example index of each token.
        rho: share of examples kept (that have response tokens), in [0, 1].
    """
    ids, first = np.unique(example, return_index=True)
    sums = np.add.reduceat(scores.astype(np.float64), first) if len(first) else np.zeros(0)
    means = sums / np.diff(np.append(first, scores.shape[0]))  # (E,) mean score of each example
    kept = global_partition(means, rho)  # (E,) ties to the earlier example
    return kept[np.searchsorted(ids, example)]


def tail_partition(scores: np.ndarray, example: np.ndarray, rho: float) -> np.ndarray:
    """Boolean (N,) mask: in the round((1 - rho) * E) examples whose lowest score is lowest, every token from that
    lowest-scored one to the example's end is negative; every other token is positive. Among tied minima the
    earlier example stays whole; within an example the earlier of tied tokens starts the tail.

    Why the tail: an answer that goes wrong stays wrong after the error (later steps build on the wrong value and
    the final answer repeats it, where a loss-based detector finds it consistent), while what comes before it is
    right and still worth learning: the first-error view of process supervision (Lightman et al., 2023, arXiv
    2305.20050). With score `ref_loss` (-CE_ref) the examples are ranked as `example_max_ref_loss` ranks them, but
    only their tails are dropped instead of the whole answers.

    Args:
        scores: (N,) scores of all response tokens in data order.
        example: (N,) non-decreasing example index of each token.
        rho: share of examples left whole (that have response tokens), in [0, 1].
    """
    worst, of = worst_tokens(scores, example)
    whole = global_partition(scores[worst], rho) if len(worst) else np.zeros(0, dtype=bool)  # (E,) highest minima kept
    return whole[of] | (np.arange(scores.shape[0]) < worst[of])


def oracle_partition(bad: np.ndarray) -> np.ndarray:
    """Boolean (N,) mask: True for every token not known to be bad. The negative set is exactly the known
    noise (an injected `corrupt` mask, or every token of an example labelled `is_correct: false`): the bound
    on what any detector could give, not something a user can run on unlabelled data."""
    return ~bad.astype(bool)


def simulated_counts(n_bad: int, n_right: int, recall: float, precision: float) -> tuple[int, int]:
    """(true positives, false positives) of a simulated negative set: tp = round(recall x n_bad) wrong tokens and
    fp = round(tp / precision) - tp right ones (capped at n_right), halves rounding up, so that tp / (tp + fp)
    is `precision` and tp / n_bad is `recall` as nearly as whole tokens allow."""
    tp = n_positive(n_bad, recall)
    return tp, min(n_right, int(math.floor(tp / precision + 0.5)) - tp)


def simulated_partition(
    bad: np.ndarray, scores: np.ndarray, recall: float, precision: float, false_positives: str, seed: int
) -> np.ndarray:
    """Boolean (N,) mask: a detector of controlled quality made from the known noise (`bad`). Its negative set is a
    seeded random `recall` share of the wrong tokens plus right tokens enough for `precision`
    (`simulated_counts`): drawn at random (`false_positives: random`), or the right tokens the detector's own
    `scores` find most suspicious, lowest first, ties to the earlier token (`detector`: its false positives are
    the hard right numbers a real detector takes). Not a method: the yardstick that says how good a detector
    must be before training on its negatives pays (issue 25).

    Args:
        bad: (N,) flags of the known noisy response tokens.
        scores: (N,) the detector's scores (`detector` only; low = suspicious).
        seed: draws the wrong tokens kept (and the random right ones); the same seed, the same set.
    """
    bad = bad.astype(bool)
    bad_idx, right_idx = np.flatnonzero(bad), np.flatnonzero(~bad)
    tp, fp = simulated_counts(len(bad_idx), len(right_idx), recall, precision)
    rng = np.random.default_rng(seed)
    negative = np.zeros(bad.shape[0], dtype=bool)
    negative[rng.choice(bad_idx, tp, replace=False)] = True
    if false_positives == "random":
        negative[rng.choice(right_idx, fp, replace=False)] = True
    else:  # the detector's most suspicious right tokens (stable sort: ties to the earlier one)
        negative[right_idx[np.argsort(scores[right_idx], kind="stable")[:fp]]] = True
    return ~negative


def mixture_partition(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """(Boolean (N,) mask, estimated negative share): the share of the data that is noise estimated from the scores
    themselves instead of a fixed rho. A two-component Gaussian mixture (`tokenforget.metrics.two_gaussians`) is fitted to the scores;
    the low component's weight w_low is the negative share, and the round(w_low x N) lowest scores are negative
    (the global partition at rho = 1 - w_low). Meant for a score whose noise forms a cluster of its own, as the
    contrastive score's recurring error does (a learned wrong value: low; a hard right one: near 0)."""
    w, _, _ = two_gaussians(scores)
    return global_partition(scores, 1.0 - float(w[0])), float(w[0])




def with_data_labels(
    classes: np.ndarray, weights: Optional[np.ndarray], data_weight: np.ndarray, response: np.ndarray
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Flat classes and |weights| with the data's weight w in force wherever it gives one (not NaN) on a response
    token: w > 0 learn, w = 0 no loss, w < 0 forget, |w| the token's weight.

    The |weights| stay None while every weight the data gives is -1, 0 or 1 (the plain objective, computed exactly
    as without weights); a fractional one makes them |w| where labelled and 1 (or the soft selection's) elsewhere.

    Args:
        classes: (N,) int8 classes from a selection; weights: (N,) float32 |weights| of the soft selection or None.
        data_weight: (N,) float32 weights from the data, NaN where it says nothing; response: (N,) 0/1 flags.
    """
    said = response.astype(bool) & ~np.isnan(data_weight)  # (N,)
    w = data_weight[said]
    classes = classes.copy()
    classes[said] = np.where(w > 0, LEARN, np.where(w < 0, FORGET, NO_LOSS))
    if weights is None and np.isin(np.abs(w), (0.0, 1.0)).all():
        return classes, None
    weights = np.where(response.astype(bool), 1.0, 0.0).astype(np.float32) if weights is None else weights.copy()
    weights[said] = np.abs(w)
    return classes, weights


def data_classes(data_weight: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Flat classes (and |weights|, where some are fractional) from the data's weights alone: a response token
    the data says nothing about is learned, as in SFT (`with_data_labels` over all-learn classes)."""
    classes = np.where(response.astype(bool), LEARN, NO_LOSS).astype(np.int8)
    return with_data_labels(classes, None, data_weight, response)


def class_counts(classes: np.ndarray, response: np.ndarray) -> dict[str, Any]:
    """The partition stats of classes that no score ranked (threshold NaN, no quantiles)."""
    resp = response.astype(bool)
    return {"n_tokens": int(resp.sum()), "n_positive": int((classes == LEARN).sum()),
            "n_negative": int((classes == FORGET).sum()), "n_no_loss": int((resp & (classes == NO_LOSS)).sum()),
            "threshold": float("nan"), "quantiles": {}}


@dataclass(frozen=True)
class Ranking:
    """What a selection decides over: the response tokens of the whole data set, in data order."""

    scores: np.ndarray  # (n,) float: high = learn
    example: np.ndarray  # (n,) int: the example each token belongs to
    noise: Optional[KnownNoise]  # the known noise (selections with `reads_known_noise`), else None
    pc: PartitionConfig  # rho, threshold and the simulated detector's settings

    def known(self, name: str) -> KnownNoise:  # the input of the selections that read the known noise
        if self.noise is None:
            raise ValueError(f"the {name} selection needs the known noise")
        return self.noise


@dataclass
class Selected:
    """A selection's decision: positive (learn) flags, and what some selections add."""

    positive: np.ndarray  # (n,) bool
    signed_weights: Optional[np.ndarray] = None  # (n,) in [-1, 1], `soft` only: |w| weighs each token's loss
    negative_share: Optional[float] = None  # `mixture` only: the share it estimated
    no_loss: Optional[np.ndarray] = None  # (n,) bool: neither learned nor forgotten (class 0): the `*_first` selections


def _soft(r: Ranking) -> Selected:
    return Selected((signed := soft_weights(r.scores, r.pc.rho)) > 0, signed_weights=signed)


def _first_wrong(r: Ranking) -> Selected:
    positive, no_loss = first_wrong_partition(r.known("oracle_first").bad, r.example)
    return Selected(positive, no_loss=no_loss)


def _verified_first(r: Ranking) -> Selected:
    positive, no_loss = verified_first_partition(r.scores, r.example, r.known("verified_first").wrong)
    return Selected(positive, no_loss=no_loss)


def _mixture(r: Ranking) -> Selected:
    positive, share = mixture_partition(r.scores)
    return Selected(positive, negative_share=share)


def _data(r: Ranking) -> Selected:  # not a ranking: `data_classes` reads the data's weights
    raise ValueError("the data selection reads the data's weights: `data_classes`, not `select_tokens`")


@dataclass(frozen=True)
class Selection:
    """One `partition.selection`: what it decides, and what it needs. A new selection is one record here."""

    decide: Callable[[Ranking], Selected]
    needs_scores: bool = True  # False: it ranks nothing, so no reference is trained and no token scored
    reads_known_noise: bool = False  # True: it reads the data's known noise (refused early on data without any)


# `partition.selection` -> its record: the one place a selection is declared (the config holds its name, checked
# against this registry when a run starts: `pipeline.names.check_names`).
SELECTIONS: dict[str, Selection] = {
    "global": Selection(lambda r: Selected(global_partition(r.scores, r.pc.rho))),
    "per_sample": Selection(lambda r: Selected(per_sample_partition(r.scores, r.example, r.pc.rho))),
    "threshold": Selection(lambda r: Selected(threshold_partition(r.scores, r.pc.threshold))),
    "soft": Selection(_soft),
    "example": Selection(lambda r: Selected(example_partition(r.scores, r.example, r.pc.rho))),
    "tail": Selection(lambda r: Selected(tail_partition(r.scores, r.example, r.pc.rho))),
    "verified_tail": Selection(
        lambda r: Selected(verified_tail_partition(r.scores, r.example, r.known("verified_tail").wrong)),
        reads_known_noise=True),
    "verified_whole": Selection(lambda r: Selected(verified_whole_partition(r.known("verified_whole").wrong)),
                                needs_scores=False, reads_known_noise=True),
    "verified_random": Selection(
        lambda r: Selected(verified_random_partition(r.example, r.known("verified_random").wrong, r.pc.seed)),
        needs_scores=False, reads_known_noise=True),
    "oracle": Selection(lambda r: Selected(oracle_partition(r.known("oracle").bad)), needs_scores=False,
                        reads_known_noise=True),
    "oracle_first": Selection(_first_wrong, needs_scores=False, reads_known_noise=True),
    "verified_first": Selection(_verified_first, reads_known_noise=True),
    "data": Selection(_data, needs_scores=False),
    "simulated": Selection(lambda r: Selected(simulated_partition(r.known("simulated").bad, r.scores, r.pc.recall,
                                                                  r.pc.precision, r.pc.false_positives, r.pc.seed)),
                           reads_known_noise=True),
    "mixture": Selection(_mixture),
}


def select_tokens(
    scores: np.ndarray, response: np.ndarray, offsets: np.ndarray, selection: str, rho: float, threshold: float = 0.0,
    noise: Optional[KnownNoise] = None, pc: Optional[PartitionConfig] = None,
) -> tuple[np.ndarray, Optional[np.ndarray], "PartitionStats"]:
    """Flat classes (+1/-1/0, int8), flat |weights| (float32, soft selection only, else None) and stats.

    Args:
        scores: flat per-token scores of every example; response: flat 0/1 flags of the tokens to rank.
        offsets: (E + 1,) example boundaries into the flat arrays.
        selection: a name of `SELECTIONS`; rho, threshold: the share positive, the `threshold` selection's cut.
        noise: the known noise, flat (the selections that read it only: `Selection.reads_known_noise`).
        pc: the partition config (`simulated` reads its recall, precision, false_positives and seed).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection '{selection}', choose from {list(SELECTIONS)}")
    resp = response.astype(bool)
    chosen = scores[resp]
    if not np.all(np.isfinite(chosen)):
        raise ValueError("scores contain NaN or infinite values")
    settings = replace(pc or PartitionConfig(), rho=rho, threshold=threshold)
    example = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[resp]
    chosen_noise = None if noise is None else KnownNoise(noise.bad[resp], noise.wrong[resp])
    decided = SELECTIONS[selection].decide(Ranking(chosen, example, chosen_noise, settings))
    classes = np.full(scores.shape[0], NO_LOSS, dtype=np.int8)
    classes[resp] = np.where(decided.positive, LEARN, FORGET)
    if decided.no_loss is not None:
        classes[np.flatnonzero(resp)[decided.no_loss]] = NO_LOSS
    weights = None
    if decided.signed_weights is not None:
        weights = np.zeros(scores.shape[0], dtype=np.float32)
        weights[resp] = np.abs(decided.signed_weights)
    stats = _stats(chosen, decided.positive)
    stats.estimated_negative_share = decided.negative_share
    if decided.no_loss is not None:
        stats.n_negative -= int(decided.no_loss.sum())  # the negatives are the forgotten tokens only
    return classes, weights, stats


@dataclass
class PartitionStats:
    n_tokens: int
    n_positive: int
    n_negative: int
    threshold: float  # lowest positive score (nan when no token is positive)
    quantiles: dict[str, float]
    estimated_negative_share: Optional[float] = None  # the mixture selection's estimate (else None)


def flat_token_classes(scores: np.ndarray, response: np.ndarray, rho: float) -> tuple[np.ndarray, PartitionStats]:
    """Flat int8 classes (+1 learn, -1 forget, 0 no loss) for flat per-token scores and response flags."""
    resp = response.astype(bool)
    chosen = scores[resp]
    positive = global_partition(chosen, rho)
    classes = np.full(scores.shape[0], NO_LOSS, dtype=np.int8)
    classes[resp] = np.where(positive, LEARN, FORGET)
    return classes, _stats(chosen, positive)


def token_classes(
    scores: Sequence[np.ndarray], response_masks: Sequence[Sequence[int]], rho: float
) -> tuple[list[np.ndarray], PartitionStats]:
    """Per-example class arrays from per-example score arrays (convenience over `flat_token_classes`)."""
    lengths = [len(m) for m in response_masks]
    flat, stats = flat_token_classes(
        np.concatenate([np.asarray(s, np.float32) for s in scores]),
        np.concatenate([np.asarray(m, np.int8) for m in response_masks]),
        rho,
    )
    return np.split(flat, np.cumsum(lengths)[:-1]), stats


def _stats(flat: np.ndarray, positive: np.ndarray) -> PartitionStats:
    qs = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    values = np.quantile(flat, qs) if flat.size else np.full(len(qs), np.nan)
    return PartitionStats(
        n_tokens=int(flat.size),
        n_positive=int(positive.sum()),
        n_negative=int(flat.size - positive.sum()),
        threshold=float(flat[positive].min()) if positive.any() else float("nan"),
        quantiles={f"q{int(q * 100)}": float(v) for q, v in zip(qs, values)},
    )


# ---------------------------------------------------------------- the partition stage over Arrow columns
# `tokens`: the data stage's examples (input_ids, response_mask, corrupt, ...); `scores`: the scores stage's
# (score per token). Both are `datasets.Dataset`s; the classes come back as an Arrow table, one list per example.


def partition_exact(tokens: Any, scores: Any, pc: PartitionConfig) -> tuple[pa.Table, dict[str, Any]]:
    """The partition stage: (`token_class` (and `token_weight`, soft selection) per example, stats) by
    `pc.selection`, all scores in memory as one flat array: exact counts (global, per-sample), or a cut, or soft
    weights (`partition.streaming`: `tokenforget.stages.partition_streaming.partition_streaming`)."""
    flat_scores, offsets = flat_list_column(scores.data.column("score"))
    flat_resp, _ = flat_list_column(tokens.data.column("response_mask"))
    data_weight = flat_list_column(tokens.data.column("data_weight"))[0] if "data_weight" in tokens.column_names else None
    if pc.selection == "data":
        if data_weight is None:
            raise ConfigError("config field 'partition.selection': 'data' needs data that carries weights (a message's "
                              "'weight', 'spans', or 'token_weight'; see docs/methods-and-options.md)")
        classes, weights = data_classes(data_weight, flat_resp)
        return _classes_table(offsets, classes, weights), {**class_counts(classes, flat_resp), "selection": "data"}
    if pc.selection == "global" and data_weight is None:  # the paper's partition, as before
        classes, stats = flat_token_classes(flat_scores, flat_resp, pc.rho)
        return pa.table({"token_class": list_column(offsets, classes)}), stats.__dict__
    noise = known_noise(tokens, pc.selection) if SELECTIONS[pc.selection].reads_known_noise else None
    classes, weights, stats = select_tokens(flat_scores, flat_resp, offsets, pc.selection, pc.rho, pc.threshold, noise, pc)
    if data_weight is not None:  # the data's labels win where both speak
        classes, weights = with_data_labels(classes, weights, data_weight, flat_resp)
        return _classes_table(offsets, classes, weights), {**stats.__dict__, **class_counts(classes, flat_resp),
                                                           "selection": pc.selection, "data_labels": True}
    return _classes_table(offsets, classes, weights), {**stats.__dict__, "selection": pc.selection}


def _classes_table(offsets: np.ndarray, classes: np.ndarray, weights: Optional[np.ndarray]) -> pa.Table:
    columns = {"token_class": list_column(offsets, classes)}
    if weights is not None:
        columns["token_weight"] = list_column(offsets, weights)
    return pa.table(columns)


# ---------------------------------------------------------------- the stage


def _fingerprint(run: StageRun, rnd: Arg) -> str:
    pc = stable_view("partition", to_dict(run.cfg.partition))
    if run.cfg.partition.selection != "threshold":
        pc.pop("threshold", None)
    if run.cfg.partition.selection != "simulated":  # its knobs move nothing else
        for k in ("recall", "precision", "false_positives", "seed"):
            pc.pop(k, None)
    return fingerprint("partition", run.fp("scores", rnd), pc)


def _make(run: StageRun, rnd: Arg) -> Any:
    """Token classes (+1/-1/0) for every training example, by `partition.selection` over the scores (and
    `token_weight` for the soft selection); in memory, or streamed (`partition.streaming`)."""
    import datasets

    name, pc = round_stage("partition", rnd), run.cfg.partition  # type: ignore[arg-type]
    tokens, scores = run.need("data"), run.need("scores", rnd)

    def commit(built: tuple[Any, dict[str, Any]], d: Path) -> None:
        table, stats = built
        run.log(f"[{name}] {stats['n_positive']} positive, {stats['n_negative']} negative of {stats['n_tokens']} tokens")
        datasets.Dataset(table).save_to_disk(str(d / "classes"))
        (d / "stats.json").write_text(json.dumps(stats, indent=2))

    cut = partition_streaming if pc.streaming else partition_exact  # scores in memory or not
    out = run.folder.ensure(name, run.fp("partition", rnd), lambda: cut(tokens, scores, pc), commit)
    return datasets.load_from_disk(str(out / "classes"))


def _plan(run: StageRun, rnd: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    sets = inputs.sets
    ranked = "read the data's weights of" if run.cfg.partition.selection == "data" else "rank"
    work = f"{ranked} {sets.response_tokens:,} response tokens"
    return StagePlan(round_stage("partition", rnd), fp, reuse, len(sets.all), sum(map(len, sets.all)), work, 0.0)  # type: ignore[arg-type]


STAGES = (Stage("partition", lambda _run, rnd: [("data", None), ("scores", rnd)], _fingerprint, _make, _plan),)
