"""The final training: its stage (`train-<mode>`), and the token classes each mode trains on, from the data, the
partition, an exported labels file, or a held-out file (every response token a learn token)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import datasets
from transformers import PreTrainedTokenizerBase

from tokenforget.columns import has_base_ce
from tokenforget.config import to_dict
from tokenforget.config.training import FLAT_OBJECTIVE, ObjectiveConfig, TrainConfig
from tokenforget.training.objectives import LEARN, NO_LOSS, needs_base_ce, needs_partition
from tokenforget.runfolder import file_digest, fingerprint, stable_view
from tokenforget.stages import labels as labels_mod
from tokenforget.stages.labels_in_data import DataError
from tokenforget.stages.stage import Arg, Need, PlanInputs, Stage, StagePlan, StageRun, training_plan
from tokenforget.model.loading import load_model
from tokenforget.training.fit import FinalTraining, fit_stage, sft_classes, with_classes


def held_out_set(tc: TrainConfig, dc: Any, tokenizer: PreTrainedTokenizerBase) -> Optional[datasets.Dataset]:
    """The held-out `train.eval_path` (None when unset), tokenized like the data (`dc`: its DataConfig), every
    response token a learn token."""
    return None if tc.eval_path is None else learned_whole(dc, tokenizer, tc.eval_path, tc.eval_split)


def learned_whole(dc: Any, tokenizer: PreTrainedTokenizerBase, path: str, split: Optional[str] = None) -> datasets.Dataset:
    """The records of `path` tokenized like the data (`dc`: its DataConfig), every response token a learn token."""
    from tokenforget.stages import data as data_mod

    cols, _ = data_mod.tokenize_records(tokenizer, data_mod.load_records(dc, path, split), dc)
    return sft_classes(datasets.Dataset.from_dict(cols))


def check_trusted(cfg: Any) -> None:
    """Refuse a `train.trusted_path` that cannot be read, naming its file and line, before any stage runs (it is
    first read by the final training, after the reference and the scoring pass)."""
    from tokenforget.stages import data as data_mod

    if cfg.train.trusted_path is not None:
        data_mod.load_records(cfg.data, cfg.train.trusted_path)


# the per-token columns a trusted answer gets beside its classes: weight 1; `ce_base` (read by `tnpo` on negatives
# only, and a trusted answer has none) finite, so that no NaN reaches the loss through a masked-out branch
TRUSTED_FILL = {"token_weight": 1.0, "ce_base": 0.0}


def with_trusted(examples: datasets.Dataset, trusted: Optional[datasets.Dataset]) -> datasets.Dataset:
    """`examples` (`input_ids`, `token_class` and the objective's extra columns) and after them the `trusted` answers
    learned whole (`learned_whole`); the other columns the trainer never reads are dropped."""
    if trusted is None:
        return examples
    extras = [c for c in TRUSTED_FILL if c in examples.column_names]
    cols: dict[str, list[Any]] = {"input_ids": trusted["input_ids"], "token_class": trusted["token_class"]}
    for name in extras:
        cols[name] = [[TRUSTED_FILL[name]] * len(ids) for ids in trusted["input_ids"]]
    kept = examples.select_columns(["input_ids", "token_class", *extras])
    return datasets.concatenate_datasets([kept, datasets.Dataset.from_dict(cols, features=kept.features)])



def sft_from_classes(exported: datasets.Dataset) -> datasets.Dataset:
    """Every token that has a class (+1 or -1) becomes a learn token: plain SFT on the same tokens."""
    return exported.map(
        lambda ex: {"token_class": [LEARN if c != NO_LOSS else NO_LOSS for c in ex["token_class"]]}, desc="classes"
    )



def from_labels(exported: datasets.Dataset, objective: ObjectiveConfig, path: str) -> datasets.Dataset:
    """The training set of `objective.mode` from an exported labels file (`labels.read_labels`)."""
    if not needs_partition(objective.mode):
        return sft_from_classes(exported)
    if needs_base_ce(objective) and "ce_base" not in exported.column_names:
        raise DataError(f"train.labels_path: '{path}' has no ce_base column, "
                        f"which train.objective.forget_term '{objective.forget_term}' needs")
    if needs_base_ce(objective) and not has_base_ce(exported):
        raise DataError(f"train.labels_path: '{path}' has ce_base NaN (scored without the base model, "
                        f"score.base_pass), which train.objective.forget_term '{objective.forget_term}' needs")
    return exported


# ---------------------------------------------------------------- the stage


def train_set(run: StageRun, mode: str) -> datasets.Dataset:
    """`input_ids` and `token_class` to train `mode` on (and `token_weight`, `ce_base` where the objective reads
    them): from `train.labels_path` when set; else `sft`/`dft` train on the data and `forget`/`ignore` on the
    partition, whose labels file is exported on the way (the stage's `needs`); `train.trusted_path`'s answers
    after them, learned whole."""
    tc = run.cfg.train
    trusted = None if tc.trusted_path is None else learned_whole(run.cfg.data, run.base.tokenizer, tc.trusted_path)
    return with_trusted(_classes(run, mode), trusted)


def _classes(run: StageRun, mode: str) -> datasets.Dataset:
    objective = run.cfg.train.objective_for(mode)
    if run.cfg.train.labels_path:
        exported = labels_mod.read_labels(run.cfg.train.labels_path, run.base.tokenizer)
        return from_labels(exported, objective, run.cfg.train.labels_path)
    tokens = run.need("data")
    if not needs_partition(mode):
        return sft_classes(tokens)
    run.need("labels")
    classes = with_classes(tokens, run.need("partition", run.rounds))
    if needs_base_ce(objective):  # p_base = exp(-CE under the base model), from the scores stage
        classes = with_classes(classes, run.need("scores", run.rounds).select_columns(["ce_base"]))
    return classes


def _needs(run: StageRun, arg: Arg) -> list[Need]:
    mode = arg[0]  # type: ignore[index]
    if run.cfg.train.labels_path:
        return []
    if not needs_partition(mode):
        return [("data", None)]
    base_ce = [("scores", run.rounds)] if needs_base_ce(run.cfg.train.objective_for(mode)) else []
    return [("data", None), ("labels", None), ("partition", run.rounds), *base_ce]


def _fingerprint(run: StageRun, arg: Arg) -> str:
    c, mode = run.cfg, arg[0]  # type: ignore[index]
    if c.train.labels_path:
        upstream = "labels:" + file_digest(str(labels_mod.labels_file(c.train.labels_path)))
    else:
        upstream = run.fp("partition", run.rounds) if needs_partition(mode) else run.fp("data")
    held_out, view = file_digest(c.train.eval_path), train_view(c.train, mode)
    if c.train.trusted_path is not None:  # the trusted answers' content, not where the file lies
        view["trusted_path"] = file_digest(c.train.trusted_path)
    return fingerprint("train", mode, upstream, held_out, view, to_dict(c.lora), c.seed, run.bf16)


def _make(run: StageRun, arg: Arg) -> Path:
    """Train from the base model with `mode` into the stage folder `name` (`arg`: (mode, name))."""
    mode, name = arg  # type: ignore[misc]
    fp = run.fp("train", arg)
    if run.folder.done_on_main(name, fp):  # (the training set and held_out_set may tokenize whole files)
        run.folder.skip(name)
        return run.folder.stage_dir(name)
    examples = train_set(run, mode)
    run.log(f"[{name}] training on {len(examples)} examples")
    eval_set = held_out_set(run.cfg.train, run.cfg.data, run.base.tokenizer)
    c = run.cfg
    final = FinalTraining(eval_set, c.train.seed, c.train.save_merged, (lambda: load_model(c.model)) if c.lora.qlora else None)
    return fit_stage(run.setup, name, fp, examples, c.train.training, mode, {"mode": mode}, final)


def _plan(run: StageRun, arg: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    c = run.cfg
    examples = [*inputs.sets.all, *inputs.sets.trusted] if inputs.sets.trusted else inputs.sets.all
    return training_plan(arg[1], fp, reuse, examples, c.train.training, c.seed, inputs.timing)  # type: ignore[index]


STAGES = (Stage("train", _needs, _fingerprint, _make, _plan, folder=lambda arg: arg[1]),)  # type: ignore[index]


def train_view(tc: Any, mode: str) -> dict[str, Any]:
    """The train settings a training of `mode` depends on, for its fingerprint: the added fields only where
    they matter (the forgetting term for `forget`, the warm-up for `warmup_constant`) and not at default."""
    view = stable_view("train", flat_train(tc))
    if mode != "forget":
        view.pop("forget_objective", None)
        view.pop("beta", None)
    if tc.objective.schedule != "warmup_constant":
        view.pop("lambda_warmup", None)
    if tc.objective.forget_term in ("ga", "unlikelihood"):
        view.pop("beta", None)
    return view


def flat_train(tc: Any) -> dict[str, Any]:
    """`to_dict(tc)` with the objective's knobs flat under their names before `train.objective` (`FLAT_OBJECTIVE`):
    the fingerprints of trainings made before the move stay the same, so their stages are still reused."""
    flat = to_dict(tc)
    objective = flat.pop("objective")
    return {**flat, **{old: objective[new] for old, new in FLAT_OBJECTIVE.items()}}
