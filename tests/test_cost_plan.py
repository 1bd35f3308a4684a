"""The dry run's cost plan (`--plan-gpus N --gpu h100`): the formulas of `tokenforget.model.memory` worked out by hand on a
small shape, and the command end to end on the tiny model (nothing loaded, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import forbid_loading
from tokenforget.model import memory as mem
from tokenforget.cli import main, parse_config
from tokenforget.pipeline.resolver import Run
from tokenforget.report.cost import cost_plan
from tokenforget.commands.plan import plan_run
from tokenforget.stages.stage import train_padded_tokens

# 2 layers, hidden 4, MLP 8, vocabulary 10, 200 parameters (the head tied to the embedding), LoRA: 32 adapter
# parameters over linears with 16 input features in all.
SHAPE = mem.Shape(layers=2, hidden=4, mlp=8, vocab=10, params=200, lora_params=32, lora_inputs=16, tied=True)
TOY = mem.GPU("toy", peak_flops=1000.0, memory=1e9)


def test_flops_and_wall_time_by_hand():
    """F at T = 6: 2 x 200 + 4 x 2 layers x 4 x 6 = 400 + 192 = 592 FLOPs a token; untied, the input embedding
    (10 x 4 = 40) is a lookup: 2 x 160 + 192 = 512. A LoRA training with gradient checkpointing runs 2 + 1 = 3
    forward-equivalents: 100 tokens cost 3 x 100 x 592 = 177,600 FLOPs; full fine-tuning 3, + 1 = 4 passes.
    On 2 toy GPUs of 1,000 FLOP/s at MFU 0.5: 177,600 / (2 x 1,000 x 0.5) = 177.6 s."""
    assert mem.forward_flops_per_token(SHAPE, 6) == 592
    untied = mem.Shape(**{**SHAPE.__dict__, "tied": False})
    assert mem.matmul_params(untied) == 160 and mem.forward_flops_per_token(untied, 6) == 512
    assert (mem.training_passes(True, False), mem.training_passes(True, True)) == (2, 3)
    assert (mem.training_passes(False, False), mem.training_passes(False, True)) == (3, 4)
    flops = mem.stage_flops(SHAPE, 100, 6, mem.training_passes(True, True))
    assert flops == 177_600
    assert mem.wall_seconds(flops, TOY, 2, 0.5) == pytest.approx(177.6)


def test_memory_per_gpu_by_sharding_by_hand():
    """One process, LoRA, micro-batch 1 x 6, fp32: weights 200 x 4 = 800 B; adapter weights, gradients and AdamW
    16 x 32 = 512 B; activations 6 tokens x 2 layers x (6 x 4 + 4 x 8 + 16 / 2 = 64) x 4 B = 3,072 B, plus one CE
    chunk 2 x 256 x 10 x 4 = 20,480 B. ZeRO-2 over 2 GPUs shards the 512 B: 256 B. FSDP (or ZeRO-3) over 2 shards the
    weights too: 800 / 2 = 400 B, plus the gathered units, 2 x max(a layer (200 - 40) / 2 = 80, the head 40) x 4 =
    640 B, so 1,040 B of weights; over 4 GPUs 200 + 640 = 840 B and 128 B."""
    est = mem.estimate(SHAPE, lora=True, batch=1, length=6, weight_bytes=4, act_bytes=4, checkpointing=False)
    assert (est.weights, est.training, est.activations) == (800, 512, 3072 + 20480)
    assert mem.sharded(est, SHAPE, "ddp", 2, 4) == est
    assert mem.sharded(est, SHAPE, "zero2", 2, 4) == mem.MemoryEstimate(800, 256, 23552)
    assert mem.sharded(est, SHAPE, "fsdp", 2, 4) == mem.MemoryEstimate(1040, 256, 23552)
    assert mem.sharded(est, SHAPE, "zero3", 4, 4) == mem.MemoryEstimate(840, 128, 23552)
    scoring = mem.forward_estimate(SHAPE, batch=2, length=6, weight_bytes=4, act_bytes=2)
    assert (scoring.weights, scoring.activations) == (800, 2 * 6 * (24 + 32) * 2 + 20480)  # 1,344 + 20,480


def test_plan_gpus_prints_a_cost_plan_and_loads_nothing(config: Path, capsys, monkeypatch):
    """`run --dry-run --plan-gpus 2`: per GPU stage, tokens, FLOPs, memory per GPU, wall time; nothing loaded or
    written. The training's FLOPs are the formula's on the plan's own padded tokens and the tiny model's shape."""
    forbid_loading(monkeypatch, AutoModelForCausalLM)
    argv = ["run", str(config), "--dry-run", "--plan-gpus", "2", "--gpu", "h100", "--plan-sharding", "zero3",
            "--eval.tasks", "[boolq, my_own_task]", "--data.max_length", "400"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert not (config.parent / "run").exists()
    assert "Cost plan: 2 x NVIDIA H100 SXM 80GB (989 TFLOP/s bf16 dense), MFU 17% (measured" in out  # LoRA's default
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] and line.split()[0] in
            ("reference", "scores", "train-forget", "eval")}
    assert set(rows) == {"reference", "scores", "train-forget", "eval"}
    from tokenforget.stages.stage import longest

    _, cfg, _ = parse_config(argv)
    run = Run(cfg)
    from tokenforget.commands.plan import _token_sets

    longest_example = max(map(len, _token_sets(run).all))  # the memory is of the data's real lengths, not max_length
    assert longest_example < 400 and longest(_token_sets(run).all, 400) == longest_example
    assert longest([[1] * 200], 128) == 128  # at most max_length
    assert f"zero3, micro-batch 4 x {longest_example}" in rows["train-forget"] and "2 forwards" in rows["scores"]
    assert "not costed: my_own_task" in rows["eval"]
    assert "GPU-hours" in out

    _, cfg, dry = parse_config(argv)
    run = Run(cfg)
    plans, _ = plan_run(run, ["forget"])
    from tokenforget.commands.plan import _token_sets

    sets = _token_sets(run)
    costs = {c.name: c for c in cost_plan(run, plans, dry)}
    shape = mem.config_shape(cfg.model, cfg.lora)
    padded = train_padded_tokens(sets.all, cfg.train.training, cfg.seed)
    seq = padded / (6 * 4)  # 24 examples: 6 micro-batches of 4
    train = costs["train-forget"]
    assert train.tokens == padded
    assert train.flops == pytest.approx(2 * padded * (2 * shape.params + 4 * shape.layers * shape.hidden * seq))
    assert train.seconds == pytest.approx(train.flops / (2 * 989e12 * 0.17))
    dry.mfu = 0.5  # --plan-mfu 0.5
    assert cost_plan(run, plans, dry)[-2].seconds == pytest.approx(train.flops / (2 * 989e12 * 0.5))


def test_bad_plan_settings_are_one_line_errors(config: Path, capsys):
    assert main(["run", str(config), "--plan-gpus", "0"]) == 2
    assert main(["run", str(config), "--plan-gpus", "2", "--gpu", "tpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--plan-gpus" in err[0] and "tpu" in err[1], err
