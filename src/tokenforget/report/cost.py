"""What a run costs: the cost plan (`--plan-gpus N --gpu h100`): per GPU stage (reference, scoring, training, one evaluation) tokens,
model FLOPs, memory per GPU under a sharding and wall time at an MFU; the formulas are `tokenforget.model.memory`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tokenforget.command_config import PlanConfig
from tokenforget.config.training import TrainingConfig
from tokenforget.model import memory as mem
from tokenforget.model.memory import MemoryEstimate
from tokenforget.pipeline.resolver import Run
from tokenforget.stages.score import score_padded_tokens
from tokenforget.stages.stage import StagePlan, longest, micro_batches, train_padded_tokens
from tokenforget.text_table import format_table

# ---------------------------------------------------------------- counts


def duration(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"



# ---------------------------------------------------------------- the cost plan (--plan-gpus)

# Forward tokens of one evaluation of the standard tasks the paper used: examples x requests per example x mean
# tokens per request, rough (not measured: lm-eval scores each answer choice as its own request; TyDiQA's 1-shot
# prompt holds two passages and its generated tokens, decoded one at a time, are not counted).
EVAL_TASK_TOKENS: dict[str, tuple[int, float]] = {  # task -> (examples, forward tokens)
    "truthfulqa_mc2": (817, 817 * 7.2 * 330),
    "boolq": (3270, 3270 * 2 * 170),
    "logiqa": (651, 651 * 4 * 300),
    "asdiv": (2305, 2305 * 1 * 70),
    "tydiqa_goldp": (5077, 5077 * 1 * 600),
}
EVAL_SEQ_LEN = 512  # a typical request's length, for the attention term of the evaluation's FLOPs


@dataclass
class StageCost:
    """One GPU stage of the cost plan."""

    name: str
    tokens: float  # tokens the stage's forwards go over (padded; training: all epochs)
    flops: float
    memory: Optional[MemoryEstimate]  # per GPU; None when not estimated
    seconds: float
    note: str = ""


def cost_plan(run: Run, plans: Sequence[StagePlan], pc: PlanConfig) -> list[StageCost]:
    """The GPU stages of `plans` (each training and each scoring pass, as the dry run planned them: its settings,
    examples, trainings and forwards) and one evaluation of the base model, costed with the formulas of
    `tokenforget.model.memory` for `pc.gpus` GPUs of type `pc.gpu`."""
    cfg, gpu = run.cfg, mem.GPUS[pc.gpu]
    shape = mem.config_shape(cfg.model, cfg.lora)
    costs = []
    for p in plans:
        if p.training is not None:
            c = _train_cost(run, shape, p.name, p.examples_ids, p.training, pc)
            c.tokens, c.flops = c.tokens * p.trainings, c.flops * p.trainings
        elif p.forwards:
            c = _score_cost(run, shape, p.name, p.examples_ids, p.forwards)
        else:
            continue
        c.seconds = mem.wall_seconds(c.flops, gpu, pc.gpus, pc.utilisation(cfg.lora.enabled))
        c.note = "reuse" if p.reuse else c.note
        costs.append(c)
    costs += _eval_costs(run, shape, pc)
    return costs


def _seq_len(padded: float, sequences: float) -> float:
    return padded / max(1.0, sequences)


def _train_cost(run: Run, shape: mem.Shape, name: str, examples: Sequence[Sequence[int]], tcfg: TrainingConfig,
                pc: PlanConfig) -> StageCost:
    """Training: passes x padded tokens x F; memory of one micro-batch of max_length under the sharding."""
    cfg = run.cfg
    padded = train_padded_tokens(examples, tcfg, cfg.seed)
    seq = _seq_len(padded, micro_batches(len(examples), tcfg) * min(tcfg.batch_size, len(examples)))
    flops = mem.stage_flops(shape, padded, seq, mem.training_passes(cfg.lora.enabled, tcfg.gradient_checkpointing))
    length = longest(examples, cfg.data.max_length)  # what a padded micro-batch reaches, not max_length
    est = mem.training_estimate(shape, cfg.model, cfg.lora, tcfg, length, run.bf16)
    sharding = pc.sharding if pc.gpus > 1 else "ddp"
    per_gpu = mem.sharded(est, shape, sharding, pc.gpus, mem.weight_bytes(cfg.model))
    return StageCost(name, padded, flops, per_gpu, 0.0, f"{sharding}, micro-batch {tcfg.batch_size} x {length}")


def _score_cost(run: Run, shape: mem.Shape, name: str, examples: Sequence[Sequence[int]], forwards: int) -> StageCost:
    """Scoring: a forward of each model the pass runs over the scorer's padded batches; every rank holds the whole model
    (scoring shares out the examples, not the weights)."""
    cfg = run.cfg
    padded = score_padded_tokens(examples, cfg.score.batch_size)
    flops = mem.stage_flops(shape, padded, _seq_len(padded, len(examples)), forwards)
    est = mem.forward_estimate(shape, cfg.score.batch_size, longest(examples, cfg.data.max_length),
                               mem.weight_bytes(cfg.model), 2 if run.bf16 else 4)
    return StageCost(name, padded * forwards, flops, est, 0.0, f"{forwards} forward{'s' * (forwards > 1)}, whole model per GPU")


def _eval_costs(run: Run, shape: mem.Shape, pc: PlanConfig) -> list[StageCost]:
    """One evaluation (one model) of the standard tasks in `eval.tasks` whose size `EVAL_TASK_TOKENS` holds."""
    known = [t for t in run.cfg.eval.tasks if t in EVAL_TASK_TOKENS]
    unknown = [t for t in run.cfg.eval.tasks if t not in EVAL_TASK_TOKENS]
    if not known:
        return []
    tokens = sum(EVAL_TASK_TOKENS[t][1] for t in known)
    flops = mem.stage_flops(shape, tokens, EVAL_SEQ_LEN, 1)
    est = mem.forward_estimate(shape, run.cfg.eval.batch_size, EVAL_SEQ_LEN, mem.weight_bytes(run.cfg.model),
                               2 if run.bf16 else 4)
    note = f"{len(known)} tasks, rough sizes" + (f"; not costed: {', '.join(unknown)}" if unknown else "")
    seconds = mem.wall_seconds(flops, mem.GPUS[pc.gpu], pc.gpus, pc.utilisation(run.cfg.lora.enabled))
    return [StageCost("eval (one model)", tokens, flops, est, seconds, note)]


def format_cost(costs: Sequence[StageCost], pc: PlanConfig, lora: bool) -> str:
    gpu, mfu = mem.GPUS[pc.gpu], pc.utilisation(lora)
    header = ["stage", "tokens", "model FLOPs", "memory/GPU", "wall", "note"]
    rows = [[c.name, f"{c.tokens / 1e6:,.1f} M" if c.tokens >= 1e6 else f"{c.tokens:,.0f}", f"{c.flops:.3g}", mem.size(c.memory.total) if c.memory else "-",
             duration(c.seconds), c.note] for c in costs]
    todo = [c for c in costs if c.note != "reuse"]
    total = sum(c.seconds for c in todo)
    over = [c.name for c in todo if c.memory and c.memory.total > gpu.memory]
    lines = [f"Cost plan: {pc.gpus} x {gpu.name} ({gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 dense), MFU {mfu:.0%}"
             f"{'' if pc.mfu else ' (measured, docs/paper-scale.md)'} (formulas: tokenforget.model.memory)", format_table(header, rows),
             f"Estimated GPU wall time of the stages to run: {duration(total)} ({total * pc.gpus / 3600:.2f} GPU-hours)"]
    if over:
        lines.append(f"Over the {mem.size(int(gpu.memory))} of one GPU: {', '.join(over)} (lower the batch size, "
                     "turn on gradient checkpointing, or shard over more GPUs)")
    return "\n".join(lines)
