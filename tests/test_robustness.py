"""Bad input, kill -9 and resume, NaN losses, determinism and 2-process runs (issue: scale out and survive)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import forbid_loading, tiny_run_config, write_config, write_jsonl

from tokenforget.training import objectives as losses
from tokenforget.cli import main
from tokenforget.stages.demo_task import make_examples

SCRIPTS = Path(__file__).parent / "scripts"
SRC = Path(__file__).parents[1] / "src"


def make_config(tmp_path: Path, model_dir: Path, run: str = "run", n: int = 24, **train) -> Path:
    """conftest's tiny run config as `<run>.yaml`, run folder `<run>`: no dropout or warm-up (runs that must repeat
    exactly), scoring in shards of 4 (kill points), `train` fields added to both trainings."""
    training = {"batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3, "warmup_ratio": 0.0, **train}
    cfg = tiny_run_config(tmp_path, model_dir, n_examples=n, run_dir=str(tmp_path / run), lora={"dropout": 0.0},
                          reference={"training": training}, score={"batch_size": 4, "shard_size": 4},
                          train={"training": training})
    return write_config(tmp_path, cfg, f"{run}.yaml")


LOG_DIRS = {"tensorboard", "report"}  # what `run` writes beside the stages


def stage_dirs(run: Path) -> list[str]:
    if not run.exists():
        return []
    return sorted(p.name for p in run.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in LOG_DIRS)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------- bad input

BAD_DATA = {
    "malformed": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', "train.jsonl:2: malformed JSON"),
    "missing": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', "train.jsonl:2: missing field 'completion'"),
    "empty": (b'{"prompt": "a", "completion": ""}\n', "train.jsonl:1: field 'completion' is empty"),
    "role": (b'{"messages": [{"role": "bot", "content": "x"}]}\n', "train.jsonl:1: messages[0] has unknown role 'bot'"),
    "utf8": (b'{"prompt": "a", "completion": "\xc3\x28"}\n', "train.jsonl:1: not valid UTF-8"),
    "all_prompt": (b'{"prompt": "' + b"apples " * 200 + b'", "completion": "b"}\n', "every one of the 1 examples has no response token"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_one_line_exit_2_nothing_written(case, tmp_path, tiny_model_dir, capsys):
    content, message = BAD_DATA[case]
    cfg = make_config(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_bytes(content)
    assert main(["run", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenforget")]
    assert len(err) == 1 and message in err[0], err
    assert stage_dirs(tmp_path / "run") == []


def test_prompt_filling_max_length_is_skipped_and_counted(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir)
    rows = make_examples(8, seed=0, noise=0.0) + [{"prompt": "apples " * 200, "completion": "b"}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["partition", str(cfg)]) == 0
    record = json.loads((tmp_path / "run" / "data" / "stage.json").read_text())
    assert (record["kept"], record["skipped_no_response"]) == (8, 1)


@pytest.mark.parametrize(
    "override, message",
    [
        (["--partition.rho", "1.5"], "config field 'partition.rho': must be in [0, 1], got 1.5"),
        (["--partition.rhoo", "0.5"], "unknown config key 'partition.rhoo' (did you mean 'partition.rho'?)"),
        (["--partition.rho", "abc"], 'Parser key "partition.rho": Expected a <class \'float\'>. Got value: abc'),
        (["--model.name_or_path", "/nonexistent/model"], "model.name_or_path: folder '/nonexistent/model' does not exist"),
        (["--model.gguf_file", "missing.gguf"], "model.gguf_file: 'missing.gguf' not found in"),
        # the trusted answers are first read by the final training: refused before the reference trains
        (["--train.trusted_path", "{tmp}/trusted.jsonl"], "trusted.jsonl:2: malformed JSON"),
    ],
)
def test_bad_config_one_line_exit_2(override, message, tmp_path, tiny_model_dir, capsys):
    cfg = make_config(tmp_path, tiny_model_dir)
    (tmp_path / "trusted.jsonl").write_bytes(BAD_DATA["malformed"][0])
    assert main(["run", str(cfg), *(o.format(tmp=tmp_path) for o in override)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenforget")]
    assert len(err) == 1 and message in err[0], err
    assert stage_dirs(tmp_path / "run") == []


# every command that writes, with the arguments that point it at `out` (report: its own output folder)
WRITING_COMMANDS = {
    "run": ["--run_dir"], "reference": ["--run_dir"], "score": ["--run_dir"], "partition": ["--run_dir"],
    "train": ["--run_dir"], "eval": ["--run_dir"], "compare": ["--run_dir"], "detect": ["--run_dir"],
    "demo": ["--run_dir"], "report": ["--out_dir"], "audit": ["--run_dir"], "prepare": ["--out_dir"],
    "weak": ["--out_dir"],
}


def unwritable_folder(kind: str, tmp_path: Path) -> tuple[str, str]:
    """(folder, why it cannot be written) for a folder under a regular file, in /proc, or in a chmod 555
    folder (the last only for a non-root user: root writes through permission bits)."""
    if kind == "under_a_file":
        (tmp_path / "a_file").write_text("x")
        return str(tmp_path / "a_file" / "out"), f"'{tmp_path / 'a_file'}' is a file, not a folder"
    if kind == "proc":
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc on this system")
        return "/proc/tokenforget-out", "creating a file in '/proc' fails ("
    if os.geteuid() == 0:
        pytest.skip("root writes into a chmod 555 folder; the other cases probe for real")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return str(locked / "out"), f"creating a file in '{locked}' fails (Permission denied)"


@pytest.mark.parametrize("kind", ["under_a_file", "proc", "chmod_555"])
@pytest.mark.parametrize("command", sorted(WRITING_COMMANDS))
def test_unwritable_output_folder_one_line_exit_2_before_loading_the_model(
    command, kind, tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """Every command that writes probes its output folder first: one line naming the field and the path,
    exit status 2, no model or tokenizer loaded (loading one fails this test), nothing written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    forbid_loading(monkeypatch, AutoModelForCausalLM, AutoTokenizer)
    folder, why = unwritable_folder(kind, tmp_path)
    cfg = make_config(tmp_path, tiny_model_dir)
    before = sorted(tmp_path.rglob("*"))
    if command == "demo":
        args = ["demo", "--model.name_or_path", str(tiny_model_dir), "--run_dir", folder]
    elif command == "report":
        args = ["report", str(tmp_path / "run"), "--out_dir", folder]
    elif command in ("prepare", "weak"):
        args = [command, "--out_dir", folder]
    else:
        args = [command, str(cfg), "--run_dir", folder]
    assert main(args) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    field = WRITING_COMMANDS[command][0].lstrip("-")
    expected = f"tokenforget {command}: error: config field '{field}': cannot write to '{folder}': {why}"
    if kind == "proc":  # the reason in brackets is the kernel's (ENOENT here; EACCES on some kernels)
        assert line.startswith(expected) and line.endswith(")"), line
    else:
        assert line == expected
    assert sorted(tmp_path.rglob("*")) == before
    assert not Path(folder).exists()


def test_report_without_out_dir_probes_the_run_folders_report(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    run = tmp_path / "a_file" / "run"
    assert main(["report", str(run)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tokenforget report: error: config field 'run_dir': cannot write to '{run / 'report'}': "
        f"'{tmp_path / 'a_file'}' is a file, not a folder"
    ]


TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 15745664 vs 15745556"  # seen on a full disk


@pytest.mark.parametrize(("error", "free"), [(OSError(28, "No space left on device"), 2**30),
                                             (RuntimeError("Error while serializing: I/O error: No space left on "
                                                           "device (os error 28)"), 2**30),
                                             (RuntimeError(TORCH_FULL), 4096)])
def test_a_full_disk_is_one_line_and_leaves_no_half_written_stage(tmp_path, monkeypatch, error, free):
    """A stage whose save fills the disk (an OSError, the error safetensors raises, or torch's checkpoint writer's
    with 4 KiB left free): one line naming the stage and the folder; the half-made stage is gone, the finished one
    before it stays; any other error, with 1 GiB free, passes unchanged."""
    import shutil
    from collections import namedtuple

    from tokenforget.runfolder import RunFolder, RunFolderError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(2**40, 2**40 - free, free))
    folder = RunFolder(tmp_path, {}, log=lambda _msg: None)
    folder.ensure("data", "fp1", lambda: 1, lambda _r, d: (d / "rows.txt").write_text("1") and {})

    def full(_result, d):
        (d / "model.safetensors").write_text("half")
        raise error

    with pytest.raises(RunFolderError) as caught:
        folder.ensure("train-sft", "fp2", lambda: 2, full)
    assert str(caught.value) == (f"[train-sft] no space left on the device of {tmp_path}: the stage was discarded, "
                                 "the finished stages are kept; free space and rerun to resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "data"]
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(2**40, 2**40 - 2**30, 2**30))
    with pytest.raises(ValueError, match="not a disk"):
        folder.ensure("train-sft", "fp2", lambda: 2, lambda _r, _d: (_ for _ in ()).throw(ValueError("not a disk")))


def test_folder_holding_a_different_run_is_refused(tmp_path, tiny_model_dir, capsys):
    cfg = make_config(tmp_path, tiny_model_dir)
    assert main(["score", str(cfg)]) == 0
    other = write_jsonl(tmp_path / "other.jsonl", make_examples(12, seed=5, noise=0.0))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    assert main(["score", str(cfg), "--data.path", str(other)]) == 2
    assert "holds a different run (data.path differ" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}  # untouched
    assert main(["score", str(cfg), "--data.path", str(other), "--overwrite", "true"]) == 0


def test_scores_that_do_not_match_the_data_are_refused(tmp_path, tiny_model_dir, capsys):
    """A scores folder whose stage.json matches but whose content belongs to other data (here: one row cut)."""
    cfg = make_config(tmp_path, tiny_model_dir)
    assert main(["score", str(cfg)]) == 0
    scores_dir = tmp_path / "run" / "scores" / "scores"
    cut = datasets.load_from_disk(str(scores_dir)).select(range(23))
    cut.save_to_disk(str(tmp_path / "cut"))
    shutil.rmtree(scores_dir)
    shutil.copytree(tmp_path / "cut", scores_dir)
    assert main(["partition", str(cfg)]) == 2
    assert "scores do not match the tokenized data set" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """The objective returns NaN from its 3rd call (optimizer step 3, one micro-batch a step):
    training stops there, checkpoint-2 is kept, no train stage is written."""
    calls = {"n": 0}
    real = losses.OBJECTIVES["forget"].loss

    def nan_from_third(token_loss, token_class, lam, counts=None):
        calls["n"] += 1
        parts = real(token_loss, token_class, lam, counts)
        return losses.LossParts(parts.loss * float("nan"), parts.pos_sum, parts.neg_sum) if calls["n"] >= 3 else parts

    monkeypatch.setitem(losses.OBJECTIVES, "forget", losses.Objective(nan_from_third, uses_lambda=True))
    cfg = make_config(tmp_path, tiny_model_dir, save_steps=1)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "training loss became nan at optimizer step 3" in err and "checkpoint-2" in err
    assert (tmp_path / "run" / ".train-forget.work" / "checkpoint-2").is_dir()
    assert "train-forget" not in stage_dirs(tmp_path / "run")


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_partition_and_loss_curve(tmp_path, tiny_model_dir):
    a, b = (make_config(tmp_path, tiny_model_dir, run=r) for r in ("a", "b"))
    assert main(["run", str(a)]) == 0 and main(["run", str(b)]) == 0
    cls = [datasets.load_from_disk(str(tmp_path / r / "partition" / "classes"))["token_class"] for r in "ab"]
    assert cls[0] == cls[1]
    curves = [[h["loss"] for h in json.loads((tmp_path / r / "train-forget" / "log_history.json").read_text()) if "loss" in h] for r in "ab"]
    assert len(curves[0]) == 6 and curves[0] == curves[1]


# ------------------------------------------------------------------------------------------- kill -9 and resume


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds (fails if it ends first)."""
    end = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < end, "timed out waiting to kill"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_during_scoring_then_resume_gives_identical_scores(tmp_path, tiny_model_dir, capsys):
    ref = make_config(tmp_path, tiny_model_dir, run="ref")
    assert main(["score", str(ref)]) == 0
    cfg = make_config(tmp_path, tiny_model_dir, run="killed")
    work = tmp_path / "killed" / ".scores.work"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "slow_cli.py"), "0.5", "score", str(cfg)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: len(list(work.glob("shard-*"))) >= 2)
    done_before = len(list(work.glob("shard-*")))
    assert 2 <= done_before < 6  # 24 examples in shards of 4
    capsys.readouterr()
    assert main(["score", str(cfg)]) == 0
    assert f"resuming: {done_before} of 6 shards already scored" in capsys.readouterr().out
    got, want = (datasets.load_from_disk(str(tmp_path / r / "scores" / "scores")) for r in ("killed", "ref"))
    assert got["score"] == want["score"] and got["ce_ref"] == want["ce_ref"]  # exactly


def test_kill_during_training_then_resume_gives_the_same_loss_curve(tmp_path, tiny_model_dir, capsys):
    """24 examples, batch 4, 2 epochs = 12 steps, a checkpoint every 3; killed after checkpoint-6."""
    kw = dict(epochs=2, save_steps=3)
    ref = make_config(tmp_path, tiny_model_dir, run="ref", **kw)
    assert main(["train", str(ref)]) == 0
    cfg = make_config(tmp_path, tiny_model_dir, run="killed", **kw)
    assert main(["partition", str(cfg)]) == 0
    work = tmp_path / "killed" / ".train-forget.work"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "slow_cli.py"), "0.3", "train", str(cfg)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: (work / "checkpoint-6" / "trainer_state.json").is_file())
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 0
    assert "resuming from" in capsys.readouterr().out
    curve = lambda r: [(h["step"], h["loss"], h["lambda"]) for h in json.loads((tmp_path / r / "train-forget" / "log_history.json").read_text()) if "loss" in h]  # noqa: E731
    got, want = curve("killed"), curve("ref")
    assert [s for s, _, _ in got] == list(range(1, 13)) == [s for s, _, _ in want]
    np.testing.assert_allclose([l for _, l, _ in got], [l for _, l, _ in want], rtol=0, atol=1e-5)  # CPU fp32
    assert [lam for _, _, lam in got] == [lam for _, _, lam in want]  # the lambda schedule picked up where it was


# ------------------------------------------------------------------------------------------- two processes


def free_port() -> int:
    """A port nobody listens on now (other test runs on this machine may use torchrun too)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: two at once hung a CI run
def test_two_process_scores_equal_one_process(tmp_path, tiny_model_dir):
    one = make_config(tmp_path, tiny_model_dir, run="one")
    assert main(["score", str(one)]) == 0
    two = make_config(tmp_path, tiny_model_dir, run="two")
    shutil.copytree(tmp_path / "one" / "reference", tmp_path / "two" / "reference")  # same reference model
    shutil.copytree(tmp_path / "one" / "data", tmp_path / "two" / "data")
    torchrun("-m", "tokenforget", "score", str(two))
    got, want = (datasets.load_from_disk(str(tmp_path / r / "scores" / "scores")) for r in ("two", "one"))
    for g, w in zip(got["score"], want["score"]):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: two at once hung a CI run
def test_two_process_first_step_equals_one_process(tmp_path, tiny_model_dir):
    """Global batch 4: one process with batch 4 vs two ranks with 2 each (gloo, CPU)."""
    script = str(SCRIPTS / "first_step.py")
    single = subprocess.run([sys.executable, script, str(tiny_model_dir), str(tmp_path / "one.pt"), "4"], env=env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun(script, str(tiny_model_dir), str(tmp_path / "two.pt"), "2")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert abs(one["loss"] - two["loss"]) <= 1e-4
    assert set(one["grads"]) == set(two["grads"]) and one["grads"]
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=0, atol=1e-4)


@pytest.mark.xdist_group("torchrun")  # one torchrun at a time: two at once hung a CI run
def test_two_process_run_writes_every_stage_once(tmp_path, tiny_model_dir):
    """`tokenforget run` under torchrun: DDP training of reference and final model, sharded scoring."""
    cfg = make_config(tmp_path, tiny_model_dir, run="ddp")
    out = torchrun("-m", "tokenforget", "run", str(cfg))
    assert stage_dirs(tmp_path / "ddp") == ["data", "labels", "partition", "reference", "scores", "train-forget"]
    assert out.stdout.count("[partition] ") == 2 and out.stdout.count("[partition] done in") == 1  # only rank 0 reports: its counts, its time
    assert out.stdout.count("train-forget: final loss=") == 1
    assert out.stdout.count("Report: ") == 1 and (tmp_path / "ddp" / "report" / "report.html").is_file()
    history = json.loads((tmp_path / "ddp" / "train-forget" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]  # 24 examples / (4 per rank x 2 ranks)
