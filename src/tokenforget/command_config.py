"""The configs of the commands that are not a run: `prepare`, `weak`, `demo` and `report`, and the dry run's
cost plan (`--plan-gpus`; no torch, like `config`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from tokenforget.errors import _check
from tokenforget.config.model import ModelConfig
from tokenforget.config.tokens import FalsePositives

DemoNoise = Literal["systematic", "step", "weak"]
Verdicts = Literal["outcome", "process"]
SolutionSource = Literal["6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification", "random", "175b_random",
                         "all"]
GpuName = Literal["h100", "h200", "a100", "l40s", "a10g"]  # the names of `tokenforget.model.memory.GPUS`
Sharding = Literal["ddp", "zero2", "zero3", "fsdp"]  # `tokenforget.model.memory.SHARDINGS`


@dataclass
class WeakConfig:
    """`tokenforget weak`: training sets whose noise a weaker model wrote (`tokenforget.commands.weak`, issue 25)."""

    out_dir: str = "data/weak"
    """Folder for noisy/correct_only/gold JSONL files (the demo's record format), samples.jsonl and manifest.json."""
    seed: int = 0
    """Makes the problems (the demo's generator, `demo.make_task`), the weak model's SFT and every sample."""
    model: ModelConfig = field(default_factory=ModelConfig)
    n_train: int = 160
    """Problems the weak model answers (the demo's training problems of `seed`)."""
    n_sft: int = 160
    """Clean generated problems (another seed, none a training problem) of the weak model's short SFT: the demo's
    own SFT size (40 left SmolLM2 writing no right answer at temperature 0.8, seed 1, docs/results.md)."""
    sft_epochs: float = 1.0
    learning_rate: float = 1e-3
    samples: int = 2
    """Answers sampled per problem; the mix is chosen among them (`stages.weak.choose_mix`)."""
    temperature: float = 0.8
    """Sampling temperature (a seed per sample: `stages.weak.sample_seed`)."""
    target_wrong: float = 0.5
    """Share of wrong answers in `noisy` (40-60% is the issue's range; reached where the samples allow)."""
    max_new_tokens: int = 72
    generate_batch: int = 64
    """Prompts per batched `generate` call."""
    report_to: list[str] = field(default_factory=lambda: ["none"])

    def __post_init__(self) -> None:
        _check(self.n_train >= 1, "n_train", f"must be >= 1, got {self.n_train}")
        _check(self.n_sft >= 1, "n_sft", f"must be >= 1, got {self.n_sft}")
        _check(self.samples >= 1, "samples", f"must be >= 1, got {self.samples}")
        _check(0.0 < self.temperature <= 2.0, "temperature", f"must be in (0, 2], got {self.temperature}")
        _check(0.0 < self.target_wrong < 1.0, "target_wrong", f"must be in (0, 1), got {self.target_wrong}")
        _check(self.generate_batch >= 1, "generate_batch", f"must be >= 1, got {self.generate_batch}")


@dataclass
class PrepareConfig:
    """`tokenforget prepare`: natural-noise SFT sets from model-written GSM8K solutions (`tokenforget.stages.natural`)."""

    out_dir: str = "data/gsm8k-natural"
    """Folder for noisy/correct_only/gold (training) and trusted/val/test (held out) JSONL files, manifest.json."""
    solutions: str = "../shared/data/gsm8k-model-solutions/example_model_solutions.jsonl"
    """OpenAI grade-school-math `example_model_solutions.jsonl` (GSM8K test questions, four GPT-3 solutions each)."""
    gsm8k_train: str = "../shared/data/gsm8k/train.jsonl"
    """GSM8K train: the trusted set and the held-out splits come from here, never from the training questions."""
    solution_source: SolutionSource = "175b_verification"
    """Which solution each question gets in `noisy`: one of the four models (175b_verification: 44% wrong over
    all 1,319 questions), `175b_random` (one of the two 175B solutions per question, seeded: about 54% wrong),
    `random` (one of the four, seeded: about 62% wrong) or `all` (all four, one row each: several responses a prompt,
    as best-of-n data has; about 62% wrong)."""
    n_questions: Optional[int] = None
    """A seeded random sample of this many questions (kept in file order); unset: all 1,319."""
    seed: int = 0
    trusted_size: int = 128
    """First GSM8K train problems as the trusted gold set (for `reference.path`)."""
    val_size: int = 160
    """Last GSM8K train problems: the validation split (choose settings here)."""
    test_size: int = 160
    """The GSM8K train problems before the validation split: the test split (report here)."""

    def __post_init__(self) -> None:
        _check(self.n_questions is None or self.n_questions > 0, "n_questions", f"must be > 0, got {self.n_questions}")
        for name in ("trusted_size", "val_size", "test_size"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")



@dataclass
class DemoConfig:
    """The offline demo: a generated arithmetic task with known corrupted steps."""

    run_dir: str = "runs/demo"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    n_train: int = 160
    """Training examples generated (what 160 reach at learning rate 1e-3: docs/results.md)."""
    n_test: int = 240
    """Clean held-out test problems for accuracy and gold NLL (another seed; none is a training or trusted problem).
    240 give a paired standard error of 0.02-0.04 against `sft` (docs/results.md), enough to separate the default
    setting from it; 48 give about ±0.07 a model, too few. About 80 s a model on a 2-core AVX2 CPU."""
    evaluate_base: bool = False
    """Evaluate the base model too (its answers before any training): one more model's evaluation, about a minute
    at 240 problems on a 2-core CPU. The comparison is with `sft`, so the demo leaves it out by default."""
    n_val: int = 0
    """Clean held-out validation problems (a third seed, disjoint from the training, trusted and test problems),
    evaluated beside the test split (`demo_results.json`: `validation`) for choosing settings without the test."""
    noise: float = 0.4
    """Share of training responses with a corrupted step."""
    noise_kind: DemoNoise = "systematic"
    """`systematic`: the same wrong step (a total 10 too large, and the answer with it) in problems that end in a
    total (about half of them: a larger `noise` is capped there); `step`: one step's result a nearby wrong number;
    `weak`: the answers a weaker model wrote (`weak_dir`, made by `tokenforget weak`; `noise` and `n_train` unused),
    the generator's own answers to the same problems as the clean twin."""
    weak_dir: Optional[str] = None
    """`noise_kind: weak` only: the folder `tokenforget weak` wrote (its noisy.jsonl and gold.jsonl)."""
    settings: list[str] = field(default_factory=lambda: ["sft", "verified_tail_base"])
    """What is trained and compared, names of `tokenforget.pipeline.settings.DEMO_SETTINGS` (checked when the demo starts): `sft`, `dft`, `paper`, `recommended` (the
    preset: `sft`), `ref_loss_wga` (that preset, its reference on `n_trusted` clean examples), `ignore` (its negative
    tokens ignored, not forgotten), `filter` (the 30% of examples that trusted reference finds least likely
    dropped), `filter_max` (the 30% whose least likely token is least likely), `ignore_tail` (those 30% kept, each
    from its least likely token to the end ignored: partition.selection `tail`), `ignore_tail_numbers` (the same
    with each number decided whole, a copied number inheriting its source: aimed at a weaker model's answers, wrong
    from their first wrong number on), `ignore_tail_half` (the tail cut in half the answers, rho 0.5), `verified_tail`
    (every answer known wrong cut at its least likely token, none other: for answers graded by a verifier, the
    verdicts that `correct_only` uses), `oracle_ignore` / `oracle_forget`
    (the known corrupted tokens as the negative set: the bound on any detector), `clean` (sft on the same problems,
    every answer right: the ceiling), `correct_only` (sft on the right answers of the noisy set only),
    `contrastive` (the two-reference score CE_noisy - CE_trusted with numbers decided whole and copies inheriting,
    the tokens below -1 nat ignored; its noisy references cross-fitted on the training answers, 2 folds),
    `contrastive_mixture` (the same scores, the negative share from a two-component mixture), `sim_ignore` / `sim_forget` (simulated detectors of
    chosen recall and precision, `sim_recall` x `sim_precision`). The default trains `sft` (the recommended preset)
    and `verified_tail_base` (each answer graded wrong cut at the token the base model finds least likely: no
    reference trained, no extra data; the best of the fair comparison's recurring-task rows, docs/fair/recurring),
    with its detection figures; its wall time from a fresh clone is in docs/performance.md. Add `contrastive`
    (the verdict-free detector), `rft` (the verdicts' baseline), `oracle_ignore` and `clean` for the bound and the
    ceiling."""
    detectors: list[str] = field(default_factory=list)
    """Names of `tokenforget.pipeline.settings.PARTITIONING`: settings whose finding of the corrupted tokens is measured and printed even when they are not in `settings`:
    only their reference and scoring pass run, no model is trained on them. `ref_loss_wga`: the reference-loss score
    with a reference trained on `n_trusted` clean examples (one reference training and one forward pass over the
    answers, its score reading no base CE; its figures in docs/results.md). None by default: the settings trained
    print their own detection."""
    sim_recall: list[float] = field(default_factory=lambda: [1.0, 0.6])
    """`sim_ignore` / `sim_forget`: the recalls of the simulated detectors (partition.selection `simulated`)."""
    sim_precision: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.3])
    """`sim_ignore` / `sim_forget`: their precisions; every recall x precision pair is one model,
    `sim_<mode>_r<recall>_p<precision>` (with `_det` when `sim_false_positives` is `detector`)."""
    sim_false_positives: FalsePositives = "random"
    """Where the simulated detectors' right tokens come from: `random`, or the trusted reference's most suspicious
    right tokens (`detector`, by the `ref_loss_wga` preset's score: a real detector's false positives)."""
    rho: float = 0.7
    reference_fraction: float = 0.3
    reference_epochs: float = 2.0
    epochs: float = 1.0
    learning_rate: float = 1e-3  # 2e-4 left the task unlearned (accuracy 0.02 with 240 examples, docs/report.md)
    batch_size: int = 8
    micro_batch_size: int = 2
    """Answers per forward pass: `batch_size` / `micro_batch_size` micro-batches are accumulated into each optimizer
    step, the same step (gradient accumulation is exact here: tests/test_trainer.py) with a quarter of the
    activations: the demo's peak RSS on a 2-core AVX2 CPU 2.3 GB at 2, 3.0 GB at 4, 4.2 GB at 8, for 13% more time a
    step at 2 than at 4 (docs/performance.md). `tokenforget fair` trains whole batches (its cells predate this)."""
    max_new_tokens: int = 72
    nll_problems: Optional[int] = 48
    """Gold NLL over the first `nll_problems` test (and validation) problems; None: all of them. A token mean is
    settled by a few thousand tokens, and at 240 problems its forward is a third of a model's evaluation (about 30 s
    on a 2-core CPU). `tokenforget fair` measures it on all of them."""
    n_trusted: int = 72
    """Clean generated examples (other seed) for the recommended preset's trusted reference; its model and detection
    figures are printed beside the paper's."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """As `RunConfig.report_to`."""
    train_seed: Optional[int] = None
    """The final trainings' seed (LoRA init, data order); None: `seed`, which also makes the data, the test problems
    and the references. Training seeds over one data seed separate the two sources of randomness."""
    equal_steps: bool = True
    """Every setting trains `sft`'s number of optimizer steps, `epochs` x ceil(training answers / batch_size): a
    smaller set (correct_only, rft) repeats its epochs, a larger one (sft_plus_trusted) sees part of an epoch, each
    under the same linear schedule to zero over those steps. False: each its own `epochs` over its own set."""
    verdicts: Verdicts = "outcome"
    """`noise_kind: weak` only: which verdict the verified settings, `correct_only` and `rft` read. `outcome`: the
    answer's final answer is right (what users' verifiers give); `process`: every number of it is right (the strict
    step-by-step grade, `stages.weak.grade`)."""

    def __post_init__(self) -> None:
        _check(self.n_train >= 10, "n_train", f"must be >= 10, got {self.n_train}")
        _check(self.n_test >= 1, "n_test", f"must be >= 1, got {self.n_test}")
        _check(self.n_val >= 0, "n_val", f"must be >= 0, got {self.n_val}")
        _check(self.nll_problems is None or self.nll_problems >= 1, "nll_problems",
               f"must be >= 1 or null (all), got {self.nll_problems}")
        _check(self.noise_kind != "weak" or self.weak_dir is not None, "weak_dir",
               "noise_kind 'weak' trains on a folder made by `tokenforget weak`: set weak_dir")
        _check(all(0.0 <= r <= 1.0 for r in self.sim_recall), "sim_recall", f"each in [0, 1], got {self.sim_recall}")
        _check(all(0.0 < p <= 1.0 for p in self.sim_precision), "sim_precision",
               f"each in (0, 1], got {self.sim_precision}")
        _check(self.n_trusted >= 1, "n_trusted", f"must be >= 1, got {self.n_trusted}")
        _check(self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size == 0, "micro_batch_size",
               f"must divide batch_size {self.batch_size}, got {self.micro_batch_size}")
        _check(0.0 <= self.noise <= 1.0, "noise", f"must be in [0, 1], got {self.noise}")
        _check(0.0 <= self.rho <= 1.0, "rho", f"must be in [0, 1], got {self.rho}")
        _check(len(self.settings) > 0 and len(set(self.settings)) == len(self.settings), "settings",
               f"a non-empty list without repeats, got {self.settings}")


@dataclass
class FairConfig:
    """`tokenforget fair`: settings x data seeds x training seeds x epochs on the demo's task, every setting at `sft`'s
    optimizer steps, epochs chosen on validation, the table on test (`tokenforget.commands.fair`, issue 36)."""

    run_dir: str = "runs/fair"
    """A folder per data seed (`seed-S/`, its cells' results in `seed-S/cells/`), the table in `fair_table.md`."""
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(n_test=240, n_val=120, report_to=["none"]))
    """The demo settings every cell shares (noise, test and validation sizes, model); `seed`, `train_seed`,
    `epochs`, `settings` and `run_dir` are the grid's."""
    settings: list[str] = field(default_factory=lambda: ["rft", "verified_tail", "verified_tail_self", "verified_whole",
                                                         "verified_random"])
    """Compared with `sft` (always trained); a setting that reads the trusted set adds `sft_plus_trusted`."""
    data_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    train_seeds: list[int] = field(default_factory=list)
    """Training seeds per data seed (LoRA init, data order); empty: the data seed's own."""
    extra_train_seeds: list[int] = field(default_factory=list)
    """More training seeds per data seed for `extra_seed_settings` only (MEASURING.md: `sft`, the strongest baseline
    and the best candidate over 3 training seeds, without training every setting 3 times)."""
    extra_seed_settings: list[str] = field(default_factory=list)
    """The settings trained at `extra_train_seeds` (`sft` always)."""
    epochs: list[float] = field(default_factory=lambda: [1.0, 2.0])
    """Epochs of `sft`'s steps each setting trains; every setting's own is chosen per run on validation."""
    weak_dir: str = "runs/fair/weak/seed-{seed}"
    """`demo.noise_kind: weak`: the weak sets of each data seed (`{seed}` filled in); made when missing."""
    table_only: bool = False
    """Train nothing: write the table from the cells already in `run_dir` (a grid stopped midway, or cells copied
    from another machine), at the epochs that have cells."""
    keep_models: bool = False
    """Keep each cell's final trainings (merged model and adapter: 590 MB each for SmolLM2-135M) once its answers are
    in the cell file. By default they are deleted there: 48 trainings would hold 28 GB; references, scores and
    evaluations stay, and a later grid that needs one trains it again."""

    def __post_init__(self) -> None:
        _check(self.demo.n_val >= 1, "demo.n_val", "the epochs are chosen on a validation split: set n_val >= 1 (120 measured)")
        _check(len(self.data_seeds) > 0 and len(self.epochs) > 0, "data_seeds", "the grid needs data seeds and epochs")
        _check(all(e > 0 for e in self.epochs), "epochs", f"each > 0, got {self.epochs}")
        _check("{seed}" in self.weak_dir, "weak_dir", f"must hold '{{seed}}', got {self.weak_dir!r}")


@dataclass
class ReportConfig:
    """The HTML report of a run folder."""

    run_dir: str = "runs/default"
    """The run folder to report on (it must hold `config.json` and `data/`)."""
    max_samples: int = 200
    """Examples embedded in the page with their token highlights (the first ones of the data set); the
    histogram and token counts always cover every example."""
    out_dir: Optional[str] = None
    """Where to write `report.html` and the PNG plots (default `run_dir/report`)."""

    def __post_init__(self) -> None:
        _check(self.max_samples >= 0, "max_samples", f"must be >= 0, got {self.max_samples}")


@dataclass
class PlanConfig:
    """The dry run (`--dry-run`, `--dry-run-timing`) and its cost plan (`--plan-gpus N --gpu h100`): per stage, tokens, model FLOPs, memory per
    GPU under `sharding` and wall time at `mfu` of the GPUs' peak (formulas: `tokenforget.model.memory`)."""

    gpus: int = 1
    gpu: GpuName = "h100"
    sharding: Sharding = "fsdp"
    """How training shards over the GPUs: `ddp` (none), `zero2` (gradients and optimizer states), `zero3` or
    `fsdp` (parameters too); one GPU is never sharded."""
    mfu: Optional[float] = None
    """Share of the peak bf16 FLOP/s a run reaches (model FLOPs utilisation). Default: what benchmarks/gpu.py
    measured on one H200 for a Llama-3.2-1B-shaped model at 8 x 1,024 tokens (docs/performance.md): 0.17 with
    LoRA r 64, 0.34 fully fine-tuned (`MEASURED_MFU`)."""
    timed: bool = False
    """`--dry-run-timing`: load the model and time a few training micro-batches and scoring forwards here."""
    costed: bool = False
    """`--plan-gpus N` given: print the cost plan on `gpus` GPUs after the stages."""

    def __post_init__(self) -> None:
        _check(self.gpus >= 1, "--plan-gpus", f"must be >= 1, got {self.gpus}")
        _check(self.mfu is None or 0.0 < self.mfu <= 1.0, "--plan-mfu", f"must be in (0, 1], got {self.mfu}")

    def utilisation(self, lora: bool) -> float:
        return self.mfu if self.mfu is not None else MEASURED_MFU["lora" if lora else "full"]


# benchmarks/gpu.py on one H200, 2026-11-29: the forget step's MFU (PaLM's count) for a random Llama-3.2-1B-shaped
# model, bf16 weights, 8 x 1,024 tokens (docs/performance.md, "GPU: forget step vs plain SFT step")
MEASURED_MFU = {"lora": 0.17, "full": 0.34}
