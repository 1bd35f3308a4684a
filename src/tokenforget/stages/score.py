"""Score: per-token CE under the base and the reference model; score = CE_base - CE_ref (or `score.method`).

With a LoRA reference the base is the same model with the adapter switched off, so one model sits in
memory and both losses come from one pass over the data. Batches are grouped by length to keep padding low.
The scoring pass is cut into shards of examples, each written as it finishes (`score_shards`), so a killed
run resumes; `with_method_scores` then turns the two CE columns into the ranked score.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from tokenforget.columns import flat_list_column, list_column
from tokenforget.model.batching import forward_ce, length_grouped_batches, pad_batch
from tokenforget.model.loading import BaseModel, fold_of, load_reference
from tokenforget.runfolder import STAGE_FILE, Ranks, RunFolderError
from tokenforget.stages.data import DataError

# a scoring pass stores the per-token CE under both models; the score is made from them by `score.method`
CE_FEATURES = datasets.Features({k: datasets.Sequence(datasets.Value("float32")) for k in ("ce_base", "ce_ref")})
# cross-fitted scores also record which fold's reference scored each example
FOLD_CE_FEATURES = datasets.Features({"scored_by": datasets.Value("int32"), **CE_FEATURES})


def _adapter_off(model: torch.nn.Module):
    """Context manager that runs a peft model as its base model."""
    return model.disable_adapter()


def score_tokens(
    reference: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    batch_size: int,
    bf16: bool,
    base: Optional[torch.nn.Module] = None,
    pad_id: int = 0,
    masks: Optional[Sequence[Sequence[int]]] = None,
    progress: bool = True,
    with_base: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-token CE of every sequence under the base and the reference model.

    Args:
        reference: the reference model; a peft model doubles as the base with its adapter off.
        input_ids: token ids per example.
        base: a separate base model (for a fully fine-tuned reference); None when `reference` is peft.
        masks: per-example 0/1 masks of the tokens to score (response tokens); others get 0. Default: all.
        with_base: run the base model; False skips its forward passes and returns CE_base as NaN (not measured).

    Returns:
        (ce_base, ce_ref): one fp32 array per example, length = its token count, entry 0 = 0.
    """
    dev = next(reference.parameters()).device
    ce_base: list[np.ndarray] = [np.empty(0, np.float32)] * len(input_ids)
    ce_ref: list[np.ndarray] = [np.empty(0, np.float32)] * len(input_ids)
    reference.eval()
    if base is not None:
        base.eval()
    batches = length_grouped_batches([len(s) for s in input_ids], batch_size)
    for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
        ids, mask = pad_batch([input_ids[i] for i in batch], pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        want = mask if masks is None else pad_batch([masks[i] for i in batch], 0)[0].to(dev)
        r = forward_ce(reference, ids, mask, bf16, want)
        if not with_base:
            b = torch.full_like(r, float("nan"))
        elif base is None:
            with _adapter_off(reference):
                b = forward_ce(reference, ids, mask, bf16, want)
        else:
            b = forward_ce(base, ids, mask, bf16, want)
        for row, i in enumerate(batch):
            n = len(input_ids[i])
            ce_base[i] = b[row, :n].cpu().numpy().astype(np.float32)
            ce_ref[i] = r[row, :n].cpu().numpy().astype(np.float32)
    return ce_base, ce_ref


def score_shards(
    tokens: datasets.Dataset,
    ref_dir: Path,
    base: BaseModel,
    work: Path,
    shards: list[tuple[int, int]],
    ranks: Ranks,
    batch_size: int,
    bf16: bool,
    log: Callable[[str], None] = print,
    with_base: bool = True,
) -> None:
    """Score this rank's unfinished shards (rank r takes shards r, r + world, ...), writing each atomically to
    `work/shard-NNNNN`: `ce_base`, `ce_ref` per example (and `scored_by`, the fold, when cross-fitted);
    without `with_base`, `ce_base` is NaN and the base model is not run."""
    mine = [s for s in range(len(shards)) if s % ranks.world == ranks.rank]
    todo = [s for s in mine if not (work / f"shard-{s:05d}").is_dir()]
    if len(todo) < len(mine):
        log(f"[scores] resuming: {len(mine) - len(todo)} of {len(mine)} shards already scored")
    if not todo:
        return
    ref, separate_base = load_reference(ref_dir, base)
    folds = fold_of(ref_dir)
    pad_id = base.tokenizer.pad_token_id
    for s in todo:
        lo, hi = shards[s]
        shard = tokens.select(range(lo, hi))
        if folds is None:
            ce_base, ce_ref = score_tokens(ref, shard["input_ids"], batch_size, bf16, base=separate_base,
                                           pad_id=pad_id, masks=shard["response_mask"], with_base=with_base)
            cols, features = {}, CE_FEATURES
        else:
            ce_base, ce_ref, scored_by = score_cross_fitted(ref, shard, folds[lo:hi], batch_size, bf16, pad_id,
                                                            with_base)
            cols, features = {"scored_by": scored_by}, FOLD_CE_FEATURES
        cols.update(ce_base=ce_base, ce_ref=ce_ref)
        tmp = work / f".shard-{s:05d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        rows = {k: [v.tolist() if isinstance(v, np.ndarray) else v for v in vs] for k, vs in cols.items()}
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp))
        os.replace(tmp, work / f"shard-{s:05d}")


def joined_shards(work: Path, n_shards: int) -> datasets.Dataset:
    """The finished shards of a scoring pass, in example order."""
    return datasets.concatenate_datasets([datasets.load_from_disk(str(work / f"shard-{s:05d}")) for s in range(n_shards)])


def score_cross_fitted(
    ref: torch.nn.Module, shard: datasets.Dataset, folds: list[int], batch_size: int, bf16: bool, pad_id: int,
    with_base: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """(ce_base, ce_ref, fold) per example of `shard`: each scored with the adapter of its own fold."""
    n = len(shard)
    ce_base: list[np.ndarray] = [np.empty(0, np.float32)] * n
    ce_ref: list[np.ndarray] = [np.empty(0, np.float32)] * n
    for k in sorted(set(folds)):
        rows = [i for i in range(n) if folds[i] == k]
        part = shard.select(rows)
        ref.set_adapter(f"fold-{k}")
        b, r = score_tokens(ref, part["input_ids"], batch_size, bf16, pad_id=pad_id, masks=part["response_mask"],
                            progress=False, with_base=with_base)
        for j, i in enumerate(rows):
            ce_base[i], ce_ref[i] = b[j], r[j]
    return ce_base, ce_ref, list(folds)


def raw_fingerprint_of(record: Path) -> Optional[str]:
    """The scoring pass a finished scores stage (its `stage.json`) was made from (a stage made before score
    methods existed is a `paper` stage, whose fingerprint is the pass's own)."""
    rec = json.loads(record.read_text())
    return rec.get("raw_fingerprint", rec.get("fingerprint"))


def same_pass_scores(stage: Path, raw_fps: Sequence[str], precomputed: bool) -> Optional[datasets.Dataset]:
    """The raw scores of a finished scores stage made by one of the scoring passes `raw_fps` (another
    `score.method`), so they are rescored without a forward pass; None when there is none."""
    done = stage / STAGE_FILE
    if not (done.is_file() and raw_fingerprint_of(done) in raw_fps):
        return None
    scores = datasets.load_from_disk(str(stage / "scores"))
    return scores if precomputed else scores.remove_columns("score")


def check_aligned(tokens: datasets.Dataset, scores: datasets.Dataset, where: Path) -> None:
    """Scores must have one value per token of every example; otherwise they belong to other data."""
    _, token_offsets = flat_list_column(tokens.data.column("input_ids"))
    _, score_offsets = flat_list_column(scores.data.column("score"))
    if len(scores) != len(tokens) or not np.array_equal(token_offsets, score_offsets):
        raise RunFolderError(
            f"{where}: scores do not match the tokenized data set ({len(scores)} examples scored, "
            f"{len(tokens)} tokenized, or token counts differ): fingerprint mismatch; delete the folder to rescore"
        )


def response_arrays(tokens: datasets.Dataset, scores: datasets.Dataset) -> dict[str, np.ndarray]:
    """Flat arrays over every response token: `ce_base`, `ce_ref` (`ce_noisy` where the pass has it), `token_id`,
    `example` (row index), `corrupt`;
    `where` (the flat positions of these tokens among all tokens, to scatter scores back) and `offsets` (where
    each example starts among all tokens)."""
    resp, offsets = flat_list_column(tokens.data.column("response_mask"))
    where = np.flatnonzero(resp)
    rows = np.repeat(np.arange(len(tokens)), np.diff(offsets))
    cols = [k for k in ("ce_base", "ce_ref", "ce_noisy") if k in scores.column_names]
    out = {k: flat_list_column(scores.data.column(k))[0][where] for k in cols}
    out["token_id"] = flat_list_column(tokens.data.column("input_ids"))[0][where]
    out["corrupt"] = flat_list_column(tokens.data.column("corrupt"))[0][where].astype(bool)
    return {**out, "example": rows[where], "where": where, "offsets": offsets}


def with_noisy(raw: datasets.Dataset, noisy: datasets.Dataset) -> datasets.Dataset:
    """The scoring pass `raw` with the noisy references' CE (their pass's `ce_ref`) as a column `ce_noisy`."""
    return datasets.Dataset(raw.data.table.append_column("ce_noisy", noisy.data.table.column("ce_ref")))


def token_kinds(tokenizer: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is_digit, is_newline) flags of flat token `ids`: the token decodes to digits only (spaces aside) / holds
    a newline. Each distinct id is decoded once."""
    uniq, inverse = np.unique(ids, return_inverse=True)
    text = [tokenizer.decode([int(i)]) for i in uniq]
    digit = np.array([t.strip().isdigit() for t in text], bool)
    newline = np.array(["\n" in t for t in text], bool)
    return digit[inverse], newline[inverse]


def with_method_scores(tokens: datasets.Dataset, raw: datasets.Dataset, method: str, spans: str = "token",
                       tokenizer: Any = None) -> datasets.Dataset:
    """`ce_base`, `ce_ref` (and `ce_noisy`) and `score` per example: the method's score on response tokens, pooled
    over `spans` (`score_methods.span_decisions`; `tokenizer` tells digits and newlines), 0 elsewhere.

    Raw scores that already carry a `score` column (precomputed) keep it as it is; cross-fitted ones keep
    `scored_by`."""
    keep = [c for c in ("scored_by", "ce_base", "ce_ref", "ce_noisy") if c in raw.column_names]
    if "score" in raw.column_names:
        return raw.select_columns([*keep, "score"])
    from tokenforget.score_methods import apply_method, span_decisions

    a = response_arrays(tokens, raw)
    flat = np.zeros(a["offsets"][-1], dtype=np.float32)
    score = apply_method(method, a["ce_base"], a["ce_ref"], a["token_id"], a["example"], a.get("ce_noisy"))
    if spans != "token":
        digit, newline = token_kinds(tokenizer, a["token_id"])
        score = span_decisions(score, a["example"], a["token_id"], digit, newline, spans).astype(np.float32)
    flat[a["where"]] = score
    table = raw.data.table.select(keep).append_column("score", list_column(a["offsets"], flat))
    return datasets.Dataset(table)


def read_precomputed(path: str, tokens: datasets.Dataset) -> datasets.Dataset:
    """User-supplied per-token scores (`score.precomputed_path`), checked row by row against the tokenized data:
    same number of rows, same `input_ids`, one score per token. CE columns are left at 0."""
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"score.precomputed_path: '{path}' does not exist")
    table = pq.read_table(p)
    missing = [c for c in ("input_ids", "score") if c not in table.column_names]
    if missing:
        raise DataError(f"{p}: missing column(s) {missing}; precomputed scores need input_ids and score")
    if table.num_rows != len(tokens):
        raise DataError(f"{p}: {table.num_rows} rows, but the data has {len(tokens)} tokenized examples")
    ids, id_offsets = flat_list_column(table.column("input_ids"))
    ours, our_offsets = flat_list_column(tokens.data.column("input_ids"))
    sc, sc_offsets = flat_list_column(table.column("score"))
    for name, offs in (("input_ids", id_offsets), ("score", sc_offsets)):
        bad = np.flatnonzero(np.diff(offs) != np.diff(our_offsets))
        if bad.size:
            raise DataError(f"{p} row {bad[0]}: {np.diff(offs)[bad[0]]} {name} entries, but the example has {np.diff(our_offsets)[bad[0]]} tokens")
    differs = np.flatnonzero(ids != ours)
    if differs.size:
        row = int(np.searchsorted(our_offsets, differs[0], side="right") - 1)
        raise DataError(f"{p} row {row}: input_ids differ from the tokenized data (other data, order or tokenizer)")
    if not np.all(np.isfinite(sc)):
        raise DataError(f"{p}: scores contain NaN or infinite values")
    zeros = list_column(our_offsets, np.zeros(len(ours), np.float32))
    return datasets.Dataset(pa.table({"ce_base": zeros, "ce_ref": zeros, "score": list_column(our_offsets, sc.astype(np.float32))}))


def zero_scores(tokens: datasets.Dataset) -> datasets.Dataset:
    """`ce_base`, `ce_ref` and `score` all 0, shaped like the tokens (for a partition that ranks nothing)."""
    _, offsets = flat_list_column(tokens.data.column("input_ids"))
    zeros = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.zeros(int(offsets[-1]), np.float32)))
    return datasets.Dataset(pa.table({"ce_base": zeros, "ce_ref": zeros, "score": zeros}))
