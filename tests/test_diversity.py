"""Diversity measures on hand-made strings, with the counting written out."""

import math

import pytest

from tokenforget.diversity import distinct_n, diversity, ngram_entropy, words


def test_words_split_punctuation_and_lower_case():
    assert words("Mia has 12+3=15 Apples.") == ["mia", "has", "12", "+", "3", "=", "15", "apples", "."]


def test_distinct_n_hand_values():
    """'the cat sat' + 'the cat ran': unigrams the cat sat the cat ran -> 4 distinct of 6;
    bigrams the-cat, cat-sat, the-cat, cat-ran -> 3 distinct of 4 (none across the two texts)."""
    texts = ["the cat sat", "The cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["same words", "same words"], 2) == pytest.approx(1 / 2)
    assert math.isnan(distinct_n(["one"], 2))  # no bigram at all


def test_ngram_entropy_hand_values():
    """Bigrams of the two texts above: the-cat 2/4, cat-sat 1/4, cat-ran 1/4 ->
    H = 1/2 * 1 + 2 * (1/4 * 2) = 1.5 bits. Four equal texts of one bigram each -> 0 bits."""
    assert ngram_entropy(["the cat sat", "the cat ran"], 2) == pytest.approx(1.5)
    assert ngram_entropy(["a b"] * 4, 2) == pytest.approx(0.0)
    assert ngram_entropy(["a b c d e"], 1) == pytest.approx(math.log2(5))


def test_diversity_names():
    d = diversity(["the cat sat", "the cat ran"])
    assert d == pytest.approx({"distinct_1": 4 / 6, "distinct_2": 3 / 4, "entropy_2": 1.5})
