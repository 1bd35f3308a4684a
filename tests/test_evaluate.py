"""The shipped lm-evaluation-harness tasks and the gold NLL, against hand-computed cases.

A scripted `lm_eval` LM (fixed generations and log-likelihoods) pins what the task definitions compute;
the tiny Llama checks the same tasks through `HFLM` against log-likelihoods we compute ourselves.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from lm_eval.api.model import LM

from tokenforget.config import DataConfig, EvalConfig, ModelConfig
from tokenforget.metrics import token_weighted_mean
from tokenforget.model.loading import load_model
from tokenforget.stages import evaluate as benchmarks, harness
from tokenforget.stages.data import load_records, tokenize_records
from tokenforget.stages.labels_in_data import DataError

GSM8K = [
    {"question": "Q1 apples?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "Q2 cards?", "answer": "12 * 100 = <<12*100=1200>>1200\n#### 1,200"},
    {"question": "Q3 pens?", "answer": "4 * 2 = <<4*2=8>>8\n#### 8"},
    {"question": "Q4 trees?", "answer": "9 * 2 = <<9*2=18>>18\n#### 18"},
]
ANSWERS = {  # what the scripted model says to each question
    "Q1": "First 2 + 3 = 5.\n#### 5",  # right
    "Q2": "So the answer is 1,200.",  # right: commas dropped
    "Q3": "I think it is 7",  # wrong: last number 7, gold 8
    "Q4": "She has 18.0 trees.",  # right: 18.0 = 18 as numbers
}


class ScriptedLM(LM):
    """Answers from tables: generations by question, log-likelihoods by (question, choice), and a list of
    samples per question handed out one per request (the diversity task asks k times)."""

    def __init__(self, answers=None, lls=None, samples=None):
        super().__init__()
        self.answers, self.lls, self.samples = answers or {}, lls or {}, samples or {}
        self.calls: dict[str, int] = defaultdict(int)

    @staticmethod
    def _key(context: str) -> str:
        return next(w for w in context.replace("\n", " ").split() if w[:1] == "Q" and w[1:2].isdigit())

    def generate_until(self, requests):
        out = []
        for r in requests:
            q = self._key(r.args[0])
            if r.args[1].get("do_sample"):
                out.append(self.samples[q][self.calls[q]])
                self.calls[q] += 1
            else:
                out.append(self.answers[q])
        return out

    def loglikelihood(self, requests):
        return [(self.lls[(self._key(r.args[0]), r.args[1].strip())], False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def _run(lm, ecfg: EvalConfig, tmp_path: Path) -> dict:
    return benchmarks.evaluate_model(torch.nn.Linear(1, 1), None, ecfg, DataConfig(), False, 0, log=lambda _: None, lm=lm)


def test_gsm8k_task_exact_match_hand_case(tmp_path: Path):
    """Hits 1, 1, 0, 1 -> exact match 3/4; lm_eval's stderr of a mean is the sample std / sqrt(n):
    the values' sample variance is (3 * 0.25^2 + 0.75^2) / 3 = 0.25, so stderr = sqrt(0.25 / 4) = 0.25."""
    ecfg = EvalConfig(gsm8k=str(write_jsonl(tmp_path / "gsm.jsonl", GSM8K)), gsm8k_nll=False, chat_template=False)
    res = _run(ScriptedLM(answers=ANSWERS), ecfg, tmp_path)["benchmarks"]
    assert list(res) == ["gsm8k"]
    assert res["gsm8k"]["value"] == pytest.approx(0.75)
    assert res["gsm8k"]["stderr"] == pytest.approx(0.25)
    assert res["gsm8k"]["n"] == 4 and res["gsm8k"]["kind"] == "accuracy"


def test_gsm8k_limit_takes_the_first_questions(tmp_path: Path):
    """limit 3 -> Q1..Q3: hits 1, 1, 0 -> 2/3."""
    ecfg = EvalConfig(gsm8k=str(write_jsonl(tmp_path / "gsm.jsonl", GSM8K)), gsm8k_nll=False, chat_template=False, limit=3)
    res = _run(ScriptedLM(answers=ANSWERS), ecfg, tmp_path)["benchmarks"]["gsm8k"]
    assert (res["value"], res["n"]) == (pytest.approx(2 / 3), 3)


def test_multiple_choice_task_hand_case(tmp_path: Path):
    """Q1: lls (-1, -2), label 0 -> acc hit; per character (-1/1, -2/4) -> acc_norm picks 'five': miss.
    Q2: lls (-0.9, -1.0), label 1 -> acc miss; per character (-0.9/5, -1/1) -> acc_norm picks 'seven': miss.
    acc = 1/2, acc_norm = 0."""
    rows = [{"question": "Q1 2+2?", "choices": ["4", "five"], "label": 0}, {"question": "Q2 3+3?", "choices": ["seven", "6"], "label": 1}]
    lls = {("Q1", "4"): -1.0, ("Q1", "five"): -2.0, ("Q2", "seven"): -0.9, ("Q2", "6"): -1.0}
    ecfg = EvalConfig(multiple_choice=[str(write_jsonl(tmp_path / "arith.jsonl", rows))], chat_template=False)
    res = _run(ScriptedLM(lls=lls), ecfg, tmp_path)
    assert res["benchmarks"]["mc:arith"]["value"] == pytest.approx(0.5)
    assert res["lm_eval"]["tokenforget_multiple_choice_arith"]["acc_norm,none"] == pytest.approx(0.0)


def test_diversity_task_hand_case(tmp_path: Path):
    """Q1 samples 'the cat sat', 'the cat ran', 'the cat sat': 9 words, 4 distinct -> distinct-1 4/9;
    bigrams the-cat x3, cat-sat x2, cat-ran x1 -> distinct-2 3/6, entropy -(1/2 log 1/2 + 1/3 log 1/3 +
    1/6 log 1/6) = 1.459148 bits. Q2 'a b', 'c d', 'e f': all distinct -> 1, 1, log2 3 = 1.584963.
    Means over the two questions: 13/18, 3/4, 1.522055."""
    samples = {"Q1": ["the cat sat", "the cat ran", "the cat sat"], "Q2": ["a b", "c d", "e f"]}
    ecfg = EvalConfig(
        gsm8k=str(write_jsonl(tmp_path / "gsm.jsonl", GSM8K)), gsm8k_nll=False, chat_template=False,
        diversity_prompts=2, diversity_samples=3, limit=1,
    )
    res = _run(ScriptedLM(answers=ANSWERS, samples=samples), ecfg, tmp_path)["benchmarks"]
    assert res["distinct_1"]["value"] == pytest.approx(13 / 18)
    assert res["distinct_2"]["value"] == pytest.approx(0.75)
    h1 = -(0.5 * math.log2(0.5) + 1 / 3 * math.log2(1 / 3) + 1 / 6 * math.log2(1 / 6))
    assert res["entropy_2"]["value"] == pytest.approx((h1 + math.log2(3)) / 2)
    assert res["distinct_1"]["n"] == 2 and res["gsm8k"]["n"] == 1  # the diversity pass has its own limit


def test_token_weighted_mean_hand_values():
    """sums (1, 5), counts (1, 1): mean 3; residuals -2, 2 -> se = sqrt(2/1 * 8) / 2 = 2, the usual
    standard error of the mean of (1, 5). sums (2, 6), counts (1, 3): 8/4 = 2 with zero residuals."""
    import numpy as np

    m = token_weighted_mean(np.array([1.0, 5.0]), np.array([1.0, 1.0]))
    assert (m.value, m.stderr, m.n, m.tokens) == (pytest.approx(3.0), pytest.approx(2.0), 2, 2)
    m = token_weighted_mean(np.array([2.0, 6.0]), np.array([1.0, 3.0]))
    assert (m.value, m.stderr) == (pytest.approx(2.0), pytest.approx(0.0))


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path, tiny_tokenizer):
    return load_model(ModelConfig(name_or_path=str(tiny_model_dir))).eval(), tiny_tokenizer


def _choice_ll(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), split as lm_eval splits it: the tokens of context + continuation
    after the tokens of the context alone."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)  # (T, V)
    return float(sum(logp[t - 1, whole[t]] for t in range(n_ctx, len(whole))))


def test_multiple_choice_on_the_tiny_model(tiny, tmp_path: Path):
    """Labels set from our own log-likelihoods: Q1's label is its most likely choice (hit), Q2's its
    least likely (miss), so lm_eval must report acc = 1/2."""
    model, tok = tiny
    qs = [("Mia has 3 apples?", ["4 apples", "12", "The answer"]), ("How many cards?", ["24", "5 dollars", "fox"])]
    lls = [[_choice_ll(model, tok, f"Question: {q}\nAnswer:", " " + c) for c in cs] for q, cs in qs]
    labels = [max(range(3), key=lambda i: lls[0][i]), min(range(3), key=lambda i: lls[1][i])]
    rows = [{"question": q, "choices": cs, "label": lab} for (q, cs), lab in zip(qs, labels)]
    ecfg = EvalConfig(multiple_choice=[str(write_jsonl(tmp_path / "mc.jsonl", rows))], chat_template=False, batch_size=2)
    res = benchmarks.evaluate_model(model, tok, ecfg, DataConfig(), False, 0, log=lambda _: None)
    assert res["benchmarks"]["mc:mc"]["value"] == pytest.approx(0.5)
    assert res["benchmarks"]["mc:mc"]["n"] == 2


def test_gold_nll_matches_the_models_own_loss(tiny, tmp_path: Path):
    """gsm8k_nll = token-weighted mean CE over response tokens. Reference: transformers' own loss with
    labels -100 outside the response, which is the mean over one example's response tokens; weighting
    each example's mean by its token count gives the same total."""
    model, tok = tiny
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM8K)
    ecfg = EvalConfig(gsm8k=str(path), limit=3, chat_template=True, max_new_tokens=4)
    res = benchmarks.evaluate_model(model, tok, ecfg, DataConfig(), False, 0, log=lambda _: None)
    nll = res["benchmarks"]["gsm8k_nll"]
    cfg = DataConfig(max_length=512)
    cols, _ = tokenize_records(tok, load_records(cfg, str(path))[:3], cfg)
    total, count = 0.0, 0
    for ids, mask in zip(cols["input_ids"], cols["response_mask"]):
        labels = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels[None]).loss
        total, count = total + float(loss) * sum(mask), count + sum(mask)
    # fp32 forward passes of the same tokens in different batch shapes: agree to ~1e-6 relative
    assert nll["value"] == pytest.approx(total / count, rel=1e-5)
    assert (nll["n"], nll["tokens"], nll["kind"]) == (3, count, "nll")
    assert res["benchmarks"]["gsm8k"]["n"] == 3  # the same first three questions
    # the accuracy is the share of the model's own extracted answers (lm_eval's filtered outputs) equal to the gold
    # numbers; the random tiny model's 4 tokens match none, so both sides are 0 here (the scripted tests count hits)
    answers = res["samples"][harness.GSM8K_TASK]
    assert len(answers) == 3
    assert res["benchmarks"]["gsm8k"]["value"] == sum(a == g for a, g in zip(answers, ["5", "1200", "8"])) / 3 == 0.0


def test_fewshot_needs_a_file(tmp_path: Path):
    from tokenforget.config import ConfigError

    ecfg = EvalConfig(gsm8k=str(write_jsonl(tmp_path / "gsm.jsonl", GSM8K)), num_fewshot=2)
    with pytest.raises(ConfigError, match="eval.fewshot_path"):
        harness.gsm8k_task(ecfg, ecfg.gsm8k)


def test_gsm8k_falls_back_to_the_hub_when_the_file_is_absent(tmp_path: Path):
    """A missing local file with a fallback becomes a Hub task (the Hub itself is not reached here)."""
    ecfg = EvalConfig(gsm8k=str(tmp_path / "absent.jsonl"), gsm8k_fallback="openai/gsm8k")
    source = benchmarks.gsm8k_source(ecfg)
    task = harness.gsm8k_task(ecfg, source)
    assert source == "openai/gsm8k"
    assert (task["dataset_path"], task["dataset_name"], task["test_split"]) == ("openai/gsm8k", "main", "test")
    assert "dataset_kwargs" not in task
    present = write_jsonl(tmp_path / "here.jsonl", GSM8K)
    assert benchmarks.gsm8k_source(EvalConfig(gsm8k=str(present), gsm8k_fallback="openai/gsm8k")) == str(present)


def test_training_data_falls_back_to_the_hub(tmp_path: Path, monkeypatch):
    """data.path absent + data.hub_fallback -> the Hub reader is asked for the fallback (stubbed here)."""
    from tokenforget.stages import data as data_mod

    asked = []

    def fake_hub(name, split, hub_config):
        asked.append((name, split, hub_config))
        return [("hub row 0", GSM8K[0])]

    monkeypatch.setattr(data_mod, "_read_hub", fake_hub)
    cfg = DataConfig(path=str(tmp_path / "absent.jsonl"), hub_fallback="openai/gsm8k", hub_config="main")
    records = data_mod.load_records(cfg)
    assert asked == [("openai/gsm8k", "train", "main")]
    assert records[0].messages[-1]["content"] == GSM8K[0]["answer"]
    with pytest.raises(DataError, match="not found"):
        data_mod.load_records(DataConfig(path=str(tmp_path / "absent.jsonl")))  # no fallback: a clear error


def test_generation_stops_a_row_once_its_answer_is_settled(tiny):
    """`AnswerSettled` after a 3-token prompt: the row whose completion reads 'The answer is 12.' and a newline is
    done, the one still at 'The answer is 1' (it may go on to 12) is not. `generate` gives each prompt its own
    completion back in the prompts' order although it batches them by length."""
    model, tok = tiny
    prompt = tok("x y z", add_special_tokens=False)["input_ids"]
    done, open_ = (tok(t, add_special_tokens=False)["input_ids"] for t in (" The answer is 12.\n", " The answer is 1"))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(done), len(open_))  # a finished row is padded on the right, as generate pads it
    ids = torch.tensor([prompt + r + [pad] * (width - len(r)) for r in (done, open_)])
    assert benchmarks.AnswerSettled(tok, len(prompt))(ids, None).tolist() == [True, False]
    prompts = [[{"role": "user", "content": "Mia has 12 apples and buys many more, how many?"}], [{"role": "user", "content": "Hi"}]]
    one_by_one = [benchmarks.generate(model, tok, [p], 4, batch_size=1, bf16=False)[0] for p in prompts]
    assert benchmarks.generate(model, tok, prompts, 4, batch_size=1, bf16=False) == one_by_one
