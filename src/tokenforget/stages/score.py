"""Score: per-token CE under the base and the reference model; score = CE_base - CE_ref (or `score.method`).

With a LoRA reference the base is the same model with the adapter switched off, so one model sits in
memory and both losses come from one pass over the data. Batches are grouped by length to keep padding low.
The scoring pass is cut into shards of examples, each written as it finishes (`score_shards`), so a killed
run resumes; `with_method_scores` then turns the two CE columns into the ranked score.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from tokenforget.columns import flat_list_column, has_base_ce, list_column
from tokenforget.config import to_dict
from tokenforget.model.batching import forward_ce, length_grouped_batches, pad_batch
from tokenforget.model.loading import BaseModel, fold_of, load_reference
from tokenforget.runfolder import STAGE_FILE, Ranks, RunFolderError, file_digest, fingerprint, round_stage, shard_ranges
from tokenforget.score_methods import reads_base, reads_reference
from tokenforget.stages.labels_in_data import DataError
from tokenforget.stages.stage import Arg, Need, PlanInputs, Stage, StagePlan, StageRun
from tokenforget.stages.verdicts import known_noise
from tokenforget.training.objectives import FORGET_TERMS

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
    ref_dir: Optional[Path],
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
    without `with_base`, `ce_base` is NaN and the base model is not run; without `ref_dir`, the base model alone
    is run and `ce_ref` is NaN (a method that reads CE_base only)."""
    mine = [s for s in range(len(shards)) if s % ranks.world == ranks.rank]
    todo = [s for s in mine if not (work / f"shard-{s:05d}").is_dir()]
    if len(todo) < len(mine):
        log(f"[scores] resuming: {len(mine) - len(todo)} of {len(mine)} shards already scored")
    if not todo:
        return
    ref, separate_base = load_reference(ref_dir, base) if ref_dir else (base.frozen(), None)
    folds = fold_of(ref_dir) if ref_dir else None
    pad_id = base.tokenizer.pad_token_id
    for s in todo:
        lo, hi = shards[s]
        shard = tokens.select(range(lo, hi))
        if folds is None:
            ce_base, ce_ref = score_tokens(ref, shard["input_ids"], batch_size, bf16, base=separate_base,
                                           pad_id=pad_id, masks=shard["response_mask"], with_base=with_base and ref_dir is not None)
            if ref_dir is None:  # the base's forward was the only one: its CE is CE_base
                ce_base, ce_ref = ce_ref, [np.full_like(c, np.nan) for c in ce_ref]
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


def score_padded_tokens(examples: Sequence[Sequence[int]], batch_size: int) -> int:
    """Padded tokens of the scorer's length-grouped batches (one forward; a scoring pass runs two, or one without
    the base model)."""
    lengths = [len(e) for e in examples]
    return sum(len(b) * max(lengths[i] for i in b) for b in length_grouped_batches(lengths, batch_size))


# ---------------------------------------------------------------- the stage


def base_pass(run: StageRun) -> bool:
    """Whether the scoring pass runs the base model too: `score.base_pass`, by default when CE_base is read."""
    sc = run.cfg.score
    if sc.base_pass is not None:
        return sc.base_pass
    return reads_base(sc.method) or FORGET_TERMS[run.cfg.train.objective.forget_term].needs_base_ce


def scores_unused(run: StageRun) -> bool:
    """The oracle and data partitions rank nothing (their classes are the data's known noise, or the weights it
    carries), so no reference is trained and no token scored: the scores stage holds zeros. Unless `tnpo` needs
    the base model's CE. A simulated detector with random false positives reads the known noise only."""
    pc = run.cfg.partition
    known_only = not run.selection.needs_scores or (pc.selection == "simulated" and pc.false_positives == "random")
    return known_only and not FORGET_TERMS[run.cfg.train.objective.forget_term].needs_base_ce


def base_only(run: StageRun) -> bool:
    """Whether the scoring pass runs the base model alone: the method reads CE_base only (`base_loss`), so no
    reference is trained or run for it."""
    return not reads_reference(run.cfg.score.method) and not run.cfg.score.precomputed_path and not scores_unused(run)


def needs_noisy_reference(run: StageRun) -> bool:
    """Whether the scoring pass trains and runs the noisy references (`reference.noisy_folds`)."""
    return (bool(run.cfg.reference.noisy_folds) and not run.cfg.score.precomputed_path and not scores_unused(run)
            and not base_only(run))


def scoring_forwards(run: StageRun) -> list[str]:
    """The models a scoring pass runs over every example, in order (none where the scores are unused or read
    from a file): the base where CE_base is read, the reference, the noisy references (each example by one)."""
    if scores_unused(run) or run.cfg.score.precomputed_path:
        return []
    if base_only(run):
        return ["base"]
    return [*(["base"] if base_pass(run) else []), "reference", *(["noisy references"] if needs_noisy_reference(run) else [])]


def raw_score_fp(run: StageRun, rnd: int = 1, with_base: Optional[bool] = None) -> str:
    """Fingerprint of the scoring pass (CE_base, CE_ref; CE_ref alone without the base pass, by default
    `base_pass(run)`), which does not depend on `score.method`."""
    c, sc = run.cfg, run.cfg.score
    if sc.precomputed_path:
        return fingerprint("precomputed", run.fp("data"), file_digest(sc.precomputed_path))
    settings = {k: v for k, v in to_dict(sc).items() if k not in ("method", "precomputed_path", "base_pass", "spans")}
    if with_base is None and base_only(run):  # the base model's CE alone: no reference in it
        return fingerprint("score-base-only", run.fp("data"), settings, run.bf16)
    kind = "score" if (base_pass(run) if with_base is None else with_base) else "score-ref-only"
    if c.reference.noisy_folds:  # the pass also stores the noisy references' CE
        return fingerprint(kind, run.fp("reference", rnd), run.fp("reference-noisy"), settings, run.bf16)
    return fingerprint(kind, run.fp("reference", rnd), settings, run.bf16)


def reusable_score_fps(run: StageRun, rnd: int = 1) -> list[str]:
    """The scoring passes whose raw scores serve this run's method: its own, and a pass with CE_base where
    CE_ref alone would do."""
    return list(dict.fromkeys([raw_score_fp(run, rnd), raw_score_fp(run, rnd, with_base=True)]))


def _fingerprint(run: StageRun, rnd: Arg) -> str:
    """The scoring pass's for `paper` (so runs made before score methods existed are reused), else the pass
    and the method; the data's alone when the scores are unused."""
    if scores_unused(run):
        return fingerprint("scores-unused", run.fp("data"))
    raw, method, spans = raw_score_fp(run, rnd), run.cfg.score.method, run.cfg.score.spans  # type: ignore[arg-type]
    if spans != "token":
        return fingerprint("score-method", raw, method, spans)
    return raw if method == "paper" else fingerprint("score-method", raw, method)


def _needs(run: StageRun, rnd: Arg) -> list[Need]:
    if scores_unused(run):
        return [("data", None)]
    precomputed = bool(run.cfg.score.precomputed_path)
    noisy = [("reference-noisy", None)] if needs_noisy_reference(run) else []
    return [("data", None), *([] if precomputed or base_only(run) else [("reference", rnd)]), *noisy]


def _make(run: StageRun, rnd: Arg) -> datasets.Dataset:
    """Per-token CE under base and reference, and the `score.method` score, for every training example.

    The examples are cut into shards of `score.shard_size`; rank r scores shards r, r + world, ... and writes
    each as it finishes, so a killed run resumes at the first missing shard. Rank 0 joins the shards in example
    order and applies the method over the whole data set. A finished stage of the same scoring pass with another
    method is rescored without a forward pass.
    """
    assert isinstance(rnd, int)
    name, sc, folder = round_stage("scores", rnd), run.cfg.score, run.folder
    tokens = run.need("data")
    if run.selection.reads_known_noise:  # refused before any forward pass (a base-only pass trains no reference)
        known_noise(tokens, run.cfg.partition.selection)
    if scores_unused(run):
        def zeros() -> datasets.Dataset:
            run.log(f"[{name}] partition.selection '{run.cfg.partition.selection}' ranks nothing: no reference, zero scores")
            return zero_scores(tokens)

        out = folder.ensure(name, run.fp("scores", rnd), zeros, lambda t, d: t.save_to_disk(str(d / "scores")) or {"unused": True})
        return datasets.load_from_disk(str(out / "scores"))
    raw_fp = raw_score_fp(run, rnd)

    def build() -> Optional[datasets.Dataset]:  # every rank: each scores its own shards
        same_pass = same_pass_scores(folder.stage_dir(name), reusable_score_fps(run, rnd), bool(sc.precomputed_path))
        if same_pass is not None:
            run.log(f"[{name}] same scoring pass, new score.method: rescoring without a forward pass")
            return same_pass
        if sc.precomputed_path:
            return read_precomputed(sc.precomputed_path, tokens) if folder.ranks.is_main else None
        # the references only where the pass runs: a copied or finished pass needs none trained
        ref_dir = None if base_only(run) else run.need("reference", rnd)
        noisy_dir = run.need("reference-noisy") if needs_noisy_reference(run) else None
        work, shards = folder.work_dir(name, raw_fp), shard_ranges(len(tokens), sc.shard_size)
        score_shards(tokens, ref_dir, run.base, work, shards, folder.ranks, sc.batch_size, run.bf16, run.log,
                     with_base=base_pass(run))
        if noisy_dir is not None:  # the second reference's pass: its CE only
            (work / "noisy").mkdir(exist_ok=True)
            score_shards(tokens, noisy_dir, run.base, work / "noisy", shards, folder.ranks, sc.batch_size, run.bf16,
                         run.log, with_base=False)
        folder.ranks.barrier()
        if not folder.ranks.is_main:
            return None
        raw = joined_shards(work, len(shards))
        return raw if noisy_dir is None else with_noisy(raw, joined_shards(work / "noisy", len(shards)))

    def commit(raw: datasets.Dataset, d: Path) -> dict[str, Any]:
        with_method_scores(tokens, raw, sc.method, sc.spans, run.base.tokenizer).save_to_disk(str(d / "scores"))
        n_tokens = int(sum(map(sum, tokens["response_mask"])))
        made_by = raw_score_fp(run, rnd, with_base=True) if has_base_ce(raw) and not base_only(run) else raw_fp
        return {"tokens": n_tokens, "raw_fingerprint": made_by, "method": sc.method}

    out = folder.ensure(name, run.fp("scores", rnd), build, commit, every_rank=True)
    folder.release_work(name)
    scores = datasets.load_from_disk(str(out / "scores"))
    check_aligned(tokens, scores, out)
    return scores


def _plan(run: StageRun, rnd: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    cfg, sets, name = run.cfg, inputs.sets, round_stage("scores", rnd)  # type: ignore[arg-type]
    n_tok = sum(map(len, sets.all))
    if scores_unused(run):  # the stage only writes zeros for the partition to read
        work = f"not needed: partition.selection '{cfg.partition.selection}' ranks nothing (no reference, no forward)"
        return StagePlan(name, fp, reuse, len(sets.all), n_tok, work, 0.0)
    bs, models = cfg.score.batch_size, scoring_forwards(run)
    why = ", ".join(models) + ("" if base_pass(run) else "; the method reads no base CE")
    secs = len(models) * score_padded_tokens(sets.all, bs) * inputs.timing.forward.get(bs, 0.0)
    work = f"{math.ceil(len(sets.all) / bs)} batches x {len(models)} forward{'s' * (len(models) > 1)} ({why})"
    return StagePlan(name, fp, reuse, len(sets.all), n_tok, work, 0.0 if reuse else secs, forwards=len(models),
                     examples_ids=sets.all)


STAGES = (Stage("scores", _needs, _fingerprint, _make, _plan),)
