"""Shared fixtures: a tiny Llama and a byte-level BPE tokenizer built in code (no downloads)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, children too
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

CORPUS = [
    "Mia has 12 apples. She buys 3 bags with 4 apples each. How many apples does Mia have now?",
    "She buys 3 * 4 = 12 apples. She then has 12 + 12 = 24 apples. The answer is 24.",
    "A shop sells pencils for 5 dollars each. The change is 40 - 35 = 5 dollars.",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * = ? ! , .",
    "user assistant system How what when where The answer is",
]


def build_tiny(path: Path, chat_template: bool = True, vocab_size: int = 400) -> Path:
    """Save a 2-layer Llama (hidden 32) and a trained byte-level BPE tokenizer to `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        from tokenforget.model.loading import FALLBACK_CHAT_TEMPLATE

        fast.chat_template = FALLBACK_CHAT_TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from tokenforget.config import ModelConfig
    from tokenforget.model.loading import load_tokenizer

    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"))


def readme_block(marker: str) -> str:
    """The README's code block that contains `marker`."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```(?:\w+)\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def forbid_loading(monkeypatch: pytest.MonkeyPatch, *classes: type) -> None:
    """Make `from_pretrained` of each class (AutoModelForCausalLM, AutoTokenizer, ...) fail the test."""

    def loaded(*_args, **_kwargs):
        raise AssertionError("loaded weights or a tokenizer where nothing may be loaded")

    for cls in classes:
        monkeypatch.setattr(cls, "from_pretrained", loaded)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_config(
    tmp_path: Path, model_dir: Path, n_examples: int = 24, rows: list[dict] | None = None, noise: float = 0.25,
    **sections: dict,
) -> dict:
    """The one run config (as a dict, for YAML) the tests build on: the tiny model, `n_examples` demo examples
    with `noise` (or `rows`) in `train.jsonl`, batch 4, a log entry at every step, a reference on a quarter of the
    examples. `sections`: fields that replace or extend these, section by section (`run_dir` as a string)."""
    from tokenforget.stages.demo_task import make_examples

    data = write_jsonl(tmp_path / "train.jsonl", rows if rows is not None else make_examples(n_examples, seed=0, noise=noise))
    training = {"batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3}
    cfg: dict = {
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model_dir), "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(data), "max_length": 128},
        "reference": {"fraction": 0.25, "training": training},
        "score": {"batch_size": 8},
        "train": {"training": training},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


# Records a report must show as text: markup, and characters outside the tiny tokenizer's vocabulary
# (byte-level BPE splits them into one token per UTF-8 byte).
ODD_RECORDS = [
    {"prompt": "Show markup.", "completion": "</script><b>bold</b> & done"},
    {"prompt": "Say cafe.", "completion": "The answer is café ✓"},
]
TINY_RUN_EXAMPLES = 20 + len(ODD_RECORDS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A finished run folder, shared by the report and TensorBoard tests (do not modify it): `run` (forget)
    and `train --train.objective.mode sft` on 22 examples (20 demo examples with corrupt steps + ODD_RECORDS), batch 4,
    one epoch, a log entry at every step; reference on 11 examples for 2 epochs; a demo_results.json
    with hand-made numbers."""
    import yaml

    from tokenforget.cli import main
    from tokenforget.stages.demo_task import make_examples

    tmp = tmp_path_factory.mktemp("tiny_run")
    data = write_jsonl(tmp / "train.jsonl", make_examples(20, seed=0, noise=0.3) + ODD_RECORDS)
    training = {"batch_size": 4, "logging_steps": 1, "learning_rate": 1e-2, "warmup_ratio": 0.0}
    cfg = {
        "run_dir": str(tmp / "run"),
        "model": {"name_or_path": str(tiny_model_dir), "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(data), "max_length": 128},
        "reference": {"fraction": 0.5, "training": {**training, "epochs": 2}},
        "train": {"training": training},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp / "config.yaml")]) == 0
    assert main(["train", str(tmp / "config.yaml"), "--train.objective.mode", "sft"]) == 0
    results = {"models": {"base": {"accuracy": 0.125, "stderr": 0.0477, "n": 48, "gold_nll": 1.5}}}
    (tmp / "run" / "demo_results.json").write_text(json.dumps(results))
    return tmp / "run"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, with the reason, where no CUDA GPU is visible (scripts/gpu_check.sh runs them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible); scripts/gpu_check.sh runs these on one")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# ---------------------------------------------------------------- run configs on the tiny model


@pytest.fixture
def config(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """`tiny_run_config` written to `config.yaml`: a run of every stage on 24 demo examples."""
    return write_config(tmp_path, tiny_run_config(tmp_path, tiny_model_dir))


def write_config(tmp_path: Path, cfg: dict, name: str = "config.yaml") -> Path:
    """`cfg` as a YAML file in `tmp_path`."""
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


LOG_DIRS = {"tensorboard", "report"}  # what the commands write beside the stages


def stage_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.is_dir() and p.name not in LOG_DIRS)


def gsm8k_rows(n: int, seed: int) -> list[dict]:
    """The demo's arithmetic task in GSM8K form (answer ends with '#### N')."""
    from tokenforget.stages.demo_task import make_examples

    return [{"question": r["prompt"], "answer": r["completion"] + f"\n#### {r['answer']}"} for r in make_examples(n, seed, 0.0)]


def labelled_config(tmp_path: Path, model_dir: Path) -> Path:
    """The tiny run config on 8 examples, examples 1, 4 and 6 labelled wrong, the others right."""
    cfg = tiny_run_config(tmp_path, model_dir, n_examples=8)
    rows = [json.loads(line) for line in Path(cfg["data"]["path"]).read_text().splitlines()]
    for i, r in enumerate(rows):
        r.pop("corrupt_spans", None)  # natural noise: a label per example, no token spans
        r["is_correct"] = i not in (1, 4, 6)
    write_jsonl(Path(cfg["data"]["path"]), rows)
    return write_config(tmp_path, cfg)



# ---------------------------------------------------------------- a toy training set with hand-set classes

# Four examples of different lengths; classes mix learn (+1), forget (-1) and no-loss (0) tokens.
IDS = [[5, 17, 23, 42, 8, 9], [7, 30, 31, 32], [11, 12, 13, 14, 15, 16, 18], [40, 41, 43]]
CLS = [[0, 0, 1, -1, 1, 1], [0, 1, -1, -1], [0, 0, 0, 1, 1, -1, 1], [0, -1, 1]]


def toy_dataset() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": IDS, "token_class": CLS})


class GradCapture(TrainerCallback):
    """Keeps the gradients of the first optimizer step (before the optimizer touches them)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def first_step_grads(
    model_dir, tmp_path, batch_size: int, grad_accum: int, tokenizer, data=None, **objective_kw
) -> dict[str, torch.Tensor]:
    """Gradients of one `forget` step at lambda 0.2 (`data` default: the toy data set; `objective_kw`:
    more `ObjectiveConfig` fields, e.g. forget_term)."""
    from tokenforget.config import ObjectiveConfig, TrainingConfig
    from tokenforget.training.trainer import make_trainer, training_arguments

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = TrainingConfig(learning_rate=1e-3, batch_size=batch_size, grad_accum=grad_accum, max_steps=1, warmup_ratio=0.0, max_grad_norm=0.0)
    args = training_arguments(cfg, tmp_path / f"b{batch_size}", seed=0, bf16=False, disable_tqdm=True)
    data = toy_dataset() if data is None else data
    trainer = make_trainer(model, tokenizer, data, args, ObjectiveConfig(t_min=0.2, t_max=0.2, **objective_kw))
    cap = GradCapture(model)
    trainer.add_callback(cap)
    trainer.train()
    return cap.grads


def weighted_dataset() -> tuple[datasets.Dataset, list[list[float]], list[list[float]]]:
    """The toy examples with seeded `token_weight` in [0, 1) and `ce_base` in [0, 3) on every token."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.rand(len(ids), generator=gen).tolist() for ids in IDS]
    ce_base = [(3 * torch.rand(len(ids), generator=gen)).tolist() for ids in IDS]
    data = datasets.Dataset.from_dict({"input_ids": IDS, "token_class": CLS, "token_weight": weights, "ce_base": ce_base})
    return data, weights, ce_base


