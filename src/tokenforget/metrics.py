"""Metrics over numbers already measured: final answers and their accuracy, token-weighted means, and how well
scores find known corrupted tokens (AUROC, recall and precision of the negative set). No model, no torch."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from tokenforget.score_methods import average_ranks

_ANSWER = re.compile(r"(?:answer is|####)\s*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a worked solution: after 'The answer is' or '####', else the last number."""
    m = _ANSWER.search(text)
    found = m.group(1) if m else (_NUMBER.findall(text) or [None])[-1]
    return found.replace(",", "").rstrip(".") if found else None


_RESULT = re.compile(r"(?:=|####)\s*\$?\s*(-?[\d,]*\.?\d+)")  # a number right after `=` or `####`


_SETTLED = re.compile(r"[,.]*[^\d,.]")  # after the number: a character that cannot extend it


def answer_settled(text: str) -> bool:
    """Whether `extract_answer` of `text` is the same for every continuation of it: its first 'answer is' (or
    '####') number is followed by a character that cannot extend the number (digits, commas and a decimal point
    could). A generation can stop there without changing the answer it is graded on."""
    m = _ANSWER.search(text)
    return m is not None and _SETTLED.match(text, m.end()) is not None


def result_spans(text: str) -> tuple[tuple[int, int], ...]:
    """Character spans of the results in a worked solution: each number right after `=` (a step's result, in
    GSM8K's `<<48/2=24>>` notes and in plain `48/2 = 24`) and after `####` (the final answer).

    These are the tokens a wrong solution gets wrong; the NLL of a gold answer's result tokens measures what
    learning wrong solutions damages, which the mean over all tokens (mostly wording) hides.
    """
    return tuple(m.span(1) for m in _RESULT.finditer(text))


def answers_match(predicted: Optional[str], gold: Optional[str]) -> bool:
    """Two extracted answers are the same number ("18" = "18.0" = "18.00"); a missing one never matches."""
    if predicted is None or gold is None:
        return False
    try:
        return float(predicted) == float(gold)
    except ValueError:
        return predicted == gold


@dataclass
class Accuracy:
    accuracy: float
    n: int
    stderr: float
    correct: list[int] = field(default_factory=list)  # per problem, 1 or 0: paired differences between models


def answer_accuracy(predictions: Sequence[str], golds: Sequence[str]) -> Accuracy:
    """Exact match of extracted final answers, with the binomial standard error."""
    hits = [answers_match(extract_answer(p), extract_answer(g)) for p, g in zip(predictions, golds)]
    n = len(hits)
    acc = sum(hits) / n if n else float("nan")
    return Accuracy(acc, n, math.sqrt(acc * (1 - acc) / n) if n else float("nan"), [int(h) for h in hits])


@dataclass
class TokenMean:
    """A token-weighted mean over examples, with the standard error that treats examples as the units."""

    value: float
    stderr: float
    n: int  # examples
    tokens: int


def token_weighted_mean(sums: np.ndarray, counts: np.ndarray) -> TokenMean:
    """m = sum_i s_i / sum_i c_i, and the standard error of this ratio estimator over n examples:
    se = sqrt(n / (n - 1) * sum_i (s_i - m c_i)^2) / sum_i c_i. With one token per example this is the
    usual standard error of a mean; tokens of one example are not independent, so they are not the units."""
    n, total = len(sums), float(counts.sum())
    m = float(sums.sum()) / total if total else float("nan")
    if n < 2 or not total:
        return TokenMean(m, float("nan"), n, int(total))
    resid = sums - m * counts
    return TokenMean(m, math.sqrt(n / (n - 1) * float((resid**2).sum())) / total, n, int(total))


def auroc(scores: np.ndarray, is_bad: np.ndarray) -> float:
    """AUROC of a *low* score flagging a bad token: P(score_bad < score_good), ties count 1/2. NaN when there is
    nothing to rank against or a score is NaN (not measured: CE_base of a pass without the base model)."""
    bad = is_bad.astype(bool)
    n_bad, n_good = int(bad.sum()), int((~bad).sum())
    if n_bad == 0 or n_good == 0 or np.isnan(scores).any():
        return float("nan")
    ranks = average_ranks(-scores.astype(np.float64))  # high rank = low score
    return float((ranks[bad].sum() - n_bad * (n_bad + 1) / 2) / (n_bad * n_good))


@dataclass
class Detection:
    """How well the negative set finds known corrupted tokens (over response tokens)."""

    auroc: float
    recall: float  # corrupted tokens that are negative / corrupted tokens
    precision: float  # negative tokens that are corrupted / negative tokens
    corrupt_share: float  # chance level of precision
    n_corrupt: int
    n_tokens: int


def detection(scores: np.ndarray, is_bad: np.ndarray, negative: np.ndarray) -> Detection:
    """Detection metrics over flat (N,) arrays of response-token scores, corrupt flags and negative flags."""
    bad, neg = is_bad.astype(bool), negative.astype(bool)
    n_bad, n_neg = int(bad.sum()), int(neg.sum())
    return Detection(
        auroc=auroc(scores, bad),
        recall=float((bad & neg).sum() / n_bad) if n_bad else float("nan"),
        precision=float((bad & neg).sum() / n_neg) if n_neg else float("nan"),
        corrupt_share=n_bad / max(len(bad), 1),
        n_corrupt=n_bad,
        n_tokens=len(bad),
    )


def two_gaussians(x: np.ndarray, iters: int = 200, tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights, means, stds) of a two-component 1-D Gaussian mixture fitted to `x` by EM, the lower-mean
    component first.

    Started from the lowest 10% and the rest (their shares, means and stds), so the low component begins on the
    tail a suspicious set lives in; each std is floored at 1e-3 of x's (a component on tied values stays finite).
    E step: r_ik = w_k N(x_i; m_k, s_k) / sum_j w_j N(x_i; m_j, s_j); M step: w_k = mean_i r_ik,
    m_k = sum_i r_ik x_i / sum_i r_ik, s_k^2 = sum_i r_ik (x_i - m_k)^2 / sum_i r_ik. Stops when the
    log-likelihood gains less than `tol` per point.
    """
    x = x.astype(np.float64)
    floor = 1e-3 * max(float(x.std()), 1e-12)
    low = x <= np.quantile(x, 0.1)
    if low.all() or not low.any():  # all values equal: one component
        return np.array([0.0, 1.0]), np.array([x.mean()] * 2), np.array([floor] * 2)
    w = np.array([low.mean(), 1 - low.mean()])
    m = np.array([x[low].mean(), x[~low].mean()])
    sd = np.maximum(np.array([x[low].std(), x[~low].std()]), floor)
    last = -np.inf
    for _ in range(iters):
        logp = np.log(w) - np.log(sd) - 0.5 * ((x[:, None] - m) / sd) ** 2  # (N, 2), up to -log sqrt(2 pi)
        top = logp.max(axis=1, keepdims=True)
        ll = float((top[:, 0] + np.log(np.exp(logp - top).sum(axis=1))).mean())
        r = np.exp(logp - top)
        r /= r.sum(axis=1, keepdims=True)
        n_k = np.maximum(r.sum(axis=0), 1e-12)
        w, m = n_k / len(x), (r * x[:, None]).sum(axis=0) / n_k
        sd = np.maximum(np.sqrt((r * (x[:, None] - m) ** 2).sum(axis=0) / n_k), floor)
        if ll - last < tol:
            break
        last = ll
    order = np.argsort(m)
    return w[order], m[order], sd[order]
