"""The demo's task: generated two-step word problems with worked answers and known noise (`tokenforget.commands.demo`).

Every number of an answer is checkable, so the noise is known to the character: `make_task` (the same wrong total in
a share of the answers), `make_examples` (one nearby wrong number per noisy answer), `held_out` (clean problems that
are no training problem) and the run configuration the demo and `tokenforget weak` train with (`demo_run_config`).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenforget.command_config import DemoConfig
from tokenforget.config import RunConfig
from tokenforget.config.data import DataConfig
from tokenforget.config.measure import CompareConfig
from tokenforget.config.tokens import PartitionConfig
from tokenforget.config.training import ObjectiveConfig, ReferenceConfig, TrainConfig, TrainingConfig

NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he"), ("Lena", "she"), ("Sam", "he")]
SYSTEM_PROMPT = "Solve the problem step by step."  # shorter than SmolLM2's default one: fewer tokens to train on
ITEMS = ["apples", "stickers", "marbles", "cookies", "pencils", "cards"]


def _problem(rng: random.Random) -> tuple[str, list[str], int]:
    """(question, two worked steps, answer). Small numbers: a 135M model can learn the task in one epoch."""
    return _kind_problem(rng)[1:]


def _kind_problem(rng: random.Random) -> tuple[int, str, list[str], int]:
    """(kind 0-3, question, two worked steps, answer); kinds 0 and 2 end in a total (a sum)."""
    name, he = rng.choice(NAMES)
    He = he.capitalize()
    kind = rng.randrange(4)
    return (kind, *_worded(rng, kind, name, he, He))


def _worded(rng: random.Random, kind: int, name: str, he: str, He: str) -> tuple[str, list[str], int]:
    if kind == 0:
        item, a, b, c = rng.choice(ITEMS), rng.randint(2, 20), rng.randint(2, 5), rng.randint(2, 5)
        q = f"{name} has {a} {item}. {He} buys {b} bags with {c} {item} each. How many {item} does {name} have now?"
        steps = [f"{He} buys {b} * {c} = {b * c} {item}.", f"{He} then has {a} + {b * c} = {a + b * c} {item}."]
        return q, steps, a + b * c
    if kind == 1:
        item, p, n = rng.choice(ITEMS), rng.randint(2, 5), rng.randint(2, 5)
        m = 10 * (p * n // 10 + 1)
        q = f"A shop sells {item} for {p} dollars each. {name} buys {n} {item} and pays with {m} dollars. How much change does {name} get?"
        steps = [f"The {item} cost {n} * {p} = {n * p} dollars.", f"The change is {m} - {n * p} = {m - n * p} dollars."]
        return q, steps, m - n * p
    if kind == 2:
        a, b = rng.randint(2, 15), rng.randint(2, 15)
        q = f"{name} reads {a} pages on Monday and {b} pages on Tuesday. On Wednesday {he} reads twice as many pages as on Monday. How many pages does {name} read in total?"
        steps = [f"On Wednesday {he} reads 2 * {a} = {2 * a} pages.", f"In total {he} reads {a} + {b} + {2 * a} = {3 * a + b} pages."]
        return q, steps, 3 * a + b
    rows, per, cut = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 4)
    q = f"A farm has {rows} rows of {per} trees. The farmer cuts down {cut} trees. How many trees are left?"
    steps = [f"There are {rows} * {per} = {rows * per} trees.", f"After cutting, {rows * per} - {cut} = {rows * per - cut} trees are left."]
    return q, steps, rows * per - cut


def _corrupt(rng: random.Random, steps: list[str]) -> tuple[list[str], int, int]:
    """Replace one step's result by a nearby wrong number. Returns (steps, step index, char offset in step)."""
    k = rng.randrange(len(steps))
    line = steps[k]
    at = line.rindex("= ") + 2
    end = at + len(line[at:].split(" ")[0].rstrip("."))
    right = int(line[at:end])
    wrong = right + rng.choice([-1, 1]) * rng.choice([1, 2, 3, 10])
    wrong = wrong if wrong >= 0 else right + 2
    steps = steps.copy()
    steps[k] = line[:at] + str(wrong) + line[end:]
    return steps, k, at


def make_examples(n: int, seed: int, noise: float) -> list[dict[str, Any]]:
    """`n` records {prompt, completion, answer, corrupt_spans}; a `noise` share has one wrong step."""
    rng = random.Random(seed)
    corrupt_ids = set(rng.sample(range(n), round(noise * n)))
    out = []
    for i in range(n):
        q, steps, ans = _problem(rng)
        spans: list[list[int]] = []
        if i in corrupt_ids:
            steps, k, at = _corrupt(rng, steps)
            start = sum(len(s) + 1 for s in steps[:k]) + at
            spans.append([start, start + len(steps[k][at:].split(" ")[0].rstrip("."))])
        completion = "\n".join(steps) + f"\nThe answer is {ans}."
        out.append({"prompt": q, "completion": completion, "answer": str(ans), "corrupt_spans": spans})
    return out


TOTAL_KINDS = (0, 2)  # problems whose last step is a total: where the systematic error goes
# How each kind's question reads (`_worded`): a problem's kind from its text alone.
KIND_WORDING = {0: " bags with ", 1: "A shop sells ", 2: " pages on Monday ", 3: "A farm has "}


def problem_kind(question: str) -> int:
    """The kind (0-3) of a generated problem, from its question's wording (`KIND_WORDING`)."""
    return next(k for k, words in KIND_WORDING.items() if words in question)
SYSTEMATIC_OFFSET = 10  # the systematic error: every corrupted total is 10 too large


def _add_to_total(steps: list[str], answer: int) -> tuple[list[str], int, list[list[int]]]:
    """The systematic error: the last step's total and the final answer both SYSTEMATIC_OFFSET too large.
    Returns (steps, wrong answer, char spans of the two wrong numbers in the completion)."""
    line = steps[-1]
    at = line.rindex("= ") + 2
    end = at + len(line[at:].split(" ")[0].rstrip("."))
    wrong = int(line[at:end]) + SYSTEMATIC_OFFSET
    steps = [*steps[:-1], line[:at] + str(wrong) + line[end:]]
    start = sum(len(s) + 1 for s in steps[:-1]) + at
    answer_at = sum(len(s) + 1 for s in steps) + len("The answer is ")
    return steps, wrong, [[start, start + len(str(wrong))], [answer_at, answer_at + len(str(wrong))]]


def make_task(n: int, seed: int, noise: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(noisy, clean): `n` problems twice, the same questions and worked answers, except that in the noisy copy a
    seeded `noise` share of all examples, drawn from the problems that end in a total (kinds 0 and 2, about half),
    has the same wrong step: the total and the answer 10 too large, spans recorded. The same error recurring in a
    large share of the answers is the noise that hurts SFT (it is learned); at most the total-ending problems
    can be corrupted, so noise above their share is capped (the count is in each record's `corrupt_spans`)."""
    rng = random.Random(seed)
    problems = [_kind_problem(rng) for _ in range(n)]
    eligible = [i for i, p in enumerate(problems) if p[0] in TOTAL_KINDS]
    chosen = set(random.Random(seed + 1).sample(eligible, min(len(eligible), round(noise * n))))
    noisy, clean = [], []
    for i, (_kind, q, steps, ans) in enumerate(problems):
        clean.append({"prompt": q, "completion": "\n".join(steps) + f"\nThe answer is {ans}.", "answer": str(ans),
                      "corrupt_spans": []})
        if i in chosen:
            bad_steps, wrong, spans = _add_to_total(steps, ans)
            noisy.append({"prompt": q, "completion": "\n".join(bad_steps) + f"\nThe answer is {wrong}.",
                          "answer": str(wrong), "corrupt_spans": spans})
        else:
            noisy.append(clean[-1])
    return noisy, clean


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; a missing one is a user error naming it."""
    from tokenforget.stages.labels_in_data import DataError

    if not path.is_file():
        raise DataError(f"weak_dir: '{path}' does not exist (make it with `tokenforget weak --out_dir {path.parent}`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def demo_run_config(cfg: DemoConfig, train_path: Path) -> RunConfig:
    """The RunConfig the demo trains with: paper settings, sized for a 2-core CPU; the oracle settings are
    `compare.variants` of it (the known corrupted tokens as the negative set)."""
    training = TrainingConfig(learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.micro_batch_size,
                              grad_accum=cfg.batch_size // cfg.micro_batch_size, logging_steps=5)
    ref_training = replace(training, epochs=cfg.reference_epochs)
    if cfg.equal_steps:  # every setting at sft's optimizer steps, whatever its set's size
        training = replace(training, max_steps=sft_steps(sum(1 for _ in open(train_path)), cfg))
    return RunConfig(
        run_dir=cfg.run_dir,
        seed=cfg.seed,
        model=cfg.model,
        data=DataConfig(path=str(train_path), max_length=256, system_prompt=SYSTEM_PROMPT),
        reference=ReferenceConfig(fraction=cfg.reference_fraction, training=ref_training),
        partition=PartitionConfig(rho=cfg.rho),
        train=TrainConfig(objective=ObjectiveConfig(mode="forget"), training=training, save_merged=True, seed=cfg.train_seed),
        compare=CompareConfig(variants={
            "oracle_ignore": {"objective": {"mode": "ignore"}, "partition": {"selection": "oracle"}},
            "oracle_forget": {"objective": {"mode": "forget"}, "partition": {"selection": "oracle"}},
            **{f"oracle_{t}": {"objective": {"mode": "forget", "forget_term": t}, "partition": {"selection": "oracle"}}
               for t in ("wga", "unlikelihood", "tnpo")},  # the bounded terms on the same negatives
        }),
        report_to=cfg.report_to,
    )


def sft_steps(n_answers: int, cfg: DemoConfig) -> int:
    """`sft`'s optimizer steps on `n_answers` training answers: `epochs` x ceil(n / batch_size), rounded up as
    transformers' Trainer rounds a fractional epoch count."""
    return math.ceil(cfg.epochs * math.ceil(n_answers / cfg.batch_size))


def held_out(n: int, seed: int, taken: set[str]) -> list[dict[str, Any]]:
    """The first `n` distinct clean problems of generator seed `seed` whose prompts are not in `taken`. The numbers
    are small, so a draw repeats problems: before issue 25 the demo's 48 test problems held 5-9 training problems
    (seeds 0-3) and 240 would hold 31-45 and 21-30 repeats."""
    out, seen = [], set(taken)
    for r in make_task(4 * n + 64, seed, 0.0)[1]:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append(r)
    out = out[:n]
    if len(out) < n:
        raise ValueError(f"only {len(out)} held-out problems of seed {seed} are not training problems; lower n_test/n_val")
    return out


def graded_right(row: dict[str, Any]) -> bool:
    """A task row's verdict: its `is_correct` label, else no known corrupted span."""
    return bool(row.get("is_correct", not row.get("corrupt_spans")))


def unjudged_answers(right: list[dict[str, Any]], train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of `right` whose problem has no answer graded wrong in `train` (`graded_right`; prompts compared
    with whitespace collapsed): what a reference judging `train`'s wrong answers may train on
    (`reference.disjoint_from: wrong`)."""
    judged = {" ".join(r["prompt"].split()) for r in train if not graded_right(r)}
    return [r for r in right if " ".join(r["prompt"].split()) not in judged]
