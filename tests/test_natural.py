"""Natural noise (`tokenforget prepare`), per-example labels, the oracle partition, `dft` and the result-token
NLL: hand-made rows, the shipped data when present, and the tiny model end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import labelled_config, tiny_run_config, write_jsonl

from tokenforget.cli import main
from tokenforget.command_config import PrepareConfig
from tokenforget.stages.labels_in_data import Record
from tokenforget.config import UserError
from tokenforget.metrics import result_spans
from tokenforget.stages.natural import check_no_overlap, prepare_natural, question_key, to_gsm8k_answer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SOLUTIONS = SHARED / "gsm8k-model-solutions" / "example_model_solutions.jsonl"
GSM8K_TRAIN = SHARED / "gsm8k" / "train.jsonl"
SOURCES = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


def solution_row(q: str, right: str, wrong: str, correct_175v: bool) -> dict:
    """A model-solutions row whose 175b_verification solution is `right` or `wrong`; the others wrong."""
    row = {"question": q, "ground_truth": f"{right}\nA: 1"}
    for s in SOURCES:
        ok = s == "175b_verification" and correct_175v
        row[s] = {"is_correct": ok, "solution": f"{right if ok else wrong}\nA: {1 if ok else 2}"}
    return row


@pytest.fixture
def small_sources(tmp_path: Path) -> tuple[Path, Path]:
    rows = [solution_row(f"Q{i}?", f"r{i} = <<1=1>>1", f"w{i} = <<2=2>>2", i % 2 == 0) for i in range(4)]
    train = [{"question": f"T{i}?", "answer": f"t{i}\n#### {i}"} for i in range(10)]
    return write_jsonl(tmp_path / "sol.jsonl", rows), write_jsonl(tmp_path / "train.jsonl", train)


def read(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_final_line_becomes_gsm8k_format():
    assert to_gsm8k_answer("So 2 + 2 = <<2+2=4>>4\nA: 4") == "So 2 + 2 = <<2+2=4>>4\n#### 4"
    assert to_gsm8k_answer("Total 1,200 dollars\nA: 1,200\n") == "Total 1,200 dollars\n#### 1,200"
    assert to_gsm8k_answer("no final line") == "no final line"


def test_prepare_writes_the_three_sets_and_disjoint_splits(small_sources: tuple[Path, Path], tmp_path: Path):
    """4 questions, 175b_verification right for Q0 and Q2: noisy 4 rows (2 wrong, share 0.5), correct_only Q0 and
    Q2, gold 4 ground truths. GSM8K train T0..T9 with trusted 2, val 3, test 3: trusted T0 T1, val T7 T8 T9,
    test T4 T5 T6."""
    sol, train = small_sources
    out = prepare_natural(PrepareConfig(out_dir=str(tmp_path / "nat"), solutions=str(sol), gsm8k_train=str(train),
                                        trusted_size=2, val_size=3, test_size=3))
    noisy, correct, gold = read(out.files["noisy"]), read(out.files["correct_only"]), read(out.files["gold"])
    assert [r["is_correct"] for r in noisy] == [True, False, True, False] and out.wrong_share == 0.5
    assert noisy[1]["answer"] == "w1 = <<2=2>>2\n#### 2" and noisy[0]["answer"] == "r0 = <<1=1>>1\n#### 1"
    assert [r["question"] for r in correct] == ["Q0?", "Q2?"]
    assert [r["answer"] for r in gold] == [f"r{i} = <<1=1>>1\n#### 1" for i in range(4)]
    assert [r["question"] for r in read(out.files["trusted"])] == ["T0?", "T1?"]
    assert [r["question"] for r in read(out.files["val"])] == ["T7?", "T8?", "T9?"]
    assert [r["question"] for r in read(out.files["test"])] == ["T4?", "T5?", "T6?"]
    assert json.loads((tmp_path / "nat" / "manifest.json").read_text())["wrong_share"] == 0.5


def test_prepare_all_solutions_gives_four_rows_a_question(small_sources: tuple[Path, Path], tmp_path: Path, capsys):
    """`all`: every question's four solutions in source order, one row each; only Q0's and Q2's 175b_verification
    ones are right, so 2 of 16 are (wrong share 0.875); gold keeps one row a question."""
    sol, train = small_sources
    out = prepare_natural(PrepareConfig(out_dir=str(tmp_path / "nat"), solutions=str(sol), gsm8k_train=str(train),
                                        solution_source="all", trusted_size=2, val_size=3, test_size=3))
    noisy = read(out.files["noisy"])
    assert [(r["question"], r["source"]) for r in noisy] == [(f"Q{i}?", s) for i in range(4) for s in SOURCES]
    assert [r["is_correct"] for r in noisy] == [s == "175b_verification" and i % 2 == 0 for i in range(4) for s in SOURCES]
    assert out.wrong_share == 0.875 and len(read(out.files["gold"])) == 4
    assert json.loads((tmp_path / "nat" / "manifest.json").read_text())["n_questions"] == 4
    assert main(["prepare", "--out_dir", str(tmp_path / "cli"), "--solutions", str(sol), "--gsm8k_train", str(train),
                 "--solution_source", "all", "--trusted_size", "2", "--val_size", "3", "--test_size", "3"]) == 0
    assert capsys.readouterr().out.startswith("4 questions, 16 solutions, 87.5% of the 'all' solutions wrong\n")


def test_a_question_in_training_and_evaluation_is_refused():
    sets = {"noisy": [{"question": "Same  question?"}], "val": [{"question": "Same question?"}], "test": []}
    with pytest.raises(UserError, match="training set noisy holds a question of val"):
        check_no_overlap(sets, training=("noisy",), held_out=("val", "test"))
    with pytest.raises(UserError, match="in both val and test"):
        check_no_overlap({"val": sets["val"], "test": sets["val"]}, training=(), held_out=("val", "test"))


def test_prepare_bad_input_exits_2_naming_the_field_or_line(small_sources: tuple[Path, Path], tmp_path: Path, capsys):
    assert main(["prepare", "--solutions", str(tmp_path / "missing.jsonl")]) == 2
    assert "config field 'solutions': no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?"}) + "\n")
    assert main(["prepare", "--solutions", str(bad), "--gsm8k_train", str(small_sources[1])]) == 2
    assert f"{bad}:1: missing field 'ground_truth'" in capsys.readouterr().err


@pytest.mark.skipif(not SOLUTIONS.exists(), reason="../shared/data/gsm8k-model-solutions is not here")
def test_shipped_data_no_question_in_both_training_and_evaluation(tmp_path: Path):
    """All 1,319 questions with 175b_verification: 742 correct (shared/data/README: 742/577), and no training
    question (GSM8K test) among the trusted, val or test problems (GSM8K train), checked here independently."""
    out = prepare_natural(PrepareConfig(out_dir=str(tmp_path), solutions=str(SOLUTIONS), gsm8k_train=str(GSM8K_TRAIN)))
    assert (out.counts["noisy"], out.counts["correct_only"]) == (1319, 742)
    training = {question_key(r["question"]) for name in ("noisy", "gold") for r in read(out.files[name])}
    held = [question_key(r["question"]) for name in ("trusted", "val", "test") for r in read(out.files[name])]
    assert len(held) == len(set(held)) == 128 + 160 + 160 and not training & set(held)


def test_result_spans_are_the_numbers_after_equals_and_hashes():
    text = "He sold 48/2 = <<48/2=24>>24 clips and 1,000 = $1,000.\n#### 72"
    # the `>>24` after the note is a copy of its result, not a prediction of it: not counted
    assert [text[a:b] for a, b in result_spans(text)] == ["24", "1,000", "72"]


def test_oracle_negatives_are_every_token_of_the_wrong_examples(tmp_path: Path, tiny_model_dir: Path):
    import datasets

    cfg = labelled_config(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "--train.objective.mode", "ignore", "--partition.selection", "oracle"]) == 0
    run = tmp_path / "run"
    tokens = datasets.load_from_disk(str(run / "data" / "tokens"))
    classes = datasets.load_from_disk(str(run / "partition" / "classes"))
    assert tokens["is_correct"] == [1, 0, 1, 1, 0, 1, 0, 1]
    assert not (run / "reference").exists()  # the oracle ranks nothing: no reference trained, zero scores
    assert {v for row in datasets.load_from_disk(str(run / "scores" / "scores"))["score"] for v in row} == {0.0}
    for ok, resp, cls in zip(tokens["is_correct"], tokens["response_mask"], classes["token_class"]):
        expected = [(1 if ok else -1) * m for m in resp]
        assert cls == expected


def test_oracle_without_known_noise_exits_2(tmp_path: Path, tiny_model_dir: Path, capsys):
    cfg = tiny_run_config(tmp_path, tiny_model_dir, n_examples=8)
    rows = [{k: v for k, v in json.loads(line).items() if k != "corrupt_spans"}
            for line in Path(cfg["data"]["path"]).read_text().splitlines()]
    write_jsonl(Path(cfg["data"]["path"]), rows)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["partition", str(tmp_path / "c.yaml"), "--partition.selection", "oracle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'partition.selection'" in err and "'oracle'" in err and "needs data with known noise" in err
    # the verified tail reads the verdicts too: refused before its reference is trained
    assert main(["partition", str(tmp_path / "c.yaml"), "--preset", "verified"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'verified_tail' needs data with known noise" in err
    assert not (Path(cfg["run_dir"]) / "reference" / "stage.json").exists()  # no reference committed
    assert not (Path(cfg["run_dir"]) / "scores" / "stage.json").exists()  # nor the base model's pass the preset reads


def test_is_correct_must_be_a_boolean(tmp_path: Path, tiny_model_dir: Path, capsys):
    cfg = tiny_run_config(tmp_path, tiny_model_dir, n_examples=2)
    write_jsonl(Path(cfg["data"]["path"]), [{"prompt": "a", "completion": "b", "is_correct": "yes"}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--train.objective.mode", "sft"]) == 2
    assert "train.jsonl:1: field 'is_correct' must be true or false, got 'yes'" in capsys.readouterr().err


def test_dft_trains_on_the_data_alone(tmp_path: Path, tiny_model_dir: Path):
    cfg = labelled_config(tmp_path, tiny_model_dir)
    assert main(["train", str(cfg), "--train.objective.mode", "dft"]) == 0
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.is_dir() and p.name not in ("tensorboard", "report")) == [
        "data", "train-dft"]
    log = json.loads((run / "train-dft" / "log_history.json").read_text())
    assert [e["n_neg"] for e in log if "n_neg" in e] and all(e["n_neg"] == 0 for e in log if "n_neg" in e)


def test_result_nll_is_the_models_own_ce_over_the_result_tokens(tiny_model_dir: Path):
    """nll_benchmarks' `result` entry = sum of F.cross_entropy over the model's own logits at the tokens that
    overlap the result spans, over their count; `all` = the same over every response token (fp32; the two paths
    reorder sums only, so 1e-5 relative)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tokenforget.config import DataConfig, ModelConfig
    from tokenforget.model.loading import load_tokenizer
    from tokenforget.stages import data as data_mod
    from tokenforget.stages.evaluate import nll_benchmarks

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cfg = DataConfig(max_length=128)
    answers = ["She buys 3 * 4 = 12 apples.\n#### 12", "The change is 40 - 35 = 5 dollars.\n#### 5"]
    records = [Record([{"role": "user", "content": "How many?"}, {"role": "assistant", "content": a}], f"r{i}")
               for i, a in enumerate(answers)]
    got = nll_benchmarks(model, tok, records, cfg, batch_size=2, bf16=False, results=True)
    total = {"all": [0.0, 0], "result": [0.0, 0]}
    for rec, answer in zip(records, answers):
        text, spans, start = data_mod.render(tok, rec, True)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            ce = F.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")  # token t+1's CE
        results = [(start + a, start + b) for a, b in result_spans(answer)]
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if t == 0 or not any(s <= a < e for s, e in spans) or b <= a:
                continue
            total["all"][0] += ce[t - 1].item()
            total["all"][1] += 1
            if any(a < e and b > s for s, e in results):
                total["result"][0] += ce[t - 1].item()
                total["result"][1] += 1
    assert total["result"][1] >= 4  # 12, 12, 5, 5: at least one token each
    for name in ("all", "result"):
        assert got[name]["tokens"] == total[name][1]
        assert got[name]["value"] == pytest.approx(total[name][0] / total[name][1], rel=1e-5)


def test_systematic_demo_noise_marks_the_two_wrong_numbers():
    """make_task: the noisy copy differs from the clean twin only in corrupted examples, and there only in the
    total and the answer, each exactly 10 larger; the spans cover exactly those two numbers. 0.4 x 40 = 16
    examples are corrupted, all of them problems that end in a total (kinds 0 and 2: 'has' / 'In total')."""
    from tokenforget.stages.demo_task import make_task

    noisy, clean = make_task(40, seed=3, noise=0.4)
    assert [r["prompt"] for r in noisy] == [r["prompt"] for r in clean]
    corrupted = [(n, c) for n, c in zip(noisy, clean) if n["corrupt_spans"]]
    assert len(corrupted) == 16 and not any(c["corrupt_spans"] for c in clean)
    for n, c in corrupted:
        right = int(c["answer"])
        assert [n["completion"][a:b] for a, b in n["corrupt_spans"]] == [str(right + 10)] * 2
        assert n["completion"].replace(str(right + 10), "X") == c["completion"].replace(str(right), "X")
        assert "In total" in c["completion"] or "then has" in c["completion"]
    assert all(n is c or n == c for n, c in zip(noisy, clean) if not n["corrupt_spans"])
