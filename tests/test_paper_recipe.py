"""`configs/paper-tulu.yaml`, the paper's own setting, checked offline: its values are the paper's, every stage runs
on a tiny Tulu-shaped stand-in, and every evaluation task it names resolves in the installed lm-eval."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from conftest import write_jsonl
from tokenforget.cli import main, parse_config
from tokenforget.config import DataConfig
from tokenforget.errors import UserError
from tokenforget.sampling import sample_indices
from tokenforget.stages.data import load_records, tokenize_records
from tokenforget.stages.labels_in_data import Record

RECIPE = Path(__file__).parents[1] / "configs" / "paper-tulu.yaml"


def tulu_rows(n: int) -> list[dict]:
    """Records shaped like the Tulu SFT mixture: `dataset`, `id` and `messages`, some with a system turn, some
    multi-turn."""
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"What is {i} + {i + 1}?"},
                {"role": "assistant", "content": f"{i} + {i + 1} = {2 * i + 1}. The answer is {2 * i + 1}."}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        if i % 4 == 1:
            msgs += [{"role": "user", "content": "And times 2?"},
                     {"role": "assistant", "content": f"{2 * i + 1} * 2 = {4 * i + 2}."}]
        rows.append({"dataset": "flan_v2" if i % 2 else "oasst1", "id": f"tulu_{i}", "messages": msgs})
    return rows


def test_the_recipe_holds_the_papers_values():
    """The values of the issue (the paper's Sec. 4), one by one, as the command line reads the file."""
    _, cfg, _ = parse_config(["run", str(RECIPE)])
    assert (cfg.data.sample, cfg.reference.size, cfg.data.max_length, cfg.data.format) == (50_000, 10_000, 2048, "messages")
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha) == (True, 64, 16)
    for t in (cfg.reference.training, cfg.train.training):
        assert (t.learning_rate, t.epochs) == (1e-4, 1.0)
    assert (cfg.partition.rho, cfg.partition.selection, cfg.score.method) == (0.7, "global", "paper")
    o = cfg.train.objective
    assert (o.mode, o.forget_term, o.schedule) == ("forget", "ga", "linear")
    assert (o.t_min, o.t_max) == (1e-5, 0.25)
    assert cfg.eval.tasks == ["truthfulqa_mc2", "boolq", "logiqa", "asdiv", "tydiqa_goldp"]
    assert cfg.eval.task_shots == {"truthfulqa_mc2": 0, "boolq": 0, "logiqa": 0, "asdiv": 0, "tydiqa_goldp": 1}


def test_the_recipes_evaluation_tasks_resolve_offline():
    """Each task name is a task or a tag of the installed lm-eval (its YAML index; no data set is read), and the
    harness is handed TyDiQA with 1 shot, the others with 0."""
    from tokenforget.stages.harness import standard_tasks, unknown_tasks

    _, cfg, _ = parse_config(["run", str(RECIPE)])
    assert unknown_tasks(cfg.eval.tasks) == []
    assert unknown_tasks(["no_such_task_anywhere"]) == ["no_such_task_anywhere"]
    specs = standard_tasks(cfg.eval)
    assert specs[-1] == {"task": "tydiqa_goldp", "num_fewshot": 1}
    assert [s["num_fewshot"] for s in specs] == [0, 0, 0, 0, 1]


def test_the_recipe_runs_every_stage_on_a_tulu_shaped_stand_in(tmp_path, tiny_model_dir):
    """The same file, with the data, the model and the sizes pointed at a stand-in: 14 Tulu-shaped records, a
    seeded 10 of them (`data.sample`), the reference on 4 of those 10 (`reference.size`), tokenized in 2 processes.
    Then `eval` of the forget model: the lm-eval tasks need the Hub, so the stand-in evaluates gold NLL instead."""
    data = write_jsonl(tmp_path / "tulu.jsonl", tulu_rows(14))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", tulu_rows(4))
    small = ["--run_dir", str(tmp_path / "run"), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
             "--data.path", str(data), "--data.sample", "10", "--data.num_proc", "2", "--data.max_length", "128",
             "--reference.size", "4", "--lora.r", "4", "--report_to", "[none]"]
    for t in ("reference", "train"):
        small += [f"--{t}.training.batch_size", "2", f"--{t}.training.grad_accum", "1"]
    assert main(["run", str(RECIPE), *small]) == 0
    run = tmp_path / "run"
    for stage in ("data", "reference", "scores", "partition", "labels", "train-forget"):
        assert (run / stage / "stage.json").is_file(), stage
    tokens = datasets.load_from_disk(str(run / "data" / "tokens"))
    assert len(tokens) == 10
    assert json.loads((run / "reference" / "stage.json").read_text())["examples"] == 4
    stats = json.loads((run / "partition" / "stats.json").read_text())
    assert stats["n_positive"] == round(0.7 * stats["n_tokens"])  # global rho 0.7 over all response tokens
    evaluation = ["--eval.checkpoint", "forget", "--eval.tasks", "[]", "--eval.task_shots", "{}",
                  "--eval.nll", f"[{held_out}]", "--eval.batch_size", "2"]
    assert main(["eval", str(RECIPE), *small, *evaluation]) == 0
    results = json.loads((run / "eval-forget" / "results.json").read_text())
    assert results["benchmarks"]["nll:held_out"]["n"] == 4


def test_a_seeded_sample_is_the_same_records_in_file_order(tmp_path):
    """`data.sample`: k of n records, sorted, the same for the same seed, another set for another seed."""
    path = write_jsonl(tmp_path / "t.jsonl", tulu_rows(30))
    picks = lambda seed: [r.where for r in load_records(DataConfig(path=str(path), sample=5, sample_seed=seed))]  # noqa: E731
    first = picks(0)
    assert len(first) == 5 and first == picks(0) and first != picks(1)
    lines = [int(w.rsplit(":", 1)[1]) for w in first]
    assert lines == sorted(lines) and len(set(lines)) == 5
    assert sample_indices(4, 4, 0, "x") == [0, 1, 2, 3]  # all of them: every index once, in order
    with pytest.raises(UserError, match=r"data.sample=31 is larger than .*\(30 records\)"):
        load_records(DataConfig(path=str(path), sample=31))


def test_tokenizing_in_processes_gives_the_same_columns(tiny_tokenizer):
    """`data.num_proc` 2 (datasets.map) and 1 (a loop here) give identical columns, corrupt spans included."""
    records = [Record(r["messages"], f"r{i}") for i, r in enumerate(tulu_rows(9))]
    records[2].corrupt_spans = ((0, 3),)
    one, rep1 = tokenize_records(tiny_tokenizer, records, DataConfig(max_length=40))
    two, rep2 = tokenize_records(tiny_tokenizer, records, DataConfig(max_length=40, num_proc=2))
    assert one == two and rep1 == rep2
    assert any(one["corrupt"][one["example"].index(2)])


def test_bad_sample_and_task_shots_are_one_line_errors(tmp_path, capsys):
    assert main(["run", "--run_dir", str(tmp_path), "--data.sample", "0"]) == 2
    assert main(["run", "--run_dir", str(tmp_path), "--eval.task_shots", "{boolq: 1}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "data.sample" in err[0] and "eval.task_shots.boolq" in err[1], err
