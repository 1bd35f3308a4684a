"""Sharded training through the engines users launch with (issue 26): FSDP2 full shard in 2 gloo processes against
one process, DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch` and the shipped config files, on this CPU.

accelerate turns FSDP on only where there are GPUs (on a CPU it quietly runs plain DDP), so the FSDP2 test applies
torch's `fully_shard` the way accelerate's FSDP2 plugin does (each decoder layer a unit, then the root) in a script
under torchrun. DeepSpeed runs on the CPU (its cpu accelerator, gloo), so ZeRO-2 and ZeRO-3 go through `accelerate
launch --config_file configs/accelerate/deepspeed-zero*.yaml` as on a GPU node, with only `mixed_precision: "no"`
(fp32, for exact comparisons) and 2 processes changed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config, write_config
from test_robustness import SCRIPTS, env, free_port, stage_dirs, torchrun
from tokenforget.cli import main

ACCELERATE = Path(__file__).parents[1] / "configs" / "accelerate"
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def cpu_copy(name: str, tmp_path: Path) -> Path:
    """The shipped accelerate config `name`, fp32 and 2 processes (what a CPU test can compare exactly)."""
    cfg = yaml.safe_load((ACCELERATE / name).read_text())
    cfg.update(mixed_precision="no", num_processes=2)
    out = tmp_path / name
    out.write_text(yaml.safe_dump(cfg))
    return out


def accelerate_launch(config: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), *args]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_the_shipped_accelerate_configs_say_what_the_docs_say():
    """Read by accelerate's own loader: FSDP2 full shard by transformer layer; ZeRO stage 2 and 3, bf16."""
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ACCELERATE / "fsdp2.yaml"))
    assert (fsdp.distributed_type, fsdp.fsdp_config["fsdp_version"]) == ("FSDP", 2)
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    for stage in (2, 3):
        ds = load_config_from_file(str(ACCELERATE / f"deepspeed-zero{stage}.yaml"))
        assert (ds.distributed_type, ds.deepspeed_config["zero_stage"], ds.mixed_precision) == ("DEEPSPEED", stage, "bf16")


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: two at once hung a CI run
def test_fsdp2_two_gloo_processes_score_and_step_like_one_process(tmp_path):
    """A LoRA Llama built in code: per-token scores (no_grad) and the first step's gradients of the forgetting loss,
    2 ranks under fully_shard against one unsharded process. Tolerances as tests/test_exact_ce.py's fp32 ones: the
    scores 1e-5 absolute (CE of O(5)); gradients 1e-4 relative, 1e-5 x max|g| absolute (FSDP's reduce-scatter
    sums the ranks' halves in another order than one backward over the whole batch). Both CE paths are the fast
    `hidden` one: the probe runs through the FSDP2 root, which gathers the tied embedding / head first."""
    script = str(SCRIPTS / "fsdp_step.py")
    one = subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], env=env(), capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun(script, str(tmp_path / "two.pt"))
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["paths"] == b["paths"] == ("hidden", "hidden")
    torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-5)
    assert abs(a["loss"] - b["loss"]) <= 1e-5
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) == 28  # 2 layers x 7 linears x (A, B)
    for name, g in a["grads"].items():
        torch.testing.assert_close(b["grads"][name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


@needs_deepspeed
@pytest.mark.xdist_group("torchrun")
@pytest.mark.parametrize("stage, head_path", [(2, "hidden"), (3, "logits")])
def test_deepspeed_zero_two_processes_first_step_equals_one_process(tmp_path, tiny_model_dir, stage, head_path):
    """The ForgettingTrainer's first step (global batch 4: 1 process x 4 vs 2 ranks x 2) under `accelerate launch`
    with the shipped ZeRO-`stage` file: the same loss (1e-4, as the DDP test) and every parameter's whole gradient
    (read from the engine) within 1e-4 absolute. Under ZeRO-3 the lm_head weight is a partitioned placeholder, so the
    per-token CE takes the model's logits; under ZeRO-2 the weights are whole and it takes the `hidden` path."""
    script = str(SCRIPTS / "first_step.py")
    single = subprocess.run([sys.executable, script, str(tiny_model_dir), str(tmp_path / "one.pt"), "4"], env=env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    out = accelerate_launch(cpu_copy(f"deepspeed-zero{stage}.yaml", tmp_path), script, str(tiny_model_dir),
                            str(tmp_path / "two.pt"), "2")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert abs(one["loss"] - two["loss"]) <= 1e-4
    assert set(one["grads"]) == set(two["grads"]) and one["grads"]
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=0, atol=1e-4, msg=name)
    if stage == 3:
        assert f"{head_path} path" in out.stderr + out.stdout


@needs_deepspeed
@pytest.mark.xdist_group("torchrun")
def test_tokenforget_run_under_deepspeed_zero3_writes_every_stage_with_whole_adapters(tmp_path, tiny_model_dir):
    """`accelerate launch --config_file deepspeed-zero3.yaml -m tokenforget run`: every stage once, and the saved
    adapters hold whole tensors (ZeRO-3 gathers them to save), the shapes of a one-process run's."""
    from safetensors.torch import load_file

    training = {"batch_size": 2, "logging_steps": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0}
    cfg = tiny_run_config(tmp_path, tiny_model_dir, n_examples=16, run_dir=str(tmp_path / "z3"), report_to=["none"],
                          reference={"training": training}, train={"training": training})
    config = write_config(tmp_path, cfg, "z3.yaml")
    accelerate_launch(cpu_copy("deepspeed-zero3.yaml", tmp_path), "-m", "tokenforget", "run", str(config))
    assert stage_dirs(tmp_path / "z3") == ["data", "labels", "partition", "reference", "scores", "train-forget"]
    assert main(["run", str(config), "--run_dir", str(tmp_path / "one")]) == 0
    for stage in ("reference", "train-forget"):
        got, want = (load_file(tmp_path / r / stage / "adapter" / "adapter_model.safetensors") for r in ("z3", "one"))
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
        assert all(v.numel() > 0 for v in got.values())
