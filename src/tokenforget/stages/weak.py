"""Natural noise written by a weaker model: grade its answers step by step and mark where each goes wrong.

On the demo's generated task every step of an answer can be checked: the gold answer's numbers, in order, are the
only right ones. A model-written answer is right when its numbers are the gold's; otherwise its first number that
differs from the gold's at the same place is its first error, and that number and everything after it is the
natural token-level noise (later steps build on the wrong value, and the final answer repeats it). This is the
first-error view of process supervision (Lightman et al., 2023, arXiv 2305.20050), exact here because the task is
generated. `tokenforget weak` (`tokenforget.commands.weak`) samples the answers; this module only grades and mixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Grade:
    """One written answer against the gold one: `correct` (every number the gold's), `wrong_at` (the character
    offset of its first wrong number; None when correct) and `complete` (it has at least the gold's numbers: an
    answer cut short cannot be graded step by step and is not kept)."""

    correct: bool
    wrong_at: Optional[int]
    complete: bool

    def spans(self, answer: str) -> list[list[int]]:
        """The natural noise as `corrupt_spans`: [[first wrong number, end of the answer]], or [] when right."""
        return [] if self.wrong_at is None else [[self.wrong_at, len(answer)]]


def grade(answer: str, gold: str) -> Grade:
    """Compare the numbers of `answer` with those of `gold`, in order.

    The first position where they differ marks the error (`wrong_at` = that number's start in `answer`); an answer
    with more numbers than the gold and the gold's as its prefix is wrong at its first extra number; one with fewer
    numbers (cut short, or a step left out) is incomplete unless a number already differs."""
    mine = list(NUMBER.finditer(answer))
    want = [m.group() for m in NUMBER.finditer(gold)]
    for m, w in zip(mine, want):
        if m.group() != w:
            return Grade(False, m.start(), True)
    if len(mine) < len(want):
        return Grade(False, None, False)
    if len(mine) > len(want):
        return Grade(False, mine[len(want)].start(), True)
    return Grade(True, None, True)


def choose_mix(grades: Sequence[Sequence[Grade]], target_wrong: float, seed: int) -> list[Optional[int]]:
    """For each problem, which of its graded samples to keep (None: dropped), so that about `target_wrong` of the
    kept answers are wrong.

    Problems fall in three groups by what their complete samples hold: only wrong ones (W), both (B), only right
    ones (R); problems without a complete sample are dropped. Of n kept problems, k = round(target_wrong x n) take a
    wrong sample: W first (they have nothing else; if |W| > k, k of them, seeded, are kept and the rest dropped, and
    n and k are recomputed), then seeded B problems until k; every other problem takes its first right sample. Each
    problem's first sample of the kind chosen is kept."""
    rng = np.random.default_rng(seed)
    kinds = [{g.correct for g in gs if g.complete} for gs in grades]
    only_wrong = [i for i, k in enumerate(kinds) if k == {False}]
    both = [i for i, k in enumerate(kinds) if k == {True, False}]
    only_right = [i for i, k in enumerate(kinds) if k == {True}]
    n_rest = len(both) + len(only_right)
    # the most wrong-only problems kept with the share at target: w / (w + rest) <= target
    w_max = len(only_wrong) if target_wrong >= 1 else int(np.floor(target_wrong * n_rest / (1 - target_wrong) + 1e-9))
    keep_w = sorted(rng.permutation(only_wrong)[: min(len(only_wrong), max(w_max, 0))].tolist())
    n = len(keep_w) + n_rest
    k = int(np.floor(target_wrong * n + 0.5))
    wrong_b = set(rng.permutation(both)[: max(0, k - len(keep_w))].tolist())
    choice: list[Optional[int]] = [None] * len(grades)
    for i in [*keep_w, *wrong_b]:
        choice[i] = next(j for j, g in enumerate(grades[i]) if g.complete and not g.correct)
    for i in [*(b for b in both if b not in wrong_b), *only_right]:
        choice[i] = next(j for j, g in enumerate(grades[i]) if g.complete and g.correct)
    return choice


def sample_seed(seed: int, problem: int, sample: int) -> int:
    """The seed of one sample: the same (seed, problem, sample) gives the same answer, in any batch."""
    return int(np.random.SeedSequence([seed, problem, sample]).generate_state(1)[0])


class RowSeededSampler:
    """A logits processor that samples each row of a batch at `temperature` with a generator of its own (seeded
    per sample) and returns logits with only the drawn token left, so greedy decoding takes it: sampling with a
    seed per sample inside one batched `generate` (its own sampler draws all rows from one global generator)."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()  # (B, V)
        picks = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])  # (B,)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), picks.to(scores.device)] = 0.0
        return out
