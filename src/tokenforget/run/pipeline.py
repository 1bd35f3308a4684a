"""The pipeline: which stage feeds which, in the order of the data's journey, over one run folder.

Each stage is a function of its own module; this file only says what each one reads, what its fingerprint is
made of, and passes it to the one loop every stage goes through (`RunFolder.ensure`: reuse the stage when its
`stage.json` holds the fingerprint of its current inputs, else build it and commit it atomically):

    stage folder           built by (modules under stages/, the trainer)                        reads
    data/                  data.load_records -> noise.corrupt -> data.tokenize_records         the JSONL or Hub data
    reference/             reference.train_reference (or train_folds; or a checkpoint)        data
    reference-round<r>/    reference.evolved_subset -> trainer.fit (`ignore`)                 partition of round r - 1
    scores/                score.score_shards -> score.with_method_scores                     data, reference
    partition/             partition.partition_exact (or partition_streaming)                 data, scores
    labels/                labels.labels_table                                                data, scores, partition
    train-<mode>/          train_sets (the mode's token classes) -> trainer.fit               data (sft, dft) or partition
    eval-<model>/          evaluate.evaluate_model                                            a train stage or the base

`Run` asks for a stage's inputs first, so `Run(cfg).train()` runs (or reuses) everything before it. The layout
of the folder is described in `runfolder`; compare's variants (one run with other settings) are in `run.variants`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import datasets
import torch

from tokenforget import trainer as train_mod
from tokenforget.columns import has_base_ce
from tokenforget.config import RunConfig, to_dict
from tokenforget.model.loading import (
    BaseModel, check_attention, check_qlora, checkpoint_dir, device, load_model, use_bf16,
)
from tokenforget.objectives import OBJECTIVES, needs_partition
from tokenforget.run.fingerprints import StageFingerprints
from tokenforget.runfolder import (
    STAGE_FILE,
    Ranks,
    RunFolder,
    RunFolderError,
    fingerprint,
    folder_digest,
    release_memory,
    round_stage,
    shard_ranges,
    stable_view,
)
from tokenforget.stages import (
    data as data_mod,
    evaluate as eval_mod,
    labels as labels_mod,
    noise,
    partition as part_mod,
    partition_streaming as stream_mod,
    reference as ref_mod,
    score as score_mod,
    train_sets,
    verdicts,
)


class Run(StageFingerprints):
    """One run folder and the stages that fill it. Stages call their inputs' stages first."""

    def __init__(self, cfg: RunConfig, base: Optional[BaseModel] = None, log: Callable[[str], None] = print,
                 ranks: Optional[Ranks] = None):
        self.cfg = cfg
        self.base = base or BaseModel(cfg.model, qlora=cfg.lora.qlora)
        ranks = ranks or Ranks.detect(cfg.ddp_timeout)
        self.log = log if ranks.is_main else (lambda _msg: None)
        self.folder = RunFolder(Path(cfg.run_dir), to_dict(cfg), ranks, self.log)
        self.bf16 = use_bf16(cfg.model.precision)
        self.setup = train_mod.FitSetup(self.base, cfg.lora, cfg.train, cfg.seed, self.bf16, self.folder, cfg.report_to,
                                        cfg.ddp_timeout)
        self._loaded: dict[str, datasets.Dataset] = {}  # stage outputs already read in this process
        self.folder.check_same_run(cfg.overwrite)
        if cfg.lora.qlora:  # settings that would fail only when their stage starts fail now, before any write
            check_qlora(cfg.model)
        check_attention(cfg.model)
        train_mod.check_training_args(cfg, self.root / ".check", self.bf16)

    # the run folder's bookkeeping, for callers that hold a Run
    root = property(lambda self: self.folder.root)
    ranks = property(lambda self: self.folder.ranks)
    skipped = property(lambda self: self.folder.reused)

    def stage_dir(self, name: str) -> Path:
        return self.folder.stage_dir(name)

    def is_done(self, name: str, fp: str) -> bool:
        return self.folder.is_done(name, fp)

    def reused(self, name: str) -> Path:
        self.folder.skip(name)
        return self.stage_dir(name)

    def _load(self, stage: str, sub: str) -> datasets.Dataset:
        self._loaded[stage] = datasets.load_from_disk(str(self.stage_dir(stage) / sub))
        return self._loaded[stage]

    # ------------------------------------------------------------ the stages, in the order of the data's journey

    def data(self) -> datasets.Dataset:
        """Tokenized training examples with response and corrupt masks."""
        dc = self.cfg.data

        def build() -> dict[str, Any]:
            records = data_mod.load_records(dc)
            data_mod.check_noise_keeps_labels(records, dc)
            records, n_corrupted = noise.corrupt(records, dc, self.log)
            cols, rep = data_mod.tokenize_records(self.base.tokenizer, records, dc)
            self.log(f"[data] {rep.kept} examples tokenized, {rep.skipped_no_response} skipped (no response token left)")
            return {"cols": cols, "kept": rep.kept, "skipped_no_response": rep.skipped_no_response, "corrupted": n_corrupted}

        def commit(built: dict[str, Any], d: Path) -> dict[str, Any]:
            datasets.Dataset.from_dict(built.pop("cols")).save_to_disk(str(d / "tokens"))
            return built

        if "data" not in self._loaded:
            self.folder.ensure("data", self.data_fp(), build, commit)
        return self._load("data", "tokens")

    def reference(self, rnd: int = 1) -> Path:
        """The reference model's folder: SFT of the base on a subset (`reference.folds` > 1: one per fold; round
        `rnd` > 1: a self-evolving round's, trained with `ignore` on round `rnd - 1`'s positive tokens)."""
        rc, name, fp = self.cfg.reference, round_stage("reference", rnd), self.reference_fp(rnd)
        tokens = self.data()
        if rnd > 1:
            subset = ref_mod.evolved_subset(tokens, self.partition(rnd - 1), rc, self.cfg.seed)
            return self._trained(name, fp, subset, rc.training, "ignore", {"examples": len(subset), "round": rnd})
        if rc.checkpoint:
            return checkpoint_dir(rc)
        if rc.folds > 1:
            build = lambda: ref_mod.train_folds(self.setup, tokens, rc, fp, self.folder.work_dir(name, fp), self.log)  # noqa: E731
            commit = lambda plan, d: ref_mod.write_folds(plan, self.root / f".{name}.work", d)  # noqa: E731
            out = self.folder.ensure(name, fp, build, commit, every_rank=True)
            self.folder.release_work(name)
            return out
        if self.folder.done_on_main(name, fp):  # (reference_examples may tokenize a whole file)
            return self.reused(name)
        subset = ref_mod.reference_examples(tokens, rc, self.cfg.data, self.base.tokenizer, self.cfg.seed)
        return self._trained(name, fp, train_mod.sft_classes(subset), rc.training, "sft", {"examples": len(subset)})

    def noisy_reference(self) -> Path:
        """The noisy references (`reference.noisy_folds`), stage `reference-noisy/`: cross-fitted on the training
        data itself, each example scored by the one that did not see it, for the two-reference scores."""
        rc, name, fp = self.cfg.reference, "reference-noisy", self.noisy_reference_fp()
        tokens = self.data()
        folds = replace(rc, folds=rc.noisy_folds, fraction=rc.noisy_fraction, size=None, path=None, noisy_folds=0)
        build = lambda: ref_mod.train_folds(self.setup, tokens, folds, fp, self.folder.work_dir(name, fp), self.log)  # noqa: E731
        commit = lambda plan, d: ref_mod.write_folds(plan, self.root / f".{name}.work", d)  # noqa: E731
        out = self.folder.ensure(name, fp, build, commit, every_rank=True)
        self.folder.release_work(name)
        return out

    def score(self, rnd: Optional[int] = None) -> datasets.Dataset:
        """Per-token CE under base and reference, and the `score.method` score, for every training example.

        The examples are cut into shards of `score.shard_size`; rank r scores shards r, r + world, ... and writes
        each as it finishes, so a killed run resumes at the first missing shard. Rank 0 joins the shards in example
        order and applies the method over the whole data set. A finished stage of the same scoring pass with another
        method is rescored without a forward pass. `rnd`: the self-evolving round (default: the last).
        """
        rnd = rnd or self.rounds
        name, sc = round_stage("scores", rnd), self.cfg.score
        if name in self._loaded:
            return self._loaded[name]
        tokens = self.data()
        if part_mod.SELECTIONS[self.cfg.partition.selection].reads_known_noise:  # refused before any reference
            verdicts.known_noise(tokens, self.cfg.partition.selection)
        if self.scores_unused():
            def zeros() -> datasets.Dataset:
                self.log(f"[{name}] partition.selection '{self.cfg.partition.selection}' ranks nothing: no reference, zero scores")
                return score_mod.zero_scores(tokens)

            self.folder.ensure(name, self.score_fp(rnd), zeros, lambda t, d: t.save_to_disk(str(d / "scores")) or {"unused": True})
            return self._load(name, "scores")
        ref_dir = None if sc.precomputed_path else self.reference(rnd)
        raw_fp = self.raw_score_fp(rnd)

        def build() -> Optional[datasets.Dataset]:  # every rank: each scores its own shards
            # the noisy references only where the pass runs: a copied or finished pass needs none trained
            noisy_dir = self.noisy_reference() if self.cfg.reference.noisy_folds and not sc.precomputed_path else None
            same_pass = score_mod.same_pass_scores(self.stage_dir(name), self.reusable_score_fps(rnd), bool(sc.precomputed_path))
            if same_pass is not None:
                self.log(f"[{name}] same scoring pass, new score.method: rescoring without a forward pass")
                return same_pass
            if sc.precomputed_path:
                return score_mod.read_precomputed(sc.precomputed_path, tokens) if self.ranks.is_main else None
            work, shards = self.folder.work_dir(name, raw_fp), shard_ranges(len(tokens), sc.shard_size)
            score_mod.score_shards(tokens, ref_dir, self.base, work, shards, self.ranks, sc.batch_size, self.bf16,  # type: ignore[arg-type]
                                   self.log, with_base=self.base_pass())
            if noisy_dir is not None:  # the second reference's pass: its CE only
                (work / "noisy").mkdir(exist_ok=True)
                score_mod.score_shards(tokens, noisy_dir, self.base, work / "noisy", shards, self.ranks, sc.batch_size,
                                       self.bf16, self.log, with_base=False)
            self.ranks.barrier()
            if not self.ranks.is_main:
                return None
            raw = score_mod.joined_shards(work, len(shards))
            return raw if noisy_dir is None else score_mod.with_noisy(raw, score_mod.joined_shards(work / "noisy", len(shards)))

        def commit(raw: datasets.Dataset, d: Path) -> dict[str, Any]:
            score_mod.with_method_scores(tokens, raw, sc.method, sc.spans, self.base.tokenizer).save_to_disk(str(d / "scores"))
            n_tokens = int(sum(map(sum, tokens["response_mask"])))
            made_by = self.raw_score_fp(rnd, base_pass=True) if has_base_ce(raw) else raw_fp
            return {"tokens": n_tokens, "raw_fingerprint": made_by, "method": sc.method}

        self.folder.ensure(name, self.score_fp(rnd), build, commit, every_rank=True)
        self.folder.release_work(name)
        scores = self._load(name, "scores")
        score_mod.check_aligned(tokens, scores, self.stage_dir(name))
        return scores

    def partition(self, rnd: Optional[int] = None) -> datasets.Dataset:
        """Token classes (+1/-1/0) for every training example, by `partition.selection` over the scores (and
        `token_weight` for the soft selection). `rnd`: the self-evolving round (default: the last)."""
        rnd = rnd or self.rounds
        name = round_stage("partition", rnd)
        if name in self._loaded:
            return self._loaded[name]
        tokens, scores = self.data(), self.score(rnd)

        def commit(built: tuple[Any, dict[str, Any]], d: Path) -> None:
            table, stats = built
            self.log(f"[{name}] {stats['n_positive']} positive, {stats['n_negative']} negative of {stats['n_tokens']} tokens")
            datasets.Dataset(table).save_to_disk(str(d / "classes"))
            (d / "stats.json").write_text(json.dumps(stats, indent=2))

        pc = self.cfg.partition
        cut = stream_mod.partition_streaming if pc.streaming else part_mod.partition_exact  # scores in memory or not
        build = lambda: cut(tokens, scores, pc)  # noqa: E731
        self.folder.ensure(name, self.partition_fp(rnd), build, commit)
        return self._load(name, "classes")

    def labels(self) -> Path:
        """Export ids, scores and classes per example as one Parquet file any trainer can read."""
        tokens, scores, classes = self.data(), self.score(), self.partition()

        def build() -> Any:
            meta = {"model": self.cfg.model.name_or_path, "tokenizer": labels_mod.tokenizer_digest(self.base.tokenizer),
                    "rho": self.cfg.partition.rho, "data": self.cfg.data.path}
            return labels_mod.table_of_stages(tokens, scores, classes, meta)

        def commit(table: Any, d: Path) -> dict[str, Any]:
            path = labels_mod.write_labels(table, d)
            self.log(f"[labels] {len(tokens)} examples -> {self.stage_dir('labels') / path.name}")
            return {"examples": len(tokens)}

        return self.folder.ensure("labels", self.labels_fp(), build, commit) / labels_mod.LABELS_FILE

    def train_set(self, mode: str) -> datasets.Dataset:
        """`input_ids` and `token_class` to train `mode` on (and `token_weight`, `ce_base` where the objective reads
        them); ensures the stages they come from: from `train.labels_path` when set; else `sft`/`dft` need only the
        data and `forget`/`ignore` the partition, whose labels file is exported on the way."""
        objective = self.cfg.train.objective_for(mode)
        if self.cfg.train.labels_path:
            exported = labels_mod.read_labels(self.cfg.train.labels_path, self.base.tokenizer)
            return train_sets.from_labels(exported, objective, self.cfg.train.labels_path)
        tokens = self.data()
        if not needs_partition(mode):
            return train_mod.sft_classes(tokens)
        self.labels()
        train_set = train_mod.with_classes(tokens, self.partition())
        if objective.needs_base_ce:  # p_base = exp(-CE under the base model), from the scores stage
            train_set = train_mod.with_classes(train_set, self.score().select_columns(["ce_base"]))
        return train_set

    def train(self, mode: Optional[str] = None, stage: Optional[str] = None) -> Path:
        """Train from the base model with `mode` (default `train.objective.mode`). Returns the stage folder (`stage`, default
        `train-<mode>`). A `compare.variants` name is trained by `variants.train`."""
        mode = mode or self.cfg.train.objective.mode
        name = stage or f"train-{mode}"
        train_set, fp = self.train_set(mode), self.train_fp(mode)
        if self.folder.done_on_main(name, fp):  # (eval_set may tokenize a whole file)
            return self.reused(name)
        self.log(f"[{name}] training on {len(train_set)} examples")
        return self._trained(name, fp, train_set, self.cfg.train.training, mode, {"mode": mode}, final=True)

    def _trained(self, name: str, fp: str, train_set: datasets.Dataset, tcfg: Any, mode: str, record: dict[str, Any],
                 final: bool = False) -> Path:
        """The stage `name` of a training (a reference, or a final training with `final`) of `mode` on `train_set`."""
        if name.startswith("reference-round"):
            self.log(f"[{name}] ignore-training on {len(train_set)} examples, round {record['round'] - 1}'s positive tokens")
        elif not final:
            self.log(f"[{name}] SFT on {len(train_set)} examples")
        eval_set = train_sets.held_out_set(self.cfg.train, self.cfg.data, self.base.tokenizer) if final else None
        trainer: Any = None

        def build() -> None:
            nonlocal trainer
            seed = self.cfg.train.seed if final and self.cfg.train.seed is not None else self.setup.seed
            setup = replace(self.setup, seed=seed)  # a final training's own seed (`train.seed`), else the run's
            trainer = train_mod.fit(setup, train_set, tcfg, setup.objective(mode), name, fp, eval_set)

        def commit(_: None, d: Path) -> dict[str, Any]:
            if final:
                (d / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
                (d / "training_args.json").write_text(trainer.args.to_json_string())
            dense = (lambda: load_model(self.cfg.model)) if final and self.cfg.lora.qlora else None
            merged = final and self.cfg.train.save_merged
            train_mod.save_model(trainer.model, self.base.tokenizer, d, merged=merged, dense_base=dense)
            return record

        out = self.folder.ensure(name, fp, build, commit, every_rank=True)
        del trainer
        release_memory()
        self.ranks.barrier()
        return out

    def evaluate(self, target: Optional[str] = None) -> dict[str, Any]:
        """Evaluate a model with `cfg.eval` (see `tokenforget.stages.evaluate`); stage `eval-<name>`.

        `target`: None or `base` = the base model; a mode or variant name = the finished stage `train-<name>` of
        this folder; anything else = a folder with a merged model, a LoRA adapter or a train stage. The results are
        reused while the model (its stage fingerprint) and the eval settings are the same. A variant with a folder
        of its own is evaluated by `variants.evaluate`.
        """
        name, model_fp, load = self._eval_target(target)
        fp, stage = self.eval_fp(model_fp), f"eval-{name}"

        def build() -> dict[str, Any]:  # every rank evaluates (lm-eval shares the work out)
            self.log(f"[{stage}] evaluating")
            model = load().to(device())
            results = eval_mod.evaluate_model(model, self.base.tokenizer, self.cfg.eval, self.cfg.data, self.bf16,
                                                self.cfg.seed, self.log)
            del model
            release_memory()
            return results

        def commit(results: dict[str, Any], d: Path) -> dict[str, Any]:
            (d / "results.json").write_text(json.dumps(results, indent=2))
            return {"target": target or "base"}

        return json.loads((self.folder.ensure(stage, fp, build, commit, every_rank=True) / "results.json").read_text())

    def _eval_target(self, target: Optional[str]) -> tuple[str, str, Callable[[], torch.nn.Module]]:
        """(stage suffix, fingerprint of the model, loader) for an eval target."""
        if target in (None, "base"):
            return "base", fingerprint("base", stable_view("model", to_dict(self.cfg.model))), self.base.frozen
        trained = (*OBJECTIVES, *self.cfg.compare.variants)  # names of train stages
        stage = self.stage_dir(f"train-{target}") if target in trained else Path(target).expanduser()
        if not stage.is_dir():
            hint = f"; train it first: tokenforget train --train.objective.mode {target}" if target in trained else ""
            raise RunFolderError(f"eval.checkpoint: '{stage}' does not exist{hint}")
        record = stage / STAGE_FILE
        model_fp = json.loads(record.read_text())["fingerprint"] if record.is_file() else fingerprint("folder", folder_digest(stage))
        name = target if target in trained else stage.resolve().name
        return name, model_fp, lambda: eval_mod.load_model_folder(stage, self.base)


def has_corrupt(run: Any) -> bool:
    """Whether the run's data has known noise (a `corrupt` mask with a set token)."""
    return any(any(c) for c in run.data()["corrupt"])
