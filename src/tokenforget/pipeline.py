"""The run folder: each stage's output written atomically with a fingerprint of its inputs.

    run_dir/
      config.json   the RunConfig of the last stage written here
      data/         tokenized examples (Arrow): input_ids, response_mask, corrupt, example
      reference/    the reference model's LoRA adapter (or full model); cross-fitted: fold-<k>/, folds.json
      scores/       per-token ce_base, ce_ref, score (Arrow, float32); cross-fitted: scored_by per example
      partition/    per-token token_class (and token_weight, soft selection) (Arrow) + stats.json
      reference-round<r>/, scores-round<r>/, partition-round<r>/   self-evolving rounds r >= 2
      labels/       labels.parquet: input_ids, token_class, scores per example, for any trainer (see `labels`)
      train-<mode>/ adapter/, model/ (merged), log_history.json, training_args.json
      eval-<model>/ results.json: `tokenforget eval` of the base model, a train stage or a model folder
      tensorboard/  <stage>/ TensorBoard events of each training (reference, train-<mode>)
      report/       report.html and its PNG plots (`tokenforget report`)

A stage is skipped when `stage.json` in its folder holds the fingerprint of its current inputs; a stale
or half-written stage is redone. Outputs are built in a hidden temporary folder and renamed into place.
Work in progress that survives a crash lives in `.<stage>.work/`: training checkpoints, and finished
scoring shards. Under `torchrun` every rank trains (DDP through the Trainer) and scores its own shards;
rank 0 alone writes stages.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import numpy as np
import pyarrow as pa
import torch
from transformers import set_seed

from tokenforget import data as data_mod
from tokenforget import labels as labels_mod
from tokenforget.config import (
    RECURRING_SENTENCE, VARIANT_SECTIONS, ConfigError, RunConfig, TrainingConfig, UserError, to_dict,
)
from tokenforget.losses import FORGET, LEARN, NEEDS_REF_CE, NO_LOSS, OBJECTIVES, PARTITION_FREE
from tokenforget.models import BaseModel, check_qlora, device, load_model, use_bf16, use_fp16
from tokenforget.partition import flat_list_column, flat_token_classes, select_tokens, streaming_threshold
from tokenforget.score import score_tokens
from tokenforget.train import last_checkpoint, make_trainer, save_model, training_arguments

STAGE_FILE = "stage.json"
CONFIG_FILE = "config.json"
FOLDS_FILE = "folds.json"  # in a cross-fitted reference stage: each example's fold, each reference's examples
# a scoring pass stores the per-token CE under both models; the score is made from them by `score.method`
CE_FEATURES = datasets.Features({k: datasets.Sequence(datasets.Value("float32")) for k in ("ce_base", "ce_ref")})
# cross-fitted scores also record which fold's reference scored each example
FOLD_CE_FEATURES = datasets.Features({"scored_by": datasets.Value("int32"), **CE_FEATURES})


class RunFolderError(UserError):
    """The run folder holds a different run, or a stage's files do not match its inputs."""


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Optional[str]) -> str:
    """Content hash of a local data file; the name itself for Hub data sets."""
    if path is None:
        return "none"
    p = Path(path).expanduser()
    if not p.is_file():
        return f"hub:{path}"
    h = hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# Config fields added after runs were made, with their defaults: left out of a fingerprint while they hold
# the default, so a stage finished by an older version is still reused.
ADDED_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"lambda_warmup": 0.1, "forget_objective": "ga", "beta": 1.0},
    "partition": {"selection": "global", "threshold": 0.0},
    "reference": {"folds": 1, "rounds": 1, "checkpoint": None},
    "data": {"noise": "step_result", "noise_sentence": RECURRING_SENTENCE},
    "model": {"weights": "fp32", "attn_implementation": "sdpa"},
}


def stable_view(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (a config section as a dict) without the added fields that hold their default."""
    added = ADDED_DEFAULTS.get(section, {})
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


def round_stage(name: str, rnd: int) -> str:
    """Stage folder of a self-evolving round: `name` for round 1, `name-round<r>` after."""
    return name if rnd == 1 else f"{name}-round{rnd}"


@dataclass
class Ranks:
    """This process's place among the processes of a `torchrun` / `accelerate launch` job."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def detect(timeout_s: int = 1800) -> "Ranks":
        """This process's rank; under torchrun the process group is made here, its collectives (the barriers
        around rank-0-only stages) failing after `timeout_s` seconds (`RunConfig.ddp_timeout`)."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks()
        from accelerate import PartialState  # initialises the process group (gloo on CPU)

        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))
        return Ranks(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) example ranges of at most `size` examples."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


IDENTITY = {"model": ("name_or_path", "gguf_file"), "data": ("path", "hub_config", "split")}


def same_run_keys(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What makes a run folder one run: the base model and the training data (other fields may change)."""
    return {sec: {k: cfg.get(sec, {}).get(k) for k in keys} for sec, keys in IDENTITY.items()}


class Run:
    """One run folder and the stages that fill it. Stages call their inputs' stages first."""

    def __init__(
        self,
        cfg: RunConfig,
        base: Optional[BaseModel] = None,
        log: Callable[[str], None] = print,
        ranks: Optional[Ranks] = None,
    ):
        self.cfg = cfg
        self.root = Path(cfg.run_dir)
        self.base = base or BaseModel(cfg.model, qlora=cfg.lora.qlora)
        self.ranks = ranks or Ranks.detect(cfg.ddp_timeout)
        self.log = log if self.ranks.is_main else (lambda _msg: None)
        self.bf16 = use_bf16(cfg.model.precision)
        self.skipped: list[str] = []
        self._loaded: dict[str, datasets.Dataset] = {}  # stage outputs already read in this process
        self.check_folder()
        self._check_before_any_stage()

    def _check_before_any_stage(self) -> None:
        """Settings that would fail only when their stage starts fail now, before anything is written."""
        if self.cfg.lora.qlora:
            check_qlora(self.cfg.model)
        trainings = {"reference.training": self.cfg.reference.training, "train.training": self.cfg.train.training}
        for name, tcfg in trainings.items():
            try:
                training_arguments(tcfg, self.root / ".check", self.cfg.seed, self.bf16)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"config field '{name}.training_args': TrainingArguments rejects them: {e}") from None

    # ------------------------------------------------------------ bookkeeping

    def check_folder(self) -> None:
        """Refuse a run folder that holds a run of another model or data set (unless `overwrite`)."""
        recorded = self.root / CONFIG_FILE
        if self.cfg.overwrite or not recorded.is_file():
            return
        before = same_run_keys(json.loads(recorded.read_text()))
        now = same_run_keys(to_dict(self.cfg))
        changed = [f"{sec}.{k}" for sec in now for k in now[sec] if before.get(sec, {}).get(k) != now[sec][k]]
        if changed:
            raise RunFolderError(
                f"run_dir '{self.root}' holds a different run ({', '.join(changed)} differ from {recorded}); "
                "choose another run_dir or pass --overwrite true"
            )

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def is_done(self, name: str, fp: str) -> bool:
        f = self.stage_dir(name) / STAGE_FILE
        return f.is_file() and json.loads(f.read_text()).get("fingerprint") == fp

    @contextlib.contextmanager
    def writing(self, name: str, fp: str, record: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder; on success it replaces `run_dir/name`, with `stage.json` last."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / STAGE_FILE).write_text(json.dumps({"stage": name, "fingerprint": fp, **record}, indent=2))
        final, old = self.stage_dir(name), self.root / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        self.save_config()

    def work_dir(self, name: str, fp: str) -> Path:
        """`.<name>.work/` for crash-surviving work of inputs `fp`; emptied when the inputs changed."""
        work = self.root / f".{name}.work"
        marker = work / "fingerprint"
        if self.ranks.is_main:
            if work.exists() and (not marker.is_file() or marker.read_text() != fp):
                shutil.rmtree(work)  # work of different inputs: never resume from it
            work.mkdir(parents=True, exist_ok=True)
            marker.write_text(fp)
        self.ranks.barrier()
        return work

    def tensorboard_dir(self, name: str, fresh: bool) -> Path:
        """`run_dir/tensorboard/<name>/`, emptied for a fresh (not resumed) training so that old curves do not
        mix with the new ones."""
        log_dir = self.root / "tensorboard" / name
        if fresh and self.ranks.is_main:
            shutil.rmtree(log_dir, ignore_errors=True)
        self.ranks.barrier()
        return log_dir

    def save_config(self) -> None:
        """Record the run's config in the run folder (for `report` and for people reading the folder)."""
        tmp = self.root / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(to_dict(self.cfg), indent=2))
        os.replace(tmp, self.root / CONFIG_FILE)

    def _skip(self, name: str) -> None:
        if name in self.skipped:
            return
        self.skipped.append(name)
        self.log(f"[{name}] up to date, reusing {self.stage_dir(name)}")

    def _load(self, stage: str, sub: str) -> datasets.Dataset:
        self._loaded[stage] = datasets.load_from_disk(str(self.stage_dir(stage) / sub))
        return self._loaded[stage]

    # ------------------------------------------------------------ data

    def data_fp(self) -> str:
        c = self.cfg
        return fingerprint("data", stable_view("data", to_dict(c.data)), file_digest(c.data.path), stable_view("model", to_dict(c.model)))

    def data(self) -> datasets.Dataset:
        """Tokenized training examples with response and corrupt masks."""
        if "data" in self._loaded:
            return self._loaded["data"]
        fp = self.data_fp()
        if self.is_done("data", fp):
            self._skip("data")
        elif self.ranks.is_main:
            records = data_mod.load_records(self.cfg.data)
            records, n_corrupted = self._corrupt(records)
            cols, rep = data_mod.tokenize_records(self.base.tokenizer, records, self.cfg.data)
            self.log(f"[data] {rep.kept} examples tokenized, {rep.skipped_no_response} skipped (no response token left)")
            record = {"kept": rep.kept, "skipped_no_response": rep.skipped_no_response, "corrupted": n_corrupted}
            with self.writing("data", fp, record) as d:
                datasets.Dataset.from_dict(cols).save_to_disk(str(d / "tokens"))
        self.ranks.barrier()
        return self._load("data", "tokens")

    def _corrupt(self, records: list[data_mod.Record]) -> tuple[list[data_mod.Record], int]:
        """The configured share of answers corrupted with `data.noise` (`data.corrupt_fraction`)."""
        dc = self.cfg.data
        if not dc.corrupt_fraction:
            return records, 0
        from tokenforget.noise import inject_noise

        records, n = inject_noise(records, dc.noise, dc.corrupt_fraction, dc.corrupt_seed, dc.noise_sentence)
        self.log(f"[data] noise '{dc.noise}' in {n} of {len(records)} answers (seed {dc.corrupt_seed})")
        return records, n

    # ------------------------------------------------------------ reference

    @property
    def rounds(self) -> int:
        return self.cfg.reference.rounds

    def reference_fp(self, rnd: int = 1) -> str:
        c = self.cfg
        if rnd > 1:  # round r's reference: trained on round r - 1's partition
            training = to_dict(c.reference.training)
            return fingerprint("reference-round", self.partition_fp(rnd - 1), training, to_dict(c.lora), c.seed)
        if c.reference.checkpoint:
            return fingerprint("reference-checkpoint", _folder_digest(self._checkpoint_dir()), stable_view("model", to_dict(c.model)))
        ref = {k: v for k, v in stable_view("reference", to_dict(c.reference)).items() if k != "rounds"}
        return fingerprint("reference", self.data_fp(), ref, file_digest(c.reference.path), to_dict(c.lora), c.seed)

    def _checkpoint_dir(self) -> Path:
        folder = Path(self.cfg.reference.checkpoint).expanduser()  # type: ignore[arg-type]
        if not folder.is_dir():
            raise RunFolderError(f"reference.checkpoint: '{folder}' does not exist")
        return folder

    def _reference_examples(self, tokens: datasets.Dataset) -> datasets.Dataset:
        rc = self.cfg.reference
        if rc.path:
            records = data_mod.load_records(self.cfg.data, rc.path)
            data_mod.check_disjoint(records, data_mod.load_records(self.cfg.data), "reference.path")
            cols, _ = data_mod.tokenize_records(self.base.tokenizer, records, self.cfg.data)
            return datasets.Dataset.from_dict(cols)
        idx = data_mod.reference_subset(len(tokens), rc.fraction, rc.size, self.cfg.seed)
        return tokens.select(idx)

    def reference(self, rnd: int = 1) -> Path:
        """Train (or reuse) the reference model: SFT of the base on a subset. Returns its folder.

        With `reference.folds` > 1 the folder holds one reference per fold (`_reference_folds`); round
        `rnd` > 1 is a self-evolving round's reference (`_evolved_reference`).
        """
        if rnd > 1:
            return self._evolved_reference(rnd)
        if self.cfg.reference.folds > 1:
            return self._reference_folds()
        tokens = self.data()
        if self.cfg.reference.checkpoint:
            return self._checkpoint_dir()
        fp = self.reference_fp()
        if self.is_done("reference", fp):
            self._skip("reference")
            return self.stage_dir("reference")
        subset = self._reference_examples(tokens)
        self.log(f"[reference] SFT on {len(subset)} examples")
        trainer = self._fit(_sft_classes(subset), self.cfg.reference.training, "sft", "reference", fp)
        if self.ranks.is_main:
            with self.writing("reference", fp, {"examples": len(subset)}) as d:
                save_model(trainer.model, self.base.tokenizer, d, merged=False)
        del trainer
        release_memory()
        self.ranks.barrier()
        return self.stage_dir("reference")

    def _reference_folds(self) -> Path:
        """Cross-fitted references: `reference/fold-<k>/` for k < K, and `folds.json` with each example's fold
        (`fold_of`) and each reference's training examples (`trained_on`). A finished fold is kept in
        `.reference.work/` until all are done, so a killed run retrains only the unfinished folds."""
        tokens = self.data()
        fp = self.reference_fp()
        if self.is_done("reference", fp):
            self._skip("reference")
            return self.stage_dir("reference")
        rc = self.cfg.reference
        plan = cross_fit_folds(len(tokens), rc.folds, rc.fraction, rc.size, self.cfg.seed)
        work = self.work_dir("reference", fp)
        for k, trained_on in enumerate(plan["trained_on"]):
            done = work / f"fold-{k}"
            if done.is_dir():
                self.log(f"[reference] fold {k} already trained, reusing it")
                continue
            self.log(f"[reference] fold {k} of {rc.folds}: SFT on {len(trained_on)} examples from the other folds")
            trainer = self._fit(_sft_classes(tokens.select(trained_on)), rc.training, "sft", f"reference-fold{k}", fp)
            if self.ranks.is_main:
                tmp = work / f".fold-{k}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                save_model(trainer.model, self.base.tokenizer, tmp, merged=False)
                os.replace(tmp, done)
            del trainer
            release_memory()
            self.ranks.barrier()
        if self.ranks.is_main:
            with self.writing("reference", fp, {"examples": [len(t) for t in plan["trained_on"]], "folds": rc.folds}) as d:
                for k in range(rc.folds):
                    shutil.copytree(work / f"fold-{k}", d / f"fold-{k}")
                (d / FOLDS_FILE).write_text(json.dumps(plan))
            shutil.rmtree(work)
        self.ranks.barrier()
        return self.stage_dir("reference")

    def _evolved_reference(self, rnd: int) -> Path:
        """Round `rnd`'s reference: a fresh LoRA of the base trained with `ignore` on the reference subset,
        learning only the tokens round `rnd - 1` marked positive (token cleaning, self-evolving)."""
        name, fp = round_stage("reference", rnd), self.reference_fp(rnd)
        tokens = self.data()
        classes = self.partition(rnd - 1)
        if self.is_done(name, fp):
            self._skip(name)
            return self.stage_dir(name)
        rc = self.cfg.reference
        idx = data_mod.reference_subset(len(tokens), rc.fraction, rc.size, self.cfg.seed)
        subset = _with_classes(tokens, classes).select(idx)
        self.log(f"[{name}] ignore-training on {len(subset)} examples, round {rnd - 1}'s positive tokens")
        trainer = self._fit(subset, rc.training, "ignore", name, fp)
        if self.ranks.is_main:
            with self.writing(name, fp, {"examples": len(subset), "round": rnd}) as d:
                save_model(trainer.model, self.base.tokenizer, d, merged=False)
        del trainer
        release_memory()
        self.ranks.barrier()
        return self.stage_dir(name)

    # ------------------------------------------------------------ score

    def raw_score_fp(self, rnd: int = 1) -> str:
        """Fingerprint of the scoring pass (CE_base, CE_ref), which does not depend on `score.method`."""
        sc = self.cfg.score
        if sc.precomputed_path:
            return fingerprint("precomputed", self.data_fp(), file_digest(sc.precomputed_path))
        settings = {k: v for k, v in to_dict(sc).items() if k not in ("method", "precomputed_path")}
        return fingerprint("score", self.reference_fp(rnd), settings, self.bf16)

    def scores_unused(self) -> bool:
        """The oracle partition ranks nothing (its negatives are the data's known noise), so no reference is
        trained and no token scored: the scores stage holds zeros. Unless `tnpo` needs the base model's CE."""
        return self.cfg.partition.selection == "oracle" and self.cfg.train.forget_objective not in NEEDS_REF_CE

    def score_fp(self, rnd: int = 1) -> str:
        """The scores stage's fingerprint: the scoring pass's for `paper` (so runs made before score methods
        existed are reused), else the pass and the method; the data's alone when the scores are unused."""
        if self.scores_unused():
            return fingerprint("scores-unused", self.data_fp())
        raw, method = self.raw_score_fp(rnd), self.cfg.score.method
        return raw if method == "paper" else fingerprint("score-method", raw, method)

    def score(self, rnd: Optional[int] = None) -> datasets.Dataset:
        """Per-token CE under base and reference, and the `score.method` score, for every training example.

        The examples are cut into shards of `score.shard_size`; rank r scores shards r, r + world, ...
        and writes each one as it finishes, so a killed run resumes at the first missing shard. Rank 0
        joins the shards in example order, then applies the method over the whole data set. A finished
        stage of the same scoring pass with another method is rescored without a forward pass.
        `rnd`: the self-evolving round (default: the last).
        """
        rnd = rnd or self.rounds
        name = round_stage("scores", rnd)
        if name in self._loaded:
            return self._loaded[name]
        tokens = self.data()
        fp = self.score_fp(rnd)
        if self.scores_unused():
            if self.is_done(name, fp):
                self._skip(name)
            elif self.ranks.is_main:
                self.log(f"[{name}] the oracle partition ranks nothing: no reference, zero scores")
                with self.writing(name, fp, {"unused": True}) as d:
                    zero_scores(tokens).save_to_disk(str(d / "scores"))
            self.ranks.barrier()
            return self._load(name, "scores")
        ref_dir = None if self.cfg.score.precomputed_path else self.reference(rnd)
        if self.is_done(name, fp):
            self._skip(name)
        else:
            raw = self._raw_scores(tokens, ref_dir, name, rnd)
            if self.ranks.is_main:
                table = with_method_scores(tokens, raw, self.cfg.score.method)
                n_tokens = int(sum(map(sum, tokens["response_mask"])))
                record = {"tokens": n_tokens, "raw_fingerprint": self.raw_score_fp(rnd), "method": self.cfg.score.method}
                with self.writing(name, fp, record) as d:
                    table.save_to_disk(str(d / "scores"))
                shutil.rmtree(self.root / f".{name}.work", ignore_errors=True)
            self.ranks.barrier()
        scores = self._load(name, "scores")
        check_aligned(tokens, scores, self.stage_dir(name))
        return scores

    def _raw_scores(
        self, tokens: datasets.Dataset, ref_dir: Optional[Path], name: str = "scores", rnd: int = 1
    ) -> Optional[datasets.Dataset]:
        """`ce_base`, `ce_ref` (`scored_by` when cross-fitted, `score` for precomputed scores) per example;
        None on ranks other than 0. `name`: the stage (`scores`, or a round's `scores-round<r>`)."""
        sc, raw_fp = self.cfg.score, self.raw_score_fp(rnd)
        done = self.stage_dir(name) / STAGE_FILE
        if done.is_file() and self._raw_fp_of(done) == raw_fp:
            self.log(f"[{name}] same scoring pass, new score.method: rescoring without a forward pass")
            done_scores = datasets.load_from_disk(str(self.stage_dir(name) / "scores"))
            return done_scores if sc.precomputed_path else done_scores.remove_columns("score")
        if sc.precomputed_path:
            return read_precomputed(sc.precomputed_path, tokens) if self.ranks.is_main else None
        work = self.work_dir(name, raw_fp)
        shards = shard_ranges(len(tokens), sc.shard_size)
        self._score_shards(tokens, ref_dir, work, shards)  # type: ignore[arg-type]
        self.ranks.barrier()
        if not self.ranks.is_main:
            return None
        return datasets.concatenate_datasets([datasets.load_from_disk(str(work / f"shard-{s:05d}")) for s in range(len(shards))])

    @staticmethod
    def _raw_fp_of(record: Path) -> Optional[str]:
        """The scoring pass a finished scores stage was made from (a stage made before score methods
        existed is a `paper` stage, whose fingerprint is the pass's own)."""
        rec = json.loads(record.read_text())
        return rec.get("raw_fingerprint", rec.get("fingerprint"))

    def _score_shards(
        self, tokens: datasets.Dataset, ref_dir: Path, work: Path, shards: list[tuple[int, int]]
    ) -> None:
        """Score this rank's unfinished shards, writing each atomically to `work/shard-NNNNN`."""
        mine = [s for s in range(len(shards)) if s % self.ranks.world == self.ranks.rank]
        todo = [s for s in mine if not (work / f"shard-{s:05d}").is_dir()]
        if len(todo) < len(mine):
            self.log(f"[scores] resuming: {len(mine) - len(todo)} of {len(mine)} shards already scored")
        if not todo:
            return
        ref, base = self._load_reference(ref_dir)
        fold_of = json.loads((ref_dir / FOLDS_FILE).read_text())["fold_of"] if (ref_dir / FOLDS_FILE).is_file() else None
        for s in todo:
            lo, hi = shards[s]
            shard = tokens.select(range(lo, hi))
            if fold_of is None:
                ce_base, ce_ref = score_tokens(
                    ref, shard["input_ids"], self.cfg.score.batch_size, self.bf16, base=base,
                    pad_id=self.base.tokenizer.pad_token_id, masks=shard["response_mask"],
                )
                cols, features = {}, CE_FEATURES
            else:
                ce_base, ce_ref, scored_by = self._score_cross_fitted(ref, shard, fold_of[lo:hi])
                cols, features = {"scored_by": scored_by}, FOLD_CE_FEATURES
            cols.update(ce_base=ce_base, ce_ref=ce_ref)
            tmp = work / f".shard-{s:05d}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            rows = {k: [v.tolist() if isinstance(v, np.ndarray) else v for v in vs] for k, vs in cols.items()}
            datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp))
            os.replace(tmp, work / f"shard-{s:05d}")

    def _score_cross_fitted(
        self, ref: torch.nn.Module, shard: datasets.Dataset, fold_of: list[int]
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        """(ce_base, ce_ref, fold) per example of `shard`: each scored with the adapter of its own fold."""
        n = len(shard)
        ce_base: list[np.ndarray] = [np.empty(0, np.float32)] * n
        ce_ref: list[np.ndarray] = [np.empty(0, np.float32)] * n
        for k in sorted(set(fold_of)):
            rows = [i for i in range(n) if fold_of[i] == k]
            part = shard.select(rows)
            ref.set_adapter(f"fold-{k}")
            b, r = score_tokens(ref, part["input_ids"], self.cfg.score.batch_size, self.bf16,
                                pad_id=self.base.tokenizer.pad_token_id, masks=part["response_mask"], progress=False)
            for j, i in enumerate(rows):
                ce_base[i], ce_ref[i] = b[j], r[j]
        return ce_base, ce_ref, list(fold_of)

    def _load_reference(self, ref_dir: Path) -> tuple[torch.nn.Module, Optional[torch.nn.Module]]:
        """(reference, separate base or None). A LoRA reference is the base plus its adapter; cross-fitted
        references are one model with an adapter per fold, named `fold-<k>`.

        `ref_dir` is a stage folder (`adapter/` preferred, else `model/`), an adapter folder or a model folder.
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        if (ref_dir / FOLDS_FILE).is_file():
            folds = len(json.loads((ref_dir / FOLDS_FILE).read_text())["trained_on"])
            model = PeftModel.from_pretrained(self.base.frozen(), str(ref_dir / "fold-0" / "adapter"), adapter_name="fold-0")
            for k in range(1, folds):
                model.load_adapter(str(ref_dir / f"fold-{k}" / "adapter"), adapter_name=f"fold-{k}")
            return model.to(device()), None

        adapter = ref_dir / "adapter" if (ref_dir / "adapter").is_dir() else ref_dir
        if (adapter / "adapter_config.json").is_file():
            return PeftModel.from_pretrained(self.base.frozen(), str(adapter)).to(device()), None
        full = ref_dir / "model" if (ref_dir / "model").is_dir() else ref_dir
        if not (full / "config.json").is_file():
            raise RunFolderError(f"reference: '{ref_dir}' holds no LoRA adapter (adapter_config.json) and no model (config.json)")
        return AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).to(device()), self.base.frozen().to(device())

    # ------------------------------------------------------------ partition

    def partition_fp(self, rnd: int = 1) -> str:
        pc = stable_view("partition", to_dict(self.cfg.partition))
        if self.cfg.partition.selection != "threshold":
            pc.pop("threshold", None)
        return fingerprint("partition", self.score_fp(rnd), pc)

    def partition(self, rnd: Optional[int] = None) -> datasets.Dataset:
        """Token classes (+1/-1/0) for every training example, by `partition.selection` over the scores
        (and `token_weight`, the |weight| of each token, for the soft selection). `rnd`: the self-evolving
        round (default: the last)."""
        rnd = rnd or self.rounds
        name = round_stage("partition", rnd)
        if name in self._loaded:
            return self._loaded[name]
        tokens = self.data()
        scores = self.score(rnd)
        fp = self.partition_fp(rnd)
        if self.is_done(name, fp):
            self._skip(name)
        elif self.ranks.is_main:
            table, stats = (self._partition_streaming if self.cfg.partition.streaming else self._partition_exact)(
                tokens, scores
            )
            self.log(f"[{name}] {stats['n_positive']} positive, {stats['n_negative']} negative of {stats['n_tokens']} tokens")
            with self.writing(name, fp, {}) as d:
                datasets.Dataset(table).save_to_disk(str(d / "classes"))
                (d / "stats.json").write_text(json.dumps(stats, indent=2))
        self.ranks.barrier()
        return self._load(name, "classes")

    def _partition_exact(self, tokens: datasets.Dataset, scores: datasets.Dataset) -> tuple[pa.Table, dict[str, Any]]:
        """All scores in memory as one flat array: exact counts (global, per-sample), or a cut, or soft weights."""
        flat_scores, offsets = flat_list_column(scores.data.column("score"))
        flat_resp, _ = flat_list_column(tokens.data.column("response_mask"))
        pc = self.cfg.partition
        if pc.selection == "global":  # the paper's partition, as before
            classes, stats = flat_token_classes(flat_scores, flat_resp, pc.rho)
            return pa.table({"token_class": _list_column(offsets, classes)}), stats.__dict__
        bad = known_bad_tokens(tokens) if pc.selection == "oracle" else None
        classes, weights, stats = select_tokens(flat_scores, flat_resp, offsets, pc.selection, pc.rho, pc.threshold, bad)
        columns = {"token_class": _list_column(offsets, classes)}
        if weights is not None:
            columns["token_weight"] = _list_column(offsets, weights)
        return pa.table(columns), {**stats.__dict__, "selection": pc.selection}

    def _partition_streaming(self, tokens: datasets.Dataset, scores: datasets.Dataset) -> tuple[pa.Table, dict[str, Any]]:
        """Scores read a block of examples at a time: histogram cut, exact count, achieved rho reported."""
        rows = self.cfg.partition.stream_rows

        def blocks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
            for lo in range(0, len(scores), rows):
                hi = min(lo + rows, len(scores))
                sc, offsets = flat_list_column(scores.data.slice(lo, hi - lo).column("score"))
                resp, _ = flat_list_column(tokens.data.slice(lo, hi - lo).column("response_mask"))
                yield sc, resp.astype(bool), offsets

        cut = streaming_threshold(lambda: (sc[resp] for sc, resp, _ in blocks()), self.cfg.partition.rho)
        parts = []
        for sc, resp, offsets in blocks():
            cls = np.where(resp, np.where(sc >= cut.threshold, LEARN, FORGET), 0).astype(np.int8)
            parts.append(pa.table({"token_class": _list_column(offsets, cls)}))
        stats = {"n_tokens": cut.n_tokens, "n_positive": cut.n_positive, "n_negative": cut.n_tokens - cut.n_positive,
                 "threshold": cut.threshold, "target_rho": cut.target_rho, "achieved_rho": cut.achieved_rho,
                 "quantiles": {}}
        return pa.concat_tables(parts), stats

    def partition_stats(self) -> dict[str, Any]:
        return json.loads((self.stage_dir(round_stage("partition", self.rounds)) / "stats.json").read_text())

    # ------------------------------------------------------------ labels

    def labels_fp(self) -> str:
        return fingerprint("labels", labels_mod.FORMAT, self.partition_fp(self.rounds))

    def labels(self) -> Path:
        """Export ids, scores and classes per example as one Parquet file any trainer can read."""
        tokens, scores, classes = self.data(), self.score(), self.partition()
        fp = self.labels_fp()
        if self.is_done("labels", fp):
            self._skip("labels")
        elif self.ranks.is_main:
            meta = {"model": self.cfg.model.name_or_path, "tokenizer": labels_mod.tokenizer_digest(self.base.tokenizer),
                    "rho": self.cfg.partition.rho, "data": self.cfg.data.path}
            column = lambda ds, name: ds.data.column(name)  # noqa: E731  (Arrow, no Python lists)
            table = labels_mod.labels_table(
                column(tokens, "input_ids"), column(classes, "token_class"),
                {k: column(scores, k) for k in ("score", "ce_base", "ce_ref")}, column(tokens, "example"), meta,
                weights=column(classes, "token_weight") if "token_weight" in classes.column_names else None,
            )
            with self.writing("labels", fp, {"examples": len(tokens)}) as d:
                path = labels_mod.write_labels(table, d)
            self.log(f"[labels] {len(tokens)} examples -> {self.stage_dir('labels') / path.name}")
        self.ranks.barrier()
        return self.stage_dir("labels") / labels_mod.LABELS_FILE

    # ------------------------------------------------------------ train

    def train_fp(self, mode: str) -> str:
        if mode in self.cfg.compare.variants:
            sub, sub_mode = self.variant(mode, adopt=False)  # a fingerprint copies nothing (dry runs call it)
            return sub.train_fp(sub_mode)
        c = self.cfg
        if c.train.labels_path:
            upstream = "labels:" + file_digest(str(labels_mod.labels_file(c.train.labels_path)))
        else:
            upstream = self.data_fp() if mode in PARTITION_FREE else self.partition_fp(self.rounds)
        held_out = file_digest(c.train.eval_path)
        return fingerprint("train", mode, upstream, held_out, train_view(c.train, mode), to_dict(c.lora), c.seed, self.bf16)

    def train_set(self, mode: str) -> datasets.Dataset:
        """`input_ids` and `token_class` to train `mode` on; ensures the stages they come from.

        From `train.labels_path` when set; else `sft` needs only the data (every response token is a learn
        token) and `forget`/`ignore` the partition, whose labels file is exported on the way.
        """
        if self.cfg.train.labels_path:
            exported = labels_mod.read_labels(self.cfg.train.labels_path, self.base.tokenizer)
            if mode in PARTITION_FREE:
                return _sft_from_classes(exported)
            if not self._needs_ref_ce(mode):
                return exported
            if "ce_base" not in exported.column_names:
                raise labels_mod.DataError(f"train.labels_path: '{self.cfg.train.labels_path}' has no ce_base column, "
                                           f"which train.forget_objective '{self.cfg.train.forget_objective}' needs")
            return exported.rename_column("ce_base", "ref_ce")
        tokens = self.data()
        if mode in PARTITION_FREE:
            return _sft_classes(tokens)
        self.labels()
        train_set = _with_classes(tokens, self.partition())
        if self._needs_ref_ce(mode):  # p_ref = exp(-CE under the base model), from the scores stage
            ref_ce = self.score().select_columns(["ce_base"]).rename_column("ce_base", "ref_ce")
            train_set = datasets.concatenate_datasets([train_set, ref_ce], axis=1)
        return train_set

    def _needs_ref_ce(self, mode: str) -> bool:
        return mode == "forget" and self.cfg.train.forget_objective in NEEDS_REF_CE

    def eval_set(self) -> Optional[datasets.Dataset]:
        """The held-out `train.eval_path`, tokenized like the data, every response token a learn token."""
        tc = self.cfg.train
        if tc.eval_path is None:
            return None
        records = data_mod.load_records(self.cfg.data, tc.eval_path, tc.eval_split)
        cols, _ = data_mod.tokenize_records(self.base.tokenizer, records, self.cfg.data)
        return _sft_classes(datasets.Dataset.from_dict(cols))

    def variant(self, name: str, adopt: bool = True) -> tuple["Run", str]:
        """A `compare.variants` entry: this run with its `train` fields overridden, and the mode it trains.

        A variant that also overrides `partition` or `reference` gets a run folder of its own,
        `run_dir/variant-<name>/`, seeded (with `adopt`) with copies of this folder's finished stages it shares.
        """
        overrides = dict(self.cfg.compare.variants[name])
        sections = {sec: replace(getattr(self.cfg, sec), **overrides.pop(sec)) for sec in VARIANT_SECTIONS if sec in overrides}
        train = replace(self.cfg.train, **overrides)
        if not sections:
            return Run(replace(self.cfg, train=train), base=self.base, log=self.log, ranks=self.ranks), train.mode
        compare = replace(self.cfg.compare, variants={**self.cfg.compare.variants, name: overrides})  # no recursion
        cfg = replace(self.cfg, run_dir=str(self.root / f"variant-{name}"), train=train, compare=compare, **sections)
        sub = Run(cfg, base=self.base, log=self.log, ranks=self.ranks)
        if adopt:
            sub.adopt_stages(self)
        return sub, train.mode

    def adopt_stages(self, parent: "Run") -> None:
        """Copy `parent`'s finished data, reference and scores stages that this run's fingerprints match, so
        a variant that changes only the partition does not train the reference again, and one that changes
        only `score.method` does not score again."""
        for stage, fp in (("data", self.data_fp), ("reference", self.reference_fp), ("scores", self.score_fp)):
            mine = fp()
            ok = parent.is_done(stage, mine)
            if stage == "scores" and not ok and (parent.stage_dir(stage) / STAGE_FILE).is_file():
                # another score.method over the same scoring pass: rescored from it without a forward pass
                ok = self._raw_fp_of(parent.stage_dir(stage) / STAGE_FILE) == self.raw_score_fp()
            if self.ranks.is_main and not self.is_done(stage, mine) and ok:
                self.root.mkdir(parents=True, exist_ok=True)
                tmp = self.root / f".{stage}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(parent.stage_dir(stage), tmp)
                shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
                os.replace(tmp, self.stage_dir(stage))
                self.log(f"[{stage}] copied from {parent.stage_dir(stage)}")
        self.ranks.barrier()

    def train(self, mode: Optional[str] = None, stage: Optional[str] = None) -> Path:
        """Train from the base model with `mode` (default `train.mode`), or a `compare.variants` name.
        Returns the stage folder (`stage`, default `train-<mode>`)."""
        mode = mode or self.cfg.train.mode
        if mode in self.cfg.compare.variants:
            sub, sub_mode = self.variant(mode)
            return sub.train(sub_mode, stage=f"train-{mode}")
        name = stage or f"train-{mode}"
        train_set = self.train_set(mode)
        fp = self.train_fp(mode)
        if self.is_done(name, fp):
            self._skip(name)
            return self.stage_dir(name)
        self.log(f"[{name}] training on {len(train_set)} examples")
        tc = self.cfg.train
        trainer = self._fit(train_set, tc.training, mode, name, fp, eval_set=self.eval_set())
        if self.ranks.is_main:
            with self.writing(name, fp, {"mode": mode}) as d:
                (d / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
                (d / "training_args.json").write_text(trainer.args.to_json_string())
                dense = (lambda: load_model(self.cfg.model)) if self.cfg.lora.qlora else None
                save_model(trainer.model, self.base.tokenizer, d, merged=tc.save_merged, dense_base=dense)
        del trainer
        release_memory()
        self.ranks.barrier()
        return self.stage_dir(name)

    def _fit(
        self,
        train_set: datasets.Dataset,
        tcfg: TrainingConfig,
        mode: str,
        name: str,
        fp: str,
        eval_set: Optional[datasets.Dataset] = None,
    ) -> Any:
        """Train a fresh LoRA copy of the base; checkpoints go to `.<name>.work/` so a killed run resumes.

        TensorBoard events (when `report_to` asks for them) go to `run_dir/tensorboard/<name>/`.
        """
        work = self.work_dir(name, fp)
        resume = last_checkpoint(work)
        set_seed(self.cfg.seed)
        model = self.base.for_training(self.cfg.lora)
        args = training_arguments(tcfg, work, self.cfg.seed, self.bf16, report_to=self.cfg.report_to,
                                  ddp_timeout=self.cfg.ddp_timeout, fp16=use_fp16(self.cfg.model.precision))
        tc = self.cfg.train
        trainer = make_trainer(
            model, self.base.tokenizer, train_set, args, mode, tc.lambda_schedule, tc.t_min, tc.t_max, tcfg.packing,
            eval_set, self.tensorboard_dir(name, fresh=resume is None),
            forget_objective=tc.forget_objective, beta=tc.beta, lambda_warmup=tc.lambda_warmup,
        )
        if resume:
            self.log(f"[{name}] resuming from {resume}")
        trainer.train(resume_from_checkpoint=resume)
        self.ranks.barrier()
        if self.ranks.is_main:
            shutil.rmtree(work, ignore_errors=True)
        return trainer

    # ------------------------------------------------------------ evaluate

    def evaluate(self, target: Optional[str] = None) -> dict[str, Any]:
        """Evaluate a model with `cfg.eval` (see `tokenforget.benchmarks`); stage `eval-<name>`.

        `target`: None or `base` = the base model; `sft`/`ignore`/`forget` = the finished stage
        `train-<mode>`; anything else = a folder with a merged model, a LoRA adapter or a train stage.
        The results are reused while the model (its stage fingerprint) and the eval settings are the same.
        """
        from tokenforget import benchmarks

        if target in self.cfg.compare.variants:
            sub, _ = self.variant(target)
            if sub.root != self.root:  # a variant with a partition of its own: its folder holds its stages
                return sub.evaluate(target)
        name, model_fp, load = self._eval_target(target)
        ec = {k: v for k, v in to_dict(self.cfg.eval).items() if k != "checkpoint"}
        rendering = {k: getattr(self.cfg.data, k) for k in ("max_length", "chat_template", "system_prompt")}
        sources = [file_digest(s) for s in (benchmarks.gsm8k_source(self.cfg.eval), self.cfg.eval.fewshot_path)]
        extra = [file_digest(p) for p in (*self.cfg.eval.nll, *self.cfg.eval.multiple_choice)]
        fp = fingerprint("eval", model_fp, ec, rendering, sources, extra, self.cfg.seed, self.bf16)
        stage = f"eval-{name}"
        if self.is_done(stage, fp):
            self._skip(stage)
            return json.loads((self.stage_dir(stage) / "results.json").read_text())
        self.log(f"[{stage}] evaluating")
        model = load().to(device())
        results = benchmarks.evaluate_model(
            model, self.base.tokenizer, self.cfg.eval, self.cfg.data, self.bf16, self.cfg.seed, self.log
        )
        del model
        release_memory()
        if self.ranks.is_main:
            with self.writing(stage, fp, {"target": target or "base"}) as d:
                (d / "results.json").write_text(json.dumps(results, indent=2))
        self.ranks.barrier()
        return results

    def _eval_target(self, target: Optional[str]) -> tuple[str, str, Callable[[], torch.nn.Module]]:
        """(stage suffix, fingerprint of the model, loader) for an eval target."""
        if target in (None, "base"):
            return "base", fingerprint("base", stable_view("model", to_dict(self.cfg.model))), self.base.frozen
        trained = (*OBJECTIVES, *self.cfg.compare.variants)  # names of train stages
        stage = self.stage_dir(f"train-{target}") if target in trained else Path(target).expanduser()
        if not stage.is_dir():
            hint = f"; train it first: tokenforget train --train.mode {target}" if target in trained else ""
            raise RunFolderError(f"eval.checkpoint: '{stage}' does not exist{hint}")
        record = stage / STAGE_FILE
        model_fp = json.loads(record.read_text())["fingerprint"] if record.is_file() else fingerprint("folder", _folder_digest(stage))
        name = target if target in trained else stage.resolve().name
        return name, model_fp, lambda: self._load_model_folder(stage)

    def _load_model_folder(self, folder: Path) -> torch.nn.Module:
        """A merged model (`config.json`), a LoRA adapter on the base (`adapter_config.json`), or a train
        stage folder (its `model/`, else its `adapter/`)."""
        from transformers import AutoModelForCausalLM

        for sub in ("model", "adapter"):
            if (folder / sub).is_dir():
                return self._load_model_folder(folder / sub)
        if (folder / "adapter_config.json").is_file():
            from peft import PeftModel

            return PeftModel.from_pretrained(self.base.fresh(), str(folder)).merge_and_unload()
        if (folder / "config.json").is_file():
            return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        raise RunFolderError(f"eval.checkpoint: '{folder}' holds no model (config.json) and no LoRA adapter")

    # ------------------------------------------------------------ all

    def run_all(self) -> Path:
        """Every stage the configured mode needs."""
        return self.train()


def release_memory() -> None:
    """Free what a finished stage left behind before the next one starts.

    A Trainer holds reference cycles (callbacks, accelerator), so its model and optimizer wait for the cycle
    collector; and glibc keeps freed heap pages, so a `compare` process's resident memory stayed at the peak
    of its first training through every later stage (12 GB for SmolLM2-135M). `malloc_trim` hands them back.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def train_view(tc: Any, mode: str) -> dict[str, Any]:
    """The train settings a training of `mode` depends on, for its fingerprint: the added fields only where
    they matter (the forgetting term for `forget`, the warm-up for `warmup_constant`) and not at default."""
    view = stable_view("train", to_dict(tc))
    if mode != "forget":
        view.pop("forget_objective", None)
        view.pop("beta", None)
    if tc.lambda_schedule != "warmup_constant":
        view.pop("lambda_warmup", None)
    if tc.forget_objective in ("ga", "unlikelihood"):
        view.pop("beta", None)
    return view


def cross_fit_folds(n: int, folds: int, fraction: float, size: Optional[int], seed: int) -> dict[str, list]:
    """Seeded K-fold plan: `fold_of[i]` is example i's fold; `trained_on[k]` the sorted examples reference k
    trains on, `size` (or round(fraction x n)) drawn from the examples of the other folds (all when fewer).

    Raises:
        ConfigError: fewer examples than folds.
    """
    if n < folds:
        raise ConfigError(f"config field 'reference.folds': {folds} folds need at least {folds} examples, got {n}")
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[np.random.default_rng(seed).permutation(n)] = np.arange(n) % folds  # sizes differ by at most 1
    want = size if size is not None else max(1, round(fraction * n))
    trained_on = []
    for k in range(folds):
        others = np.flatnonzero(fold_of != k)
        pick = np.random.default_rng([seed, k]).choice(others, min(want, len(others)), replace=False)
        trained_on.append(sorted(int(i) for i in pick))
    return {"fold_of": fold_of.tolist(), "trained_on": trained_on}


def _folder_digest(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a folder's files: a cheap identity for a model folder."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


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
    """Flat arrays over every response token: `ce_base`, `ce_ref`, `token_id`, `example` (row index), `corrupt`;
    `where` (the flat positions of these tokens among all tokens, to scatter scores back) and `offsets` (where
    each example starts among all tokens)."""
    resp, offsets = flat_list_column(tokens.data.column("response_mask"))
    where = np.flatnonzero(resp)
    rows = np.repeat(np.arange(len(tokens)), np.diff(offsets))
    out = {k: flat_list_column(scores.data.column(k))[0][where] for k in ("ce_base", "ce_ref")}
    out["token_id"] = flat_list_column(tokens.data.column("input_ids"))[0][where]
    out["corrupt"] = flat_list_column(tokens.data.column("corrupt"))[0][where].astype(bool)
    return {**out, "example": rows[where], "where": where, "offsets": offsets}


def with_method_scores(tokens: datasets.Dataset, raw: datasets.Dataset, method: str) -> datasets.Dataset:
    """`ce_base`, `ce_ref` and `score` per example: the method's score on response tokens, 0 elsewhere.

    Raw scores that already carry a `score` column (precomputed) keep it as it is; cross-fitted ones keep
    `scored_by`."""
    keep = [c for c in ("scored_by", "ce_base", "ce_ref") if c in raw.column_names]
    if "score" in raw.column_names:
        return raw.select_columns([*keep, "score"])
    from tokenforget.score_methods import apply_method

    a = response_arrays(tokens, raw)
    flat = np.zeros(a["offsets"][-1], dtype=np.float32)
    flat[a["where"]] = apply_method(method, a["ce_base"], a["ce_ref"], a["token_id"], a["example"])
    table = raw.data.table.select(keep).append_column("score", _list_column(a["offsets"], flat))
    return datasets.Dataset(table)


def read_precomputed(path: str, tokens: datasets.Dataset) -> datasets.Dataset:
    """User-supplied per-token scores (`score.precomputed_path`), checked row by row against the tokenized data:
    same number of rows, same `input_ids`, one score per token. CE columns are left at 0."""
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    if not p.is_file():
        raise data_mod.DataError(f"score.precomputed_path: '{path}' does not exist")
    table = pq.read_table(p)
    missing = [c for c in ("input_ids", "score") if c not in table.column_names]
    if missing:
        raise data_mod.DataError(f"{p}: missing column(s) {missing}; precomputed scores need input_ids and score")
    if table.num_rows != len(tokens):
        raise data_mod.DataError(f"{p}: {table.num_rows} rows, but the data has {len(tokens)} tokenized examples")
    ids, id_offsets = flat_list_column(table.column("input_ids"))
    ours, our_offsets = flat_list_column(tokens.data.column("input_ids"))
    sc, sc_offsets = flat_list_column(table.column("score"))
    for name, offs in (("input_ids", id_offsets), ("score", sc_offsets)):
        bad = np.flatnonzero(np.diff(offs) != np.diff(our_offsets))
        if bad.size:
            raise data_mod.DataError(f"{p} row {bad[0]}: {np.diff(offs)[bad[0]]} {name} entries, but the example has {np.diff(our_offsets)[bad[0]]} tokens")
    differs = np.flatnonzero(ids != ours)
    if differs.size:
        row = int(np.searchsorted(our_offsets, differs[0], side="right") - 1)
        raise data_mod.DataError(f"{p} row {row}: input_ids differ from the tokenized data (other data, order or tokenizer)")
    if not np.all(np.isfinite(sc)):
        raise data_mod.DataError(f"{p}: scores contain NaN or infinite values")
    zeros = _list_column(our_offsets, np.zeros(len(ours), np.float32))
    return datasets.Dataset(pa.table({"ce_base": zeros, "ce_ref": zeros, "score": _list_column(our_offsets, sc.astype(np.float32))}))


def zero_scores(tokens: datasets.Dataset) -> datasets.Dataset:
    """`ce_base`, `ce_ref` and `score` all 0, shaped like the tokens (for a partition that ranks nothing)."""
    _, offsets = flat_list_column(tokens.data.column("input_ids"))
    zeros = _list_column(offsets, np.zeros(int(offsets[-1]), np.float32))
    return datasets.Dataset(pa.table({"ce_base": zeros, "ce_ref": zeros, "score": zeros}))


def known_bad_tokens(tokens: datasets.Dataset) -> np.ndarray:
    """Flat 0/1 flags of the tokens known to be noise: the `corrupt` mask (injected noise), and every token of
    an example labelled `is_correct: false` (natural noise, labelled per example). An error when there are none."""
    corrupt, offsets = flat_list_column(tokens.data.column("corrupt"))
    bad = corrupt.astype(bool)
    if "is_correct" in tokens.column_names:
        wrong = np.asarray(tokens["is_correct"]) == 0  # (E,)
        bad |= np.repeat(wrong, np.diff(offsets))
    if not bad.any():
        raise ConfigError("config field 'partition.selection': 'oracle' needs data with known noise "
                          "(data.corrupt_fraction > 0, or records labelled is_correct: false)")
    return bad


def _list_column(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def _sft_classes(tokens: datasets.Dataset) -> datasets.Dataset:
    """Every response token is a learn token."""
    return tokens.map(lambda ex: {"token_class": [LEARN * m for m in ex["response_mask"]]}, desc="classes")


def _with_classes(tokens: datasets.Dataset, classes: datasets.Dataset) -> datasets.Dataset:
    return datasets.concatenate_datasets([tokens, classes], axis=1)  # column-wise, no copy through Python


def _sft_from_classes(exported: datasets.Dataset) -> datasets.Dataset:
    """Every token that has a class (+1 or -1) becomes a learn token: plain SFT on the same tokens."""
    return exported.map(
        lambda ex: {"token_class": [LEARN if c != NO_LOSS else NO_LOSS for c in ex["token_class"]]}, desc="classes"
    )
