"""`score` and `partition`: how each response token is scored, and which are learned or forgotten."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from tokenforget.errors import _check, check_name

FalsePositives = Literal["random", "detector"]


@dataclass
class ScoreConfig:
    """Per-token scoring: CE under the base and the reference model, made into a score by `method`."""

    batch_size: int = 8
    """Examples per forward pass; batches are grouped by length to keep padding low."""
    shard_size: int = 1024
    """Examples per shard: the unit written to disk as scoring goes (resume) and dealt out to ranks."""
    method: str = "paper"
    """How CE_base and CE_ref become the score that is ranked (`tokenforget.score_methods.SCORE_METHODS`):
    `paper` (CE_base - CE_ref), `relative`, `binned`, `token_z` (difficulty-corrected), `ref_loss` (-CE_ref),
    `ref_loss_z`, `ref_loss_window`, `ref_loss_example`, `ref_loss_copy`, `ref_loss_z_copy` (copies of a token
    pair inherit the earlier occurrence's score), `example_ref_loss`, `example_max_ref_loss` (an example's
    worst token), `ref_loss_min_rank` (the `ref_loss_wga` preset's, docs/detection.md). Changing it reuses the
    scoring pass."""
    spans: str = "token"
    """What is decided as one unit (`tokenforget.score_methods.span_decisions`): `token`; `number`, every token of a
    number takes the number's lowest score, and a number repeating an earlier one of its answer inherits that one's
    (a copied wrong value goes with its source); `step`, numbers first, then a whole line. Reuses the scoring pass."""
    precomputed_path: Optional[str] = None
    """Per-token scores made elsewhere: a Parquet file with one row per tokenized example, in order, holding
    `input_ids` (checked against ours) and `score` (one float per token), e.g. a `labels.parquet`. No reference
    is trained and nothing is scored; the scores are ranked as they are (leave `method` at `paper`)."""
    base_pass: Optional[bool] = None
    """Whether the scoring pass also runs the base model (CE_base). None: when something reads it, that is `method`
    (the `ref_loss*` and `example_*` methods read CE_ref only), the `tnpo` forgetting term and `tokenforget audit`.
    Without it the pass costs half as much and CE_base is stored as NaN (not measured)."""

    def __post_init__(self) -> None:
        from tokenforget.score_methods import SCORE_METHODS, SPAN_UNITS, reads_base

        _check(self.batch_size > 0, "score.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.shard_size > 0, "score.shard_size", f"must be > 0, got {self.shard_size}")
        check_name(self.method, SCORE_METHODS, "score.method")
        check_name(self.spans, SPAN_UNITS, "score.spans")
        _check(
            self.precomputed_path is None or self.method == "paper",
            "score.method", "precomputed scores are ranked as they are; leave score.method unset",
        )
        _check(self.base_pass is not False or not reads_base(self.method), "score.base_pass",
               f"false, but score.method '{self.method}' reads the base model's CE")


@dataclass
class PartitionConfig:
    """Which response tokens are positive (learn) and which negative (forget), from their scores."""

    rho: float = 0.7
    """Share of response tokens that are positive (the top-scored ones); the rest are negative."""
    selection: str = "global"
    """A name of `tokenforget.stages.partition.SELECTIONS` (checked when a run starts). `global`: the top rho of all tokens of the data set (the paper); `per_sample`: the top rho of each
    example (every example keeps some tokens); `threshold`: score >= `threshold` (rho unused);
    `soft`: the global ranking plus a weight per token in [-1, 1], 1 - r/k for the k positives and
    -(r - k + 1)/(N - k) for the negatives (r = rank), used as |weight| in the loss, so tokens near the cut
    count little (see `tokenforget.stages.partition`); `example`: whole examples, the top rho of them by mean score
    (with `score.method: ref_loss` and `ignore`, a sample filter dropping the highest reference loss);
    `tail`: in the 1 - rho of examples whose lowest token score is lowest, the tokens from that one to the end are
    negative (with `ref_loss` and `ignore`: each suspicious answer is cut where it first looks wrong);
    `verified_tail`: the same cut in every answer the data says is wrong (`is_correct: false`, or a known noisy token)
    and in no other (rho unused): a verifier's verdict says which answers, the score where each goes wrong (where the
    data has `is_correct`, that label is the verdict; else a known noisy token); `verified_random`: the same answers,
    each cut at a seeded random token (`seed`: the control for where to cut); `verified_whole`: every token of the
    answers known wrong negative (with `ignore`: rejection sampling's filter at sft's steps; with a forgetting term,
    unlikelihood on the wrong answers, UFT); `oracle`: the
    data's known noise is the negative set (injected `corrupt` tokens, or every token of an example with
    `is_correct: false`), a bound on any detector (scores unused); `oracle_first`: only the first known noisy token
    of each example negative (the mistake), its later noisy tokens no loss; `verified_first`: `verified_tail`'s cut
    token alone negative (the mistake as the score finds it), the rest of the tail no loss; `data`: the weights the data carries (a message's
    `weight`, `spans`, a `token_weight` column: > 0 learn, 0 no loss, < 0 forget; `tokenforget.stages.labels_in_data`),
    no reference and no scores; a token they say nothing about is learned. With any other selection the data's
    weights, where it has them, override the detector's classes. `simulated`: a
    detector of chosen `recall` and `precision` made from the known noise (`tokenforget.stages.partition.
    simulated_partition`), to measure how good a detector must be; `mixture`: the negative share estimated from the
    scores (a two-component Gaussian mixture's low component, `mixture_partition`) instead of a fixed rho."""
    threshold: float = 0.0
    """`selection: threshold` only: the score (nats, CE_base - CE_ref) at or above which a token is positive."""
    streaming: bool = False
    """For scores that do not fit in memory: a histogram cut over blocks of examples (rho approximate, reported)."""
    stream_rows: int = 100_000
    """Examples per block in streaming mode."""
    recall: float = 1.0
    """`selection: simulated` only: the share of the known wrong tokens in the negative set (drawn at random)."""
    precision: float = 1.0
    """`selection: simulated` only: the share of wrong tokens among the negatives (right ones added to reach it)."""
    false_positives: FalsePositives = "random"
    """`selection: simulated` only: the right tokens added, `random` ones or those the `score.method` finds most
    suspicious (`detector`: a real detector's false positives, the hardest right tokens)."""
    seed: int = 0
    """`selection: simulated` and `verified_random` only: the seed of their random draws."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.rho <= 1.0, "partition.rho", f"must be in [0, 1], got {self.rho}")
        _check(self.stream_rows > 0, "partition.stream_rows", f"must be > 0, got {self.stream_rows}")
        _check(0.0 <= self.recall <= 1.0, "partition.recall", f"must be in [0, 1], got {self.recall}")
        _check(0.0 < self.precision <= 1.0, "partition.precision", f"must be in (0, 1], got {self.precision}")
        _check(not self.streaming or self.selection == "global", "partition.selection",
               f"streaming supports the global selection only, got '{self.selection}'")
