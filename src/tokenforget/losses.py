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


class _LinearCrossEntropy(torch.autograd.Function):
    """CE of `targets` under logits = hidden @ weight.T, one chunk of rows at a time (see `linear_cross_entropy`)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, dtype: torch.dtype):  # type: ignore[override]
        w = weight.to(dtype)
        loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(loss)
        for i in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[i : i + chunk_size].to(dtype) @ w.T).float()  # (c, V): the only logits alive
            lse[i : i + chunk_size] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[i : i + chunk_size, None]).squeeze(1)
            loss[i : i + chunk_size] = lse[i : i + chunk_size] - picked
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[i : i + ctx.chunk_size].to(ctx.dtype)
            probs = torch.exp((h @ w.T).float() - lse[i : i + ctx.chunk_size, None])  # softmax, (c, V)
            probs[torch.arange(h.shape[0]), targets[i : i + ctx.chunk_size]] -= 1.0  # d CE / d logits
            g = (probs * grad_loss[i : i + ctx.chunk_size, None]).to(ctx.dtype)
            if grad_h is not None:
                grad_h[i : i + ctx.chunk_size] = (g @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (g.T @ h).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Per-row cross-entropy of `targets` under `hidden @ weight.T`, without the full logits.

    The (N, V) logits exist one chunk of `chunk_size` rows at a time, in fp32 for the log-sum-exp; the
    backward pass recomputes each chunk. Under autocast the matmuls run in the autocast dtype.

    Args:
        hidden: (N, H) final hidden states of the positions that predict `targets`.
        weight: (V, H) output embedding (lm_head) weight.
        targets: (N,) token ids.

    Returns:
        (N,) fp32 cross-entropy per row.
    """
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(device_type=dev, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, dtype)
