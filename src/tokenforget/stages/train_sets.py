"""Training sets: the token classes each mode trains on, from the partition, an exported labels file or a
held-out file (every response token a learn token)."""

from __future__ import annotations

from typing import Any, Optional

import datasets
from transformers import PreTrainedTokenizerBase

from tokenforget.columns import has_base_ce
from tokenforget.config.training import ObjectiveConfig, TrainConfig
from tokenforget.objectives import LEARN, NO_LOSS, needs_partition
from tokenforget.stages.data import DataError
from tokenforget.trainer import sft_classes


def held_out_set(tc: TrainConfig, dc: Any, tokenizer: PreTrainedTokenizerBase) -> Optional[datasets.Dataset]:
    """The held-out `train.eval_path` (None when unset), tokenized like the data (`dc`: its DataConfig), every
    response token a learn token."""
    from tokenforget.stages import data as data_mod

    if tc.eval_path is None:
        return None
    records = data_mod.load_records(dc, tc.eval_path, tc.eval_split)
    cols, _ = data_mod.tokenize_records(tokenizer, records, dc)
    return sft_classes(datasets.Dataset.from_dict(cols))



def sft_from_classes(exported: datasets.Dataset) -> datasets.Dataset:
    """Every token that has a class (+1 or -1) becomes a learn token: plain SFT on the same tokens."""
    return exported.map(
        lambda ex: {"token_class": [LEARN if c != NO_LOSS else NO_LOSS for c in ex["token_class"]]}, desc="classes"
    )



def from_labels(exported: datasets.Dataset, objective: ObjectiveConfig, path: str) -> datasets.Dataset:
    """The training set of `objective.mode` from an exported labels file (`labels.read_labels`)."""
    if not needs_partition(objective.mode):
        return sft_from_classes(exported)
    if objective.needs_base_ce and "ce_base" not in exported.column_names:
        raise DataError(f"train.labels_path: '{path}' has no ce_base column, "
                        f"which train.objective.forget_term '{objective.forget_term}' needs")
    if objective.needs_base_ce and not has_base_ce(exported):
        raise DataError(f"train.labels_path: '{path}' has ce_base NaN (scored without the base model, "
                        f"score.base_pass), which train.objective.forget_term '{objective.forget_term}' needs")
    return exported
