"""The HTML report of a run folder: what was learned, what was forgotten, and how training went.

`build_report(run_dir)` reads the run folder (never a model: only the tokenizer, rebuilt from the run's
`config.json`) and writes `report/report.html`, one self-contained page (CSS, JavaScript, data and plots
inline; it opens offline), with the plots also as PNG files beside it:

- example responses, every token coloured by its class (green learned, red forgotten) and by how far its
  score is from the cut; hovering a token shows its score, base CE and reference CE; search and paging.
  Only the first `max_samples` examples are embedded, so the page stays light on big data sets;
- the score histogram with the rho cut, and the most frequent positive and negative tokens (every token);
- training curves per trained variant (total loss, positive CE, negative CE, lambda);
- the results tables when the run has a results file (`RESULT_FILES`).

A results file is JSON. A `tables` list (`{"title", "header", "rows", "note"}`) is shown as it is, so any
command can put a table on the page; `compare_results.json` gets the tables of `tokenforget compare`
(`compare_tables.compare_tables`); otherwise `models` ({name: {metric: value}}) and `detection` (the demo's
corrupted-token detection) are laid out here.

A `tokenforget compare` folder has no data of its own: its page shows the comparison and, for the tokens
and training curves, its first seed's run folder (`seed-<s>/`). A seed's folder shows its comparison too.
"""

from __future__ import annotations

import base64
import html
import importlib.resources
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase

from tokenforget.training.objectives import FORGET, LEARN
from tokenforget.report.plots import score_histogram, training_curves
from tokenforget.report.views import setting_views
from tokenforget.report.reading import FlatTokens, ReportedRun, _json, flat_tokens, read_run, token_label, token_pieces
from tokenforget.version import __version__

TOP_TOKENS = 20
HISTOGRAM_PNG, CURVES_PNG, PAGE = "score_histogram.png", "training_curves.png", "report.html"


# ---------------------------------------------------------------- the samples embedded in the page


def _rounded(values: Sequence[float]) -> list[Optional[float]]:
    return [round(float(v), 4) if math.isfinite(v) else None for v in values]


def sample_payload(run: ReportedRun, tok: PreTrainedTokenizerBase, n: int) -> list[dict[str, Any]]:
    """The first `n` examples as the page's JavaScript reads them.

    Per example: `i` its index in the data file, `t` token texts, `m` response mask; when the run has
    them, `s` score, `b` base CE, `r` reference CE (4 decimals), `c` class; `k` corrupt mask if any is set.
    """
    n = min(n, len(run.tokens))
    rows = range(n)
    tokens = run.tokens.select(rows).to_dict()
    scores = run.scores.select(rows).to_dict() if run.scores is not None else None
    classes = run.classes.select(rows)["token_class"] if run.classes is not None else None
    out = []
    for row in rows:
        ids = tokens["input_ids"][row]
        s: dict[str, Any] = {"i": tokens["example"][row], "t": token_pieces(tok, ids), "m": tokens["response_mask"][row]}
        if scores is not None:
            s |= {k: _rounded(scores[col][row]) for k, col in (("s", "score"), ("b", "ce_base"), ("r", "ce_ref"))}
        if classes is not None:
            s["c"] = classes[row]
        if any(tokens["corrupt"][row]):
            s["k"] = tokens["corrupt"][row]
        out.append(s)
    return out


def colour_scale(score: np.ndarray, threshold: float) -> float:
    """Distance from the cut at which a token's colour is full: the 95th percentile of |score - cut|."""
    if score.size == 0:
        return 1.0
    scale = float(np.quantile(np.abs(score - threshold), 0.95))
    return scale if scale > 0 else 1.0


def page_data(run: ReportedRun, flat: FlatTokens, tok: PreTrainedTokenizerBase, max_samples: int) -> dict[str, Any]:
    """The JSON the page's script renders the examples from."""
    threshold = _threshold(run)
    samples = sample_payload(run, tok, max_samples)
    meta = {
        "n_examples": len(run.tokens),
        "n_embedded": len(samples),
        "threshold": threshold if threshold is not None else 0.0,
        "scale": colour_scale(flat.score, threshold or 0.0) if flat.score is not None else 1.0,
    }
    views = setting_views(run.root, run.cfg.data.path, [s["m"] for s in samples])  # a demo's trained settings
    return {"meta": meta, "samples": samples, **({"views": views} if views else {})}


def _threshold(run: ReportedRun) -> Optional[float]:
    t = run.stats.get("threshold") if run.stats else None
    return float(t) if t is not None and math.isfinite(t) else None


def script_json(value: Any) -> str:
    """JSON safe inside a <script> element: no NaN (JSON.parse rejects it), no `</` that would end the element."""
    return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


# ---------------------------------------------------------------- tables


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""


def top_tokens(flat: FlatTokens, tok: PreTrainedTokenizerBase, cls: int, k: int = TOP_TOKENS) -> Table:
    """The `k` tokens most often in class `cls`, with the share of their response occurrences in it."""
    all_ids, all_counts = np.unique(flat.ids, return_counts=True)
    ids, counts = np.unique(flat.ids[flat.token_class == cls], return_counts=True)
    order = np.lexsort((ids, -counts))[:k]  # most frequent first, ties by id
    totals = dict(zip(all_ids.tolist(), all_counts.tolist()))
    rows = [[token_label(tok, int(ids[j])), int(counts[j]), f"{counts[j] / totals[int(ids[j])]:.0%}"] for j in order]
    title = "Most frequent positive tokens (learned)" if cls == LEARN else "Most frequent negative tokens (forgotten)"
    return Table(title, ["token", "times", "share of its occurrences"], rows)


METRIC_LABELS = {
    "accuracy": "answer accuracy",
    "gold_nll": "gold NLL (nats/token, lower is better)",
    "auroc": "AUROC (low score = corrupted)",
    "recall": "recall of negative set",
    "precision": "precision of negative set",
    "corrupt_share": "chance precision",
}


def _label(key: str) -> str:
    return METRIC_LABELS.get(key, key.replace("_", " "))


def _accuracy_cell(m: dict[str, Any]) -> str:
    """`0.250 ± 0.063 (n=48)`: accuracy is a share, 3 decimals say all its n can."""
    cell = f"{m['accuracy']:.3f}" + (f" ± {m['stderr']:.3f}" if "stderr" in m else "")
    return cell + (f" (n={m['n']})" if "n" in m else "")


def models_table(models: dict[str, dict[str, Any]]) -> Table:
    """One row per model, one column per numeric metric; accuracy carries its stderr and n."""
    keys = [k for k, v in next(iter(models.values())).items() if _is_number(v) and k not in ("stderr", "n", "nll_n")]
    rows = [[name, *(_accuracy_cell(m) if k == "accuracy" else m.get(k, "") for k in keys)] for name, m in models.items()]
    return Table("Held-out evaluation", ["model", *map(_label, keys)], rows)


def detection_table(d: dict[str, Any]) -> Table:
    keys = ["auroc", "recall", "precision", "corrupt_share"]
    note = f"{d['n_corrupt']} known corrupted of {d['n_tokens']} response tokens" if "n_corrupt" in d and "n_tokens" in d else ""
    return Table("Finding the known corrupted tokens (training data)", [_label(k) for k in keys], [[d.get(k) for k in keys]], note)


def results_tables(doc: dict[str, Any]) -> list[Table]:
    """The tables of one results file (see the module docstring for the format)."""
    if "tables" in doc:
        return [Table(**t) for t in doc["tables"]]
    if "paired_vs_sft" in doc:  # compare_results.json
        from tokenforget.report.tables import compare_tables

        return [Table(**t) for t in compare_tables(doc)]
    out = [models_table(doc["models"])] if doc.get("models") else []
    if doc.get("detection_methods"):
        return out + [settings_detection_table(doc["detection_methods"])]
    return out + ([detection_table(doc["detection"])] if doc.get("detection") else [])


def settings_detection_table(by_setting: dict[str, dict[str, Any]]) -> Table:
    """The demo's detection per partitioning setting, each with its own score, reference and rho."""
    keys = ["auroc", "recall", "precision", "corrupt_share"]
    rows = [[name, *(d.get(k) for k in keys)] for name, d in by_setting.items()]
    return Table("Finding the known corrupted tokens (training data), per setting", ["setting", *map(_label, keys)], rows)


def training_table(histories: dict[str, list[dict[str, Any]]]) -> Table:
    """Steps and last logged values per trained variant."""
    keys = ["loss", "loss_pos", "loss_neg", "lambda"]
    rows = []
    for name, history in histories.items():
        logged = [h for h in history if "loss" in h]
        last = logged[-1] if logged else {}
        rows.append([name, last.get("step", ""), *(last.get(k, "") for k in keys)])
    return Table("Last logged values", ["variant", "step", *keys], rows)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.4f}"
    return "–" if v is None else str(v)


# ---------------------------------------------------------------- HTML


def esc(v: Any) -> str:
    return html.escape(_cell(v))


def html_table(t: Table) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{esc(t.note)}</p>' if t.note else ""
    return f"<h3>{esc(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def png_img(path: Path, alt: str) -> str:
    """An <img> with the PNG inline (a data: URI), so the page needs no file beside it."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def summary_facts(run: ReportedRun, flat: FlatTokens, settings: Sequence[str] = ()) -> list[tuple[str, str]]:
    """(label, value) pairs for the top of the page; `settings`: a demo's trained settings (each in a folder of its
    own, not this run folder's variants)."""
    c, s = run.cfg, run.stats
    facts = [("run folder", str(run.root.resolve()))]
    if run.source != run.root:
        facts.append(("examples and training from", f"{run.source.name}/ (the comparison's first seed)"))
    facts += [
        ("model", c.model.name_or_path + (f" ({c.model.gguf_file})" if c.model.gguf_file else "")),
        ("training data", f"{c.data.path} — {len(run.tokens)} examples, {flat.ids.size} response tokens"),
    ]
    if s:
        n = max(s["n_tokens"], 1)
        facts.append(("partition", f"ρ = {c.partition.rho}: {s['n_positive']} learned ({s['n_positive'] / n:.0%}), "
                                    f"{s['n_negative']} forgotten ({s['n_negative'] / n:.0%}); cut at score {_cell(s['threshold'])}"))
    if flat.corrupt.any():
        facts.append(("known corrupted tokens", f"{int(flat.corrupt.sum())} (marked in the data; underlined below)"))
    facts.append(("trained settings", ", ".join(settings)) if settings else
                 ("trained variants", ", ".join(run.histories) or "none yet"))
    facts.append(("report", f"tokenforget {__version__}, {datetime.now().strftime('%Y-%m-%d %H:%M')}"))
    return facts


def summary_html(facts: list[tuple[str, str]]) -> str:
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts)
    return f'<dl class="facts">{rows}</dl>'


INTRO = (
    "Every response token was scored: <b>score = CE under the base model − CE under the reference model</b> "
    "(a LoRA fine-tune on a subset of the data). A high score means the reference learned the token, so it is "
    "worth learning. Over the whole data set, the top ρ of the tokens by score are <span class='sw pos'>learned</span> "
    "(trained on, as in SFT) and the rest are <span class='sw neg'>forgotten</span> (training pushes their "
    "likelihood down, with weight λ)."
)
DEMO_INTRO = (  # a demo's folder: its settings chose their tokens each in its own way
    "The demo trained each setting below on the same noisy answers. Pick a setting in <a href='#samples'>the "
    "examples</a> to see which response tokens it <span class='sw pos'>learned</span> and which it set aside "
    "(<span class='sw neg'>ignored</span> or forgotten), against the tokens known to be corrupted (underlined); the "
    "line beside the choice says how that setting chose them."
)
DEMO_HISTOGRAM = (" The score histogram below is the run folder's own scoring pass (CE under the base model − CE under "
                  "a reference on a slice of the data), not every setting's.")
DEMO_NO_SCORES = ("Each setting scored its tokens in a folder of its own (the choice above shows what it set aside); "
                  "this run folder trained plain <code>sft</code> and has no scoring pass of its own.")


def intro(demo: bool, has_scores: bool) -> str:
    """The page's opening paragraph: a demo's settings, or the paper's score and partition of a run."""
    return DEMO_INTRO + (DEMO_HISTOGRAM if has_scores else "") if demo else INTRO


def samples_html(meta: dict[str, Any], has_corrupt: bool, views: Sequence[str] = ()) -> str:
    """The static part of the examples section; the script fills `#sample-list`. With `views` (a demo's trained
    settings, `report.views`), a choice of whose tokens are shown, and what that setting is."""
    shown = f"the first {meta['n_embedded']} of {meta['n_examples']} examples"
    corrupt = ('<label><input type="checkbox" id="only-corrupt"> only examples with known corrupted tokens</label>'
               if has_corrupt else "")
    legend = ('<span class="tok pos" style="background:rgba(46,158,79,.8)">learned</span> '
              '<span class="tok neg" id="neg-label" style="background:rgba(214,69,61,.8)">forgotten</span> '
              '<span class="tok prompt">prompt (no loss)</span> '
              + ('<span class="tok neg corrupt" style="background:rgba(214,69,61,.3)">known corrupted</span> ' if has_corrupt else "")
              + "· deeper colour = score further from the cut · hover a token for its numbers")
    chooser = ('<p class="view"><label>tokens of the setting <select id="view">'
               + "".join(f"<option>{html.escape(v)}</option>" for v in views)
               + '</select></label> <span id="view-what"></span></p>') if views else ""
    return (
        f'{chooser}<p class="legend">{legend}</p>'
        f'<div class="controls"><input type="search" id="search" placeholder="search text, or #12 for example 12">'
        f'<label><input type="checkbox" id="show-prompt" checked> show prompts</label>{corrupt}'
        '<label>per page <select id="per-page"><option>5</option><option selected>10</option><option>25</option>'
        '<option>50</option></select></label></div>'
        f'<p class="note">This page holds {html.escape(shown)} (<code>--max_samples</code>); search and paging '
        "work over those. The histogram and token counts below cover every example.</p>"
        '<div class="pager"><button id="prev">← previous</button><span id="page-status"></span>'
        '<button id="next">next →</button></div><div id="sample-list"></div>'
    )


def scores_html(run: ReportedRun, flat: FlatTokens, tok: PreTrainedTokenizerBase, out: Path, demo: bool = False) -> str:
    if flat.score is None:
        return f'<p class="note">{DEMO_NO_SCORES if demo else "No scores yet: run <code>tokenforget score</code>."}</p>'
    body = png_img(out / HISTOGRAM_PNG, "score histogram")
    if flat.token_class is not None:
        body += '<div class="columns">' + "".join(
            f"<div>{html_table(top_tokens(flat, tok, c))}</div>" for c in (LEARN, FORGET)) + "</div>"
    return body


def training_html(run: ReportedRun, out: Path) -> str:
    if not run.histories:
        return '<p class="note">No trained variant yet: run <code>tokenforget train</code>.</p>'
    return png_img(out / CURVES_PNG, "training curves") + html_table(training_table(run.histories)) + (
        f'<p class="note">TensorBoard: <code>tensorboard --logdir {html.escape(str(run.source / "tensorboard"))}</code></p>'
        if (run.source / "tensorboard").is_dir() else "")


def results_html(run: ReportedRun) -> str:
    parts = []
    for name, doc in run.results.items():
        parts += [html_table(t) for t in results_tables(doc)]
        parts.append(f'<p class="note">{html.escape(provenance_note(name, doc))}</p>')
        parts.append(first_answers_html(first_answers(doc)))
    return "".join(parts)


AUDIT_SHOWN = 10  # examples the report's audit section shows (the whole ranking is in audit.jsonl)


def audit_html(root: Path) -> Optional[str]:
    """The `tokenforget audit` section: the AUROC of every measure against the labels, and the most suspicious
    examples with the worst span marked. None when the run folder has no audit."""
    from tokenforget.runfolder import AUDIT_DIR, ROWS_FILE, SUMMARY_FILE

    summary, rows_file = _json(root / AUDIT_DIR / SUMMARY_FILE), root / AUDIT_DIR / ROWS_FILE
    if summary is None or not rows_file.is_file():
        return None
    parts = []
    if summary.get("auroc"):
        note = f"{summary['n_labelled']} labelled examples; 0.5 = chance, 1 = every wrong example ranked first"
        parts.append(html_table(Table("Sample-level AUROC against is_correct", ["measure", "AUROC"],
                                      [[m, a] for m, a in summary["auroc"].items()], note)))
    items = []
    for line in rows_file.read_text(encoding="utf-8").splitlines()[:AUDIT_SHOWN]:
        r = json.loads(line)
        label = {1: "correct", 0: "wrong"}.get(r.get("is_correct", -1), "unlabelled")
        items.append(f"<li><p>#{r['rank'] + 1} · example {r['example']} · suspicion {esc(r['suspicion'])} · {label}</p>"
                     f"<pre>{marked(r['response'], r['worst_span'])}</pre></li>")
    parts.append(f"<h3>Most suspicious examples (by {esc(summary.get('measure'))}; worst span marked)</h3>"
                 f'<ol class="audit">{"".join(items)}</ol>'
                 f'<p class="note">The whole ranking: {html.escape(str(rows_file))} (and audit.parquet)</p>')
    return "".join(parts)


def marked(text: str, span: str) -> str:
    """`text` escaped, with the first occurrence of `span` (stripped) in <mark>; unmarked when it is not found."""
    at = text.find(span.strip()) if span.strip() else -1
    if at < 0:
        return html.escape(text)
    end = at + len(span.strip())
    return html.escape(text[:at]) + f"<mark>{html.escape(text[at:end])}</mark>" + html.escape(text[end:])


def provenance_note(name: str, doc: dict[str, Any]) -> str:
    """`from compare_results.json, 93.8 min wall time, <machine>, <date>`: what the file says of itself."""
    note = f"from {name}"
    if _is_number(doc.get("wall_s")):
        note += f", {doc['wall_s'] / 60:.1f} min wall time"
    return note + "".join(f", {doc[k]}" for k in ("machine", "date") if isinstance(doc.get(k), str))


def first_answers(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(model, its first held-out answer): the demo's `models.<m>.sample`, or the first output of each
    task in a comparison's `samples.<m>.<task>`."""
    models = doc.get("models") if isinstance(doc.get("models"), dict) else {}  # a comparison lists names only
    out = [(m, e["sample"]) for m, e in models.items() if isinstance(e, dict) and isinstance(e.get("sample"), str)]
    for model, tasks in (doc.get("samples") or {}).items():
        for task, outputs in (tasks or {}).items():
            first = outputs[0] if outputs else None
            first = first[0] if isinstance(first, list) and first else first
            if isinstance(first, str):
                out.append((f"{model} · {task}", first))
    return out


def first_answers_html(answers: list[tuple[str, str]]) -> str:
    if not answers:
        return ""
    items = "".join(f"<dt>{html.escape(n)}</dt><dd><pre>{html.escape(a)}</pre></dd>" for n, a in answers)
    return f'<details><summary>First held-out answer of each model</summary><dl class="answers">{items}</dl></details>'


def _asset(name: str) -> str:
    return (importlib.resources.files("tokenforget.report") / "assets" / name).read_text(encoding="utf-8")


def page_html(run: ReportedRun, flat: FlatTokens, tok: PreTrainedTokenizerBase, out: Path, data: dict[str, Any]) -> str:
    """The whole page."""
    views = list(data.get("views", {}))
    sections = [("summary", "Run", summary_html(summary_facts(run, flat, views)))]
    if run.results:
        sections.append(("results", "Results", results_html(run)))
    sections += [
        ("samples", "What is learned and what is forgotten",
         samples_html(data["meta"], bool(flat.corrupt.any()), views)),
        ("scores", "Token scores", scores_html(run, flat, tok, out, demo=bool(views))),
        ("training", "Training", training_html(run, out)),
        *([("audit", "Audit: the examples to review first", audit)] if (audit := audit_html(run.root)) else []),
        ("config", "Config", f"<details><summary>config.json</summary><pre>{html.escape(json.dumps(_config(run), indent=2))}</pre></details>"),
    ]
    nav = " · ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>tokenforget report: {html.escape(run.root.name)}</title>'
        f'<style>{_asset("report.css")}</style></head><body><header><h1>tokenforget report: {html.escape(run.root.name)}</h1>'
        f"<p>{intro(bool(views), flat.score is not None)}</p><nav>{nav}</nav></header>"
        + "".join(section(*s) for s in sections)
        + f'<div id="tip" hidden></div><script type="application/json" id="report-data">{script_json(data)}</script>'
        f'<script>{_asset("report.js")}</script></body></html>'
    )


def _config(run: ReportedRun) -> dict[str, Any]:
    return json.loads((run.source / "config.json").read_text())


# ---------------------------------------------------------------- entry point


def write_plots(run: ReportedRun, flat: FlatTokens, out: Path) -> list[Path]:
    """The PNG plots the run has data for; returns their paths."""
    written = []
    if flat.score is not None:
        positive = flat.token_class == LEARN if flat.token_class is not None else None
        rho = run.cfg.partition.rho if run.stats else None
        score_histogram(flat.score, positive, _threshold(run), rho, flat.corrupt, out / HISTOGRAM_PNG)
        written.append(out / HISTOGRAM_PNG)
    if run.histories:
        training_curves(run.histories, out / CURVES_PNG)
        written.append(out / CURVES_PNG)
    return written


def build_report(
    run_dir: Path,
    out_dir: Optional[Path] = None,
    max_samples: int = 200,
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
) -> Path:
    """Write `report.html` and its PNG plots into `out_dir` (default `run_dir/report`); return the page's path.

    `tokenizer` defaults to the one the run's `config.json` names (rebuilt, no model weights loaded).
    """
    from tokenforget.model.loading import BaseModel

    run = read_run(Path(run_dir))
    tok = tokenizer or BaseModel(run.cfg.model).tokenizer
    out = Path(out_dir) if out_dir is not None else run.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    flat = flat_tokens(run)
    write_plots(run, flat, out)
    page = page_html(run, flat, tok, out, page_data(run, flat, tok, max_samples))
    tmp = out / f".{PAGE}.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out / PAGE)  # a reader never sees half a page
    return out / PAGE
