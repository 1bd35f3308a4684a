"""The offline demo: a generated arithmetic task with known corrupted steps, end to end.

The generator writes multi-step word problems with worked answers. In a seeded share of the training
answers one step's result is replaced by a plausible wrong number (the steps after it are left as they
were, as in a careless annotation); the character span of every wrong number is recorded, so we know
exactly which response tokens are corrupted. The held-out split is clean.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from tokenforget.config import (
    DataConfig, DemoConfig, PartitionConfig, ReferenceConfig, RunConfig, TrainConfig, TrainingConfig, apply_preset,
)
from tokenforget.models import BaseModel

NAMES = [("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zoe", "she"), ("Omar", "he"), ("Lena", "she"), ("Sam", "he")]
SYSTEM_PROMPT = "Solve the problem step by step."  # shorter than SmolLM2's default one: fewer tokens to train on
ITEMS = ["apples", "stickers", "marbles", "cookies", "pencils", "cards"]


def _problem(rng: random.Random) -> tuple[str, list[str], int]:
    """(question, two worked steps, answer). Small numbers: a 135M model can learn the task in one epoch."""
    name, he = rng.choice(NAMES)
    He = he.capitalize()
    kind = rng.randrange(4)
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


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def demo_run_config(cfg: DemoConfig, train_path: Path) -> RunConfig:
    """The RunConfig the demo trains with: paper settings, sized for a 2-core CPU."""
    training = TrainingConfig(learning_rate=cfg.learning_rate, epochs=cfg.epochs, batch_size=cfg.batch_size, logging_steps=5)
    ref_training = replace(training, epochs=cfg.reference_epochs)
    return RunConfig(
        run_dir=cfg.run_dir,
        seed=cfg.seed,
        model=cfg.model,
        data=DataConfig(path=str(train_path), max_length=256, system_prompt=SYSTEM_PROMPT),
        reference=ReferenceConfig(fraction=cfg.reference_fraction, training=ref_training),
        partition=PartitionConfig(rho=cfg.rho),
        train=TrainConfig(mode="forget", training=training, save_merged=True),
        report_to=cfg.report_to,
    )


def recommended_run(cfg: DemoConfig, run: Any, root: Path, log: Callable[[str], None]) -> Any:
    """The demo's run with the `recommended` preset (`config.PRESETS`) and its reference trained on `n_trusted`
    clean generated examples that share no prompt with the training data, in `run_dir/recommended/`."""
    from tokenforget.pipeline import Run

    trusted_path = root / "task" / "trusted.jsonl"
    scored = {json.loads(line)["prompt"] for line in (root / "task" / "train.jsonl").read_text().splitlines()}
    pool = make_examples(4 * cfg.n_trusted, cfg.seed + 20_000, 0.0)  # small number ranges: some problems repeat
    write_jsonl([r for r in pool if r["prompt"] not in scored][: cfg.n_trusted], trusted_path)  # disjoint
    rc = replace(run.cfg, run_dir=str(root / "recommended"), reference=replace(run.cfg.reference, path=str(trusted_path)))
    return Run(apply_preset(rc, "recommended"), base=run.base, log=log)


def detection_side_by_side(paper: Any, rec: Any) -> dict[str, dict[str, Any]]:
    """Detection figures of the paper's setting (its score, a slice of the noisy data as reference) and of the
    recommended preset (its score method and rho, a trusted reference), each at its own rho."""
    from tokenforget.detect import detection_of_methods

    def of(run: Any) -> dict[str, Any]:
        method = run.cfg.score.method
        return detection_of_methods(run.data(), run.score(), [method], run.cfg.partition.rho)[method]

    return {"paper": of(paper), "recommended": of(rec)}


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, base: Optional[BaseModel] = None) -> dict[str, Any]:
    """Generate the task, train `sft`, `forget` (the paper's setting) and the `recommended` preset, evaluate
    them and the base, write the HTML report; return every number."""
    from tokenforget import report
    from tokenforget.html_report import build_report
    from tokenforget.pipeline import Run

    t0 = time.time()
    root = Path(cfg.run_dir)
    train_path, test_path = root / "task" / "train.jsonl", root / "task" / "test.jsonl"
    write_jsonl(make_examples(cfg.n_train, cfg.seed, cfg.noise), train_path)
    write_jsonl(make_examples(cfg.n_test, cfg.seed + 10_000, 0.0), test_path)
    run = Run(demo_run_config(cfg, train_path), base=base, log=log)
    rec = recommended_run(cfg, run, root, log)
    stages = {mode: run.train(mode) for mode in ("sft", "forget")}
    stages["recommended"] = rec.train()
    results = report.evaluate_models(run, stages, test_path, cfg.max_new_tokens, log)
    results["detection"] = report.detection_of(run).__dict__
    results["detection_methods"] = detection_side_by_side(run, rec)
    results["wall_s"] = time.time() - t0
    (root / "demo_results.json").write_text(json.dumps(results, indent=2))
    log(report.demo_table(results))
    log(report.run_summary(run, [f"train-{m}" for m in stages]))
    log(f"Report: {build_report(root, tokenizer=run.base.tokenizer).resolve()}")
    return results

