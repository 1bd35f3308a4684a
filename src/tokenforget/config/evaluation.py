"""`eval`: what `tokenforget eval` and `compare` measure through lm-evaluation-harness, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tokenforget.errors import _check


@dataclass
class EvalConfig:
    """What `tokenforget eval` and `tokenforget compare` measure, through lm-evaluation-harness.

    Local files are evaluated with the task definitions shipped in `tokenforget/tasks/`, offline;
    `tasks` names standard lm-evaluation-harness tasks, which need the Hub for their data.
    """

    checkpoint: Optional[str] = None
    """What `tokenforget eval` evaluates: unset = the base model; `sft`, `ignore` or `forget` = that
    trained stage of `run_dir`; or a folder holding a merged model, a LoRA adapter, or a train stage."""
    gsm8k: Optional[str] = None
    """GSM8K-format JSONL (`question`, `answer` ending in `#### N`): greedy generation, exact match on
    the final number. A Hub name is read with `gsm8k_hub_config` and split `test`."""
    gsm8k_fallback: Optional[str] = None
    """Hub data set read instead of `gsm8k` when that is a local file that does not exist."""
    gsm8k_hub_config: Optional[str] = "main"
    num_fewshot: int = 0
    """Worked examples before each GSM8K question (as earlier chat turns)."""
    fewshot_path: Optional[str] = None
    """GSM8K-format file the few-shot examples are drawn from (needed when `num_fewshot` > 0 and `gsm8k`
    is a local file; a Hub `gsm8k` uses its train split)."""
    gsm8k_nll: bool = True
    """Also report the held-out NLL of the gold GSM8K answers (the sensitive measure at small scale)."""
    nll: list[str] = field(default_factory=list)
    """More SFT-format files (any format `data` reads) whose gold responses' NLL is reported."""
    result_nll: bool = False
    """Also report, for every gold NLL above, the NLL of the result tokens only (`result_<name>`: the numbers
    after `=` and `####`), what wrong worked solutions damage; the mean over all tokens barely sees it."""
    multiple_choice: list[str] = field(default_factory=list)
    """Multiple-choice JSONL files (`question`, `choices`, `label`): log-likelihood accuracy."""
    tasks: list[str] = field(default_factory=list)
    """Standard lm-evaluation-harness task names (e.g. `arc_easy`); their data comes from the Hub."""
    task_shots: dict[str, int] = field(default_factory=dict)
    """Few-shot examples per task of `tasks` (others: the task's default), e.g. `{tydiqa_goldp: 1}`."""
    limit: Optional[int] = None
    """Evaluate only the first N examples of every benchmark (the GSM8K test subset size)."""
    max_new_tokens: int = 256
    batch_size: int = 8
    chat_template: bool = True
    """Render prompts with the tokenizer's chat template (as `data.chat_template` renders training data)."""
    diversity_prompts: int = 0
    """Sample answers to the first N GSM8K questions and report their diversity (0: off)."""
    diversity_samples: int = 4
    """Answers sampled per question."""
    temperature: float = 0.7
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _check(self.num_fewshot >= 0, "eval.num_fewshot", f"must be >= 0, got {self.num_fewshot}")
        _check(self.limit is None or self.limit > 0, "eval.limit", f"must be > 0, got {self.limit}")
        _check(self.batch_size > 0, "eval.batch_size", f"must be > 0, got {self.batch_size}")
        for task, shots in self.task_shots.items():
            _check(task in self.tasks and shots >= 0, f"eval.task_shots.{task}", f"needs a task of eval.tasks {self.tasks} and shots >= 0")
        _check(self.max_new_tokens > 0, "eval.max_new_tokens", f"must be > 0, got {self.max_new_tokens}")
        _check(self.diversity_prompts >= 0, "eval.diversity_prompts", f"must be >= 0, got {self.diversity_prompts}")
        _check(self.diversity_samples >= 2, "eval.diversity_samples", f"must be >= 2, got {self.diversity_samples}")
        _check(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "eval.top_p", f"must be in (0, 1], got {self.top_p}")
