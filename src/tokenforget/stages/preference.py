"""TRL's own preference trainers as a stage of a run (`preference`; its folder `train-<method><suffix>`, beside the
final trainings): what a user with verdicts would pick instead of tokenforget (issue 36). Fingerprinted and reused
like every stage; its record lists what it reads, so the resolver makes DPO's `sft` warm start first.

- `kto`: `trl.KTOTrainer` with each answer's verdict as its label (desirable = graded right), from the base model
  (TRL's docs: depending on the base model, SFT before KTO may not be needed), at the run's optimizer steps.
- `kto_sft`: the same from the run's `sft` model (where the base cannot yet do the task, TRL's docs leave SFT first
  to the user): its steps are `sft`'s plus the run's again, as DPO's.
- `dpo`: `trl.DPOTrainer` on the problems that have a right and a wrong sampled answer (the arg's pairs file: prompt,
  chosen, rejected), from the run's `sft` model as TRL's docs ask (DPO always follows SFT): its steps are `sft`'s plus
  the run's again.

Both with the run's LoRA, learning rate, batch, schedule and seed (`trainer.training_arguments`), the reference
the adapter-free model (TRL's default for a peft model), beta 0.1 (TRL's default). The stage's arg: (method, the
folder name's suffix, the pairs file or None[, a learning rate of its own]): at sft's 1e-3 DPO collapses (the
chosen answers' log-probability fell from -3.5 to -37 in 18 steps on the weaker model's pairs, docs/results.md), and
TRL's own defaults are far lower (1e-6, full fine-tuning), so a fair DPO or KTO row sweeps it on validation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, cast

from tokenforget.config import to_dict
from tokenforget.errors import UserError
from tokenforget.runfolder import file_digest, fingerprint, release_memory
from tokenforget.stages.demo_task import graded_right
from tokenforget.stages.stage import Arg, Need, PlanInputs, Stage, StagePlan, StageRun, training_plan

BETA = 0.1  # TRL's default for both


@dataclass(frozen=True)
class Method:
    """One preference method: TRL's trainer (`kto` or `dpo`), whether it reads the pairs file (else the run's answers
    with their verdicts), and whether it starts from the run's `sft` model."""

    trainer: str
    paired: bool = False
    after_sft: bool = False


METHODS = {"kto": Method("kto"), "dpo": Method("dpo", paired=True, after_sft=True), "kto_sft": Method("kto", after_sft=True)}


def kto_rows(records: list[dict[str, Any]], system_prompt: Optional[str]) -> list[dict[str, Any]]:
    """TRL's unpaired preference format, conversational: prompt (system and user turns), completion, label."""
    return [{"prompt": _prompt(r["prompt"], system_prompt), "completion": [{"role": "assistant", "content": r["completion"]}],
             "label": graded_right(r)} for r in records]


def dpo_rows(pairs: list[dict[str, Any]], system_prompt: Optional[str]) -> list[dict[str, Any]]:
    """TRL's paired preference format, conversational: prompt, chosen, rejected."""
    return [{"prompt": _prompt(p["prompt"], system_prompt), "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]


def _prompt(text: str, system_prompt: Optional[str]) -> list[dict[str, str]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": text}]


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _method(arg: Arg) -> tuple[str, str, Optional[Path]]:
    method, suffix, pairs = cast(tuple[str, str, Optional[str]], arg)[:3]
    return method, suffix, None if pairs is None else Path(pairs)


def _learning_rate(arg: Arg) -> Optional[float]:
    """The arg's own learning rate (its 4th element), or None: the run's."""
    parts = cast(tuple[Any, ...], arg)
    return parts[3] if len(parts) > 3 else None


def _warm_start(arg: Arg) -> Optional[tuple[str, str]]:
    """The warm start of DPO and `kto_sft`: the run's `sft` training of the same suffix (the train stage's arg)."""
    method, suffix, _ = _method(arg)
    return ("sft", f"train-sft{suffix}") if METHODS[method].after_sft else None


def _source(run: StageRun, arg: Arg) -> Path:
    """What the trainer reads: the pairs file (DPO; refused when missing) or the run's data."""
    method, _, pairs = _method(arg)
    if not METHODS[method].paired:
        return Path(run.cfg.data.path)  # type: ignore[arg-type]
    if pairs is None or not pairs.is_file():
        raise UserError(f"dpo trains on pairs of a right and a wrong answer to one problem: '{pairs}' does not "
                        "exist (the demo writes task/pairs.jsonl for noise_kind weak)")
    return pairs


def _needs(run: StageRun, arg: Arg) -> list[Need]:
    _source(run, arg)  # a missing pairs file is refused before the warm start trains
    warm = _warm_start(arg)
    return [("train", warm)] if warm else []


def _fingerprint(run: StageRun, arg: Arg) -> str:
    c, warm = run.cfg, _warm_start(arg)
    seed, warm_fp = c.train.seed if c.train.seed is not None else c.seed, run.fp("train", warm) if warm else None
    lr = _learning_rate(arg)
    return fingerprint("preference", _method(arg)[0], BETA, file_digest(str(_source(run, arg))),
                       to_dict(c.train.training), to_dict(c.lora), seed, run.bf16, warm_fp,
                       *(() if lr is None else (("learning_rate", lr),)))  # none: the fingerprints made before it


def _make(run: StageRun, arg: Arg) -> Path:
    """TRL's KTO or DPO trainer on the run's data into `train-<method><suffix>` (DPO and `kto_sft` after
    `train-sft<suffix>`, which the resolver made first); the merged model in `model/`."""
    c, (method, _, _) = run.cfg, _method(arg)
    name, fp, warm_arg = folder_of(arg), run.fp("preference", arg), _warm_start(arg)
    if run.folder.done_on_main(name, fp):
        run.folder.skip(name)
        return run.folder.stage_dir(name)
    warm: Optional[Path] = run.need("train", warm_arg) if warm_arg else None
    source = _source(run, arg)
    paired, trainer_name = METHODS[method].paired, METHODS[method].trainer
    rows = (dpo_rows if paired else kto_rows)(_read(source), c.data.system_prompt)
    run.log(f"[{name}] TRL's {trainer_name.upper()}Trainer on {len(rows)} {'pairs' if paired else 'answers'}"
            + (f" after {warm.name}" if warm else ""))
    trainer: Any = None

    def build() -> None:
        nonlocal trainer
        trainer = _fit(run, trainer_name, rows, name, fp, warm, _learning_rate(arg))

    def commit(_: None, d: Path) -> dict[str, Any]:
        from tokenforget.training.fit import save_model

        (d / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
        save_model(trainer.model, run.base.tokenizer, d, merged=True)
        return {"mode": method, "rows": len(rows), "warm_start": str(warm) if warm else None,
                "learning_rate": trainer.args.learning_rate}

    out = run.folder.ensure(name, fp, build, commit)
    del trainer
    release_memory()
    return out


def _plan(run: StageRun, arg: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    """A training of the run's settings over its examples (DPO's pairs count as its answers: about as many tokens)."""
    c = run.cfg
    return training_plan(folder_of(arg), fp, reuse, inputs.sets.all, c.train.training, c.seed, inputs.timing)


def folder_of(arg: Arg) -> str:
    """`train-<method><suffix>`, with `-lr<rate>` before the suffix for a learning rate of its own."""
    method, suffix, _ = _method(arg)
    lr = _learning_rate(arg)
    return f"train-{method}" + ("" if lr is None else f"-lr{lr:g}") + suffix


STAGES = (Stage("preference", _needs, _fingerprint, _make, _plan, folder=folder_of, trains="train"),)


def _fit(run: StageRun, trainer_name: str, rows: list[dict[str, Any]], name: str, fp: str, warm: Optional[Path],
         learning_rate: Optional[float] = None) -> Any:
    """Train with TRL's trainer: the run's LoRA on the base (or on the warm-start model), its TrainingArguments
    (`learning_rate`, when given, replacing the run's)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import ProgressCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from tokenforget.model.loading import add_lora
    from tokenforget.training.trainer import BarOnlyProgress, training_arguments

    c = run.cfg
    seed = c.train.seed if c.train.seed is not None else c.seed
    work = run.folder.work_dir(name, fp)
    args = training_arguments(c.train.training, work, seed, run.bf16, report_to=["none"], save_strategy="no")
    config_cls, trainer_cls = (DPOConfig, DPOTrainer) if trainer_name == "dpo" else (KTOConfig, KTOTrainer)
    fields = {k: v for k, v in args.to_dict().items() if k in config_cls.__dataclass_fields__ and not k.startswith("_")}
    fields.update(beta=BETA, max_length=c.data.max_length, remove_unused_columns=True, disable_tqdm=False)
    if learning_rate is not None:
        fields["learning_rate"] = learning_rate
    if trainer_name == "kto":  # its KL term pairs each example with its batch neighbours: TRL asks for a fixed order,
        fields["train_sampling_strategy"] = "sequential"  # so the rows are shuffled once, seeded, instead
        rows = [rows[i] for i in random.Random(seed).sample(range(len(rows)), len(rows))]
    cfg = config_cls(**{k: v for k, v in fields.items() if k not in ("push_to_hub_token", "hub_token")})
    base = (AutoModelForCausalLM.from_pretrained(str(warm / "model"), dtype=torch.float32) if warm else
            (run.base.frozen() if c.lora.enabled else run.base.fresh()))
    model = add_lora(base, c.lora)
    trainer = trainer_cls(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=run.base.tokenizer)
    if trainer.pop_callback(ProgressCallback) is not None:  # a bar, not the log dicts
        trainer.add_callback(BarOnlyProgress)
    trainer.train()
    return trainer
