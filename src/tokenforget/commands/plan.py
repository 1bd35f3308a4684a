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

import random
import statistics
import time
from typing import Callable, Optional, Sequence

import datasets
import torch

from tokenforget.command_config import PlanConfig
from tokenforget.config import RunConfig
from tokenforget.report.cost import cost_plan, duration, format_cost
from tokenforget.model.batching import forward_ce, pad_batch
from tokenforget.model.loading import autocast, device
from tokenforget.model.memory import run_estimate
from tokenforget.model.model_ce import model_token_ce
from tokenforget.training.objectives import LEARN, forgetting_loss
from tokenforget.pipeline import variants
from tokenforget.pipeline.resolver import STAGES, Run
from tokenforget.stages import data as data_mod
from tokenforget.stages.reference import reference_examples
from tokenforget.stages.score import raw_score_fp, reusable_score_fps, scores_unused
from tokenforget.stages.stage import Arg, PlanInputs, StagePlan, Timing, TokenSets, longest
from tokenforget.stages.train import learned_whole
from tokenforget.text_table import format_table

TIMED_REPEATS = 2  # timed repetitions per measurement, after one untimed warm-up

Planned = tuple[Run, str, Arg]  # (the run whose folder holds it, the stage's kind, its arg)


def stages_for_modes(run: Run, modes: Sequence[str]) -> list[Planned]:
    """The stages training `modes` makes, in the order `Run.need` makes them (a `compare.variants` name that changes
    only training: with its own settings, in this folder)."""
    targets = []
    for mode in modes:
        sub, sub_mode = variants.variant(run, mode, adopt=False) if mode in run.cfg.compare.variants else (run, mode)
        targets.append((sub, sub_mode, f"train-{mode}"))
    return walk_needs(targets)


def walk_needs(targets: Sequence[tuple[Run, str, str]]) -> list[Planned]:
    """The records' `needs` walked from each (run, mode, stage folder) training, depth first, each stage once."""
    order: list[Planned] = []

    def visit(r: Run, kind: str, arg: Arg) -> None:
        arg = r.arg_of(kind, arg)
        if any((k, a) == (kind, arg) for _r, k, a in order):
            return
        for up_kind, up_arg in STAGES[kind].needs(r, arg):
            visit(r, up_kind, up_arg)
        order.append((r, kind, arg))

    for r, mode, folder in targets:
        visit(r, "train", (mode, folder))
    return order


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
        groups.append((sub, f"variant-{name}/", walk_needs([(sub, sub_mode, f"train-{name}")]), run))
    t0 = time.perf_counter()
    sets = sets or _token_sets(run)  # `sets`: the caller's, of this run
    tokenize_s = time.perf_counter() - t0
    planned = []  # (run, shown name, kind, arg, fingerprint, reused)
    parent_fps: dict[str, str] = {}  # the parent's stages this plan makes: a variant copies them after
    for _group, prefix, stages, parent in groups:
        for r, kind, arg in stages:
            name, fp = STAGES[kind].folder_name(arg), r.fp(kind, arg)
            if parent is None:
                parent_fps[name] = fp
            adopted = parent is not None and (variants.adoptable(r, parent, name, fp)
                                              or _made_for_adoption(r, parent, name, fp, parent_fps))
            planned.append((r, prefix + name, kind, arg, fp, r.is_done(name, fp) or adopted))
    todo = [name.rsplit("/", 1)[-1] for _r, name, _k, _a, _fp, reused in planned if not reused]
    timing = _measure(run, sets, todo) if measure and todo else Timing({}, {}, [], measured=measure)
    group_sets = {id(g): sets if g is run else _token_sets(g) for g, *_ in groups}  # a variant may subset anew
    plans = []
    for r, shown, kind, arg, fp, reused in planned:
        owner = next(g for g, *_ in groups if g.root == r.root)
        plan = STAGES[kind].plan(r, arg, fp, reused, PlanInputs(group_sets[id(owner)], timing, tokenize_s))
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
    return stage == "scores" and raw_score_fp(parent) in reusable_score_fps(child)


def _token_sets(run: Run) -> TokenSets:
    """Token ids from the finished data stage, the labels file, or tokenized now in memory."""
    c = run.cfg
    trusted = [] if c.train.trusted_path is None else list(learned_whole(c.data, run.base.tokenizer, c.train.trusted_path)["input_ids"])
    if c.train.labels_path:
        from tokenforget.stages.labels import read_labels

        exported = read_labels(c.train.labels_path, run.base.tokenizer)
        ids = exported["input_ids"]
        masks = [[int(k != 0) for k in cls] for cls in exported["token_class"]]
        return TokenSets(ids, masks, sum(map(sum, masks)), [], trusted)
    tokens = _tokens(run)
    ids, masks = tokens["input_ids"], tokens["response_mask"]
    reference = reference_examples(tokens, c.reference, c.data, run.base.tokenizer, c.seed)["input_ids"]
    return TokenSets(ids, masks, sum(map(sum, masks)), reference, trusted)


def _tokens(run: Run) -> datasets.Dataset:
    if run.is_done("data", run.fp("data")):
        return datasets.load_from_disk(str(run.stage_dir("data") / "tokens"))
    records = data_mod.load_records(run.cfg.data)
    cols, _ = data_mod.tokenize_records(run.base.tokenizer, records, run.cfg.data)
    return datasets.Dataset.from_dict(cols)


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
    if any(s.startswith("scores") for s in todo) and not scores_unused(run):
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
    micro-batch of `length` tokens a sequence (`stage.longest`)."""
    seen: dict[tuple[int, bool], str] = {}
    for t in (p.training for p in plans if p.training is not None and not p.reuse):
        key = (t.batch_size, t.gradient_checkpointing)
        if key not in seen:
            seen[key] = run_estimate(run.cfg.model, run.cfg.lora, t, length, run.bf16)
    return list(seen.values())


def dry_run(run: Run, modes: Sequence[str], log: Callable[[str], None] = print, plan: Optional[PlanConfig] = None
            ) -> list[StagePlan]:
    """Print the plan for training `modes` in `run` and return it; timed with `plan.timed`, the GPU cost plan after
    it with `plan.costed`."""
    plan = plan or PlanConfig()
    t0 = time.perf_counter()
    sets = _token_sets(run)
    tokenize_s = time.perf_counter() - t0
    plans, timing = plan_run(run, modes, plan.timed, sets)
    data = next((p for p in plans if p.name == "data"), None)
    if data is not None and not data.reuse:
        data.seconds = tokenize_s  # the tokenizing was done here, before plan_run
    log(format_plan(run, plans, timing, longest(sets.all, run.cfg.data.max_length)))
    if plan.costed:
        log(format_cost(cost_plan(run, plans, plan), plan, run.cfg.lora.enabled))
    return plans


def dry_run_command(command: str, cfg: RunConfig, plan: PlanConfig) -> None:
    """`tokenforget run|compare --dry-run`: the stages of the run folder the command would fill (a comparison: its
    first seed's) for the modes it would train there."""
    from tokenforget.commands.compare import seed_config

    if command == "compare":
        cfg, modes = seed_config(cfg, cfg.compare.seeds[0]), [*cfg.compare.modes, *cfg.compare.variants]
    else:
        modes = [cfg.train.objective.mode]
    dry_run(Run(cfg), modes, plan=plan)
