"""`tokenforget audit`: the detector as a data-quality tool, for people who would rather fix their data than
train around it.

From one scoring pass (CE of every response token under the base and the reference model), every example gets a
suspicion under several measures (high = more likely wrong), and the span inside it that the reference finds
least likely. The examples are written ranked by the chosen measure, for a person to review:

    ref_loss      mean CE_ref over the response (the reference finds the whole answer unlikely)
    base_loss     mean CE_base over the response (the base model does)
    paper         -mean(CE_base - CE_ref): the paper's score, averaged (low score = forget)
    confidence    1 - mean p_ref, p = exp(-CE_ref): a DFT-style confidence (arXiv 2508.05629), inverted
    worst_span    max over windows of `SPAN` tokens of the mean CE_ref: one bad step in a long, fluent answer
    agreement     the share of the other responses to the same prompt whose final answer differs (no model:
                  self-consistency, Wang et al., 2022, arXiv 2203.11171); 0 where a prompt has one response

Files in `run_dir/audit/`: `audit.parquet` and `audit.jsonl` (rank, example, suspicion, every measure, the
worst span's text and token range, prompt and response, and `is_correct` when the data has it),
`audit.json` with the sample-level AUROC of every measure against the labels when there are any, and
`marked.jsonl`: the input records in their own format, the worst span of the `audit.mark` most suspicious ones
marked as a span of weight `audit.mark_weight` (`tokenforget.stages.labels_in_data`), for a person to review, edit
and train on as written: `tokenforget train --data.path run_dir/audit/marked.jsonl --partition.selection data`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from tokenforget.config import RunConfig
from tokenforget.metrics import answers_match, auroc, extract_answer
from tokenforget.runfolder import AUDIT_DIR, ROWS_FILE, SUMMARY_FILE, TABLE_FILE

SPAN = 8  # tokens in the worst-span window: about one worked step of a GSM8K answer
MARKED_FILE = "marked.jsonl"


def _mean(x: np.ndarray, example: np.ndarray, n: int) -> np.ndarray:
    """(n,) mean of x over each example's tokens (0 for an example with none)."""
    return np.bincount(example, x, minlength=n) / np.maximum(np.bincount(example, minlength=n), 1)


def worst_spans(ce_ref: np.ndarray, example: np.ndarray, n: int, width: int = SPAN) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the highest mean CE_ref over `width` consecutive response tokens (the whole response when
    shorter), and the index (into the flat arrays) of that window's first token.

    Args:
        ce_ref: (N,) CE under the reference of every response token, examples contiguous and in order.
        example: (N,) example index of each token (non-decreasing).
    """
    best, start = np.full(n, -np.inf), np.zeros(n, dtype=np.int64)
    bounds = np.flatnonzero(np.r_[True, example[1:] != example[:-1], True])
    csum = np.r_[0.0, np.cumsum(ce_ref, dtype=np.float64)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        w = min(width, hi - lo)
        means = (csum[lo + w : hi + 1] - csum[lo : hi - w + 1]) / w  # window starting at lo, lo+1, ...
        k = int(np.argmax(means))
        best[example[lo]], start[example[lo]] = means[k], lo + k
    return best, start


def suspicion_measures(
    ce_base: np.ndarray, ce_ref: np.ndarray, example: np.ndarray, n: int, worst: Optional[np.ndarray] = None
) -> dict[str, np.ndarray]:
    """{measure: (n,) suspicion per example, high = more suspicious} from flat response-token arrays; `worst`:
    the worst-span means when the caller already has them (`worst_spans`)."""
    return {
        "ref_loss": _mean(ce_ref, example, n),
        "base_loss": _mean(ce_base, example, n),
        "paper": -_mean(ce_base - ce_ref, example, n),
        "confidence": 1.0 - _mean(np.exp(-ce_ref), example, n),
        "worst_span": worst_spans(ce_ref, example, n)[0] if worst is None else worst,
    }


def disagreement(prompts: list[Any], answers: list[Optional[str]]) -> np.ndarray:
    """(E,) per example: the share of the other examples with the same prompt whose answer differs (`answers_match`;
    a missing answer matches nothing); 0 for a prompt with one example.

    Args:
        prompts: a hashable key per example (equal for responses to the same prompt).
        answers: the final answer of each response, or None where it has none.
    """
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(prompts):
        groups.setdefault(key, []).append(i)
    out = np.zeros(len(prompts))
    for members in groups.values():
        for i in members:
            others = [j for j in members if j != i]
            if others:
                out[i] = sum(not answers_match(answers[i], answers[j]) for j in others) / len(others)
    return out


MEASURES = ("ref_loss", "base_loss", "paper", "confidence", "worst_span", "agreement")


@dataclass
class AuditResult:
    rows: list[dict[str, Any]]  # ranked, most suspicious first
    measure: str  # the measure that ranked them (`auto` resolved)
    auroc: dict[str, float]  # measure -> sample-level AUROC against is_correct == false (empty without labels)
    n_labelled: int


def sample_auroc(measures: dict[str, np.ndarray], is_correct: np.ndarray) -> dict[str, float]:
    """AUROC of each measure (high = wrong) against the labelled examples (`is_correct` 1 or 0; -1 unlabelled)."""
    known = is_correct >= 0
    return {m: auroc(-s[known], is_correct[known] == 0) for m, s in measures.items()}


def audit_examples(
    arrays: dict[str, np.ndarray], is_correct: Optional[np.ndarray], decode: Callable[[list[int]], str],
    input_ids: list[list[int]], response_masks: list[list[int]], measure: str = "auto",
) -> AuditResult:
    """Rank the examples by `measure` and describe each (see the module docstring).

    Args:
        arrays: flat response-token arrays of one scoring pass (`score.response_arrays`).
        is_correct: (E,) 1 / 0 / -1 (unlabelled) per example, or None.
        decode: token ids -> text (the tokenizer's decode).
    """
    n = len(input_ids)
    worst, span_start = worst_spans(arrays["ce_ref"], arrays["example"], n)  # once: a measure and the spans to show
    measures = suspicion_measures(arrays["ce_base"], arrays["ce_ref"], arrays["example"], n, worst)
    firsts = [int(np.argmax(m)) for m in response_masks]
    responses = [decode([t for t, r in zip(ids, m) if r]) for ids, m in zip(input_ids, response_masks)]
    prompts = [tuple(ids[:f]) for ids, f in zip(input_ids, firsts)]
    measures["agreement"] = disagreement(prompts, [extract_answer(text) for text in responses])
    positions = arrays["where"] - arrays["offsets"][arrays["example"]]  # each response token's position in its example
    if measure == "auto":  # the best measured ranking (docs/results.md): agreement where there is any to measure
        measure = "agreement" if len(set(prompts)) < len(prompts) else "ref_loss"
    order = np.argsort(-measures[measure], kind="stable")
    rows = []
    for rank, i in enumerate(order):
        ids = input_ids[i]
        a = int(positions[span_start[i]])
        b = min(a + SPAN, len(ids))
        rows.append({
            "rank": rank, "example": int(i), "suspicion": float(measures[measure][i]),
            **{m: float(measures[m][i]) for m in MEASURES},
            "worst_span": decode(ids[a:b]), "span_tokens": [a, b],
            "prompt": decode(ids[:firsts[i]]), "response": responses[i],
            **({"is_correct": int(is_correct[i])} if is_correct is not None else {}),
        })
    labelled = is_correct is not None and bool((is_correct >= 0).any())
    scores = sample_auroc(measures, is_correct) if labelled else {}
    return AuditResult(rows, measure, scores, int((is_correct >= 0).sum()) if labelled else 0)


def write_audit(result: AuditResult, out: Path, meta: dict[str, Any]) -> None:
    """audit.parquet, audit.jsonl and audit.json in `out`, each written to a temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{TABLE_FILE}.tmp"
    pq.write_table(pa.Table.from_pylist(result.rows), tmp)
    tmp.replace(out / TABLE_FILE)
    tmp = out / f".{ROWS_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows), encoding="utf-8")
    tmp.replace(out / ROWS_FILE)
    summary = {**meta, "auroc": result.auroc, "n_labelled": result.n_labelled, "n_examples": len(result.rows)}
    tmp = out / f".{SUMMARY_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / SUMMARY_FILE)


def audit_table(result: AuditResult, measure: str, top: int = 10) -> str:
    """The most suspicious examples and, with labels, the AUROC of every measure, as text."""
    from tokenforget.text_table import format_table

    lines = [f"Most suspicious examples (by {measure}; high = suspicious)"]
    header = ["rank", "example", "suspicion", *(["is_correct"] if result.rows and "is_correct" in result.rows[0] else []),
              "worst span"]
    body = [[r["rank"], r["example"], r["suspicion"], *([r["is_correct"]] if "is_correct" in r else []),
             " ".join(r["worst_span"].split())[:60]] for r in result.rows[:top]]
    lines.append(format_table(header, body))
    if result.auroc:
        lines += ["", f"Sample-level AUROC against is_correct ({result.n_labelled} labelled examples; 0.5 = chance)",
                  format_table(["measure", "AUROC"], [[m, a] for m, a in result.auroc.items()])]
    return "\n".join(lines)


# ---------------------------------------------------------------- the marked file: audit -> review -> train


def span_characters(tokenizer: Any, record: Any, chat: bool, tokens: tuple[int, int]) -> Optional[tuple[int, int, int]]:
    """(message index, start, end) in that message's content of the characters of tokens [a, b), cut to the
    assistant turn the first of them is in; None when they cover none of its content.

    The tokens are the data stage's (the record rendered and tokenized the same way, so positions agree)."""
    from tokenforget.stages.data import render_turns

    text, turns = render_turns(tokenizer, record, chat)
    offsets = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)["offset_mapping"]
    a, b = tokens
    lo, hi = offsets[a][0], offsets[min(b, len(offsets)) - 1][1]
    turn = next((t for t in turns if t.span[0] <= lo < t.span[1]), None)
    if turn is None or turn.content_start < 0:
        return None
    content = record.messages[turn.message]["content"]
    start, end = max(lo - turn.content_start, 0), min(hi - turn.content_start, len(content))
    return (turn.message, start, end) if start < end else None


def with_span(raw: dict[str, Any], message: int, span: dict[str, Any], fmt: str, field_map: dict[str, str]) -> dict[str, Any]:
    """A copy of the raw record with `span` added where its format keeps spans: on message `message` of a
    conversation, at the top level of a single-turn record (its answer)."""
    out = json.loads(json.dumps(raw, default=str))
    key = {"messages": "messages", "sharegpt": "conversations"}.get(fmt)
    if key is not None:
        out[field_map.get(key, key)][message].setdefault("spans", []).append(span)
        return out
    prompt, completion = (field_map.get(k, k) for k in ("prompt", "completion"))
    if fmt == "prompt_completion" and isinstance(out.get(prompt), list) and isinstance(out.get(completion), list):
        turns = out[prompt] + out[completion]  # the same dicts: marking the turn marks the record
        turns[message].setdefault("spans", []).append(span)
        return out
    out.setdefault("spans", []).append(span)
    return out


def marked_records(result: AuditResult, tokens: Any, cfg: Any, tokenizer: Any, share: float, weight: float) -> tuple[list[dict], int]:
    """(every input record in order, the number marked): the worst span of the round(share * E) most suspicious
    examples added as a span of `weight`. An example whose record already carries weights is left as it is (the
    data's labels win)."""
    from tokenforget.stages import data as data_mod

    dc = cfg.data
    raw = data_mod.read_records(data_mod.resolve_source(dc.path, dc.hub_fallback), dc.split, dc.hub_config)
    raw = raw[: dc.limit] if dc.limit else raw
    fmt = dc.format if dc.format != "auto" else data_mod.detect_format(raw[0][1], dc.field_map)
    records = data_mod.load_records(dc)
    out = [r for _where, r in raw]
    examples = tokens["example"]  # data stage row -> record index (records with no response token are not rows)
    n_marked = 0
    for row in result.rows[: round(share * len(result.rows))]:
        i = examples[row["example"]]
        rec = records[i]
        if rec.labels or rec.tokens is not None:
            continue
        found = span_characters(tokenizer, rec, dc.chat_template, tuple(row["span_tokens"]))
        if found is None:
            continue
        message, start, end = found
        out[i] = with_span(out[i], message, {"start": start, "end": end, "weight": weight}, fmt, dc.field_map)
        n_marked += 1
    return out, n_marked


def write_marked(rows: list[dict], out: Path) -> Path:
    """`marked.jsonl` in `out`, written to a temporary name and renamed."""
    tmp = out / f".{MARKED_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), encoding="utf-8")
    return tmp.replace(out / MARKED_FILE)


def run_audit(cfg: RunConfig) -> None:
    """`tokenforget audit`: rank the examples by how suspicious the reference finds them, write the table to review
    and, for unlabelled data, a copy with the worst spans marked."""
    import numpy as np

    from tokenforget.pipeline.resolver import Run
    from tokenforget.stages.score import response_arrays

    if cfg.score.base_pass is None:  # the audit's `base_loss` and `paper` measures read CE_base
        cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, base_pass=True))
    run = Run(cfg)
    tokens, scores = run.data(), run.score()
    labels = np.asarray(tokens["is_correct"]) if "is_correct" in tokens.column_names else None
    result = audit_examples(response_arrays(tokens, scores), labels, run.base.tokenizer.decode,
                            tokens["input_ids"], tokens["response_mask"], cfg.audit.measure)
    if run.ranks.is_main:
        ac = cfg.audit
        marked, n_marked = ([], 0) if cfg.data.corrupt_fraction else marked_records(
            result, tokens, cfg, run.base.tokenizer, ac.mark, ac.mark_weight)  # (injected noise is not in the file)
        write_audit(result, run.root / AUDIT_DIR, {"measure": result.measure, "data": cfg.data.path,
                                                    "reference": cfg.reference.path or cfg.reference.checkpoint or "slice",
                                                    "marked": n_marked, "mark_weight": ac.mark_weight})
        print(audit_table(result, result.measure, cfg.audit.top))
        if marked:
            path = write_marked(marked, run.root / AUDIT_DIR)
            print(f"Marked: {n_marked} examples' worst spans as weight {ac.mark_weight:g} in {path.resolve()}; review, "
                  f"then: tokenforget train --data.path {path} --partition.selection data")
        print(f"Audit: {(run.root / AUDIT_DIR).resolve()}")
