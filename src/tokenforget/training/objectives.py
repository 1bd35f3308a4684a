"""The training objectives, their forgetting terms and the lambda schedules, looked up by name.

Conventions (one everywhere): per-token tensors are (B, T) and aligned with `input_ids`; entry [b, t]
belongs to token t, predicted from tokens < t. Position 0 is never predicted, so its loss is 0 and its
class is 0. Token classes: +1 learn (positive), -1 forget (negative), 0 no loss (prompt, padding).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from tokenforget.config.training import ObjectiveConfig
from tokenforget.errors import check_name

LEARN, FORGET, NO_LOSS = 1, -1, 0


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
    weight: Optional[torch.Tensor] = None,
    ce_base: Optional[torch.Tensor] = None,
    forget_term: str = "ga",
    beta: float = 1.0,
) -> LossParts:
    """The forgetting objective of Taheri et al. (https://arxiv.org/abs/2508.04329), with a choice of
    forgetting term for the negative tokens.

    loss = sum_{t: class=+1} w_t l_t / N_pos  +  lam * sum_{t: class=-1} w_t f(l_t) / N_neg

    With the paper's term f(l) = -l (`ga`) and w = 1 this is mean CE(positive) - lam * mean CE(negative):
    learn the positive tokens, do gradient ascent on the negative ones. Other terms (`FORGET_TERMS`) bound
    the push away. With `counts` from the whole optimizer batch the sums over micro-batches add up to the
    batch mean (the authors' code averages per micro-batch instead). A missing class contributes 0; N is
    clamped to >= 1. The counts are token counts whatever the weights, so soft weights scale tokens
    against a fixed denominator.

    Args:
        token_loss: (B, T) per-token cross-entropy (see `model.head_ce.token_cross_entropy`).
        token_class: (B, T) int, +1 learn / -1 forget / 0 no loss.
        lam: weight of the forgetting term (lambda(t) from a schedule).
        counts: denominators; default: the counts in this batch.
        weight: (B, T) per-token weights in [0, 1] (soft token selection); default 1 everywhere.
        ce_base: (B, T) CE of each token under the base model (what `tnpo` compares with).
        forget_term: name in `FORGET_TERMS`.
        beta: the temperature of `wga` and `tnpo`.
    """
    counts = counts or TokenCounts.of(token_class)
    pos_sum, neg_sum = _sums(token_loss, token_class)
    if forget_term == "ga" and weight is None:  # the paper's objective, computed exactly as before
        loss = pos_sum / max(counts.pos, 1.0) - lam * neg_sum / max(counts.neg, 1.0)
        return LossParts(loss, pos_sum.detach(), neg_sum.detach())
    w = torch.ones_like(token_loss) if weight is None else weight.to(token_loss.dtype)
    forget = get_forget_term(forget_term)(token_loss, ce_base, beta)  # (B, T)
    learn_sum, forget_sum = _sums(w * token_loss, token_class)[0], _sums(w * forget, token_class)[1]
    loss = learn_sum / max(counts.pos, 1.0) + lam * forget_sum / max(counts.neg, 1.0)
    return LossParts(loss, pos_sum.detach(), neg_sum.detach())


# ---------------------------------------------------------------- forgetting terms for negative tokens
# Each maps the per-token CE l = -log p (B, T) to the per-token term f(l) (B, T) that `forgetting_loss`
# averages over the negative tokens and adds with weight lambda. sg() is stop-gradient (`.detach()`).

UNLIKELIHOOD_MIN_CE = 1e-6  # p <= exp(-1e-6): the term stays <= ~13.8 and its gradient finite


def ga_term(ce: torch.Tensor, ce_base: Optional[torch.Tensor] = None, beta: float = 1.0) -> torch.Tensor:
    """Gradient ascent, the paper's term (https://arxiv.org/abs/2508.04329): f = -l = log p.

    Unbounded below: minimising it drives p to 0 without limit. d f / d l = -1.
    """
    return -ce


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-x)) for x > 0, stable at both ends (Maechler 2012): expm1 below ln 2, log1p above."""
    small = x < math.log(2.0)
    return torch.where(small, torch.log(-torch.expm1(-x.clamp(max=math.log(2.0)))), torch.log1p(-torch.exp(-x.clamp(min=math.log(2.0)))))


def unlikelihood_term(ce: torch.Tensor, ce_base: Optional[torch.Tensor] = None, beta: float = 1.0) -> torch.Tensor:
    """Unlikelihood (Welleck et al., 2019, https://arxiv.org/abs/1908.04319): f = -log(1 - p), p = exp(-l).

    Bounded below by 0 (reached at p = 0): the push stops once the token is unlikely.
    d f / d l = -p / (1 - p): strong while the model still predicts the token, vanishing as p -> 0.
    l is clamped to >= `UNLIKELIHOOD_MIN_CE`, so a token with p ~ 1 gives a large but finite term (no
    gradient below the clamp).
    """
    return -log1mexp(ce.clamp(min=UNLIKELIHOOD_MIN_CE))


def wga_term(ce: torch.Tensor, ce_base: Optional[torch.Tensor] = None, beta: float = 1.0) -> torch.Tensor:
    """Weighted gradient ascent (Wang et al., ICLR 2025, https://arxiv.org/abs/2502.19301):
    f = -sg(p)^beta * l.

    The gradient is gradient ascent scaled by p^beta: tokens the model has already made unlikely stop
    being pushed. d f / d l = -p^beta.
    """
    return -torch.exp(-beta * ce.detach()) * ce


def tnpo_term(ce: torch.Tensor, ce_base: Optional[torch.Tensor] = None, beta: float = 1.0) -> torch.Tensor:
    """Token-wise NPO (Wang et al., ICLR 2025, https://arxiv.org/abs/2502.19301; NPO: Zhang et al.,
    https://arxiv.org/abs/2404.05868): f = -w * l with w = 2 sg(p)^beta / (sg(p)^beta + p_ref^beta).

    p_ref is the base model's probability of the token (`ce_base` = -log p_ref, from the scores stage). w = 1
    while the model still agrees with the base (so it starts as `ga`), and falls to 0 as p drops below
    p_ref. Computed as w = 2 sigmoid(beta (l_ref - l)), which equals the ratio and cannot overflow.
    """
    if ce_base is None:
        raise ValueError("the tnpo forgetting term needs ce_base: the base model's CE of each token")
    w = 2.0 * torch.sigmoid(beta * (ce_base.to(ce.dtype) - ce.detach()))
    return -w * ce


ForgetTerm = Callable[[torch.Tensor, Optional[torch.Tensor], float], torch.Tensor]


@dataclass(frozen=True)
class Term:
    """One `train.objective.forget_term`: what `forget` does to a negative token. A new term is one record here."""

    push: ForgetTerm  # (ce, ce_base or None, beta) -> the token's loss
    needs_base_ce: bool = False  # it compares with the base model's CE of the token (`ce_base`, from the scores stage)


FORGET_TERMS: dict[str, Term] = {
    "ga": Term(ga_term),
    "unlikelihood": Term(unlikelihood_term),
    "wga": Term(wga_term),
    "tnpo": Term(tnpo_term, needs_base_ce=True),
}


def named(registry: dict[str, Any], name: str, what: str) -> Any:
    """`registry[name]`, or a KeyError naming `what` and the choices (one lookup for every registry here)."""
    if name not in registry:
        raise KeyError(f"unknown {what} '{name}', choose from {sorted(registry)}")
    return registry[name]


def get_forget_term(name: str) -> ForgetTerm:
    return named(FORGET_TERMS, name, "forgetting term").push


def ignore_loss(
    token_loss: torch.Tensor,
    token_class: torch.Tensor,
    lam: float,
    counts: Optional[TokenCounts] = None,
    weight: Optional[torch.Tensor] = None,
    **_unused: Any,
) -> LossParts:
    """Token cleaning: mean CE over positive tokens; negative tokens get exactly zero gradient.

    loss = sum_{t: class=+1} w_t l_t / N_pos      (w = 1 unless soft weights (B, T) are given)
    """
    counts = counts or TokenCounts.of(token_class)
    pos_sum, neg_sum = _sums(token_loss, token_class)
    learn_sum = pos_sum if weight is None else _sums(weight.to(token_loss.dtype) * token_loss, token_class)[0]
    return LossParts(learn_sum / max(counts.pos, 1.0), pos_sum.detach(), neg_sum.detach())


def sft_loss(
    token_loss: torch.Tensor,
    token_class: torch.Tensor,
    lam: float,
    counts: Optional[TokenCounts] = None,
    **_unused: Any,
) -> LossParts:
    """Plain SFT: mean CE over every response token, whatever its class (and whatever its weight).

    loss = sum_{t: class!=0} l_t / (N_pos + N_neg)
    """
    counts = counts or TokenCounts.of(token_class)
    pos_sum, neg_sum = _sums(token_loss, token_class)
    return LossParts((pos_sum + neg_sum) / max(counts.pos + counts.neg, 1.0), pos_sum.detach(), neg_sum.detach())


def dft_loss(
    token_loss: torch.Tensor,
    token_class: torch.Tensor,
    lam: float,
    counts: Optional[TokenCounts] = None,
    **_unused: Any,
) -> LossParts:
    """Dynamic Fine-Tuning (Wu et al., 2025, https://arxiv.org/abs/2508.05629): every response token's CE
    scaled by the model's own, detached, probability of it.

    loss = sum_{t: class!=0} sg(p_t) l_t / (N_pos + N_neg),   p_t = exp(-l_t)

    So d loss / d l_t = p_t / N: tokens the model finds unlikely (possibly noise) pull little. The same
    loss as TRL's `SFTConfig(loss_type="dft")` and LLaMA-Factory's `use_dft_loss` (token mean over the
    optimizer batch). Token classes only mark which tokens are response tokens; no partition is needed.
    """
    counts = counts or TokenCounts.of(token_class)
    scaled = torch.exp(-token_loss.detach()) * token_loss  # (B, T)
    pos_sum, neg_sum = _sums(scaled, token_class)
    raw_pos, raw_neg = _sums(token_loss, token_class)
    return LossParts((pos_sum + neg_sum) / max(counts.pos + counts.neg, 1.0), raw_pos.detach(), raw_neg.detach())


# (token_loss, token_class, lam, counts, **extras) -> LossParts; extras (keyword, only when set): weight,
# ce_base (per-token (B, T) tensors from the batch), forget_term, beta (the `forget` objective's settings).
LossFn = Callable[..., LossParts]


@dataclass(frozen=True)
class Objective:
    """One `train.objective.mode`: its loss and what it needs. A new objective is one record in `OBJECTIVES`."""

    loss: LossFn
    uses_lambda: bool = False  # its value depends on lambda(t) (logged only for these)
    needs_partition: bool = True  # False: every response token alike, trained on the data alone (no reference)
    settings: tuple[str, ...] = ()  # the `train.objective` fields its loss takes, bound once by `bound`

    def bound(self, objective: ObjectiveConfig) -> LossFn:
        """The loss with its settings bound (torchtune's `DPOLoss(beta)` style):
        a caller passes the batch's tensors and lambda(t) only."""
        return functools.partial(self.loss, **{name: getattr(objective, name) for name in self.settings})


OBJECTIVES: dict[str, Objective] = {
    "forget": Objective(forgetting_loss, uses_lambda=True, settings=("forget_term", "beta")),
    "ignore": Objective(ignore_loss),
    "sft": Objective(sft_loss, needs_partition=False),
    "dft": Objective(dft_loss, needs_partition=False),
}


def needs_partition(mode: str) -> bool:
    """Whether a training of `mode` reads the partition (and so a reference and scores). A name that is no mode (a
    `compare.variants` entry, planned and compared beside the modes) counts as reading it."""
    return OBJECTIVES[mode].needs_partition if mode in OBJECTIVES else True


def needs_base_ce(objective: ObjectiveConfig) -> bool:
    """Whether a training with `objective` reads the base model's CE of each token: its mode
    takes a forgetting term, and that term compares with the base (`Term.needs_base_ce`)."""
    return "forget_term" in OBJECTIVES[objective.mode].settings and FORGET_TERMS[objective.forget_term].needs_base_ce


def check_objective(objective: ObjectiveConfig, where: str) -> None:
    """Refuse, naming the field, an objective whose names are not in this module's registries."""
    check_name(objective.mode, OBJECTIVES, f"{where}.mode")
    check_name(objective.forget_term, FORGET_TERMS, f"{where}.forget_term")
    check_name(objective.schedule, SCHEDULES, f"{where}.schedule")


def linear_schedule(step: int, total: int, t_min: float, t_max: float) -> float:
    """lambda(t) = t_min + (t_max - t_min) * t / T over optimizer steps (the paper's schedule)."""
    return t_min + (t_max - t_min) * step / max(total, 1)


def constant_schedule(step: int, total: int, t_min: float, t_max: float) -> float:
    """lambda(t) = t_max at every step."""
    return t_max


def cosine_schedule(step: int, total: int, t_min: float, t_max: float) -> float:
    """lambda(t) = t_min + (t_max - t_min) (1 - cos(pi t / T)) / 2: rises slowly, fastest at T/2, flat at T."""
    return t_min + (t_max - t_min) * (1.0 - math.cos(math.pi * step / max(total, 1))) / 2.0


def warmup_constant_schedule(step: int, total: int, t_min: float, t_max: float, warmup: float = 0.1) -> float:
    """lambda(t) = t_min + (t_max - t_min) min(1, t / (warmup T)): linear over the first `warmup` share of
    the steps, then t_max (forget at full strength once the model has learned the positives a little)."""
    ramp = warmup * max(total, 1)
    return t_max if ramp <= 0 else t_min + (t_max - t_min) * min(1.0, step / ramp)


Schedule = Callable[[int, int, float, float], float]

SCHEDULES: dict[str, Schedule] = {
    "linear": linear_schedule,
    "constant": constant_schedule,
    "cosine": cosine_schedule,
    "warmup_constant": warmup_constant_schedule,
}


def get_objective(name: str) -> LossFn:
    return named(OBJECTIVES, name, "objective").loss


def get_schedule(name: str, warmup: float = 0.1) -> Schedule:
    """The schedule `name`; `warmup` (share of the steps) is bound into `warmup_constant`."""
    schedule = named(SCHEDULES, name, "lambda schedule")
    return functools.partial(schedule, warmup=warmup) if name == "warmup_constant" else schedule


