"""One training from a run's settings: `FitSetup` (what every training of a run shares), `fit` (a
`ForgettingTrainer` built and run, resumed from its last checkpoint), the training sets' token classes, saving the
adapter, and `fit_stage` (one training as a run-folder stage, committed atomically)."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import torch
from transformers import PreTrainedTokenizerBase, set_seed

from tokenforget.errors import ConfigError
from tokenforget.config.model import LoraSettings
from tokenforget.config.training import ObjectiveConfig, TrainConfig, TrainingConfig
from tokenforget.model.loading import BaseModel, use_fp16
from tokenforget.runfolder import RunFolder, release_memory
from tokenforget.training.objectives import LEARN
from tokenforget.training.trainer import ForgettingTrainer, last_checkpoint, make_trainer, training_arguments


@dataclass
class FitSetup:
    """What every training of one run shares: the base model, LoRA, the objective's settings (`train`), seed,
    precision, logging integrations, and the run folder its checkpoints and TensorBoard events go to."""

    base: BaseModel
    lora: LoraSettings
    train: TrainConfig
    seed: int
    bf16: bool
    folder: RunFolder
    report_to: Sequence[str] = field(default_factory=lambda: ["none"])
    ddp_timeout: int = 1800

    def objective(self, mode: str) -> ObjectiveConfig:
        return self.train.objective_for(mode)


def fit(
    setup: FitSetup,
    train_set: datasets.Dataset,
    tcfg: TrainingConfig,
    objective: ObjectiveConfig,
    name: str,
    fp: str,
    eval_set: Optional[datasets.Dataset] = None,
) -> ForgettingTrainer:
    """Train a fresh LoRA copy of the base on `train_set` (`input_ids`, `token_class`, optional `EXTRA_COLUMNS`).

    Checkpoints go to the run folder's `.<name>.work/` (of inputs `fp`), so a killed run resumes; the folder is
    removed when training ends. TensorBoard events (when `report_to` asks for them) go to `run_dir/tensorboard/<name>/`.
    Every rank trains (DDP); returns the finished Trainer.
    """
    folder = setup.folder
    work = folder.work_dir(name, fp)
    resume = last_checkpoint(work)
    set_seed(setup.seed)
    model = setup.base.for_training(setup.lora)
    args = training_arguments(tcfg, work, setup.seed, setup.bf16, report_to=setup.report_to,
                              ddp_timeout=setup.ddp_timeout, fp16=use_fp16(setup.base.cfg.precision))
    trainer = make_trainer(model, setup.base.tokenizer, train_set, args, objective, tcfg.packing, eval_set,
                           folder.tensorboard_dir(name, fresh=resume is None))
    if resume:
        folder.log(f"[{name}] resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    folder.ranks.barrier()
    if folder.ranks.is_main:
        shutil.rmtree(work, ignore_errors=True)
    return trainer


# ---------------------------------------------------------------- training sets: token classes per mode


def check_training_args(cfg: Any, scratch: Path, bf16: bool) -> None:
    """Both trainings' `training_args` (of a RunConfig `cfg`) as TrainingArguments accepts them, checked before
    any stage writes: else a ConfigError naming the field."""
    trainings = {"reference.training": cfg.reference.training, "train.training": cfg.train.training}
    for name, tcfg in trainings.items():
        try:
            training_arguments(tcfg, scratch, cfg.seed, bf16)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"config field '{name}.training_args': TrainingArguments rejects them: {e}") from None


def sft_classes(tokens: datasets.Dataset) -> datasets.Dataset:
    """`tokens` with `token_class`: every response token a learn token (what `sft`, `dft` and the reference train on)."""
    return tokens.map(lambda ex: {"token_class": [LEARN * m for m in ex["response_mask"]]}, desc="classes")


def with_classes(tokens: datasets.Dataset, classes: datasets.Dataset) -> datasets.Dataset:
    """The partition's columns (`token_class`, `token_weight`) next to the tokens, column-wise, no copy through Python."""
    return datasets.concatenate_datasets([tokens, classes], axis=1)


def save_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    merged: bool,
    dense_base: Optional[Callable[[], torch.nn.Module]] = None,
) -> None:
    """Save the LoRA adapter to `out/adapter` and, if asked, the merged model to `out/model`.

    A full fine-tune (no adapter) is saved to `out/model` only. With `dense_base` (QLoRA) the saved adapter
    is merged into that full-precision base rather than into the 4-bit weights it was trained on, so the
    merged model is not quantised twice.
    """
    is_peft = hasattr(model, "merge_and_unload")
    if is_peft:
        model.save_pretrained(out / "adapter")
    if not (merged or not is_peft):
        return
    if is_peft and dense_base is not None:
        from peft import PeftModel

        full = PeftModel.from_pretrained(dense_base(), str(out / "adapter")).merge_and_unload()
    else:
        # merged into a copy: a LoRA base shares its weights with the next stage's (`BaseModel.frozen`)
        full = copy.deepcopy(model).merge_and_unload() if is_peft else model
    full.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")


def fit_stage(setup: FitSetup, name: str, fp: str, train_set: datasets.Dataset, tcfg: TrainingConfig, mode: str,
              record: dict[str, Any], final: Optional[FinalTraining] = None) -> Path:
    """The run-folder stage `name` of one training of `mode` on `train_set`: built by `fit`, committed with the
    adapter (`save_model`) and `record` in its stage.json. A reference's training, or with `final` the final one
    (its held-out set, its seed, its log history and training arguments, the merged model on request)."""
    trainer: Any = None

    def build() -> None:
        nonlocal trainer
        run_setup = replace(setup, seed=final.seed) if final is not None and final.seed is not None else setup
        trainer = fit(run_setup, train_set, tcfg, run_setup.objective(mode), name, fp, final.eval_set if final else None)

    def commit(_: None, d: Path) -> dict[str, Any]:
        if final is not None:
            (d / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
            (d / "training_args.json").write_text(trainer.args.to_json_string())
        save_model(trainer.model, setup.base.tokenizer, d, merged=final is not None and final.merged,
                   dense_base=final.dense_base if final is not None else None)
        return record

    out = setup.folder.ensure(name, fp, build, commit, every_rank=True)
    del trainer
    release_memory()
    setup.folder.ranks.barrier()
    return out


@dataclass
class FinalTraining:
    """What a final training adds to a reference's (`fit_stage`): its held-out set, its own seed (`train.seed`;
    None: the run's), the merged model (`train.save_merged`), and for QLoRA the dense base to merge into."""

    eval_set: Optional[datasets.Dataset] = None
    seed: Optional[int] = None
    merged: bool = False
    dense_base: Optional[Callable[[], torch.nn.Module]] = None
