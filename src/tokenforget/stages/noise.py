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
from typing import Callable, Optional, Sequence

from tokenforget.config.data import RECURRING_SENTENCE, DataConfig
from tokenforget.stages.labels_in_data import Record, Span

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


# ---------------------------------------------------------------- noise for the detection benchmark
#
# Four kinds of noise that occur in real SFT data, for any data set with one assistant message per record
# (`tokenforget detect`). Each returns the exact changed character spans, so the corrupt mask marks exactly
# the tokens that overlap a change (a token the change splits or merges is marked as a whole).

NOISE_KINDS = ("step_result", "number", "systematic", "recurring", "wrong_prompt")
_ANY_NUMBER = re.compile(r"(?<![\w.,])\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")


def nearby_number(right: str, rng: random.Random) -> str:
    """A plausible wrong value near `right`: right ± k units of its last decimal place, k in 1..max(1, 20%),
    never negative, in the same format (thousands commas and decimal places kept)."""
    decimals = len(right.split(".")[1]) if "." in right else 0
    units = int(right.replace(",", "").replace(".", ""))  # the value in units of its last decimal place
    reach = max(1, round(0.2 * units))
    wrong = units
    while wrong == units or wrong < 0:
        wrong = units + rng.choice([-1, 1]) * rng.randint(1, reach)
    text = f"{wrong / 10**decimals:.{decimals}f}" if decimals else str(wrong)
    return f"{float(text):,.{decimals}f}" if "," in right else text


def changed_span(old: str, new: str) -> Span:
    """[start, end) of `new` that differs from `old` (common prefix and suffix left out)."""
    p = 0
    while p < min(len(old), len(new)) and old[p] == new[p]:
        p += 1
    s = 0
    while s < min(len(old), len(new)) - p and old[-1 - s] == new[-1 - s]:
        s += 1
    return p, len(new) - s


def change_number(text: str, rng: random.Random) -> Optional[tuple[str, list[Span]]]:
    """A seeded number of `text` replaced by a nearby wrong value, with every copy of it on the same line
    (GSM8K's `<<48/2=24>>24` holds it twice). Returns (new text, changed spans), or None without a number."""
    found = list(_ANY_NUMBER.finditer(text))
    if not found:
        return None
    pick = rng.choice(found)
    return set_number(text, pick.start(), nearby_number(pick.group(), rng))


def set_number(text: str, at: int, wrong: str) -> tuple[str, list[Span]]:
    """The number starting at character `at` set to `wrong`, with every copy of it on the same line.
    Returns (new text, the changed character spans in the new text)."""
    found = list(_ANY_NUMBER.finditer(text))
    pick = next(m for m in found if m.start() == at)
    line_start, line_end = text.rfind("\n", 0, at) + 1, (text.find("\n", pick.end()) + 1 or len(text) + 1) - 1
    copies = [m for m in found if m.group() == pick.group() and line_start <= m.start() < line_end]
    out, spans, shift = text, [], 0
    for m in copies:
        s, e = m.start() + shift, m.end() + shift
        out = out[:s] + wrong + out[e:]
        a, b = changed_span(m.group(), wrong)
        spans.append((s + a, s + b))
        shift += len(wrong) - len(m.group())
    return out, spans


def one_more(right: str) -> str:
    """`right` + 1 in units of its last decimal place, in the same format (thousands commas, decimal places,
    width of the integer part): 1,299 -> 1,300, 2.50 -> 2.51, 9 -> 10. A sign is not part of a number here
    (`_ANY_NUMBER`), so the digits as written grow: -5 becomes -6."""
    whole, _, frac = right.partition(".")
    new_whole, new_frac = divmod(int(whole.replace(",", "") + frac) + 1, 10 ** len(frac))
    text = f"{new_whole:,}" if "," in whole else str(new_whole).zfill(len(whole))
    return text + (f".{new_frac:0{len(frac)}d}" if frac else "")


def off_by_one(text: str) -> Optional[tuple[str, list[Span]]]:
    """`text`'s final number (GSM8K: the `#### N` answer) made one too large, with every copy of it on the same
    line. The same rule in every chosen response, so unlike `change_number`'s random changes it is a pattern a
    model can learn from many samples: a reference trained on the noisy data can learn it, a trusted one cannot.
    Returns (new text, changed spans), or None without a number."""
    found = list(_ANY_NUMBER.finditer(text))
    if not found:
        return None
    return set_number(text, found[-1].start(), one_more(found[-1].group()))


def insert_sentence(text: str, sentence: str, rng: random.Random) -> tuple[str, list[Span]]:
    """`sentence` inserted at a seeded line or sentence boundary of `text` (never after the last line)."""
    lines = [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    sentences = [m.end() for m in re.finditer(r"[.!?] ", text)]
    at = rng.choice([0, *lines, *sentences])
    glue = "\n" if at == 0 or text[at - 1] == "\n" else " "
    new = text[:at] + sentence + glue + text[at:]
    return new, [(at, at + len(sentence))]


def passed_round(answers: Sequence[str], k: int) -> tuple[str, list[Span]]:
    """The response for the k-th of `answers`' prompts: the next one's (a cycle, so none keeps its own). Every
    character is corrupt: the whole response answers another question."""
    text = answers[(k + 1) % len(answers)]
    return text, [(0, len(text))]


def inject_noise(
    records: Sequence[Record], kind: str, fraction: float, seed: int, sentence: str = RECURRING_SENTENCE
) -> tuple[list[Record], int]:
    """`round(fraction * len(records))` records corrupted with noise `kind`, chosen with `seed` among the records
    with one assistant message (and, for `number`/`systematic`/`step_result`, a number to change). Returns
    (records, count).

    Kinds: `step_result` (GSM8K: one digit of a worked step's result, `corrupt_records`); `number` (any number
    of the response set to a nearby wrong value); `systematic` (the same rule in every chosen response: its final
    number one too large, `off_by_one`); `recurring` (the same fluent `sentence` inserted into every chosen
    response); `wrong_prompt` (the chosen responses passed round to each other's prompts: every response token
    is corrupted).
    """
    if kind == "step_result":
        return corrupt_records(records, fraction, seed)
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}, choose from {list(NOISE_KINDS)}")
    rng = random.Random(seed)
    ok = [i for i, r in enumerate(records) if _single_answer(r) is not None]
    if kind in ("number", "systematic"):
        ok = [i for i in ok if _ANY_NUMBER.search(_single_answer(records[i]))]  # type: ignore[arg-type]
    chosen = sorted(rng.sample(ok, min(round(fraction * len(records)), len(ok))))
    if kind == "wrong_prompt" and len(chosen) < 2:
        return list(records), 0
    answers: list[str] = [_single_answer(records[i]) for i in chosen]  # type: ignore[misc]
    change: dict[str, Callable[[int], Optional[tuple[str, list[Span]]]]] = {  # the k-th chosen response, changed
        "number": lambda k: change_number(answers[k], rng),
        "systematic": lambda k: off_by_one(answers[k]),
        "recurring": lambda k: insert_sentence(answers[k], sentence, rng),
        "wrong_prompt": lambda k: passed_round(answers, k),
    }
    out = list(records)
    for k, i in enumerate(chosen):
        text, spans = change[kind](k)  # type: ignore[misc]  # never None: `ok` holds only records it can change
        rec = records[i]
        out[i] = replace(rec, messages=[*rec.messages[:-1], {**rec.messages[-1], "content": text}], corrupt_spans=tuple(spans))
    return out, len(chosen)


def corrupt(records: list[Record], dc: DataConfig, log: Callable[[str], None] = print) -> tuple[list[Record], int]:
    """The configured share of answers corrupted with `data.noise` (`data.corrupt_fraction`; none when 0)."""
    if not dc.corrupt_fraction:
        return records, 0
    records, n = inject_noise(records, dc.noise, dc.corrupt_fraction, dc.corrupt_seed, dc.noise_sentence)
    log(f"[data] noise '{dc.noise}' in {n} of {len(records)} answers (seed {dc.corrupt_seed})")
    return records, n
