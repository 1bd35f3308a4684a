"""Scoring functions the task YAMLs in this folder name with `!function utils.<name>`.

lm-evaluation-harness loads this file by path, next to the YAMLs; the work is done by tokenforget's own
modules so that the demo, the tests and the harness score answers the same way.
"""

from __future__ import annotations

from typing import Any

from tokenforget.diversity import diversity
from tokenforget.metrics import answers_match, extract_answer


def process_gsm8k(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """1.0 when the final number of the generation equals the one after '####' in the gold answer."""
    return {"exact_match": float(answers_match(extract_answer(results[0]), extract_answer(doc["answer"])))}


def process_diversity(doc: dict[str, Any], results: list[list[str]]) -> dict[str, float]:
    """Diversity of the sampled answers to one question (`results[0]`: the k samples)."""
    return diversity(results[0])
