"""Noisy training data: one step's result changed to a wrong number, in a seeded share of the answers.

The paper claims that forgetting lessens the reliance on data quality. To test it on real data we
corrupt GSM8K the way a careless annotator would: in a chosen answer, one worked step's result gets one
wrong digit. In GSM8K's calculator notation `48/2 = <<48/2=24>>24` both copies of the result change
(`<<48/2=34>>34`), so the error reads as a slip, not as a visible mismatch. The later steps and the final
`#### N` line are left as they were, as in the demo's generator. The changed characters are recorded as
corrupt spans, so `report.detection_of` can tell how well the scores find them.

A step result is a number right after `=` (or the result inside `<<...=R>>`), on a line that is not the
`####` line. The wrong value keeps the length and format of the right one: one digit is replaced by
another, and a leading digit never by 0, so 24 may become 34 or 29 but not 04.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Optional, Sequence

from tokenforget.data import Record, Span

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_ANNOTATION = re.compile(rf"<<[^<>]*=({_NUMBER})>>({_NUMBER})?")
_AFTER_EQUALS = re.compile(rf"=\s*\$?({_NUMBER})")


def step_results(text: str) -> list[list[Span]]:
    """The character spans of every step result in `text`; one list per step (GSM8K's calculator
    annotation holds the result twice: inside `<<...=R>>` and right after it)."""
    final = text.find("####")
    final = len(text) if final < 0 else text.rfind("\n", 0, final) + 1  # start of the final-answer line
    steps: list[list[Span]] = []
    masked = list(text)
    for m in _ANNOTATION.finditer(text):
        spans = [m.span(1)] + ([m.span(2)] if m.group(2) == m.group(1) else [])
        steps.append(spans)
        masked[m.start() : m.end()] = " " * (m.end() - m.start())  # so `=` inside is not seen twice
    for m in _AFTER_EQUALS.finditer("".join(masked)):
        steps.append([m.span(1)])
    return sorted((s for s in steps if s[-1][1] <= final), key=lambda s: s[0])


def wrong_number(right: str, rng: random.Random) -> str:
    """`right` with one digit replaced by another; the first digit of a multi-digit integer part never
    becomes 0."""
    digits = [i for i, ch in enumerate(right) if ch.isdigit()]
    at = rng.choice(digits)
    integer_part = right.lstrip("-").split(".")[0].replace(",", "")
    choices = [d for d in "0123456789" if d != right[at]]
    if at == digits[0] and len(integer_part) > 1:
        choices.remove("0")
    return right[:at] + rng.choice(choices) + right[at + 1 :]


def corrupt_answer(text: str, rng: random.Random) -> Optional[tuple[str, list[Span]]]:
    """(text with one step's result changed, the changed spans), or None when `text` has no step result."""
    steps = step_results(text)
    if not steps:
        return None
    spans = rng.choice(steps)
    s, e = spans[0]
    wrong = wrong_number(text[s:e], rng)
    for s, e in spans:  # every copy of the result: same length, so later offsets do not move
        text = text[:s] + wrong + text[e:]
    return text, spans


def corrupt_records(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], int]:
    """Corrupt `round(fraction * len(records))` answers, chosen with `seed` among the records whose single
    assistant message has a step result. Returns (records, how many were corrupted)."""
    rng = random.Random(seed)
    candidates = [i for i, r in enumerate(records) if _single_answer(r) is not None and step_results(_single_answer(r))]
    chosen = sorted(rng.sample(candidates, min(round(fraction * len(records)), len(candidates))))
    out = list(records)
    for i in chosen:
        rec = records[i]
        text, spans = corrupt_answer(_single_answer(rec), rng)  # type: ignore[misc,arg-type]
        messages = [*rec.messages[:-1], {**rec.messages[-1], "content": text}]
        out[i] = replace(rec, messages=messages, corrupt_spans=tuple(spans))
    return out, len(chosen)


def _single_answer(record: Record) -> Optional[str]:
    """The assistant message's content when the record has exactly one, as its last message."""
    roles = [m["role"] for m in record.messages]
    if roles.count("assistant") != 1 or roles[-1] != "assistant" or record.corrupt_spans:
        return None
    return record.messages[-1]["content"]
