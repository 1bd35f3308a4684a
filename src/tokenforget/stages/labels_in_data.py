"""Labels the data already has: per-message and per-span weights, or a weight per token, read from the records.

A weight w says what the token is for (axolotl's message `weight`, with negatives added for forgetting):

    w > 0   learn (class +1), its CE weighted by w        w = 1: an ordinary SFT token
    w = 0   no loss (class 0)
    w < 0   forget (class -1), the forgetting term weighted by |w|, with the objective's lambda

Where it goes in a record:

    {"messages": [..., {"role": "assistant", "content": "...", "weight": 0}]}              a message (OpenAI, ShareGPT)
    {"messages": [..., {"role": "assistant", "content": "3 + 4 = 8", "spans": [{"start": 8, "end": 9, "weight": -1}]}]}
    {"prompt": "...", "completion": "3 + 4 = 8", "spans": [{"start": 8, "end": 9, "weight": -1}]}   the answer
    {"prompt": "...", "completion": "...", "weight": -1}                                   the whole answer
    {"input_ids": [...], "token_weight": [0, 0, 1, 1, -1, ...]}                            a tokenized record (parquet)

Spans are in characters (Python string indices, so a multi-byte character counts one) of the message's content or
the completion, `start` inclusive, `end` exclusive. The token rule: a response token takes the weight of every span
it shares a character with, so a token partly inside a span takes the span's weight; a token that touches spans of
different weights takes the lowest (doubt wins: forget over no loss over learn). A span overrides its message's
weight, which covers the whole turn (the end-of-turn token too). The prompt never gets a loss, whatever its weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from tokenforget.errors import UserError

WEIGHT_KEY, SPANS_KEY, TOKEN_WEIGHT_KEY = "weight", "spans", "token_weight"


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line or field. Defined here, the first room the data
    passes (every stage that refuses data raises it from here)."""


def _error(message: str) -> Exception:
    return DataError(message)


@dataclass(frozen=True)
class WeightSpan:
    """Characters [start, end) of a message's content, and their weight."""

    start: int
    end: int
    weight: float


@dataclass(frozen=True)
class MessageLabels:
    """What the data says about one message: its weight (None: unset) and spans inside its content."""

    weight: Optional[float]
    spans: tuple[WeightSpan, ...]


@dataclass(frozen=True)
class TokenLabels:
    """A record that comes tokenized: its token ids and one weight per token."""

    input_ids: list[int]
    weights: list[float]


Span = tuple[int, int]  # [start, end) characters of a message's content


@dataclass
class Record:
    """One training example before tokenization."""

    messages: list[dict[str, str]]
    where: str  # "file.jsonl:12", for error messages
    corrupt_spans: tuple[Span, ...] = ()  # char spans inside the (single) assistant message
    is_correct: Optional[bool] = None  # a per-example label (`is_correct` in the file), e.g. a graded model solution
    labels: dict[int, MessageLabels] = field(default_factory=dict)  # message index -> its weight and spans
    tokens: Optional[TokenLabels] = None  # an already tokenized record (format `tokens`): ids and weights


def finite_weight(value: Any, where: str) -> float:
    """`value` as a float, or an error naming `where` when it is not a finite number (booleans are not numbers)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise _error(f"{where}: must be a finite number, got {value!r}")
    return float(value)


def _position(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _error(f"{where}: must be an integer character offset, got {value!r}")
    return value


def read_spans(value: Any, text: str, where: str) -> tuple[WeightSpan, ...]:
    """The `spans` list of one text, checked: each inside the text with start < end, and no two overlapping with
    different weights. Returns them sorted by start."""
    if not isinstance(value, list):
        raise _error(f"{where}: must be a list of {{start, end, weight}}, got {type(value).__name__}")
    spans = [_span(s, text, f"{where}[{i}]") for i, s in enumerate(value)]
    order = sorted(range(len(spans)), key=lambda i: (spans[i].start, spans[i].end))
    for k, i in enumerate(order):  # sorted by start: i overlaps j (later) when j starts before i ends
        for j in order[k + 1:]:
            if spans[j].start >= spans[i].end:
                break
            if spans[j].weight != spans[i].weight:
                raise _error(f"{where}[{j}]: overlaps span [{i}] ({spans[i].start}-{spans[i].end}) with another "
                             f"weight ({spans[j].weight} vs {spans[i].weight})")
    return tuple(spans[i] for i in order)


def _span(value: Any, text: str, where: str) -> WeightSpan:
    if not isinstance(value, dict) or not {"start", "end", "weight"} <= set(value):
        raise _error(f"{where}: must be an object with start, end and weight")
    start, end = _position(value["start"], f"{where}.start"), _position(value["end"], f"{where}.end")
    weight = finite_weight(value["weight"], f"{where}.weight")
    if not 0 <= start < end <= len(text):
        raise _error(f"{where}: {start}-{end} is not a span of its text (need 0 <= start < end <= {len(text)})")
    return WeightSpan(start, end, weight)


def message_labels(raw: Any, message: dict[str, str], where: str, text_key: str) -> Optional[MessageLabels]:
    """The `weight` and `spans` of one message of a conversation (None when it has neither). A message that gets no
    loss (system, user) may say weight 0 (axolotl's files do) but nothing else: there is no loss to weigh."""
    if not isinstance(raw, dict) or (raw.get(WEIGHT_KEY) is None and raw.get(SPANS_KEY) is None):
        return None
    found = _labels(raw, message["content"], where, f"{where}.{text_key}")
    if message["role"] != "assistant" and (found.spans or found.weight not in (None, 0.0)):
        raise _error(f"{where}: a {message['role']} message gets no loss, so it cannot carry weights "
                     f"other than weight 0 (only assistant messages are trained on)")
    return found


def record_labels(raw: dict, answer: str, where: str) -> Optional[MessageLabels]:
    """The record-level `weight` and `spans` of a single-turn record: both belong to its answer (None: neither)."""
    if raw.get(TOKEN_WEIGHT_KEY) is not None:  # (None: a data set's column, unset in this row)
        raise _error(f"{where}: field '{TOKEN_WEIGHT_KEY}' needs the record's tokens ('input_ids'); "
                     f"for text, mark characters with '{SPANS_KEY}'")
    if raw.get(WEIGHT_KEY) is None and raw.get(SPANS_KEY) is None:
        return None
    return _labels(raw, answer, where, f"{where}: answer")


def _labels(raw: dict, text: str, where: str, text_where: str) -> MessageLabels:
    weight = None if raw.get(WEIGHT_KEY) is None else finite_weight(raw[WEIGHT_KEY], f"{where}: field '{WEIGHT_KEY}'")
    spans = read_spans(raw[SPANS_KEY], text, f"{where}: field '{SPANS_KEY}'") if raw.get(SPANS_KEY) is not None else ()
    return MessageLabels(weight, spans)


def check_unlabelled(raw: dict, where: str, kind: str) -> None:
    """A record whose weights belong on its messages carries none at its top level."""
    for key in (WEIGHT_KEY, SPANS_KEY, TOKEN_WEIGHT_KEY):
        if raw.get(key) is not None:
            raise _error(f"{where}: field '{key}' at the top level of {kind}")


def token_record(raw: dict, where: str) -> TokenLabels:
    """A tokenized record: `input_ids` (non-negative integers) and `token_weight` (a finite number per token)."""
    ids, weights = raw.get("input_ids"), raw.get(TOKEN_WEIGHT_KEY)
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise _error(f"{where}: field 'input_ids' must be a non-empty list of token ids")
    if not isinstance(weights, (list, tuple)) or len(weights) != len(ids):
        n = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise _error(f"{where}: field '{TOKEN_WEIGHT_KEY}' must be a list of one number per token "
                     f"({len(ids)} input_ids, got {n})")
    values = [finite_weight(w, f"{where}: field '{TOKEN_WEIGHT_KEY}'[{i}]") for i, w in enumerate(weights)]
    return TokenLabels(list(ids), values)


def token_weights(labels: dict[int, MessageLabels], turns: Sequence[Any], offsets: Sequence[tuple[int, int]],
                  response: Sequence[int], where: str) -> list[float]:
    """The data's weight of each token (NaN where it says nothing), by the rule in the module docstring.

    Args:
        labels: message index -> its labels. turns: the record's assistant turns (`data.Turn`: message, span of
            the turn, start of its content in the text). offsets: (start, end) characters of each token.
        response: 1 for the response tokens (the others never take a weight).
    """
    out = [math.nan] * len(offsets)
    for turn in turns:
        lab = labels.get(turn.message)
        if lab is None:
            continue
        if lab.spans and turn.content_start < 0:
            raise _error(f"{where}: the chat template changes the text of message {turn.message}, "
                         f"so its character spans cannot be placed")
        spans = [(turn.content_start + s.start, turn.content_start + s.end, s.weight) for s in lab.spans]
        lo, hi = turn.span
        for t, ((a, b), r) in enumerate(zip(offsets, response)):
            if not r or not lo <= a < hi:
                continue
            touched = [w for s, e, w in spans if a < e and b > s]
            out[t] = min(touched) if touched else (math.nan if lab.weight is None else lab.weight)
    return out


def carries_weights(row: dict) -> bool:
    """Whether a record (a JSON object, or a data set's row) gives any weight: at its top level or on a message."""
    def said(d: Any) -> bool:
        return isinstance(d, dict) and any(d.get(k) is not None for k in (WEIGHT_KEY, SPANS_KEY, TOKEN_WEIGHT_KEY))

    turns = [t for v in row.values() if isinstance(v, list) for t in v]
    return said(row) or any(said(t) for t in turns)
