"""The run folder: each stage's output written atomically with a fingerprint of its inputs.

    run_dir/
      config.json   the RunConfig of the last stage written here
      data/         tokenized examples (Arrow): input_ids, response_mask, corrupt, example
      reference/    the reference model's LoRA adapter (or full model)
      scores/       per-token ce_base, ce_ref, score (Arrow)
      partition/    per-token token_class (Arrow) + stats.json
      train-<mode>/ adapter/, model/ (merged), log_history.json, summary.json
      tensorboard/  <stage>/ TensorBoard events of each training (reference, train-<mode>)
      report/       report.html and its PNG plots (`tokenforget report`)

A stage is skipped when `stage.json` in its folder holds the fingerprint of its current inputs; a stale
or half-written stage is redone. Outputs are built in a hidden temporary folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import datasets
import numpy as np
import torch
from transformers import set_seed

from tokenforget import data as data_mod
from tokenforget.config import RunConfig, to_dict
from tokenforget.losses import LEARN
from tokenforget.models import BaseModel, add_lora, device, use_bf16
from tokenforget.partition import token_classes
from tokenforget.score import score_tokens
from tokenforget.train import last_checkpoint, make_trainer, save_model, training_arguments

STAGE_FILE = "stage.json"
CONFIG_FILE = "config.json"  # the RunConfig of the last command run in this folder


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


class Run:
    """One run folder and the stages that fill it. Stages call their inputs' stages first."""

    def __init__(self, cfg: RunConfig, base: Optional[BaseModel] = None, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.root = Path(cfg.run_dir)
        self.base = base or BaseModel(cfg.model)
        self.log = log
        self.bf16 = use_bf16(cfg.model.precision)
        self.skipped: list[str] = []
        self._loaded: dict[str, datasets.Dataset] = {}  # stage outputs already read in this process

    # ------------------------------------------------------------ bookkeeping

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
        else:
            records = data_mod.load_records(self.cfg.data)
            cols, rep = data_mod.tokenize_records(self.base.tokenizer, records, self.cfg.data)
            self.log(f"[data] {rep.kept} examples tokenized, {rep.skipped_no_response} skipped (no response token left)")
            with self.writing("data", fp, {"kept": rep.kept, "skipped_no_response": rep.skipped_no_response}) as d:
                datasets.Dataset.from_dict(cols).save_to_disk(str(d / "tokens"))
        return self._load("data", "tokens")

    # ------------------------------------------------------------ reference

    def reference_fp(self) -> str:
        c = self.cfg
        ref = to_dict(c.reference)
        return fingerprint("reference", self.data_fp(), ref, file_digest(c.reference.path), to_dict(c.lora), c.seed)

    def _reference_examples(self, tokens: datasets.Dataset) -> datasets.Dataset:
        rc = self.cfg.reference
        if rc.path:
            records = data_mod.load_records(self.cfg.data, rc.path)
            cols, _ = data_mod.tokenize_records(self.base.tokenizer, records, self.cfg.data)
            return datasets.Dataset.from_dict(cols)
        idx = data_mod.reference_subset(len(tokens), rc.fraction, rc.size, self.cfg.seed)
        return tokens.select(idx)

    def reference(self) -> Path:
        """Train (or reuse) the reference model: SFT of the base on a subset. Returns its folder."""
        tokens = self.data()
        fp = self.reference_fp()
        if self.is_done("reference", fp):
            self._skip("reference")
            return self.stage_dir("reference")
        subset = self._reference_examples(tokens)
        self.log(f"[reference] SFT on {len(subset)} examples")
        with self.writing("reference", fp, {"examples": len(subset)}) as d:
            model = self._fit("reference", _sft_classes(subset), self.cfg.reference.training, "sft", fp)
            save_model(model, self.base.tokenizer, d, merged=False)
        return self.stage_dir("reference")

    # ------------------------------------------------------------ score

    def score_fp(self) -> str:
        return fingerprint("score", self.reference_fp(), to_dict(self.cfg.score), self.bf16)

    def score(self) -> datasets.Dataset:
        """Per-token CE under base and reference, and their difference, for every training example."""
        if "scores" in self._loaded:
            return self._loaded["scores"]
        tokens = self.data()
        ref_dir = self.reference()
        fp = self.score_fp()
        if self.is_done("scores", fp):
            self._skip("scores")
        else:
            ref, base = self._load_reference(ref_dir)
            ids = tokens["input_ids"]
            ce_base, ce_ref = score_tokens(
                ref, ids, self.cfg.score.batch_size, self.bf16, base=base, pad_id=self.base.tokenizer.pad_token_id
            )
            cols = {"ce_base": ce_base, "ce_ref": ce_ref, "score": [b - r for b, r in zip(ce_base, ce_ref)]}
            with self.writing("scores", fp, {"tokens": int(sum(map(sum, tokens["response_mask"])))}) as d:
                datasets.Dataset.from_dict({k: [v.tolist() for v in vs] for k, vs in cols.items()}).save_to_disk(
                    str(d / "scores")
                )
        return self._load("scores", "scores")

    def _load_reference(self, ref_dir: Path) -> tuple[torch.nn.Module, Optional[torch.nn.Module]]:
        """(reference, separate base or None). A LoRA reference is the base plus its adapter."""
        if (ref_dir / "adapter").is_dir():
            from peft import PeftModel

            return PeftModel.from_pretrained(self.base.fresh(), str(ref_dir / "adapter")).to(device()), None
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(str(ref_dir / "model"), dtype=torch.float32)
        return full.to(device()), self.base.fresh().to(device())

    # ------------------------------------------------------------ partition

    def partition_fp(self) -> str:
        return fingerprint("partition", self.score_fp(), self.cfg.partition.rho)

    def partition(self) -> datasets.Dataset:
        """Token classes (+1/-1/0) for every training example, by global ranking of the scores."""
        if "partition" in self._loaded:
            return self._loaded["partition"]
        tokens = self.data()
        scores = self.score()
        fp = self.partition_fp()
        if self.is_done("partition", fp):
            self._skip("partition")
        else:
            arrays = [np.asarray(s, np.float32) for s in scores["score"]]
            classes, stats = token_classes(arrays, tokens["response_mask"], self.cfg.partition.rho)
            self.log(f"[partition] {stats.n_positive} positive, {stats.n_negative} negative of {stats.n_tokens} tokens")
            with self.writing("partition", fp, {}) as d:
                datasets.Dataset.from_dict({"token_class": [c.tolist() for c in classes]}).save_to_disk(
                    str(d / "classes")
                )
                (d / "stats.json").write_text(json.dumps(stats.__dict__, indent=2))
        return self._load("partition", "classes")

    def partition_stats(self) -> dict[str, Any]:
        return json.loads((self.stage_dir("partition") / "stats.json").read_text())

    # ------------------------------------------------------------ train

    def train_fp(self, mode: str) -> str:
        c = self.cfg
        upstream = self.data_fp() if mode == "sft" else self.partition_fp()
        return fingerprint("train", mode, upstream, to_dict(c.train), to_dict(c.lora), c.seed, self.bf16)

    def train(self, mode: Optional[str] = None) -> Path:
        """Train from the base model with `mode` (default `train.mode`). Returns the stage folder.

        `sft` needs no scores: every response token is a learn token. `forget` and `ignore` use the partition.
        """
        mode = mode or self.cfg.train.mode
        name = f"train-{mode}"
        tokens = self.data()
        classes = None if mode == "sft" else self.partition()
        fp = self.train_fp(mode)
        if self.is_done(name, fp):
            self._skip(name)
            return self.stage_dir(name)
        train_set = _sft_classes(tokens) if classes is None else _with_classes(tokens, classes)
        self.log(f"[{name}] training on {len(train_set)} examples")
        with self.writing(name, fp, {"mode": mode}) as d:
            tc = self.cfg.train
            model, trainer = self._fit(name, train_set, tc.training, mode, fp, keep_trainer=True)
            (d / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
            save_model(model, self.base.tokenizer, d, merged=tc.save_merged)
        return self.stage_dir(name)

    def _fit(
        self,
        stage: str,
        train_set: datasets.Dataset,
        tcfg: Any,
        mode: str,
        fp: str,
        keep_trainer: bool = False,
    ) -> Any:
        """Train a fresh LoRA copy of the base; checkpoints go to `.<stage>.work` so a killed run resumes.

        TensorBoard events (when `report_to` asks for them) go to `run_dir/tensorboard/<stage>/`.
        """
        work = self.root / f".{stage}.work"
        marker = work / "fingerprint"
        if work.exists() and (not marker.is_file() or marker.read_text() != fp):
            shutil.rmtree(work)  # checkpoints of different inputs: never resume from them
        work.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp)
        resume = last_checkpoint(work)
        log_dir = self.root / "tensorboard" / stage
        if resume is None:
            shutil.rmtree(log_dir, ignore_errors=True)  # a fresh training: old curves would mix with the new
        set_seed(self.cfg.seed)
        model = add_lora(self.base.fresh(), self.cfg.lora)
        args = training_arguments(tcfg, work, self.cfg.seed, self.bf16, report_to=self.cfg.report_to)
        tc = self.cfg.train
        trainer = make_trainer(
            model, self.base.tokenizer, train_set, args, mode, tc.lambda_schedule, tc.t_min, tc.t_max, log_dir
        )
        trainer.train(resume_from_checkpoint=resume)
        model = trainer.model
        shutil.rmtree(work, ignore_errors=True)
        return (model, trainer) if keep_trainer else model

    # ------------------------------------------------------------ all

    def save_config(self) -> None:
        """Record the run's config in the run folder (for `report` and for people reading the folder)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(to_dict(self.cfg), indent=2))
        os.replace(tmp, self.root / CONFIG_FILE)

    def run_all(self) -> Path:
        """Every stage the configured mode needs."""
        return self.train()


def _sft_classes(tokens: datasets.Dataset) -> datasets.Dataset:
    """Every response token is a learn token."""
    return tokens.map(lambda ex: {"token_class": [LEARN * m for m in ex["response_mask"]]}, desc="classes")


def _with_classes(tokens: datasets.Dataset, classes: datasets.Dataset) -> datasets.Dataset:
    return tokens.add_column("token_class", classes["token_class"])
