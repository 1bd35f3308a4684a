"""`tokenforget weak`: natural noise on the demo's task, written by a weaker model (issue 25, item 4).

1. A short SFT of the base model (SmolLM2-135M by default) on `n_sft` clean generated problems of another seed:
   the weak teacher (`out_dir/weak-sft/`, a run folder: reused when rerun).
2. It answers each of the `n_train` training problems `samples` times, sampled at `temperature` with a seed per
   sample (`stages.weak.sample_seed`), in batched `generate` calls.
3. Every answer is graded step by step against the generator's (`stages.weak.grade`); a mix with `target_wrong`
   wrong answers is chosen (`stages.weak.choose_mix`).
4. Written, in the demo's record format (`corrupt_spans`: the first wrong number to the end): `noisy.jsonl` (the
   model-written answers kept), `correct_only.jsonl` (the right ones among them), `gold.jsonl` (the generator's own
   answers to the same problems), `samples.jsonl` (every sample with its grade) and `manifest.json`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tokenforget.command_config import DemoConfig, WeakConfig
from tokenforget.errors import UserError
from tokenforget.stages.weak import RowSeededSampler, choose_mix, grade, sample_seed

SFT_SEED_OFFSET = 40_000  # the weak model's SFT problems: a generator seed of their own


def weak_model(cfg: WeakConfig, out: Path, taken: set[str], log: Callable[[str], None]) -> Any:
    """The weak teacher: the demo's SFT (its LoRA, learning rate and batch) on `n_sft` clean problems of another
    seed that are not training problems; returns (the Run, the train stage folder)."""
    from tokenforget.stages.demo_task import demo_run_config, make_task, write_jsonl
    from tokenforget.pipeline.resolver import Run

    pool = make_task(4 * cfg.n_sft + 64, cfg.seed + SFT_SEED_OFFSET, 0.0)[1]
    sft = [r for r in pool if r["prompt"] not in taken][: cfg.n_sft]
    write_jsonl(sft, out / "weak-sft.jsonl")
    demo = DemoConfig(run_dir=str(out / "weak-sft"), seed=cfg.seed, model=cfg.model, epochs=cfg.sft_epochs,
                      learning_rate=cfg.learning_rate, report_to=cfg.report_to)
    run = Run(demo_run_config(demo, out / "weak-sft.jsonl"), log=log)
    return run, run.train("sft")


def sample_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[list[dict[str, str]]], seeds: Sequence[int],
                   cfg: WeakConfig, bf16: bool) -> list[str]:
    """One sampled answer per prompt, each with its own seed, in left-padded batches of `generate_batch`."""
    from transformers import LogitsProcessorList

    from tokenforget.model.loading import autocast

    model.eval()
    dev = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), cfg.generate_batch):
            batch = prompts[i : i + cfg.generate_batch]
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            sampler = RowSeededSampler(seeds[i : i + cfg.generate_batch], cfg.temperature)
            with autocast(bf16), torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                     logits_processor=LogitsProcessorList([sampler]), pad_token_id=tokenizer.pad_token_id)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


def make_weak_sets(cfg: WeakConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Make the weak teacher, sample, grade, mix and write the sets; returns the manifest."""
    from tokenforget.stages.demo_task import SYSTEM_PROMPT, make_task
    from tokenforget.stages.evaluate import load_trained

    t0 = time.time()
    out = Path(cfg.out_dir)
    gold = make_task(cfg.n_train, cfg.seed, 0.0)[1]  # the demo's training problems of this seed, answered right
    run, stage = weak_model(cfg, out, {r["prompt"] for r in gold}, log)
    model = load_trained(stage)
    prompts = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": r["prompt"]}] for r in gold]
    jobs = [(i, j) for j in range(cfg.samples) for i in range(len(gold))]  # sample j of every problem, then j + 1
    log(f"[weak] sampling {len(jobs)} answers at temperature {cfg.temperature}")
    texts = sample_answers(model, run.base.tokenizer, [prompts[i] for i, _ in jobs],
                           [sample_seed(cfg.seed, i, j) for i, j in jobs], cfg, run.bf16)
    answers = [[""] * cfg.samples for _ in gold]
    for (i, j), t in zip(jobs, texts):
        answers[i][j] = t.strip()
    grades = [[grade(a, g["completion"]) for a in row] for row, g in zip(answers, gold)]
    if not any(g.correct for gs in grades for g in gs if g.complete):  # no mix exists: say so, write nothing
        raise UserError(f"none of the weak model's {len(jobs)} sampled answers is right, so no set "
                        f"with {cfg.target_wrong:.0%} wrong answers exists: train it longer (--n_sft, --sft_epochs)")
    choice = choose_mix(grades, cfg.target_wrong, cfg.seed)
    return write_sets(cfg, out, gold, answers, grades, choice, time.time() - t0)


def outcome_correct(answer: str, gold_answer: str) -> bool:
    """The verdict users have (an outcome verifier): the answer's final answer (`metrics.extract_answer`) equals the
    gold one, whatever its steps say ("3 * 4 = 12" in place of "4 * 3 = 12" is right)."""
    from tokenforget.metrics import answers_match, extract_answer

    return answers_match(extract_answer(answer), gold_answer)


def rft_rows(gold: list[dict[str, Any]], kept: list[int]) -> list[dict[str, Any]]:
    """A right-answer record per kept problem, its completion to be filled in."""
    return [{"prompt": gold[i]["prompt"], "completion": "", "answer": gold[i]["answer"], "corrupt_spans": [],
             "is_correct": True} for i in kept]


def write_sets(cfg: WeakConfig, out: Path, gold: list[dict[str, Any]], answers: list[list[str]], grades: list[list[Any]],
               choice: list[Any], wall_s: float) -> dict[str, Any]:
    """noisy / correct_only / rft / gold / samples JSONL and manifest.json; the manifest.

    Each kept answer carries `is_correct`, the outcome verdict (its final answer right: what users' verifiers give),
    and `process_correct`, the strict step-by-step grade (`stages.weak.grade`); `corrupt_spans` stay the process
    grade's first wrong number to the end (the oracle's natural mask). `correct_only` holds the kept answers whose
    outcome is right; `rft.jsonl` every distinct outcome-right sample of the kept problems (rejection-sampling
    fine-tuning, Yuan et al. 2023, arXiv 2308.01825: all the right samples, not one per problem); `rft_process.jsonl`
    the same by the process grade."""
    from tokenforget.stages.demo_task import write_jsonl

    kept = [i for i, c in enumerate(choice) if c is not None]
    noisy = [{"prompt": gold[i]["prompt"], "completion": answers[i][choice[i]], "answer": gold[i]["answer"],
              "corrupt_spans": grades[i][choice[i]].spans(answers[i][choice[i]]),
              "is_correct": outcome_correct(answers[i][choice[i]], gold[i]["answer"]),
              "process_correct": grades[i][choice[i]].correct} for i in kept]
    rft = [{**r, "completion": a} for i, r in zip(kept, rft_rows(gold, kept)) for a in dict.fromkeys(answers[i])
           if outcome_correct(a, gold[i]["answer"])]
    rft_process = [{**r, "completion": a} for i, r in zip(kept, rft_rows(gold, kept)) for a, g in
                   dict.fromkeys(zip(answers[i], grades[i])) if g.correct]
    sets = {"noisy": noisy, "correct_only": [r for r in noisy if r["is_correct"]], "rft": rft, "rft_process": rft_process,
            "gold": [gold[i] for i in kept]}
    files = {}
    for name, rows in sets.items():
        write_jsonl(rows, out / f"{name}.jsonl")
        files[name] = str(out / f"{name}.jsonl")
    write_jsonl([{"problem": i, "sample": j, "answer": a, **asdict(g), "outcome_correct": outcome_correct(a, gold[i]["answer"])}
                 for i, (row, gs) in enumerate(zip(answers, grades)) for j, (a, g) in enumerate(zip(row, gs))],
                out / "samples.jsonl")
    complete = [g for gs in grades for g in gs if g.complete]
    manifest = {
        "config": asdict(cfg), "counts": {k: len(v) for k, v in sets.items()}, "files": files,
        "wrong_share": 1 - len(sets["correct_only"]) / max(len(noisy), 1),
        "process_wrong_share": sum(not r["process_correct"] for r in noisy) / max(len(noisy), 1),
        "verdicts_disagree": sum(r["is_correct"] != r["process_correct"] for r in noisy),
        "sampled_wrong_share": sum(not g.correct for g in complete) / max(len(complete), 1),
        "incomplete_samples": sum(not g.complete for gs in grades for g in gs), "wall_s": wall_s,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def run_weak(cfg: WeakConfig) -> None:
    out = make_weak_sets(cfg)
    print(f"{out['counts']['noisy']} answers kept, {out['wrong_share']:.1%} wrong by their final answer (is_correct), "
          f"{out['process_wrong_share']:.1%} step by step (process_correct; the verdicts disagree on "
          f"{out['verdicts_disagree']}); {out['sampled_wrong_share']:.1%} of all complete samples wrong step by step")
    for name, path in out["files"].items():
        print(f"  {name:<13}{out['counts'][name]:>6}  {path}")
