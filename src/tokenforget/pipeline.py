"""The run folder: each stage's output written atomically with a fingerprint of its inputs.

    run_dir/
      config.json   the RunConfig of the last stage written here
      data/         tokenized examples (Arrow): input_ids, response_mask, corrupt, example
      reference/    the reference model's LoRA adapter (or full model)
      scores/       per-token ce_base, ce_ref, score (Arrow, float32)
      partition/    per-token token_class (Arrow) + stats.json
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
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import numpy as np
import pyarrow as pa
import torch
from transformers import set_seed

from tokenforget import data as data_mod
from tokenforget import labels as labels_mod
from tokenforget.config import ConfigError, RunConfig, TrainingConfig, UserError, to_dict
from tokenforget.losses import FORGET, LEARN, NO_LOSS
from tokenforget.models import BaseModel, add_lora, check_qlora, device, load_model, use_bf16
from tokenforget.partition import flat_list_column, flat_token_classes, streaming_threshold
from tokenforget.score import score_tokens
from tokenforget.train import last_checkpoint, make_trainer, save_model, training_arguments

STAGE_FILE = "stage.json"
CONFIG_FILE = "config.json"
CE_FEATURES = datasets.Features({k: datasets.Sequence(datasets.Value("float32")) for k in ("ce_base", "ce_ref")})


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


@dataclass
class Ranks:
    """This process's place among the processes of a `torchrun` / `accelerate launch` job."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def detect() -> "Ranks":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks()
        from accelerate import PartialState  # initialises the process group (gloo on CPU)

        state = PartialState(cpu=not torch.cuda.is_available())
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
        self.ranks = ranks or Ranks.detect()
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
        return fingerprint("data", to_dict(c.data), file_digest(c.data.path), to_dict(c.model))

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

    def reference_fp(self) -> str:
        c = self.cfg
        if c.reference.checkpoint:
            return fingerprint("reference-checkpoint", _folder_digest(self._checkpoint_dir()), to_dict(c.model))
        ref = to_dict(c.reference)
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

    def reference(self) -> Path:
        """Train (or reuse) the reference model: SFT of the base on a subset. Returns its folder."""
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
        self.ranks.barrier()
        return self.stage_dir("reference")

    # ------------------------------------------------------------ score

    def raw_score_fp(self) -> str:
        """Fingerprint of the scoring pass (CE_base, CE_ref), which does not depend on `score.method`."""
        sc = self.cfg.score
        if sc.precomputed_path:
            return fingerprint("precomputed", self.data_fp(), file_digest(sc.precomputed_path))
        return fingerprint("score", self.reference_fp(), sc.batch_size, sc.shard_size, self.bf16)

    def score_fp(self) -> str:
        return fingerprint("score", self.raw_score_fp(), self.cfg.score.method)

    def score(self) -> datasets.Dataset:
        """Per-token CE under base and reference, and the `score.method` score, for every training example.

        The examples are cut into shards of `score.shard_size`; rank r scores shards r, r + world, ...
        and writes each one as it finishes, so a killed run resumes at the first missing shard. Rank 0
        joins the shards in example order, then applies the method over the whole data set. A finished
        stage of the same scoring pass with another method is rescored without a forward pass.
        """
        if "scores" in self._loaded:
            return self._loaded["scores"]
        tokens = self.data()
        ref_dir = None if self.cfg.score.precomputed_path else self.reference()
        fp = self.score_fp()
        if self.is_done("scores", fp):
            self._skip("scores")
        else:
            raw = self._raw_scores(tokens, ref_dir)
            if self.ranks.is_main:
                table = with_method_scores(tokens, raw, self.cfg.score.method)
                n_tokens = int(sum(map(sum, tokens["response_mask"])))
                record = {"tokens": n_tokens, "raw_fingerprint": self.raw_score_fp(), "method": self.cfg.score.method}
                with self.writing("scores", fp, record) as d:
                    table.save_to_disk(str(d / "scores"))
                shutil.rmtree(self.root / ".scores.work", ignore_errors=True)
            self.ranks.barrier()
        scores = self._load("scores", "scores")
        check_aligned(tokens, scores, self.stage_dir("scores"))
        return scores

    def _raw_scores(self, tokens: datasets.Dataset, ref_dir: Optional[Path]) -> Optional[datasets.Dataset]:
        """`ce_base`, `ce_ref` (and `score` for precomputed scores) per example; None on ranks other than 0."""
        sc, raw_fp = self.cfg.score, self.raw_score_fp()
        done = self.stage_dir("scores") / STAGE_FILE
        if done.is_file() and json.loads(done.read_text()).get("raw_fingerprint") == raw_fp:
            self.log("[scores] same scoring pass, new score.method: rescoring without a forward pass")
            done_scores = datasets.load_from_disk(str(self.stage_dir("scores") / "scores"))
            return done_scores if sc.precomputed_path else done_scores.select_columns(["ce_base", "ce_ref"])
        if sc.precomputed_path:
            return read_precomputed(sc.precomputed_path, tokens) if self.ranks.is_main else None
        work = self.work_dir("scores", raw_fp)
        shards = shard_ranges(len(tokens), sc.shard_size)
        self._score_shards(tokens, ref_dir, work, shards)  # type: ignore[arg-type]
        self.ranks.barrier()
        if not self.ranks.is_main:
            return None
        return datasets.concatenate_datasets([datasets.load_from_disk(str(work / f"shard-{s:05d}")) for s in range(len(shards))])

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
        for s in todo:
            lo, hi = shards[s]
            shard = tokens.select(range(lo, hi))
            ce_base, ce_ref = score_tokens(
                ref, shard["input_ids"], self.cfg.score.batch_size, self.bf16, base=base,
                pad_id=self.base.tokenizer.pad_token_id, masks=shard["response_mask"],
            )
            cols = {"ce_base": ce_base, "ce_ref": ce_ref}
            tmp = work / f".shard-{s:05d}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            datasets.Dataset.from_dict({k: [v.tolist() for v in vs] for k, vs in cols.items()}, features=CE_FEATURES).save_to_disk(str(tmp))
            os.replace(tmp, work / f"shard-{s:05d}")

    def _load_reference(self, ref_dir: Path) -> tuple[torch.nn.Module, Optional[torch.nn.Module]]:
        """(reference, separate base or None). A LoRA reference is the base plus its adapter.

        `ref_dir` is a stage folder (`adapter/` preferred, else `model/`), an adapter folder or a model folder.
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        adapter = ref_dir / "adapter" if (ref_dir / "adapter").is_dir() else ref_dir
        if (adapter / "adapter_config.json").is_file():
            return PeftModel.from_pretrained(self.base.fresh(), str(adapter)).to(device()), None
        full = ref_dir / "model" if (ref_dir / "model").is_dir() else ref_dir
        if not (full / "config.json").is_file():
            raise RunFolderError(f"reference: '{ref_dir}' holds no LoRA adapter (adapter_config.json) and no model (config.json)")
        return AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).to(device()), self.base.fresh().to(device())

    # ------------------------------------------------------------ partition

    def partition_fp(self) -> str:
        return fingerprint("partition", self.score_fp(), to_dict(self.cfg.partition))

    def partition(self) -> datasets.Dataset:
        """Token classes (+1/-1/0) for every training example, by global ranking of the scores."""
        if "partition" in self._loaded:
            return self._loaded["partition"]
        tokens = self.data()
        scores = self.score()
        fp = self.partition_fp()
        if self.is_done("partition", fp):
            self._skip("partition")
        elif self.ranks.is_main:
            table, stats = (self._partition_streaming if self.cfg.partition.streaming else self._partition_exact)(
                tokens, scores
            )
            self.log(f"[partition] {stats['n_positive']} positive, {stats['n_negative']} negative of {stats['n_tokens']} tokens")
            with self.writing("partition", fp, {}) as d:
                datasets.Dataset(table).save_to_disk(str(d / "classes"))
                (d / "stats.json").write_text(json.dumps(stats, indent=2))
        self.ranks.barrier()
        return self._load("partition", "classes")

    def _partition_exact(self, tokens: datasets.Dataset, scores: datasets.Dataset) -> tuple[pa.Table, dict[str, Any]]:
        """All scores in memory as one flat array: exact round(rho * N) positives."""
        flat_scores, offsets = flat_list_column(scores.data.column("score"))
        flat_resp, _ = flat_list_column(tokens.data.column("response_mask"))
        classes, stats = flat_token_classes(flat_scores, flat_resp, self.cfg.partition.rho)
        return pa.table({"token_class": _list_column(offsets, classes)}), stats.__dict__

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
        return json.loads((self.stage_dir("partition") / "stats.json").read_text())

    # ------------------------------------------------------------ labels

    def labels_fp(self) -> str:
        return fingerprint("labels", labels_mod.FORMAT, self.partition_fp())

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
            )
            with self.writing("labels", fp, {"examples": len(tokens)}) as d:
                path = labels_mod.write_labels(table, d)
            self.log(f"[labels] {len(tokens)} examples -> {self.stage_dir('labels') / path.name}")
        self.ranks.barrier()
        return self.stage_dir("labels") / labels_mod.LABELS_FILE

    # ------------------------------------------------------------ train

    def train_fp(self, mode: str) -> str:
        c = self.cfg
        if c.train.labels_path:
            upstream = "labels:" + file_digest(str(labels_mod.labels_file(c.train.labels_path)))
        else:
            upstream = self.data_fp() if mode == "sft" else self.partition_fp()
        held_out = file_digest(c.train.eval_path)
        return fingerprint("train", mode, upstream, held_out, to_dict(c.train), to_dict(c.lora), c.seed, self.bf16)

    def train_set(self, mode: str) -> datasets.Dataset:
        """`input_ids` and `token_class` to train `mode` on; ensures the stages they come from.

        From `train.labels_path` when set; else `sft` needs only the data (every response token is a learn
        token) and `forget`/`ignore` the partition, whose labels file is exported on the way.
        """
        if self.cfg.train.labels_path:
            exported = labels_mod.read_labels(self.cfg.train.labels_path, self.base.tokenizer)
            return _sft_from_classes(exported) if mode == "sft" else exported
        tokens = self.data()
        if mode == "sft":
            return _sft_classes(tokens)
        self.labels()
        return _with_classes(tokens, self.partition())

    def eval_set(self) -> Optional[datasets.Dataset]:
        """The held-out `train.eval_path`, tokenized like the data, every response token a learn token."""
        tc = self.cfg.train
        if tc.eval_path is None:
            return None
        records = data_mod.load_records(self.cfg.data, tc.eval_path, tc.eval_split)
        cols, _ = data_mod.tokenize_records(self.base.tokenizer, records, self.cfg.data)
        return _sft_classes(datasets.Dataset.from_dict(cols))

    def train(self, mode: Optional[str] = None) -> Path:
        """Train from the base model with `mode` (default `train.mode`). Returns the stage folder."""
        mode = mode or self.cfg.train.mode
        name = f"train-{mode}"
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
        model = add_lora(self.base.fresh(), self.cfg.lora)
        args = training_arguments(tcfg, work, self.cfg.seed, self.bf16, report_to=self.cfg.report_to)
        tc = self.cfg.train
        trainer = make_trainer(
            model, self.base.tokenizer, train_set, args, mode, tc.lambda_schedule, tc.t_min, tc.t_max, tcfg.packing,
            eval_set, self.tensorboard_dir(name, fresh=resume is None),
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
        if self.ranks.is_main:
            with self.writing(stage, fp, {"target": target or "base"}) as d:
                (d / "results.json").write_text(json.dumps(results, indent=2))
        self.ranks.barrier()
        return results

    def _eval_target(self, target: Optional[str]) -> tuple[str, str, Callable[[], torch.nn.Module]]:
        """(stage suffix, fingerprint of the model, loader) for an eval target."""
        if target in (None, "base"):
            return "base", fingerprint("base", to_dict(self.cfg.model)), self.base.fresh
        stage = self.stage_dir(f"train-{target}") if target in ("sft", "ignore", "forget") else Path(target).expanduser()
        if not stage.is_dir():
            hint = f"; train it first: tokenforget train --train.mode {target}" if target in ("sft", "ignore", "forget") else ""
            raise RunFolderError(f"eval.checkpoint: '{stage}' does not exist{hint}")
        record = stage / STAGE_FILE
        model_fp = json.loads(record.read_text())["fingerprint"] if record.is_file() else fingerprint("folder", _folder_digest(stage))
        name = target if target in ("sft", "ignore", "forget") else stage.resolve().name
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

    Raw scores that already carry a `score` column (precomputed) keep it as it is."""
    if "score" in raw.column_names:
        return raw.select_columns(["ce_base", "ce_ref", "score"])
    from tokenforget.score_methods import apply_method

    a = response_arrays(tokens, raw)
    flat = np.zeros(a["offsets"][-1], dtype=np.float32)
    flat[a["where"]] = apply_method(method, a["ce_base"], a["ce_ref"], a["token_id"], a["example"])
    table = raw.data.table.select(["ce_base", "ce_ref"]).append_column("score", _list_column(a["offsets"], flat))
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
