"""Dry run: which stages a command would run or reuse, and what they would process; on request, how long.

Nothing is written: stage fingerprints are compared with the `stage.json` files in the run folder, and the
data is tokenized in memory when its stage is not done yet. Only the tokenizer is loaded, so the plan
(examples, tokens, optimizer steps) comes in seconds. With `measure` (`--dry-run-timing`) the base model is
loaded too and the wall time comes from a short warm-up measured on this machine (a few training
micro-batches and scoring forwards on real examples), scaled by the padded tokens each stage would process:

    estimate(stage) = seconds per padded token (measured) x padded tokens the stage processes

Training batches are drawn at random, so their padded tokens are those of a seeded shuffle (an expected
value, not the Trainer's exact order); scoring batches are the scorer's own length-grouped batches.
`run --dry-run` plans one mode; a command that trains several modes passes them all to `plan_run`.
The estimate is for one process (under torchrun each rank does a share of the steps).
Both print a memory estimate of each training to run, from the model's config file alone (`tokenforget.model.memory`).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import datasets
import torch

from tokenforget.command_config import PlanConfig
from tokenforget.commands.cost import (  # noqa: F401  (the counts are also plan's API)
    cost_plan, duration, format_cost, longest, micro_batches, optimizer_steps, score_padded_tokens, train_padded_tokens,
)
from tokenforget.config.training import TrainingConfig
from tokenforget.model.batching import forward_ce, pad_batch
from tokenforget.model.loading import autocast, device
from tokenforget.model.memory import MemoryEstimate, run_estimate
from tokenforget.model.model_ce import model_token_ce
from tokenforget.objectives import LEARN, forgetting_loss, needs_partition
from tokenforget.run import variants
from tokenforget.run.pipeline import Run
from tokenforget.runfolder import round_stage
from tokenforget.stages import data as data_mod
from tokenforget.stages.reference import reference_examples
from tokenforget.text_table import format_table

TIMED_REPEATS = 2  # timed repetitions per measurement, after one untimed warm-up


@dataclass
class StagePlan:
    """One stage of a dry run."""

    name: str
    fingerprint: str
    reuse: bool  # True: its stage.json matches, the command would skip it
    examples: int
    tokens: int  # tokens of the examples the stage goes over (prompt and response)
    work: str
    seconds: float  # estimated wall time if it runs (0 when reused)
    trainings: int = 0  # model trainings the stage runs (a reference per fold)
    forwards: int = 0  # forward passes over every example (the scoring pass: base, reference, noisy references)


def stages_for_modes(run: Run, modes: Sequence[str]) -> list[str]:
    """The stage folders training `modes` needs, in the order they would run."""
    if run.cfg.train.labels_path:
        return [f"train-{m}" for m in modes]
    needs_scores = any(needs_partition(m) for m in modes)
    per_round = ("scores", "partition") if run.scores_unused() else ("reference", "scores", "partition")
    rounds = [round_stage(s, r) for r in range(1, run.rounds + 1) for s in per_round]
    if run.needs_noisy_reference():  # trained once, before the first scoring pass
        rounds.insert(rounds.index("scores"), "reference-noisy")
    upstream = ["data", *rounds, "labels"] if needs_scores else ["data"]
    return upstream + [f"train-{m}" for m in modes]


def _round_of(stage: str) -> tuple[str, int]:
    """`scores-round3` -> ("scores", 3); `scores` -> ("scores", 1)."""
    name, _, r = stage.partition("-round")
    return name, int(r) if r else 1


def fingerprints(run: Run, stages: Sequence[str]) -> dict[str, str]:
    fps: dict[str, Callable[[int], str]] = {
        "data": lambda _r: run.data_fp(), "reference": run.reference_fp, "scores": run.score_fp,
        "reference-noisy": lambda _r: run.noisy_reference_fp(),
        "partition": run.partition_fp, "labels": lambda _r: run.labels_fp(),
    }
    return {s: variants.train_fp(run, s.removeprefix("train-")) if s.startswith("train-") else fps[_round_of(s)[0]](_round_of(s)[1])
            for s in stages}


@dataclass
class Timing:
    """Measured seconds per padded token (median of the timed repeats) and what they were measured on."""

    train: dict[tuple[int, int], float]  # (batch size, gradient checkpointing) -> s/token of a training micro-batch
    forward: dict[int, float]  # batch size -> s/token of one scoring forward
    notes: list[str]
    measured: bool = True  # False: no warm-up was asked for, the plan has no wall-time estimate


def plan_run(run: Run, modes: Sequence[str], measure: bool = False, sets: Optional["TokenSets"] = None
             ) -> tuple[list[StagePlan], Timing]:
    """Plan every stage training `modes` needs; with `measure`, time the warm-up (loading the model) for the
    stages that would run.

    A `compare.variants` name among `modes` that overrides partition, reference or score trains in a folder of
    its own (`variants.variant`): its stages are planned there, named `variant-<name>/<stage>`, and one counts as
    reused when done there or when the parent holds it with the same fingerprint (`compare` copies it over)."""
    own = {m: variants.variant(run, m, adopt=False) for m in modes if m in run.cfg.compare.variants}
    own = {m: v for m, v in own.items() if v[0].root != run.root}
    groups = [(run, "", stages_for_modes(run, [m for m in modes if m not in own]), None)]
    for name, (sub, sub_mode) in own.items():
        stages = [*stages_for_modes(sub, [sub_mode])[:-1], f"train-{name}"]
        groups.append((sub, f"variant-{name}/", stages, run))
    t0 = time.perf_counter()
    sets = sets or _token_sets(run)  # `sets`: the caller's, of this run
    tokenize_s = time.perf_counter() - t0
    planned = []  # (run, shown name, stage, fingerprint, reused)
    parent_fps: dict[str, str] = {}  # the parent's stages this plan makes: a variant copies them after
    for r, prefix, stages, parent in groups:
        fps = fingerprints(r, stages)
        if parent is None:
            parent_fps = fps
        for st in stages:
            adopted = parent is not None and (variants.adoptable(r, parent, st, fps[st])
                                              or _made_for_adoption(r, parent, st, fps[st], parent_fps))
            planned.append((r, prefix + st, st, fps[st], r.is_done(st, fps[st]) or adopted))
    todo = [st for _r, _shown, st, _fp, reused in planned if not reused]
    timing = _measure(run, sets, todo) if measure and todo else Timing({}, {}, [], measured=measure)
    group_sets = {id(r): sets if r is run else _token_sets(r) for r, *_ in groups}  # a variant may subset anew
    plans = []
    for r, shown, st, fp, reused in planned:
        plan = _stage_plan(r, st, fp, reused, group_sets[id(r)], timing, tokenize_s)
        plan.name = shown
        plans.append(plan)
    return plans, timing


def _made_for_adoption(child: Run, parent: Run, stage: str, fp: str, parent_fps: dict[str, str]) -> bool:
    """Whether the parent's stages planned before the variant (`parent_fps`) give `compare` the child's `stage` to
    copy: the same fingerprint, or a scoring pass the child's method can be rescored from."""
    if stage not in variants.ADOPTED_STAGES or stage not in parent_fps:
        return False
    if parent_fps[stage] == fp:
        return True
    return stage == "scores" and parent.raw_score_fp() in child.reusable_score_fps()


@dataclass
class TokenSets:
    """The examples each stage goes over, as token id lists."""

    all: list[list[int]]
    masks: list[list[int]]  # 1 where a token gets a loss (response tokens), per example of `all`
    response_tokens: int
    reference: list[list[int]]  # the reference training's examples (every mode trains on `all`)


def _token_sets(run: Run) -> TokenSets:
    """Token ids from the finished data stage, the labels file, or tokenized now in memory."""
    cfg = run.cfg
    if cfg.train.labels_path:
        from tokenforget.stages.labels import read_labels

        exported = read_labels(cfg.train.labels_path, run.base.tokenizer)
        ids = exported["input_ids"]
        masks = [[int(c != 0) for c in cls] for cls in exported["token_class"]]
        return TokenSets(ids, masks, sum(map(sum, masks)), [])
    tokens = _tokens(run)
    ids, masks = tokens["input_ids"], tokens["response_mask"]
    c = run.cfg
    reference = reference_examples(tokens, c.reference, c.data, run.base.tokenizer, c.seed)["input_ids"]
    return TokenSets(ids, masks, sum(map(sum, masks)), reference)


def _tokens(run: Run) -> datasets.Dataset:
    if run.is_done("data", run.data_fp()):
        return datasets.load_from_disk(str(run.stage_dir("data") / "tokens"))
    records = data_mod.load_records(run.cfg.data)
    cols, _ = data_mod.tokenize_records(run.base.tokenizer, records, run.cfg.data)
    return datasets.Dataset.from_dict(cols)


# ---------------------------------------------------------------- estimates


def _stage_plan(
    run: Run, stage: str, fp: str, reuse: bool, sets: TokenSets, timing: Timing, tokenize_s: float
) -> StagePlan:
    cfg = run.cfg
    n_tok = sum(map(len, sets.all))
    if stage == "data":
        return StagePlan(stage, fp, reuse, len(sets.all), n_tok, "tokenize", 0.0 if reuse else tokenize_s)
    kind = _round_of(stage)[0]
    if kind == "reference":
        if cfg.reference.checkpoint:
            return StagePlan(stage, fp, reuse, 0, 0, "read reference.checkpoint (no training)", 0.0)
        plan = _train_plan(stage, fp, reuse, sets.reference, cfg.reference.training, cfg.seed, timing)
        folds = cfg.reference.folds
        if folds > 1:  # K references, each on a subset of the same size
            plan.work, plan.seconds, plan.trainings = f"{folds} references x {plan.work}", plan.seconds * folds, folds
        return plan
    if kind == "reference-noisy":  # cross-fitted on the training data
        rc = cfg.reference
        n = len(sets.all)  # `reference.cross_fit_folds`: round(fraction x n), at most the other folds' examples
        share = min(max(1, round(rc.noisy_fraction * n)), n - math.ceil(n / rc.noisy_folds))
        plan = _train_plan(stage, fp, reuse, sets.all[:share], rc.training, cfg.seed, timing)
        plan.work, plan.seconds = f"{rc.noisy_folds} noisy references x {plan.work}", plan.seconds * rc.noisy_folds
        plan.trainings = rc.noisy_folds
        return plan
    if kind == "scores" and run.scores_unused():  # the stage only writes zeros for the partition to read
        work = f"not needed: partition.selection '{cfg.partition.selection}' ranks nothing (no reference, no forward)"
        return StagePlan(stage, fp, reuse, len(sets.all), n_tok, work, 0.0)
    if kind == "scores":
        bs = cfg.score.batch_size
        padded = score_padded_tokens(sets.all, bs)
        n_batches = math.ceil(len(sets.all) / bs)
        models = run.scoring_forwards()
        why = ", ".join(models) + ("" if run.base_pass() else "; the method reads no base CE")
        secs = len(models) * padded * timing.forward.get(bs, 0.0)
        work = f"{n_batches} batches x {len(models)} forward{'s' * (len(models) > 1)} ({why})"
        return StagePlan(stage, fp, reuse, len(sets.all), n_tok, work, 0.0 if reuse else secs, forwards=len(models))
    if kind in ("partition", "labels"):
        ranked = "read the data's weights of" if cfg.partition.selection == "data" else "rank"
        what = f"{ranked} {sets.response_tokens:,} response tokens" if stage == "partition" else "write labels.parquet"
        return StagePlan(stage, fp, reuse, len(sets.all), n_tok, what, 0.0)
    return _train_plan(stage, fp, reuse, sets.all, cfg.train.training, cfg.seed, timing)


def _train_plan(
    stage: str, fp: str, reuse: bool, examples: Sequence[Sequence[int]], tcfg: TrainingConfig, seed: int, timing: Timing
) -> StagePlan:
    steps = optimizer_steps(len(examples), tcfg)
    per_token = timing.train.get((tcfg.batch_size, tcfg.gradient_checkpointing), 0.0)
    secs = train_padded_tokens(examples, tcfg, seed) * per_token
    work = f"{steps} optimizer steps of {tcfg.batch_size} x {tcfg.grad_accum}"
    return StagePlan(stage, fp, reuse, len(examples), sum(map(len, examples)), work, 0.0 if reuse else secs, trainings=1)


# ---------------------------------------------------------------- warm-up


def _measure(run: Run, sets: TokenSets, todo: Sequence[str]) -> Timing:
    """Time a few micro-batches of each training and scoring configuration that a stage to run uses."""
    cfg = run.cfg
    timing = Timing({}, {}, [])
    t0 = time.perf_counter()
    run.base.load()  # loads the base once (stages share its weights)
    timing.notes.append(f"model load {time.perf_counter() - t0:.1f} s")
    trainings = [cfg.reference.training] if any(s.startswith("reference") for s in todo) else []
    trainings += [cfg.train.training] if any(s.startswith("train-") for s in todo) else []
    for tcfg in trainings:
        key = (tcfg.batch_size, tcfg.gradient_checkpointing)
        if key not in timing.train:
            ids, attn, resp = _sample_batch(sets, tcfg.batch_size, cfg.seed)
            secs = _time_train_step(run, ids, attn, resp, tcfg.gradient_checkpointing)
            timing.train[key] = secs / ids.numel()
            timing.notes.append(f"training micro-batch {tuple(ids.shape)}: {secs:.3f} s")
    if any(s.startswith("scores") for s in todo) and not run.scores_unused():
        ids, attn, resp = _sample_batch(sets, cfg.score.batch_size, cfg.seed)
        secs = _time_forward(run, ids, attn, resp)
        timing.forward[cfg.score.batch_size] = secs / ids.numel()
        timing.notes.append(f"scoring forward {tuple(ids.shape)}: {secs:.3f} s")
    return timing


def _sample_batch(sets: TokenSets, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, response mask), each (B, T), of a seeded random batch, right-padded."""
    pick = random.Random(seed).sample(range(len(sets.all)), min(batch_size, len(sets.all)))
    ids, attn = pad_batch([sets.all[i] for i in pick], 0)
    resp, _ = pad_batch([sets.masks[i] for i in pick], 0)
    return ids.to(device()), attn.to(device()), resp.to(device())


def _timed(step: Callable[[], None]) -> float:
    """Median seconds of TIMED_REPEATS calls after one untimed call."""
    step()
    times = []
    for _ in range(TIMED_REPEATS):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_train_step(
    run: Run, ids: torch.Tensor, attn: torch.Tensor, resp: torch.Tensor, gradient_checkpointing: bool
) -> float:
    """Seconds of one training micro-batch on a fresh LoRA copy: forward and per-token CE the way
    `ForgettingTrainer` computes them, the objective, backward, an AdamW step."""
    model = run.base.for_training(run.cfg.lora).to(device())
    if gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)  # lr 0: weights stay put
    cls = resp * LEARN

    def step() -> None:
        with autocast(run.bf16):
            token_loss = model_token_ce(model, ids, resp.bool(), attention_mask=attn)  # (B, T)
        forgetting_loss(token_loss, cls, 0.0).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()

    return _timed(step)


def _time_forward(run: Run, ids: torch.Tensor, attn: torch.Tensor, resp: torch.Tensor) -> float:
    """Seconds of one scoring forward (the scorer's `forward_ce`, response tokens only)."""
    model = run.base.frozen().to(device()).eval()

    def step() -> None:
        forward_ce(model, ids, attn, run.bf16, resp)
        _sync()

    return _timed(step)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---------------------------------------------------------------- report


def format_plan(run: Run, plans: Sequence[StagePlan], timing: Timing, length: int) -> str:
    """The dry run as a table; when timed, each stage's estimate, the warm-up measurements and the total; the memory
    estimate at `length` tokens a sequence."""
    header = ["stage", "status", "fingerprint", "examples", "tokens", "work"]
    rows = [[p.name, "reuse" if p.reuse else "run", p.fingerprint, p.examples, f"{p.tokens:,}", p.work] for p in plans]
    if timing.measured:
        header.append("est. time")
        for row, p in zip(rows, plans):
            row.append("-" if p.reuse else duration(p.seconds))
    lines = [f"Dry run of {run.root} (nothing is written)", format_table(header, rows), *memory_lines(run, plans, length)]
    nothing = "" if any(not p.reuse for p in plans) else " (nothing to run)"
    if not timing.measured:
        lines.append(f"Wall time not estimated{nothing}: --dry-run-timing loads the model and times a few "
                     "training micro-batches and scoring forwards on this machine")
        return "\n".join(lines)
    if timing.notes:
        lines.append(f"Warm-up on this machine (median of {TIMED_REPEATS} after 1 untimed): " + "; ".join(timing.notes))
    total = sum(p.seconds for p in plans if not p.reuse)
    lines.append(f"Estimated wall time of the stages to run: {duration(total)}{nothing}")
    return "\n".join(lines)


def memory_lines(run: Run, plans: Sequence[StagePlan], length: int) -> list[str]:
    """The memory estimate (`tokenforget.model.memory`) of each training configuration a stage to run uses, for a
    micro-batch of `length` tokens a sequence (`cost.longest`)."""
    cfg = run.cfg
    stages = [(p.name.rsplit("/", 1)[-1], p.reuse) for p in plans]  # a variant's: variant-<name>/<stage>
    kinds = {_round_of(s)[0] if not s.startswith("train-") else "train" for s, reuse in stages if not reuse}
    trainings = [cfg.reference.training] if "reference" in kinds else []
    trainings += [cfg.train.training] if "train" in kinds else []
    seen: dict[tuple[int, bool], str] = {}
    for t in trainings:
        key = (t.batch_size, t.gradient_checkpointing)
        if key not in seen:
            seen[key] = run_estimate(cfg.model, cfg.lora, t, length, run.bf16)
    return list(seen.values())


def dry_run(
    run: Run, modes: Sequence[str], log: Callable[[str], None] = print, measure: bool = False,
    cost: Optional[PlanConfig] = None,
) -> list[StagePlan]:
    """Print the plan for training `modes` in `run` and return it; with `cost`, the GPU cost plan after it."""
    t0 = time.perf_counter()
    sets = _token_sets(run)
    tokenize_s = time.perf_counter() - t0
    plans, timing = plan_run(run, modes, measure, sets)
    data = next((p for p in plans if p.name == "data"), None)
    if data is not None and not data.reuse:
        data.seconds = tokenize_s  # the tokenizing was done here, before plan_run
    log(format_plan(run, plans, timing, longest(sets.all, run.cfg.data.max_length)))
    if cost is not None:
        log(format_cost(cost_plan(run, plans, sets, cost), cost, run.cfg.lora.enabled))
    return plans
