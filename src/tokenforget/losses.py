"""Per-token cross-entropy, the training objectives and the lambda schedules, looked up by name.

Conventions (one everywhere): per-token tensors are (B, T) and aligned with `input_ids`; entry [b, t]
belongs to token t, predicted from tokens < t. Position 0 is never predicted, so its loss is 0 and its
class is 0. Token classes: +1 learn (positive), -1 forget (negative), 0 no loss (prompt, padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

LEARN, FORGET, NO_LOSS = 1, -1, 0


def token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Cross-entropy of every token under the model, aligned with the tokens.

    Args:
        logits: (B, T, V) next-token logits, any float dtype; upcast to fp32 one chunk at a time.
        input_ids: (B, T) token ids.
        chunk_size: positions per fp32 chunk, so the fp32 copy of the logits is never whole.

    Returns:
        (B, T) fp32: out[b, t] = -log p(input_ids[b, t] | input_ids[b, :t]) for t >= 1; out[:, 0] = 0.
    """
    bsz, seq, vocab = logits.shape
    flat_logits = logits[:, :-1].reshape(-1, vocab)  # (B*(T-1), V), predicts tokens 1..T-1
    targets = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    chunks = [
        F.cross_entropy(flat_logits[i : i + chunk_size].float(), targets[i : i + chunk_size], reduction="none")
        for i in range(0, flat_logits.shape[0], chunk_size)
    ]
    shifted = torch.cat(chunks).view(bsz, seq - 1) if chunks else flat_logits.new_zeros(bsz, 0).float()
    return F.pad(shifted, (1, 0))  # (B, T): position 0 has no prediction


@dataclass
class TokenCounts:
    """Denominators of the means: positive and negative tokens in the whole optimizer batch.

    The trainer sums them over all micro-batches of a gradient-accumulation step and over all ranks, so
    summing the per-micro-batch losses gives the mean over the whole optimizer batch.
    """

    pos: float
    neg: float

    @staticmethod
    def of(token_class: torch.Tensor) -> "TokenCounts":
        return TokenCounts(pos=float((token_class == LEARN).sum()), neg=float((token_class == FORGET).sum()))


@dataclass
class LossParts:
    """An objective's value plus the sums it was made of (detached, for logging)."""

    loss: torch.Tensor
    pos_sum: torch.Tensor
    neg_sum: torch.Tensor


def _sums(token_loss: torch.Tensor, token_class: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zero = token_loss.new_zeros(())
    pos_sum = torch.where(token_class == LEARN, token_loss, zero).sum()
    neg_sum = torch.where(token_class == FORGET, token_loss, zero).sum()
    return pos_sum, neg_sum


def forgetting_loss(
    token_loss: torch.Tensor,
    token_class: torch.Tensor,
    lam: float,
    counts: Optional[TokenCounts] = None,
) -> LossParts:
    """The forgetting objective of Taheri et al. (https://arxiv.org/abs/2508.04329).

    loss = sum_{t: class=+1} l_t / N_pos  -  lam * sum_{t: class=-1} l_t / N_neg

    Learn the positive tokens, do gradient ascent on the negative ones. With `counts` from the whole
    optimizer batch the sums over micro-batches add up to the batch mean (the authors' code averages per
    micro-batch instead). A missing class contributes 0; N is clamped to >= 1.

    Args:
        token_loss: (B, T) per-token cross-entropy (see `token_cross_entropy`).
        token_class: (B, T) int, +1 learn / -1 forget / 0 no loss.
        lam: weight of the forgetting term (lambda(t) from a schedule).
        counts: denominators; default: the counts in this batch.
    """
    counts = counts or TokenCounts.of(token_class)
    pos_sum, neg_sum = _sums(token_loss, token_class)
    loss = pos_sum / max(counts.pos, 1.0) - lam * neg_sum / max(counts.neg, 1.0)
    return LossParts(loss, pos_sum.detach(), neg_sum.detach())


def ignore_loss(
    token_loss: torch.Tensor, token_class: torch.Tensor, lam: float, counts: Optional[TokenCounts] = None
) -> LossParts:
    """Token cleaning: mean CE over positive tokens; negative tokens get exactly zero gradient.

    loss = sum_{t: class=+1} l_t / N_pos
    """
    counts = counts or TokenCounts.of(token_class)
    pos_sum, neg_sum = _sums(token_loss, token_class)
    return LossParts(pos_sum / max(counts.pos, 1.0), pos_sum.detach(), neg_sum.detach())


def sft_loss(
    token_loss: torch.Tensor, token_class: torch.Tensor, lam: float, counts: Optional[TokenCounts] = None
) -> LossParts:
    """Plain SFT: mean CE over every response token, whatever its class.

    loss = sum_{t: class!=0} l_t / (N_pos + N_neg)
    """
    counts = counts or TokenCounts.of(token_class)
    pos_sum, neg_sum = _sums(token_loss, token_class)
    return LossParts((pos_sum + neg_sum) / max(counts.pos + counts.neg, 1.0), pos_sum.detach(), neg_sum.detach())


Objective = Callable[[torch.Tensor, torch.Tensor, float, Optional[TokenCounts]], LossParts]

OBJECTIVES: dict[str, Objective] = {"forget": forgetting_loss, "ignore": ignore_loss, "sft": sft_loss}
USES_LAMBDA = frozenset({"forget"})  # objectives whose value depends on lambda (logged only for these)


def linear_schedule(step: int, total: int, t_min: float, t_max: float) -> float:
    """lambda(t) = t_min + (t_max - t_min) * t / T over optimizer steps (the paper's schedule)."""
    return t_min + (t_max - t_min) * step / max(total, 1)


def constant_schedule(step: int, total: int, t_min: float, t_max: float) -> float:
    """lambda(t) = t_max at every step."""
    return t_max


Schedule = Callable[[int, int, float, float], float]

SCHEDULES: dict[str, Schedule] = {"linear": linear_schedule, "constant": constant_schedule}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective '{name}', choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise KeyError(f"unknown lambda schedule '{name}', choose from {sorted(SCHEDULES)}")
    return SCHEDULES[name]
