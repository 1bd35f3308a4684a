"""Diversity of sampled responses: distinct-n and n-gram entropy.

The paper claims that forgetting makes responses more diverse. We measure it on the k responses a model
samples for one prompt (how different are the answers it gives to the same question), then average over
prompts (`tokenforget eval` does the sampling through lm-evaluation-harness, see `tasks/`).

- distinct-n (Li et al., 2016, arXiv 1510.03055): distinct n-grams / all n-grams, pooled over the texts.
  1 when no n-gram repeats, near 0 when the texts repeat each other.
- n-gram entropy (Zhang et al., 2018, arXiv 1809.05972, "Ent-n"): the Shannon entropy, in bits, of the
  frequency distribution of the n-grams pooled over the texts. Unlike distinct-n it also sees how evenly
  the n-grams are used, and it does not shrink with text length.

Texts are split into words by `words`: lower-cased runs of letters and digits, and every other
non-space character on its own (so "12+3=15." is `12 + 3 = 15 .`).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens of `text`."""
    return _WORD.findall(text.lower())


def ngram_counts(texts: Sequence[str], n: int) -> Counter:
    """How often each n-gram occurs, pooled over `texts` (n-grams never cross from one text to the next)."""
    counts: Counter = Counter()
    for text in texts:
        w = words(text)
        counts.update(tuple(w[i : i + n]) for i in range(len(w) - n + 1))
    return counts


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over `texts`; nan when they hold no n-gram."""
    counts = ngram_counts(texts, n)
    total = sum(counts.values())
    return len(counts) / total if total else float("nan")


def ngram_entropy(texts: Sequence[str], n: int) -> float:
    """Entropy in bits of the n-gram distribution over `texts`: -sum_g p(g) log2 p(g); nan when empty."""
    counts = ngram_counts(texts, n)
    total = sum(counts.values())
    if not total:
        return float("nan")
    return -sum(c / total * math.log2(c / total) for c in counts.values())


MEASURES = {
    "distinct_1": lambda texts: distinct_n(texts, 1),
    "distinct_2": lambda texts: distinct_n(texts, 2),
    "entropy_2": lambda texts: ngram_entropy(texts, 2),
}
"""The measures `tokenforget eval` reports, by name; each maps a list of texts to one number."""


def diversity(texts: Sequence[str]) -> dict[str, float]:
    """Every measure in `MEASURES` over one group of texts (the samples for one prompt)."""
    return {name: fn(texts) for name, fn in MEASURES.items()}
