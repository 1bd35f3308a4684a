"""`data`: the training file, its format and rendering, and the noise a benchmark injects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from tokenforget.errors import _check

DataFormat = Literal["auto", "messages", "sharegpt", "prompt_completion", "instruction", "question_answer", "tokens"]
NoiseKind = Literal["step_result", "number", "systematic", "recurring", "wrong_prompt"]
# Recurring noise for the detection benchmark: fluent, plausible and wrong (rounding changes the answer).
RECURRING_SENTENCE = "We can round this to the nearest ten to make the numbers easier to work with."


@dataclass
class DataConfig:
    """Where the SFT data comes from and how it becomes tokens."""

    path: Optional[str] = None
    """A .jsonl, .json or .parquet file, or a Hugging Face Hub data set name."""
    split: str = "train"
    """Split to read (Hub data sets, and local files loaded through `datasets`)."""
    hub_config: Optional[str] = None
    """Hub data set configuration name (e.g. `main` for `openai/gsm8k`)."""
    format: DataFormat = "auto"
    """Record layout; `auto` looks at the first record's keys. `tokens`: records already tokenized, `input_ids` and a
    `token_weight` per token (see `tokenforget.stages.labels_in_data`)."""
    field_map: dict[str, str] = field(default_factory=dict)
    """Our field name -> the file's column, e.g. `{prompt: question, completion: answer}`."""
    max_length: int = 512
    """Tokens per example after the chat template; longer examples are cut at the right."""
    chat_template: bool = True
    """Render single-turn records with the tokenizer's chat template (a ChatML fallback when it has none)."""
    system_prompt: Optional[str] = None
    """System message added to every single-turn example."""
    limit: Optional[int] = None
    """Use only the first N records."""
    sample: Optional[int] = None
    """A seeded random N of the training records (after `limit`), in file order: the paper's 50k of Tulu."""
    sample_seed: int = 0
    """Seed of that sample (apart from `seed`: every seed of a comparison trains on the same records)."""
    num_proc: int = 1
    """Processes that tokenize the data (`datasets.map`); 1: this process."""
    hub_fallback: Optional[str] = None
    """Hub data set read instead of `path` when `path` is a local file that does not exist (with
    `hub_config` and `split`), e.g. `openai/gsm8k` behind `../shared/data/gsm8k/train.jsonl`."""
    corrupt_fraction: float = 0.0
    """Share of the training answers corrupted with `noise` (see `tokenforget.stages.noise`); the changed
    characters are marked as corrupted tokens."""
    corrupt_seed: int = 0
    """Seed of that corruption: which answers, and what changes in each."""
    noise: NoiseKind = "step_result"
    """What `corrupt_fraction` does to an answer: `step_result` (GSM8K: one digit of a worked step's result),
    `number` (any number of the response set to a nearby wrong value), `systematic` (the same error in every
    chosen response: its final number one too large, a pattern a model can learn), `recurring` (the same fluent
    sentence, `noise_sentence`, inserted), `wrong_prompt` (the response moved to another example's prompt)."""
    noise_sentence: str = RECURRING_SENTENCE
    """The sentence `noise: recurring` inserts: fluent and plausible, so no token filter could catch it."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 2, "data.max_length", f"must be >= 2, got {self.max_length}")
        _check(self.limit is None or self.limit > 0, "data.limit", f"must be > 0, got {self.limit}")
        _check(self.sample is None or self.sample > 0, "data.sample", f"must be > 0, got {self.sample}")
        _check(self.num_proc >= 1, "data.num_proc", f"must be >= 1, got {self.num_proc}")
        _check(
            0.0 <= self.corrupt_fraction <= 1.0,
            "data.corrupt_fraction",
            f"must be in [0, 1], got {self.corrupt_fraction}",
        )
