"""What each stage's output depends on: its fingerprint, from the settings and files it reads and its inputs'
fingerprints. A stage is reused while its `stage.json` holds the fingerprint of its current inputs
(`RunFolder.ensure`); change anything listed here and the stage, and every stage after it, is built again.
"""

from __future__ import annotations

from typing import Any, Optional

from tokenforget.config import RunConfig, to_dict
from tokenforget.config.training import FLAT_OBJECTIVE, NEEDS_BASE_CE
from tokenforget.model.loading import checkpoint_dir
from tokenforget.objectives import needs_partition
from tokenforget.stages.partition import SELECTIONS
from tokenforget.runfolder import file_digest, fingerprint, folder_digest, stable_view
from tokenforget.score_methods import reads_base
from tokenforget.stages import labels as labels_mod
from tokenforget.stages.data import gsm8k_source


class StageFingerprints:
    """The fingerprints of a run's stages (mixed into `pipeline.Run`; needs `cfg` and `bf16`)."""

    cfg: RunConfig
    bf16: bool

    @property
    def rounds(self) -> int:
        return self.cfg.reference.rounds


    def data_fp(self) -> str:
        c = self.cfg
        data = {k: v for k, v in stable_view("data", to_dict(c.data)).items() if k != "num_proc"}  # same tokens either way
        return fingerprint("data", data, file_digest(c.data.path), stable_view("model", to_dict(c.model)))

    def reference_fp(self, rnd: int = 1) -> str:
        c = self.cfg
        if rnd > 1:  # round r's reference: trained on round r - 1's partition
            training = to_dict(c.reference.training)
            return fingerprint("reference-round", self.partition_fp(rnd - 1), training, to_dict(c.lora), c.seed)
        if c.reference.checkpoint:
            return fingerprint("reference-checkpoint", folder_digest(checkpoint_dir(c.reference)), stable_view("model", to_dict(c.model)))
        ref = {k: v for k, v in stable_view("reference", to_dict(c.reference)).items()
               if k not in ("rounds", "noisy_folds", "noisy_fraction")}  # the noisy reference is a stage of its own
        return fingerprint("reference", self.data_fp(), ref, file_digest(c.reference.path), to_dict(c.lora), c.seed)

    def noisy_reference_fp(self) -> str:
        """The noisy references' (`reference.noisy_folds`): cross-fitted on the data, as `reference.folds` would be."""
        c = self.cfg
        rc = c.reference
        return fingerprint("reference-noisy", self.data_fp(), rc.noisy_folds, rc.noisy_fraction, to_dict(rc.training),
                           to_dict(c.lora), c.seed)

    def base_pass(self) -> bool:
        """Whether the scoring pass runs the base model too: `score.base_pass`, by default when CE_base is read."""
        sc = self.cfg.score
        if sc.base_pass is not None:
            return sc.base_pass
        return reads_base(sc.method) or self.cfg.train.objective.forget_term in NEEDS_BASE_CE

    def raw_score_fp(self, rnd: int = 1, base_pass: Optional[bool] = None) -> str:
        """Fingerprint of the scoring pass (CE_base, CE_ref; CE_ref alone without `base_pass`, by default
        `self.base_pass()`), which does not depend on `score.method`."""
        sc = self.cfg.score
        if sc.precomputed_path:
            return fingerprint("precomputed", self.data_fp(), file_digest(sc.precomputed_path))
        settings = {k: v for k, v in to_dict(sc).items() if k not in ("method", "precomputed_path", "base_pass", "spans")}
        kind = "score" if (self.base_pass() if base_pass is None else base_pass) else "score-ref-only"
        if self.cfg.reference.noisy_folds:  # the pass also stores the noisy references' CE
            return fingerprint(kind, self.reference_fp(rnd), self.noisy_reference_fp(), settings, self.bf16)
        return fingerprint(kind, self.reference_fp(rnd), settings, self.bf16)

    def reusable_score_fps(self, rnd: int = 1) -> list[str]:
        """The scoring passes whose raw scores serve this run's method: its own, and a pass with CE_base where
        CE_ref alone would do."""
        return list(dict.fromkeys([self.raw_score_fp(rnd), self.raw_score_fp(rnd, base_pass=True)]))

    def needs_noisy_reference(self) -> bool:
        """Whether the scoring pass trains and runs the noisy references (`reference.noisy_folds`)."""
        return bool(self.cfg.reference.noisy_folds) and not self.cfg.score.precomputed_path and not self.scores_unused()

    def scoring_forwards(self) -> list[str]:
        """The models a scoring pass runs over every example, in order (none where the scores are unused or read
        from a file): the base where CE_base is read, the reference, the noisy references (each example by one)."""
        if self.scores_unused() or self.cfg.score.precomputed_path:
            return []
        return [*(["base"] if self.base_pass() else []), "reference", *(["noisy references"] if self.needs_noisy_reference() else [])]

    def scores_unused(self) -> bool:
        """The oracle and data partitions rank nothing (their classes are the data's known noise, or the weights it
        carries), so no reference is trained and no token scored: the scores stage holds zeros. Unless `tnpo` needs
        the base model's CE. A simulated detector with random false positives reads the known noise only."""
        pc = self.cfg.partition
        known_only = not SELECTIONS[pc.selection].needs_scores or (pc.selection == "simulated" and pc.false_positives == "random")
        return known_only and self.cfg.train.objective.forget_term not in NEEDS_BASE_CE

    def score_fp(self, rnd: int = 1) -> str:
        """The scoring pass's for `paper` (so runs made before score methods existed are reused), else the pass
        and the method; the data's alone when the scores are unused."""
        if self.scores_unused():
            return fingerprint("scores-unused", self.data_fp())
        raw, method, spans = self.raw_score_fp(rnd), self.cfg.score.method, self.cfg.score.spans
        if spans != "token":
            return fingerprint("score-method", raw, method, spans)
        return raw if method == "paper" else fingerprint("score-method", raw, method)

    def partition_fp(self, rnd: int = 1) -> str:
        pc = stable_view("partition", to_dict(self.cfg.partition))
        if self.cfg.partition.selection != "threshold":
            pc.pop("threshold", None)
        if self.cfg.partition.selection != "simulated":  # its knobs move nothing else
            for k in ("recall", "precision", "false_positives", "seed"):
                pc.pop(k, None)
        return fingerprint("partition", self.score_fp(rnd), pc)

    def labels_fp(self) -> str:
        return fingerprint("labels", labels_mod.FORMAT, self.partition_fp(self.rounds))

    def train_fp(self, mode: str) -> str:
        c = self.cfg
        if c.train.labels_path:
            upstream = "labels:" + file_digest(str(labels_mod.labels_file(c.train.labels_path)))
        else:
            upstream = self.partition_fp(self.rounds) if needs_partition(mode) else self.data_fp()
        held_out = file_digest(c.train.eval_path)
        return fingerprint("train", mode, upstream, held_out, train_view(c.train, mode), to_dict(c.lora), c.seed, self.bf16)

    def eval_fp(self, model_fp: str) -> str:
        """An evaluation's: the model's fingerprint, the eval settings, how examples are rendered, every file read."""
        c = self.cfg
        ec = {k: v for k, v in stable_view("eval", to_dict(c.eval)).items() if k != "checkpoint"}
        rendering = {k: getattr(c.data, k) for k in ("max_length", "chat_template", "system_prompt")}
        sources = [file_digest(s) for s in (gsm8k_source(c.eval), c.eval.fewshot_path)]
        extra = [file_digest(p) for p in (*c.eval.nll, *c.eval.multiple_choice)]
        return fingerprint("eval", model_fp, ec, rendering, sources, extra, c.seed, self.bf16)


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
