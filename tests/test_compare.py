"""`tokenforget compare` and `tokenforget eval` end to end on the tiny model: 2 seeds, every mode."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import gsm8k_rows, tiny_run_config, write_config, write_jsonl

from tokenforget.cli import main
from tokenforget.commands.compare import RESULTS_FILE, TABLE_FILE, mean_std, summarize

MODES = ["sft", "ignore", "forget"]


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    test = write_jsonl(tmp_path / "test.jsonl", gsm8k_rows(4, 1))
    cfg = tiny_run_config(
        tmp_path, tiny_model_dir, rows=gsm8k_rows(16, 0), run_dir=str(tmp_path / "cmp"),
        data={"corrupt_fraction": 0.5, "corrupt_seed": 3}, reference={"fraction": 0.5}, score={"batch_size": 8},
        eval={"gsm8k": str(test), "limit": 2, "max_new_tokens": 4, "batch_size": 4, "diversity_prompts": 2,
              "diversity_samples": 2},
        compare={"seeds": [1, 2]},
    )
    return write_config(tmp_path, cfg)


def test_compare_two_seeds_end_to_end(config: Path, capsys):
    root = config.parent / "cmp"
    started = time.time()
    assert main(["compare", str(config)]) == 0
    out = capsys.readouterr().out
    assert "Paired difference to sft" in out and "Comparison over seeds 1, 2" in out
    assert (root / TABLE_FILE).read_text().strip() in out
    for seed in (1, 2):
        folder = root / f"seed-{seed}"
        assert json.loads((folder / "config.json").read_text())["seed"] == seed
        assert all((folder / f"{stage}-{m}" / "stage.json").is_file() for m in MODES for stage in ("train", "eval"))
    assert (root / "eval-base" / "results.json").is_file() and not (root / "train-sft").exists()

    res = json.loads((root / RESULTS_FILE).read_text())
    assert res["seeds"] == [1, 2] and res["models"] == ["base", *MODES]
    assert set(res["benchmarks"]) == {"gsm8k", "gsm8k_nll", "distinct_1", "distinct_2", "entropy_2"}
    assert res["benchmarks"]["gsm8k"]["n"] == 2 and res["benchmarks"]["gsm8k_nll"]["kind"] == "nll"
    nll = {m: [res["per_seed"][s][m]["gsm8k_nll"]["value"] for s in ("1", "2")] for m in res["models"]}
    assert nll["base"][0] == nll["base"][1]  # evaluated once
    assert nll["sft"][0] != nll["sft"][1]  # a different seed trains a different model
    mean, std = mean_std(nll["forget"])
    assert res["table"]["forget"]["gsm8k_nll"] == pytest.approx({"mean": mean, "std": std, "n_seeds": 2})
    assert res["table"]["base"]["gsm8k_nll"]["std"] is None and res["table"]["base"]["gsm8k_nll"]["stderr"] > 0
    paired = res["paired_vs_sft"]["forget"]["gsm8k_nll"]["per_seed"]
    assert paired == pytest.approx({s: f - b for s, f, b in zip(("1", "2"), nll["forget"], nll["sft"])})
    assert set(res["paired_vs_sft"]) == {"ignore", "forget"} and "average" in res["paired_vs_sft"]["forget"]
    assert set(res["paired_vs_sft"]["forget"]["gsm8k_nll"]["stderr_per_seed"]) == {"1", "2"}
    assert set(res["detection"]) == {"1", "2"} and res["detection"]["1"]["n_corrupt"] > 0
    from importlib.metadata import version

    from tokenforget.version import machine

    assert res["versions"]["lm_eval"] == version("lm_eval") and res["machine"] == machine()
    assert 0 < res["wall_s"] < time.time() - started

    assert main(["compare", str(config)]) == 0  # a rerun trains and evaluates nothing
    out = capsys.readouterr().out
    assert "training on" not in out and "evaluating" not in out
    assert out.count("[eval-forget] up to date") == 2
    assert json.loads((root / RESULTS_FILE).read_text())["per_seed"] == res["per_seed"]


def test_eval_command_base_and_stage(config: Path, capsys):
    root = config.parent / "cmp"
    assert main(["eval", str(config)]) == 0
    out = capsys.readouterr().out
    assert "gsm8k_nll" in out and "distinct_2" in out
    assert (root / "eval-base" / "results.json").is_file()
    assert main(["eval", str(config), "--eval.checkpoint", "forget"]) == 2  # not trained yet
    assert "tokenforget train --train.objective.mode forget" in capsys.readouterr().err
    assert main(["train", str(config), "--train.objective.mode", "sft"]) == 0
    capsys.readouterr()
    assert main(["eval", str(config), "--eval.checkpoint", str(root / "train-sft" / "adapter")]) == 0
    assert "gsm8k" in capsys.readouterr().out
    assert (root / "eval-adapter" / "results.json").is_file()


def test_eval_without_lm_eval_refuses_its_benchmarks_before_any_model_loads(config: Path, capsys, monkeypatch):
    """lm-evaluation-harness is the optional `eval` extra: where it is missing, a benchmark it runs (`eval.gsm8k`)
    is refused in one line naming the field and the extra, exit 2, no stage made; gold NLL alone still runs."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    root = config.parent / "cmp"
    assert main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert "'eval.gsm8k'" in err and "tokenforget[eval]" in err and len(err.strip().splitlines()) == 1
    assert not (root / "eval-base").exists()
    assert main(["eval", str(config), "--eval.gsm8k", "null", "--eval.nll", f"[{config.parent / 'test.jsonl'}]"]) == 0
    assert "nll:test" in capsys.readouterr().out and (root / "eval-base" / "results.json").is_file()


def test_summarize_average_and_differences_by_hand():
    """Two seeds, one accuracy benchmark a and one NLL benchmark b.
    sft a = (0.2, 0.4), forget a = (0.3, 0.3): table forget a = 0.3 ± 0; paired a = (+0.1, -0.1) -> 0 ± 0.1414.
    average = a alone (b is an NLL, not averaged)."""
    def e(v, kind="accuracy"):
        return {"value": v, "stderr": 0.0, "n": 10, "metric": "m", "higher_is_better": True, "kind": kind}

    per_seed = {
        "1": {"base": {"a": e(0.1), "b": e(2.0, "nll")}, "sft": {"a": e(0.2), "b": e(1.5, "nll")}, "forget": {"a": e(0.3), "b": e(1.4, "nll")}},
        "2": {"base": {"a": e(0.1), "b": e(2.0, "nll")}, "sft": {"a": e(0.4), "b": e(1.7, "nll")}, "forget": {"a": e(0.3), "b": e(1.5, "nll")}},
    }
    res = summarize(per_seed, ["base", "sft", "forget"])
    assert res["table"]["forget"]["a"] == pytest.approx({"mean": 0.3, "std": 0.0, "n_seeds": 2})
    assert res["table"]["sft"]["average"]["mean"] == pytest.approx(0.3)
    d = res["paired_vs_sft"]["forget"]["a"]
    assert d["per_seed"] == pytest.approx({"1": 0.1, "2": -0.1})
    assert (d["mean"], d["std"]) == pytest.approx((0.0, 0.2 / 2**0.5))
    assert res["paired_vs_sft"]["forget"]["b"]["mean"] == pytest.approx(-0.15)


@pytest.mark.parametrize("name", ["gsm8k-smollm2", "gsm8k-noisy-smollm2"])
def test_shipped_gsm8k_configs_parse(name: str):
    """The two measured configs load into a RunConfig with the Hub fallbacks set (nothing is run)."""
    from tokenforget.cli import parse_config

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    _, cfg, _ = parse_config(["compare", "--config", str(path)])
    assert cfg.data.hub_fallback == "openai/gsm8k" and cfg.eval.gsm8k_fallback == "openai/gsm8k"
    assert cfg.compare.seeds == [1, 2, 3] and cfg.eval.limit and cfg.data.limit
    assert (cfg.data.corrupt_fraction > 0) == ("noisy" in name)


def test_paired_nll_stderr_by_hand():
    """Same tokens (1, 1) per example; NLL sums a = (2, 4), b = (1, 5): r = (1, -1), difference 0/2 = 0,
    residuals (1, -1) -> se = sqrt(2/1 * 2) / 2 = 1. Without per-example numbers: None."""
    from tokenforget.commands.compare import paired_nll_stderr

    a = {"per_example": {"nll_sum": [2.0, 4.0], "tokens": [1, 1]}}
    b = {"per_example": {"nll_sum": [1.0, 5.0], "tokens": [1, 1]}}
    assert paired_nll_stderr(a, b) == pytest.approx(1.0)
    assert paired_nll_stderr(a, {"value": 1.0}) is None
