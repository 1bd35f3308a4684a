"""The offline demo: a generated arithmetic task with known corrupted steps, end to end.

The generator writes two-step word problems with worked answers, which SmolLM2-135M learns in minutes. The
training answers carry known noise, the character span of every wrong number recorded, so we know exactly which
response tokens are corrupted; the held-out split is clean:
- `systematic` (the default): the same wrong step in a share of the answers, every corrupted total 10 too large
  (and the final answer with it). An error that recurs is learned, so it hurts SFT: the noise forgetting is for.
- `step`: one step's result replaced by a nearby wrong number, a different error each time (a careless annotator).
Each setting of `DemoConfig.settings` (`tokenforget.pipeline.settings.DEMO_SETTINGS`: sft, dft, the paper, the recommended preset, the oracle
bounds, and sft on the clean twin of the data as the ceiling) is trained and evaluated on the held-out problems.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from tokenforget.command_config import DemoConfig
from tokenforget.model.loading import BaseModel
from tokenforget.pipeline.settings import (
    DEMO_SETTINGS, FORGET_T_MAX, PARTITIONING, check_settings, described, expand_settings, setting_stage,
)
from tokenforget.presets import apply_preset
from tokenforget.stages.demo_task import (
    demo_run_config, graded_right, held_out, make_examples, make_task, read_jsonl, unjudged_answers, write_jsonl,
)

if TYPE_CHECKING:  # imported where used: a run pulls in the training stack
    from tokenforget.pipeline.resolver import Run


CONTRASTIVE_PRESET = "trusted"  # the two-reference detector the demo measures is the preset users pick (config.PRESETS)
TRUSTED_PRESET = "ref_loss_wga"  # the trusted run's method: the best forgetting setting measured (config.PRESETS)


def trusted_run(cfg: DemoConfig, run: Run, root: Path, log: Callable[[str], None]) -> Run:
    """The demo's noisy data with a reference trained on `n_trusted` clean generated examples that share no
    prompt with the training data, and the `ref_loss_wga` preset, in `run_dir/trusted/`: the settings that
    need a trusted reference (forgetting, ignoring, the sample filter) train here or start from here."""
    from tokenforget.pipeline.resolver import Run

    trusted_path = root / "task" / "trusted.jsonl"
    taken = task_prompts(root / "task")  # training and held-out problems: the trusted ones share none
    pool = make_examples(4 * cfg.n_trusted, cfg.seed + 20_000, 0.0)  # small number ranges: some problems repeat
    write_jsonl([r for r in pool if r["prompt"] not in taken][: cfg.n_trusted], trusted_path)  # disjoint
    rc = replace(run.cfg, run_dir=str(root / "trusted"), reference=replace(run.cfg.reference, path=str(trusted_path)))
    return Run(apply_preset(rc, TRUSTED_PRESET), base=run.base, log=log)


def task_prompts(task: Path) -> set[str]:
    """The prompts of the task's training and held-out files (train, test, val), as far as they exist."""
    files = [task / f"{n}.jsonl" for n in ("train", "test", "val")]
    return {json.loads(line)["prompt"] for f in files if f.is_file() for line in f.read_text().splitlines()}




@dataclass
class DemoRuns:
    """The run folders the demo's settings train in, made when a setting first needs one (the records of
    `tokenforget.pipeline.settings` see them as `SettingRuns`)."""

    cfg: DemoConfig
    root: Path
    run: Run  # the noisy data, the paper's reference (a slice of it): sft, dft, paper, the oracle variants
    log: Callable[[str], None]
    made: dict[str, Run] = field(default_factory=dict)

    def trusted(self) -> Run:
        if "trusted" not in self.made:
            self.made["trusted"] = trusted_run(self.cfg, self.run, self.root, self.log)
        return self.made["trusted"]

    def filtered(self, name: str, method: str, selection: str = "example", spans: str = "token",
                 rho: float = 0.7, run: Optional[Run] = None) -> Run:
        """A sample filter on the trusted run's reference and scoring pass, in `run_dir/<name>/`: the 1 - `rho` of
        examples with the lowest score `method` (`tokenforget.score_methods`, an example's tokens alike) dropped
        (`ignore` over a per-example selection); with selection `tail`, only their tokens from the worst one on
        (`verified_tail`: in the answers known wrong, rho unused; `verified_random` cuts them at a random token seeded
        by the demo's seed, `verified_whole` drops them whole); with `spans` `number`, each number scored as its least
        likely token (`score.spans`). `run`: the run whose reference it reads (default: the trusted one)."""
        from tokenforget.pipeline.resolver import Run
        from tokenforget.pipeline.variants import adopt_stages

        if name not in self.made:
            rec = run or self.trusted()
            c = rec.cfg
            cfg = replace(c, run_dir=str(self.root / name), score=replace(c.score, method=method, spans=spans),
                          partition=replace(c.partition, selection=selection, rho=rho, seed=self.cfg.seed))
            self.made[name] = Run(cfg, base=rec.base, log=self.log)
            adopt_stages(self.made[name], rec)  # the same reference and scoring pass: rescored, not rerun
        return self.made[name]

    def simulated(self, name: str, recall: float, precision: float) -> Run:
        """A simulated detector (`partition.selection: simulated`, `tokenforget.stages.partition.simulated_partition`) of
        `recall` and `precision` made from the known noise, in `run_dir/<name>/`, with the trusted run's training
        settings (its forgetting term for `sim_forget`). Its right tokens are random ones, or with
        `sim_false_positives: detector` the ones the trusted run's score finds most suspicious (that reference and
        scoring pass reused, not rerun)."""
        from tokenforget.pipeline.resolver import Run
        from tokenforget.pipeline.variants import adopt_stages

        if name not in self.made:
            rec = self.trusted()
            fps = self.cfg.sim_false_positives
            pc = replace(rec.cfg.partition, selection="simulated", recall=recall, precision=precision,
                         false_positives=fps, seed=self.cfg.seed)
            self.made[name] = Run(replace(rec.cfg, run_dir=str(self.root / name), partition=pc), base=rec.base, log=self.log)
            if fps == "detector":
                adopt_stages(self.made[name], rec)
        return self.made[name]

    def contrastive(self, name: str = "contrastive") -> Run:
        """The two-reference detector in `run_dir/<name>/`, the `trusted` preset on the trusted run: its reference
        (copied, not retrained) and two references cross-fitted on the noisy training answers; score `contrastive`
        (CE_noisy - CE_trusted), numbers decided whole. Its negatives: for `contrastive`, the preset's (the spans below
        -1 nat); for `contrastive_mixture`, the share a two-component mixture estimates (`partition.selection:
        mixture`). The two share one scoring pass, made in `contrastive`'s folder."""
        from tokenforget.pipeline.resolver import Run
        from tokenforget.pipeline.variants import adopt_stages

        if name not in self.made:
            rec = self.trusted()
            c = rec.cfg
            # the preset's detector; the final training's mode comes with each setting, as for every run here
            cfg = replace(apply_preset(replace(c, run_dir=str(self.root / name)), CONTRASTIVE_PRESET), train=c.train)
            if name == "contrastive_mixture":
                cfg = replace(cfg, partition=replace(c.partition, selection="mixture"))
            self.made[name] = Run(cfg, base=rec.base, log=self.log)
            # the data and the trusted reference from the trusted run; the mixture's scores from `contrastive`'s pass
            adopt_stages(self.made[name], rec if name == "contrastive" else self.contrastive())
        return self.made[name]

    def clean(self, name: str = "clean") -> Run:
        """The ceiling: the same problems with every answer right, in `run_dir/clean/` (with `name`
        `correct_only`: the noisy set's right answers only, `task/correct_only.jsonl`, in `run_dir/correct_only/`;
        `rft`: every right sample, `task/rft.jsonl`)."""
        from tokenforget.pipeline.resolver import Run

        if name not in self.made:
            data = replace(self.run.cfg.data, path=str(self.root / "task" / f"{name}.jsonl"))
            self.made[name] = Run(replace(self.run.cfg, run_dir=str(self.root / name), data=data),
                                  base=self.run.base, log=self.log)
        return self.made[name]

    def plus_trusted(self, name: str = "sft_plus_trusted") -> Run:
        """`sft`'s baseline for the settings that read the trusted set: the noisy answers and the `n_trusted` trusted
        ones in one file (`task/sft_plus_trusted.jsonl`), in `run_dir/<name>/`."""
        self.trusted()  # writes task/trusted.jsonl
        task = self.root / "task"
        write_jsonl([*read_jsonl(task / "train.jsonl"), *read_jsonl(task / "trusted.jsonl")], task / f"{name}.jsonl")
        return self.clean(name)

    def trusted_trained(self, name: str = "trusted_trained") -> Run:
        """The trusted run trained on the trusted set too, as a user who has one would (issue 36), for the verified
        selections: its data the noisy answers and the trusted ones (`task/sft_plus_trusted.jsonl`,
        `sft_plus_trusted`'s), its reference on the trusted set as the trusted run's (a stage of its own: a reference's
        fingerprint reads the data it scores; the same examples and seed), disjoint from the answers known wrong
        only (it trained on the trusted answers it now also scores), in `run_dir/<name>/`. A verdict selection leaves
        the trusted answers whole."""
        from tokenforget.pipeline.resolver import Run

        if name not in self.made:
            data = self.plus_trusted().cfg.data  # writes task/sft_plus_trusted.jsonl
            c = self.trusted().cfg
            self.made[name] = Run(replace(c, run_dir=str(self.root / name), data=data,
                                          partition=replace(c.partition, selection="verified_tail"),
                                          compare=replace(c.compare, variants={}),  # the oracle's read every answer
                                          reference=replace(c.reference, disjoint_from="wrong")),
                                  base=self.run.base, log=self.log)
        return self.made[name]

    def learned_too(self, run: Run, name: str) -> Run:
        """`run` with the trusted set learned whole in its final training too (`train.trusted_path`:
        `task/trusted.jsonl`), as a user who has one would, in `run_dir/<name>/`: its detector's stages adopted, not
        rerun (the trusted answers are never scored, so the detector is `run`'s); its baseline `sft_plus_trusted`."""
        from tokenforget.pipeline.resolver import Run
        from tokenforget.pipeline.variants import adopt_stages

        if name not in self.made:
            self.trusted()  # writes task/trusted.jsonl
            c = run.cfg
            train = replace(c.train, trusted_path=str(self.root / "task" / "trusted.jsonl"))
            self.made[name] = Run(replace(c, run_dir=str(self.root / name), train=train), base=run.base, log=self.log)
            adopt_stages(self.made[name], run)
        return self.made[name]

    def self_checked(self, name: str = "self_reference") -> Run:
        """The `verified` preset with no data beyond the user's own file: its reference trained on the answers of
        the training file graded right (`task/correct_only.jsonl`), in `run_dir/<name>/`; a problem that also has an
        answer graded wrong in the file gives the reference none of its answers (`task/self_reference.jsonl`, written
        only where there is one: the reference never sees a problem whose answer it judges)."""
        from tokenforget.pipeline.resolver import Run

        if name not in self.made:
            c, task = self.run.cfg, self.root / "task"
            right = read_jsonl(task / "correct_only.jsonl")
            unjudged = unjudged_answers(right, read_jsonl(task / "train.jsonl"))
            path = task / "correct_only.jsonl"
            if len(unjudged) < len(right):
                path = task / "self_reference.jsonl"
                write_jsonl(unjudged, path)
                self.log(f"[{name}] {len(right) - len(unjudged)} of {len(right)} right answers left out: their problem "
                         "also has a wrong answer in the file")
            rc = replace(c, run_dir=str(self.root / name), partition=replace(c.partition, selection="verified_tail"),
                         compare=replace(c.compare, variants={}),  # the oracle variants read every answer's scores
                         reference=replace(c.reference, path=str(path),
                                           disjoint_from="wrong"))  # it saw the right answers, never a wrong one
            rc = apply_preset(rc, "verified")  # its cut and mode; scored by this reference's own loss, not the base's
            self.made[name] = Run(replace(rc, score=replace(rc.score, method="ref_loss")), base=self.run.base, log=self.log)
        return self.made[name]

    def oracle(self) -> Run:
        """The run of `oracle_forget` (`variant-oracle_forget/`): the known corrupted tokens as its negatives."""
        from tokenforget.pipeline import variants

        if "oracle" not in self.made:
            self.made["oracle"] = variants.variant(self.run, "oracle_forget")[0]
        return self.made["oracle"]

    def forgetting(self, run: Run, term: str, t_max: float = FORGET_T_MAX) -> tuple[Run, str]:
        """`run`'s negatives forgotten instead of ignored: the paper's `forget` with `term` and its schedule
        (lambda linear 0 -> `t_max`, the paper's 0.25 by default), a `compare.variants` entry `forget_<term>`
        (`forget_<term>_lam<t_max>` at another `t_max`) trained in `run`'s folder."""
        from tokenforget.pipeline.resolver import Run

        name = f"forget_{term}" + ("" if t_max == FORGET_T_MAX else f"_lam{t_max:g}")
        objective = {"mode": "forget", "forget_term": term, "schedule": "linear", "t_min": 0.0, "t_max": t_max}
        c = run.cfg
        cfg = replace(c, compare=replace(c.compare, variants={**c.compare.variants, name: {"objective": objective}}))
        return Run(cfg, base=run.base, log=self.log), name


# a setting name's suffix -> its forgetting term: every term of the objectives' registry, the paper's `ga` as `forget`


FULL_TABLE = ("docs/fair/recurring/fair_table.md (this task, 3 data seeds, rft and sft_plus_trusted beside them; "
              "what it means: docs/results.md)")  # where the comparison over seeds and baselines lives


def write_task(cfg: DemoConfig, root: Path) -> tuple[Path, Path]:
    """task/train.jsonl (noisy), task/clean.jsonl (the same problems, right), task/test.jsonl (clean held-out
    problems, another seed, none of them a training problem) and with `n_val` task/val.jsonl (a third seed, none
    a training or test problem), task/correct_only.jsonl (the noisy set's answers graded right) and task/rft.jsonl
    (every sample graded right, where `tokenforget weak` wrote them; else the same). Returns (train, test)."""
    task = root / "task"
    rft: Optional[list[dict[str, Any]]] = None
    if cfg.noise_kind == "weak":  # a weaker model's answers and the generator's own (`tokenforget weak`)
        weak = Path(cfg.weak_dir)  # type: ignore[arg-type]
        noisy = [with_verdict(r, cfg.verdicts) for r in read_jsonl(weak / "noisy.jsonl")]
        clean = read_jsonl(weak / "gold.jsonl")
        rft_file = weak / ("rft.jsonl" if cfg.verdicts == "outcome" else "rft_process.jsonl")
        rft = read_jsonl(rft_file) if rft_file.is_file() else None  # sets made before issue 36: the kept right ones
        write_jsonl(weak_pairs(weak, noisy, cfg.verdicts), task / "pairs.jsonl")
    elif cfg.noise_kind == "systematic":
        noisy, clean = make_task(cfg.n_train, cfg.seed, cfg.noise)
    else:  # one nearby wrong number in one step; the clean twin is the same generator without noise
        noisy, clean = make_examples(cfg.n_train, cfg.seed, cfg.noise), make_examples(cfg.n_train, cfg.seed, 0.0)
    write_jsonl(noisy, task / "train.jsonl")
    write_jsonl(clean, task / "clean.jsonl")
    correct_only = [r for r in noisy if graded_right(r)]
    write_jsonl(correct_only, task / "correct_only.jsonl")
    write_jsonl(correct_only if rft is None else rft, task / "rft.jsonl")
    taken = {r["prompt"] for r in noisy}
    test = held_out(cfg.n_test, cfg.seed + 10_000, taken)
    write_jsonl(test, task / "test.jsonl")
    if cfg.n_val:
        write_jsonl(held_out(cfg.n_val, cfg.seed + 30_000, taken | {r["prompt"] for r in test}), task / "val.jsonl")
    return task / "train.jsonl", task / "test.jsonl"


def weak_pairs(weak: Path, noisy: list[dict[str, Any]], verdicts: str) -> list[dict[str, Any]]:
    """DPO's pairs from `tokenforget weak`'s samples: for each problem of the noisy set with a sample graded right
    and a complete one graded wrong (by `verdicts`), {prompt, chosen: the first right, rejected: the first wrong}."""
    from tokenforget.commands.weak import outcome_correct

    if not (weak / "manifest.json").is_file() or not (weak / "samples.jsonl").is_file():
        return []  # sets written by hand, without the samples: no pairs (dpo says so)
    made = json.loads((weak / "manifest.json").read_text())["config"]
    gold = make_task(made["n_train"], made["seed"], 0.0)[1]  # the problems the samples answer, in their order
    kept = {r["prompt"] for r in noisy}
    by_problem: dict[int, list[dict[str, Any]]] = {}
    for s in read_jsonl(weak / "samples.jsonl"):
        by_problem.setdefault(s["problem"], []).append(s)
    pairs = []
    for i, samples in sorted(by_problem.items()):
        if gold[i]["prompt"] not in kept:
            continue
        right = [s["answer"] for s in samples if s["complete"] and (
            s["correct"] if verdicts == "process" else outcome_correct(s["answer"], gold[i]["answer"]))]
        wrong = [s["answer"] for s in samples if s["complete"] and s["answer"] not in right]
        if right and wrong:
            pairs.append({"prompt": gold[i]["prompt"], "chosen": right[0], "rejected": wrong[0]})
    return pairs


def with_verdict(record: dict[str, Any], verdicts: str) -> dict[str, Any]:
    """A weak set's record with `is_correct` the verdict chosen (`DemoConfig.verdicts`): `tokenforget weak` writes
    the outcome there and the process grade in `process_correct`."""
    if verdicts == "process" and "process_correct" in record:
        return {**record, "is_correct": record["process_correct"]}
    return record


def detection_of_settings(runs: DemoRuns, settings: list[str]) -> dict[str, dict[str, Any]]:
    """Detection figures (AUROC, recall, precision of the negative set) of each partitioning setting trained,
    each with its own score method, reference and rho."""
    from tokenforget.commands.detect import detection_of_methods

    from tokenforget.report.summary import detection_of

    out = {}
    for name in (s for s in settings if s in PARTITIONING or s not in DEMO_SETTINGS):
        run, _stage = setting_stage(runs, name)
        if run.cfg.partition.selection in ("simulated", "mixture", "threshold", "tail", "verified_tail", "verified_whole",
                                           "verified_random"):  # its own
            out[name] = {**detection_of(run).__dict__, "mean_corrupt": float("nan"), "mean_clean": float("nan")}
        elif run.cfg.partition.selection == "example":  # a filter drops whole examples: detection of examples
            out[name] = example_detection(run.data(), run.score(), run.partition())
        else:
            method = run.cfg.score.method
            out[name] = detection_of_methods(run.data(), run.score(), [method], run.cfg.partition.rho)[method]
    return out


def example_detection(tokens: Any, scores: Any, classes: Any) -> dict[str, Any]:
    """Detection of the examples with a known corrupted token: each example's mean response-token score (low =
    suspicious), and the examples a per-example partition dropped as the negative set; the figures of
    `metrics.detection` over examples, with the mean score of wrong and right examples."""
    import numpy as np

    from tokenforget.metrics import detection

    masks = [np.asarray(m, bool) for m in tokens["response_mask"]]
    mean = np.array([np.asarray(s)[m].mean() for s, m in zip(scores["score"], masks)])
    bad = np.array([bool(np.asarray(c)[m].any()) for c, m in zip(tokens["corrupt"], masks)])
    dropped = np.array([bool((np.asarray(c)[m] == -1).any()) for c, m in zip(classes["token_class"], masks)])
    nan = float("nan")
    return {**detection(mean, bad, dropped).__dict__, "mean_corrupt": float(mean[bad].mean()) if bad.any() else nan,
            "mean_clean": float(mean[~bad].mean()) if (~bad).any() else nan}


def stage_suffix(cfg: DemoConfig) -> str:
    """What a final training's stage name adds for epochs other than 1 and a training seed of its own
    (`train-sft-e2-t1`), so that a grid's cells share one run folder, its references and scoring passes."""
    return ("" if cfg.epochs == 1 else f"-e{cfg.epochs:g}") + ("" if cfg.train_seed is None else f"-t{cfg.train_seed}")


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print, base: Optional[BaseModel] = None) -> dict[str, Any]:
    """Generate the task, train every setting of `cfg.settings`, evaluate them and the base on clean held-out
    problems (answer accuracy, gold NLL), measure detection, write the HTML report; return every number."""
    from tokenforget.report import summary as report
    from tokenforget.report.html import build_report
    from tokenforget.pipeline import variants
    from tokenforget.pipeline.resolver import Run, has_corrupt
    from tokenforget.stages.preference import METHODS as PREFERENCE_METHODS
    from tokenforget.stages.evaluate import evaluate_models

    check_settings(cfg.settings, detectors=cfg.detectors)
    t0 = time.time()
    root = Path(cfg.run_dir)
    train_path, test_path = write_task(cfg, root)
    run = Run(demo_run_config(cfg, train_path), base=base, log=log)
    runs = DemoRuns(cfg, root, run, log)
    stages, settings = {}, expand_settings(cfg)
    for name in settings:
        sub, stage = setting_stage(runs, name)
        if stage in PREFERENCE_METHODS:  # TRL's trainers: a stage of their own
            lr = DEMO_SETTINGS[name].learning_rate
            stages[name] = sub.need("preference", (stage, stage_suffix(cfg), str(root / "task" / "pairs.jsonl"), lr))
        else:
            stages[name] = variants.train(sub, stage, stage_suffix(cfg))  # a mode, or a variant (oracle_ignore, ...)
    results = evaluate_models(run, stages, test_path, cfg.max_new_tokens, log, cfg.evaluate_base, cfg.nll_problems)
    if cfg.n_val:
        results["validation"] = evaluate_models(run, stages, root / "task" / "val.jsonl", cfg.max_new_tokens, log,
                                                cfg.evaluate_base, cfg.nll_problems)["models"]
    if has_corrupt(run):  # injected noise: how well each detector found it (trained on or not)
        untrained = [d for d in cfg.detectors if d not in settings]
        results["detection_methods"] = detection_of_settings(runs, [*settings, *untrained])
        results["detected_only"] = [d for d in untrained if d in results["detection_methods"]]
    results["wall_s"] = time.time() - t0
    results["descriptions"] = {name: described(name) for name in results["models"]}
    results["stages"] = {name: str(stage) for name, stage in stages.items()}  # the report's token view of each
    (root / "demo_results.json").write_text(json.dumps(results, indent=2))
    log(report.demo_table(results))
    log(f"\nThe comparison over seeds, with the baselines at equal steps: {FULL_TABLE}")
    log("Trained models (merged, loadable with AutoModelForCausalLM.from_pretrained):")
    for name, folder in stages.items():
        log(f"  {name}: {(folder / 'model').resolve()}")
    log(f"Report: {build_report(root, tokenizer=run.base.tokenizer).resolve()}")
    return results
