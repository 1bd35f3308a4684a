"""Report: evaluate a run's models, and the tables and one-screen summary printed at the end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from tokenforget import data as data_mod
from tokenforget.evaluate import Detection, answer_accuracy, detection, generate, gold_nll
from tokenforget.runfolder import round_stage
from tokenforget.losses import FORGET
from tokenforget.models import device


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def load_trained(stage: Path) -> torch.nn.Module:
    """The merged model a train stage saved."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stage / "model"), dtype=torch.float32).to(device())


GENERATE_BATCH = 64  # prompts per generate call: the demo's 48 held-out problems at once (at 16, its evaluation took 42 s a model)


def evaluate_models(
    run: Any, stages: dict[str, Path], test_path: Path, max_new_tokens: int, log: Callable[[str], None],
    cache: Optional[Path] = None,
) -> dict[str, Any]:
    """Answer accuracy and gold NLL on a held-out file, for the base model and each trained stage. With `cache`, a
    model's results are kept there (`<name>-<key>.json`, the key made of the model's stage fingerprint, the file's
    content and the generation length) and reused, so a rerun that adds settings evaluates only the new ones."""
    tok = run.base.tokenizer
    records = data_mod.load_records(run.cfg.data, str(test_path))
    cols, _ = data_mod.tokenize_records(tok, records, run.cfg.data)
    prompts = [r.messages[:-1] for r in records]
    golds = [r.messages[-1]["content"] for r in records]
    models: dict[str, Any] = {}
    for name in ["base", *stages]:
        kept = cache / f"{name}-{eval_key(run, stages.get(name), test_path, max_new_tokens)}.json" if cache else None
        if kept is not None and kept.is_file():
            log(f"[evaluate] {name}: reusing {kept}")
            models[name] = json.loads(kept.read_text())
            continue
        model = run.base.frozen().to(device()) if name == "base" else load_trained(stages[name])
        log(f"[evaluate] {name}: generating {len(prompts)} answers")
        preds = generate(model, tok, prompts, max_new_tokens, batch_size=GENERATE_BATCH, bf16=run.bf16)
        acc = answer_accuracy(preds, golds)
        nll = gold_nll(model, cols["input_ids"], cols["response_mask"], 16, run.bf16, tok.pad_token_id)
        models[name] = {"accuracy": acc.accuracy, "stderr": acc.stderr, "n": acc.n, "gold_nll": nll, "sample": preds[0],
                        "correct": acc.correct}
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(models[name]))
        del model
    return {"models": models}


def eval_key(run: Any, stage: Optional[Path], test_path: Path, max_new_tokens: int) -> str:
    """What a held-out evaluation depends on: the model (its train stage's fingerprint, or the base model's
    settings), the held-out file's content, the answer length and the precision."""
    from tokenforget.config import to_dict
    from tokenforget.runfolder import STAGE_FILE, file_digest, fingerprint

    model = json.loads((stage / STAGE_FILE).read_text())["fingerprint"] if stage else to_dict(run.cfg.model)
    return fingerprint("held-out", model, file_digest(str(test_path)), max_new_tokens, run.bf16)


def detection_of(run: Any) -> Detection:
    """How well the run's scores and partition find the tokens its data marks as corrupted."""
    tokens, scores, classes = run.data(), run.score(), run.partition()
    masks = [np.asarray(m, bool) for m in tokens["response_mask"]]

    def flat(column: Sequence[Sequence[float]]) -> np.ndarray:
        return np.concatenate([np.asarray(v)[m] for v, m in zip(column, masks)])

    return detection(flat(scores["score"]), flat(tokens["corrupt"]), flat(classes["token_class"]) == FORGET)


def demo_table(results: dict[str, Any]) -> str:
    """The demo's comparison: accuracy and gold NLL per model, then detection of corrupted tokens."""
    rows = [
        [name, f"{m['accuracy']:.3f} ± {m['stderr']:.3f} (n={m['n']})", m["gold_nll"]]
        for name, m in results["models"].items()
    ]
    out = ["", "Held-out clean split", format_table(["model", "answer accuracy", "gold NLL (nats/token)"], rows)]
    methods = results.get("detection_methods")
    if methods:
        untrained = set(results.get("detected_only", []))
        rows = [[name + (" (no model trained)" if name in untrained else ""), d["auroc"], d["recall"], d["precision"],
                 d["mean_corrupt"], d["mean_clean"], d["corrupt_share"]] for name, d in methods.items()]
        out += ["", "Finding the known corrupted tokens (training data), each setting with its own score method, "
                "reference and rho; `paper` on a slice of the noisy data, the others on a small trusted set; `filter` "
                "counts whole examples (a wrong one has a corrupted token)",
                format_table(["setting", "AUROC (low score = corrupted)", "recall of negative set",
                              "precision of negative set", "mean score corrupt", "mean score clean", "chance precision"], rows)]
        return "\n".join(out)
    d = results.get("detection")
    if d:
        out += [
            "",
            "Finding the known corrupted tokens (training data)",
            format_table(
                ["AUROC (low score = corrupted)", "recall of negative set", "precision of negative set", "chance precision"],
                [[d["auroc"], d["recall"], d["precision"], d["corrupt_share"]]],
            ),
        ]
    return "\n".join(out)


def _final_losses(stage: Path) -> dict[str, float]:
    """The last logged loss, positive and negative CE and lambda of a train stage. A NaN is left out: it
    means no token of that class was logged (`loss_neg` of `sft`, which has no negative tokens)."""
    history = json.loads((stage / "log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    last = logged[-1] if logged else {}
    return {k: last[k] for k in ("loss", "loss_pos", "loss_neg", "lambda") if k in last and not math.isnan(last[k])}


def run_summary(run: Any, train_stages: Sequence[str]) -> str:
    """One screen: tokens scored, class counts, score quantiles, final losses, where the outputs are."""
    lines = ["", f"Run folder: {run.root.resolve()}"]
    part = run.stage_dir(round_stage("partition", run.rounds)) / "stats.json"  # the last round's
    if part.is_file():
        s = json.loads(part.read_text())
        lines.append(
            f"Tokens scored: {s['n_tokens']}  positive: {s['n_positive']}  negative: {s['n_negative']}  "
            f"(rho={run.cfg.partition.rho}, threshold score {s['threshold']:.4f})"
        )
        lines.append("Score quantiles: " + "  ".join(f"{k}={v:.3f}" for k, v in s["quantiles"].items()))
    for name in train_stages:
        stage = run.stage_dir(name)
        if (stage / "log_history.json").is_file():
            losses = "  ".join(f"{k}={v:.4f}" for k, v in _final_losses(stage).items())
            lines.append(f"{name}: final {losses}")
            lines.append(f"  adapter: {stage / 'adapter'}  merged model: {stage / 'model'}")
    if run.skipped:
        lines.append("Reused finished stages: " + ", ".join(run.skipped))
    return "\n".join(lines)
