"""TRL integration: `ForgettingSFTTrainer`, a `trl.SFTTrainer` that trains a tokenforget objective.

A TRL script changes in two places: the class name, and a training set that carries a per-token
`token_class` column next to `input_ids` (the `labels.parquet` that `tokenforget partition` exports):

    train_dataset = load_dataset("parquet", data_files="runs/my-run/labels/labels.parquet", split="train")
    trainer = ForgettingSFTTrainer(model=..., args=SFTConfig(...), train_dataset=train_dataset,
                                   objective=ObjectiveConfig(mode="forget", t_max=0.25))

What TRL keeps doing: loading the model and tokenizer, peft, truncation to `max_length`, dropping examples
with no loss token left, packing (`bfd`, `bfd_split`, `wrapped`) and padding-free batches, its fused LM head
(no full logits), its metrics, checkpoints and logging. The classes stay aligned with the tokens because
they travel through the same steps: truncated with the same slice, packed by TRL's own `pack_dataset`
together with `input_ids` and `labels`, and padded or concatenated like the labels. A position TRL gives no
loss (label -100, e.g. the first token of a packed sequence) gets class 0.

The classes are per token of tokenforget's tokenization, so the training set must be tokenized already:
TRL's chat-template step does not run on it (tokenforget's data stage applied the same tokenizer's template).

Or pass the records with the labels they carry (`tokenforget.stages.labels_in_data`: a message's `weight`, `spans`
of `{start, end, weight}`, a tokenized record's `token_weight`) and no partition step: the trainer renders and
tokenizes them as tokenforget's data stage does, with the trainer's `processing_class` (a conversation through its
chat template; a string prompt/completion as prompt + completion + eos, as TRL joins them), and turns the weights
into classes as `partition.selection: data` does (> 0 learn, 0 no loss, < 0 forget, |w| the token's weight):

    train_dataset = Dataset.from_list([{"messages": [{"role": "user", "content": "2 + 2?"},
                                                     {"role": "assistant", "content": "5", "weight": -1}]}, ...])
An eval set without `token_class` is prepared by TRL as usual and every token it trains on counts as a
learn token, so `eval_loss` is the plain held-out NLL.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset

try:
    from trl import SFTTrainer
    from trl.data_utils import get_dataset_column_names, pack_dataset
except ImportError as e:  # an optional extra
    raise ImportError(f"tokenforget.training.trl needs TRL: pip install 'tokenforget[trl]' ({e})") from e

from tokenforget.config.data import DataConfig
from tokenforget.config.training import ObjectiveConfig
from tokenforget.training.objectives import LEARN, NO_LOSS
from tokenforget.stages import data as data_mod
from tokenforget.stages.labels_in_data import carries_weights
from tokenforget.stages.partition import data_classes
from tokenforget.training.trainer import EXTRA_COLUMNS, ForgettingMixin

IGNORE = -100  # the label of a token with no loss, in transformers and TRL


class ForgettingSFTTrainer(ForgettingMixin, SFTTrainer):
    """`trl.SFTTrainer` with the loss replaced by a tokenforget objective over per-token classes.

    Args:
        objective: the objective's settings (`tokenforget.config.ObjectiveConfig`): the mode (`forget`, the paper;
            `ignore`, `sft`, `dft`), lambda(t)'s schedule and bounds, the term for negative tokens and its beta
            (`tnpo` reads the labels file's per-token `ce_base`, the base model's CE).
        *args, **kwargs: everything `SFTTrainer` takes. `train_dataset` needs `input_ids` and `token_class`.

    The objective replaces TRL's `loss_type`, `compute_loss_func` and label smoothing, so those must be
    left at their defaults.
    """

    def __init__(
        self,
        *args: Any,
        objective: ObjectiveConfig = ObjectiveConfig(),
        **kwargs: Any,
    ) -> None:
        self.init_forgetting(objective)
        _reject_other_losses(kwargs)
        super().__init__(*args, **kwargs)
        self.data_collator = TokenClassPadding(self.data_collator)

    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: Any,
        args: Any,
        packing: bool,
        formatting_func: Any,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        columns = get_dataset_column_names(dataset)
        if "token_class" not in columns and dataset_name == "train" and _weighted(dataset):
            dataset = classes_from_weights(dataset, processing_class)
            columns = get_dataset_column_names(dataset)
        if "token_class" not in columns:
            if dataset_name == "train":
                raise ValueError(
                    "ForgettingSFTTrainer: the training set has no 'token_class' column. Train on the labels that "
                    "`tokenforget partition` exports (run_dir/labels/labels.parquet: input_ids, token_class), or "
                    "on records that carry weights (a message's 'weight', 'spans', or 'token_weight')."
                )
            prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
            return prepared.map(_learn_where_labelled)  # held-out data: plain NLL of the tokens TRL trains on
        if "input_ids" not in columns:
            raise ValueError(
                f"ForgettingSFTTrainer: the {dataset_name} set has 'token_class' but no 'input_ids'; classes belong "
                "to tokens, so pass the tokenized labels file that tokenforget exports."
            )
        dataset = dataset.map(_labels_from_classes)
        if packing:
            dataset = _pack(dataset, args)
        else:
            dataset = _truncate_classes(dataset, args.max_length, args.truncation_mode)
        # TRL truncates input_ids and labels with the same slice (a no-op after packing), drops examples
        # with no loss token and shuffles if asked; it packs nothing more.
        return super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Optional[torch.Tensor] = None,
    ) -> Any:
        token_class = inputs.pop("token_class")  # (B, T)
        extras = {k: inputs.pop(k) for k in EXTRA_COLUMNS if k in inputs}  # (B, T) each, laid out like the classes
        inputs["use_cache"] = False
        # TRL's fused LM head: log_probs (B, T-1), entry t = log p(labels[:, t+1]); 0 where the label is -100
        outputs = model(**inputs, fused_lm_head=True)
        token_loss = F.pad(-outputs.log_probs.float(), (1, 0))  # (B, T): our alignment, entry 0 = 0
        loss = self.objective_loss(token_loss, token_class, num_items_in_batch, model.training, extras)
        self._record_trl_metrics(outputs, inputs)
        if return_outputs:  # evaluation asking for logits: TRL recomputes them the same way
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _record_trl_metrics(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> None:
        """TRL's own per-step metrics (entropy, mean_token_accuracy, num_tokens), as `SFTTrainer` logs them."""
        mode = "train" if self.model.training else "eval"
        gather = self.accelerator.gather_for_metrics
        n_valid = gather(outputs.label_mask.sum()).sum()
        for key, value in (("entropy", outputs.entropy.detach().sum()), ("mean_token_accuracy", outputs.is_top1.sum())):
            self._metrics[mode][key].append((gather(value).sum() / n_valid).item() if n_valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                n = inputs["attention_mask"].sum()
            else:  # padding-free: one row of real tokens
                n = torch.tensor(inputs["position_ids"].size(1))
            self._total_train_tokens += gather(n.to(self.accelerator.device)).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class TokenClassPadding:
    """Wraps TRL's collator: pads `token_class` like the labels, and gives class 0 wherever TRL gives no loss.

    TRL's collator returns rows right-padded to a common width, or, padding-free, all sequences of the batch
    concatenated into one row; `token_class` gets the same layout. Output `token_class`: (B, T) long, and
    each of `EXTRA_COLUMNS` the features carry (`token_weight`, `ce_base`) as (B, T) float32, 0 on padding.
    """

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        classes = [torch.as_tensor(f.pop("token_class"), dtype=torch.long) for f in features]
        extras = {k: [torch.as_tensor(f.pop(k), dtype=torch.float32) for f in features] for k in EXTRA_COLUMNS if k in features[0]}
        batch = self.inner(features)
        ids = batch["input_ids"]  # (B, T), or (1, sum of lengths) padding-free
        token_class = _same_layout(classes, ids.shape, torch.long)
        for name, values in extras.items():
            batch[name] = _same_layout(values, ids.shape, torch.float32)
        if "labels" in batch:
            token_class[batch["labels"] == IGNORE] = NO_LOSS
        token_class[:, 0] = NO_LOSS  # the first position is never predicted
        batch["token_class"] = token_class
        return batch


def _same_layout(values: list[torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Per-example 1-D tensors as rows right-padded with 0 to `shape`, or concatenated into its one row."""
    rows = values if shape[0] == len(values) else [torch.cat(values)]
    out = torch.zeros(shape, dtype=dtype)
    for r, v in enumerate(rows):
        out[r, : len(v)] = v
    return out


def _reject_other_losses(kwargs: dict[str, Any]) -> None:
    args = kwargs.get("args")
    if kwargs.get("compute_loss_func") is not None:
        raise ValueError("ForgettingSFTTrainer: the objective is the loss; pass no compute_loss_func")
    if args is not None and getattr(args, "loss_type", "nll") != "nll":
        raise ValueError(
            f"ForgettingSFTTrainer: the objective is the loss; leave loss_type at 'nll', not {args.loss_type!r}"
        )
    if args is not None and getattr(args, "label_smoothing_factor", 0.0):
        raise ValueError("ForgettingSFTTrainer: label smoothing does not combine with the objective; set it to 0")


def _labels_from_classes(example: dict[str, Any]) -> dict[str, Any]:
    """labels = input_ids where the token has a class, -100 elsewhere: TRL's filters and metrics see our tokens."""
    return {"labels": [t if c != NO_LOSS else IGNORE for t, c in zip(example["input_ids"], example["token_class"])]}


def _learn_where_labelled(example: dict[str, Any]) -> dict[str, Any]:
    return {"token_class": [LEARN if lab != IGNORE else NO_LOSS for lab in example["labels"]]}


def _truncate_classes(dataset: Dataset | IterableDataset, max_length: Optional[int], mode: str) -> Any:
    """Cut `token_class` and the other per-token columns (and nothing else) with the slice TRL will cut
    `input_ids` and `labels` with."""
    if max_length is None:
        return dataset
    cut = slice(None, max_length) if mode == "keep_start" else slice(-max_length, None)
    names = _per_token_columns(dataset)
    return dataset.map(lambda ex: {k: ex[k][cut] for k in names})


def _per_token_columns(dataset: Dataset | IterableDataset) -> list[str]:
    """`token_class` and whichever of `EXTRA_COLUMNS` the data set has."""
    columns = get_dataset_column_names(dataset)
    return ["token_class", *(c for c in EXTRA_COLUMNS if c in columns)]


def _pack(dataset: Dataset | IterableDataset, args: Any) -> Any:
    """TRL's packing with `token_class` as a third packed column; same order of shuffle and pack as TRL."""
    if args.max_length is None:
        raise ValueError("When packing is enabled, `max_length` can't be `None`.")
    dataset = dataset.select_columns(["input_ids", "labels", *_per_token_columns(dataset)])
    if args.shuffle_dataset:
        dataset = dataset.shuffle(seed=args.seed)
    return pack_dataset(dataset, args.max_length, args.packing_strategy, {})


def _weighted(dataset: Dataset | IterableDataset) -> bool:
    """Whether a training set of records carries weights (an iterable one is never converted: it is not read ahead)."""
    return isinstance(dataset, Dataset) and any(carries_weights(row) for row in dataset)


def classes_from_weights(dataset: Dataset, tokenizer: Any) -> Dataset:
    """`input_ids`, `token_class` (and `token_weight` where some weight is fractional) of records that carry weights,
    tokenized as tokenforget's data stage does and classed as `partition.selection: data` does. Truncation is left to
    TRL (`max_length`), which cuts the classes with the ids."""
    rows = list(dataset)
    fmt = data_mod.detect_format(rows[0], {})
    plain = fmt == "prompt_completion" and isinstance(rows[0].get("prompt"), str)  # TRL's non-conversational data
    dc = DataConfig(max_length=1 << 30, chat_template=not plain)
    records = [data_mod.to_record(r, f"train_dataset row {i}", dc, fmt) for i, r in enumerate(rows)]
    cols, _ = data_mod.tokenize_records(tokenizer, records, dc)
    lengths = np.cumsum([len(ids) for ids in cols["input_ids"]])[:-1]
    flat = lambda name, dtype: np.concatenate([np.asarray(v, dtype) for v in cols[name]])  # noqa: E731
    classes, weights = data_classes(flat("data_weight", np.float32), flat("response_mask", np.int8))
    out = {"input_ids": cols["input_ids"], "token_class": [c.tolist() for c in np.split(classes, lengths)]}
    if weights is not None:
        out["token_weight"] = [w.tolist() for w in np.split(weights, lengths)]
    return Dataset.from_dict(out)
