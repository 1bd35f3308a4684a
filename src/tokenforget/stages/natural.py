"""Natural noise: SFT sets from model-written GSM8K solutions, each labelled correct or wrong.

Source: `example_model_solutions.jsonl` of OpenAI's grade-school-math repository (MIT): for each GSM8K
*test* question, `ground_truth` and four GPT-3 solutions (`6b_finetuning`, `6b_verification`,
`175b_finetuning`, `175b_verification`), each `{"is_correct": bool, "solution": str}`. The wrong ones are
fluent, with self-consistent arithmetic: the noise our users have (model-written data, some of it wrong).

`prepare_natural` writes, for the same questions:
- `noisy.jsonl`: one model solution per question (`solution_source`; `all`: every one), with its `is_correct` label;
- `correct_only.jsonl`: the questions whose chosen solution is correct (what a perfect verifier keeps);
- `gold.jsonl`: the ground-truth solution of every question (the ceiling);
and, from GSM8K *train* (never the questions above, so no training set meets an evaluation split):
- `trusted.jsonl`: a small gold set for a trusted reference model;
- `val.jsonl`, `test.jsonl`: held-out gold solutions (choose settings on val, report on test).
Labels are per solution: `is_correct` is never turned into token labels here.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tokenforget.command_config import PrepareConfig
from tokenforget.errors import ConfigError, UserError

SOLUTION_SOURCES = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
FINAL_LINE = re.compile(r"\n?A:\s*(\S[^\n]*)\s*$")  # the solutions' last line, `A: 18`


@dataclass(frozen=True)
class NaturalSplits:
    """What `prepare_natural` wrote: file paths and counts (also in `manifest.json`)."""

    files: dict[str, str]
    counts: dict[str, int]
    wrong_share: float
    manifest: dict[str, Any] = field(default_factory=dict)


def to_gsm8k_answer(solution: str) -> str:
    """A model solution in GSM8K's answer format: the final `A: N` line becomes `#### N` (what GSM8K train
    answers end with, and what our answer extraction reads). Text without an `A:` line is kept as is."""
    m = FINAL_LINE.search(solution.rstrip())
    if not m:
        return solution.rstrip()
    return solution.rstrip()[: m.start()].rstrip() + f"\n#### {m.group(1).strip()}"


# Rules that draw one of several sources per question (seeded), by name.
SOURCE_DRAWS = {"random": SOLUTION_SOURCES, "175b_random": ("175b_finetuning", "175b_verification")}


def choose_solution(row: dict[str, Any], source: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    """(source name, {is_correct, solution}) of the solution taken for one question: `source` itself, or one
    of `SOURCE_DRAWS[source]` drawn with `rng`."""
    name = rng.choice(SOURCE_DRAWS[source]) if source in SOURCE_DRAWS else source
    return name, row[name]


def read_solutions(path: Path) -> list[dict[str, Any]]:
    """Rows of the model-solutions file; a row without the fields is an error naming its line."""
    from tokenforget.stages.data import _read_jsonl  # the project's one JSON-lines reader (errors name file and line)

    rows = []
    for where, row in _read_jsonl(path):
        missing = [k for k in ("question", "ground_truth", *SOLUTION_SOURCES) if k not in row]
        if missing:
            raise UserError(f"{where}: missing field '{missing[0]}' (a model-solutions row needs question, "
                            f"ground_truth and {', '.join(SOLUTION_SOURCES)})")
        rows.append(row)
    return rows


def read_gsm8k(path: Path) -> list[dict[str, str]]:
    """GSM8K rows (`question`, `answer`); a row without them is an error naming its line."""
    from tokenforget.stages.data import _read_jsonl

    rows = []
    for where, row in _read_jsonl(path):
        if "question" not in row or "answer" not in row:
            raise UserError(f"{where}: a GSM8K row needs 'question' and 'answer'")
        rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def question_key(text: str) -> str:
    """A question, whitespace-normalised: two copies of one problem compare equal."""
    return " ".join(text.split())


def natural_sets(
    rows: list[dict[str, Any]], source: str, n_questions: Optional[int], seed: int
) -> dict[str, list[dict[str, Any]]]:
    """The `noisy`, `correct_only` and `gold` sets over the same (seeded) questions, in file order."""
    rng = random.Random(seed)
    picked = sorted(rng.sample(range(len(rows)), n_questions)) if n_questions and n_questions < len(rows) else range(len(rows))
    noisy, gold = [], []
    for i in picked:
        chosen = [(name, rows[i][name]) for name in SOLUTION_SOURCES] if source == "all" else [choose_solution(rows[i], source, rng)]
        noisy += [{"question": rows[i]["question"], "answer": to_gsm8k_answer(sol["solution"]),
                   "is_correct": bool(sol["is_correct"]), "source": name, "id": i} for name, sol in chosen]
        gold.append({"question": rows[i]["question"], "answer": to_gsm8k_answer(rows[i]["ground_truth"]), "id": i})
    return {"noisy": noisy, "correct_only": [r for r in noisy if r["is_correct"]], "gold": gold}


def held_out_sets(train_rows: list[dict[str, str]], trusted: int, val: int, test: int) -> dict[str, list[dict[str, str]]]:
    """From GSM8K train: `trusted` = its first rows, `val` = its last rows, `test` = the rows before `val`."""
    if trusted + val + test > len(train_rows):
        raise ConfigError(f"config field 'trusted_size': trusted + val + test = {trusted + val + test} is more than "
                          f"the {len(train_rows)} GSM8K train rows")
    end = len(train_rows)
    return {"trusted": train_rows[:trusted], "val": train_rows[end - val :], "test": train_rows[end - val - test : end - val]}


def check_no_overlap(sets: dict[str, list[dict[str, Any]]], training: tuple[str, ...], held_out: tuple[str, ...]) -> None:
    """Refuse any question that is both in a training set and in a held-out set (or in two held-out sets)."""
    owner: dict[str, str] = {}
    for name in held_out:
        for r in sets[name]:
            key = question_key(r["question"])
            if key in owner:
                raise UserError(f"the question '{r['question'][:60]}...' is in both {owner[key]} and {name}")
            owner[key] = name
    for name in training:
        for r in sets[name]:
            if question_key(r["question"]) in owner:
                raise UserError(f"training set {name} holds a question of {owner[question_key(r['question'])]}")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write atomically: a half-written file never sits under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def prepare_natural(cfg: PrepareConfig) -> NaturalSplits:
    """Write the natural-noise training sets and the held-out splits of `cfg` to `cfg.out_dir`."""
    for name in ("solutions", "gsm8k_train"):
        if not Path(getattr(cfg, name)).is_file():
            raise UserError(f"config field '{name}': no such file: {getattr(cfg, name)}")
    rows = read_solutions(Path(cfg.solutions))
    if cfg.n_questions and cfg.n_questions > len(rows):
        raise ConfigError(f"config field 'n_questions': {cfg.n_questions} is more than the {len(rows)} questions")
    sets = natural_sets(rows, cfg.solution_source, cfg.n_questions, cfg.seed)
    sets.update(held_out_sets(read_gsm8k(Path(cfg.gsm8k_train)), cfg.trusted_size, cfg.val_size, cfg.test_size))
    check_no_overlap(sets, training=("noisy", "correct_only", "gold"), held_out=("trusted", "val", "test"))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {name: str(out / f"{name}.jsonl") for name in sets}
    for name, rows_out in sets.items():
        write_jsonl(Path(files[name]), rows_out)
    counts = {name: len(r) for name, r in sets.items()}
    wrong = 1.0 - counts["correct_only"] / max(counts["noisy"], 1)
    manifest = {"solution_source": cfg.solution_source, "seed": cfg.seed, "n_questions": counts["gold"],
                "wrong_share": round(wrong, 4), "counts": counts, "solutions": cfg.solutions,
                "gsm8k_train": cfg.gsm8k_train, "held_out": "GSM8K train: trusted = first rows, val = last rows, "
                "test = the rows before val; the training sets are GSM8K test questions"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return NaturalSplits(files, counts, wrong, manifest)
