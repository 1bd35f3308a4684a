"""The named settings that the demo (`tokenforget demo`) and the fair grid (`tokenforget fair`) train, one record each.

A setting (`Setting`, in `DEMO_SETTINGS`) is the run it trains in and the stage it trains there (`make`, over the
run folders of `SettingRuns`), what it is in one line, what its partition is for the detection table, and what it reads
beyond the user's noisy file (`reads`: the trusted set, the verdicts) and whether it is a baseline a user would train
anyway (`baseline`): the fair table's rules (`tokenforget.report.fair`) read those fields, not lists of names. A new
setting is one record here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence

from tokenforget.command_config import DemoConfig
from tokenforget.errors import check_name
from tokenforget.presets import PRESETS
from tokenforget.training.objectives import FORGET_TERMS

if TYPE_CHECKING:  # the records name runs; they make none themselves (the run folders do: `SettingRuns`)
    from tokenforget.pipeline.resolver import Run

FORGET_T_MAX = 0.25  # the paper's lambda: linear from 0 to 0.25 over the optimizer steps


class SettingRuns(Protocol):
    """The run folders a setting trains in, made when one first needs them (`tokenforget.commands.demo.DemoRuns`):
    the noisy data's run, and the runs on the trusted reference, a sample filter, the contrastive detector, the
    clean or filtered files, the user's own right answers as reference, the oracle, forgetting in place of ignoring,
    and a simulated detector."""

    run: Run

    def trusted(self) -> Run: ...
    def filtered(self, name: str, method: str, selection: str = "example", spans: str = "token", rho: float = 0.7,
                 run: Optional[Run] = None) -> Run: ...
    def contrastive(self, name: str = "contrastive") -> Run: ...
    def clean(self, name: str = "clean") -> Run: ...
    def plus_trusted(self, name: str = "sft_plus_trusted") -> Run: ...
    def trusted_trained(self, name: str = "trusted_trained") -> Run: ...
    def learned_too(self, run: Run, name: str) -> Run: ...
    def self_checked(self, name: str = "self_reference") -> Run: ...
    def oracle(self) -> Run: ...
    def forgetting(self, run: Run, term: str, t_max: float = FORGET_T_MAX) -> tuple[Run, str]: ...
    def simulated(self, name: str, recall: float, precision: float) -> Run: ...


FORGET_SUFFIXES = {("forget" if term == "ga" else term): term for term in FORGET_TERMS}


TRUSTED, VERDICTS = ("trusted",), ("verdicts",)  # the trusted set (`n_trusted` clean problems); each answer's verdict
READS = ("trusted", "verdicts")


@dataclass(frozen=True)
class Setting:
    """One setting of `DemoConfig.settings`: the run it trains in and the stage it trains there (`make`), what it is
    in one line for the demo's table (`what`), and for a setting whose partition the detection table shows, what
    that partition is (`detects`; "" when it has none to show), what it reads beyond the user's noisy answers
    (`reads`), whether it is a `baseline`, and which setting it `tunes` (the fair table's tuned rows). A new setting is one record in `DEMO_SETTINGS`; the
    config's names are checked against it when the demo starts (`check_settings`)."""

    make: Callable[[SettingRuns], tuple[Run, str]]
    what: str = ""
    detects: str = ""
    learning_rate: Optional[float] = None  # TRL's trainers (`kto`, `dpo`) only: a rate of their own, else the run's
    reads: tuple[str, ...] = ()  # what it reads beyond the noisy answers, of `READS`: the fair table's matching baselines
    baseline: bool = False  # what a user would train anyway (no detector of ours): a candidate for the strongest baseline
    tunes: str = ""  # the setting this one is a variant of (another rate, another lambda): chosen between on validation


def _forgot(partition: str, term: str, t_max: float = FORGET_T_MAX) -> str:
    return f"{partition} forgotten with the {term} term (lambda 0 -> {t_max:g}) instead of ignored"


def _verified(r: SettingRuns, name: str, method: str = "ref_loss", selection: str = "verified_tail",
              run: Optional[Run] = None) -> Run:
    return r.filtered(name, method, selection, run=run)


DEMO_SETTINGS: dict[str, Setting] = {
    "sft": Setting(lambda r: (r.run, "sft"), "every response token learned (plain supervised fine-tuning): the baseline",
                   baseline=True),
    "dft": Setting(lambda r: (r.run, "dft"), "every response token, its loss scaled by the model's probability of it (DFT)",
                   baseline=True),
    "paper": Setting(lambda r: (r.run, "forget"), detects="the paper's setting (its score, a slice of the noisy data as reference)"),
    "recommended": Setting(lambda r: (r.run, PRESETS["recommended"]["train"]["objective"]["mode"])),  # a mode only
    "ref_loss_wga": Setting(lambda r: (r.trusted(), "forget"),
                            detects="the ref_loss_wga preset (its score method and rho, a trusted reference)", reads=TRUSTED),
    "ignore": Setting(lambda r: (r.trusted(), "ignore"), reads=TRUSTED),
    "filter": Setting(lambda r: (r.filtered("filter", "ref_loss"), "ignore"),  # mean reference loss: the usual filter
                      detects="the sample filter, whole examples (its reference trusted)", reads=TRUSTED),
    "filter_max": Setting(lambda r: (r.filtered("filter_max", "example_max_ref_loss"), "ignore"),
                          detects="the sample filter by each example's worst token (its reference trusted)", reads=TRUSTED),
    "ignore_tail": Setting(lambda r: (r.filtered("ignore_tail", "ref_loss", "tail"), "ignore"),
                           detects="the same examples cut at their worst token (its reference trusted)", reads=TRUSTED),
    "ignore_tail_numbers": Setting(lambda r: (r.filtered("ignore_tail_numbers", "ref_loss", "tail", "number"), "ignore"),
                                   detects="cut at the worst number, a copy inheriting its source (its reference trusted)", reads=TRUSTED),
    "ignore_tail_half": Setting(lambda r: (r.filtered("ignore_tail_half", "ref_loss", "tail", rho=0.5), "ignore"),
                                detects="the half of the answers whose worst token is least likely, cut there (trusted)", reads=TRUSTED),
    "verified_tail": Setting(lambda r: (_verified(r, "verified_tail"), "ignore"),
                             "each answer graded wrong ignored from the token a trusted reference finds least likely",
                             "the answers known wrong (a verifier's verdict), each cut at its worst token (trusted)",
                             reads=TRUSTED + VERDICTS),
    "oracle_ignore": Setting(lambda r: (r.run, "oracle_ignore"), "exactly the tokens known wrong ignored: the bound on any detector"),
    "oracle_forget": Setting(lambda r: (r.run, "oracle_forget"),
                             "exactly the tokens known wrong forgotten (the paper's -lambda CE, lambda 0 -> 0.25)"),
    "clean": Setting(lambda r: (r.clean(), "sft"), "the same problems, every answer right: the ceiling"),
    "correct_only": Setting(lambda r: (r.clean("correct_only"), "sft"), "only the answers graded right, one per problem",
                            reads=VERDICTS, baseline=True),
    "contrastive": Setting(lambda r: (r.contrastive(), "ignore"),
                           "a trusted reference against references trained on the noisy answers; the tokens they "
                           "disagree on are ignored",
                           "CE_noisy - CE_trusted, numbers whole, negative below -1 nat (trusted + noisy refs)", reads=TRUSTED),
    "contrastive_mixture": Setting(lambda r: (r.contrastive("contrastive_mixture"), "ignore"),
                                   detects="the same scores, the negative share from a two-component mixture", reads=TRUSTED),
    # the fair comparison's baselines and controls (issue 36)
    "rft": Setting(lambda r: (r.clean("rft"), "sft"),
                   "every sampled answer graded right, the rest dropped (rejection-sampling fine-tuning), at sft's steps",
                   reads=VERDICTS, baseline=True),
    "sft_plus_trusted": Setting(lambda r: (r.plus_trusted(), "sft"), "sft on the noisy answers plus the trusted set the detectors read",
                                reads=TRUSTED, baseline=True),
    "verified_whole": Setting(lambda r: (_verified(r, "verified_whole", selection="verified_whole"), "ignore"),
                              "each answer graded wrong ignored whole, at sft's steps", "the answers known wrong, whole (no score)",
                              reads=VERDICTS, baseline=True),
    "verified_random": Setting(lambda r: (_verified(r, "verified_random", selection="verified_random"), "ignore"),
                               "each answer graded wrong ignored from a random token (the control for where to cut)",
                               "the answers known wrong, each cut at a random token (no score)", reads=VERDICTS),
    "verified_tail_plus_trusted": Setting(
        lambda r: (r.filtered("verified_tail_plus_trusted", "ref_loss", "verified_tail", run=r.trusted_trained()), "ignore"),
        "verified_tail trained on the trusted set too (as a user who has one would; its baseline sft_plus_trusted)",
        "the answers known wrong, each cut at its worst token (trusted), the trusted answers learned whole",
        reads=TRUSTED + VERDICTS),
    "contrastive_plus_trusted": Setting(
        lambda r: (r.learned_too(r.contrastive(), "contrastive_plus_trusted"), "ignore"),
        "contrastive trained on the trusted set too (as a user who has one would; its baseline sft_plus_trusted)",
        reads=TRUSTED),
    "verified_tail_self": Setting(lambda r: (_verified(r, "verified_tail_self", run=r.self_checked()), "ignore"),
                                  "as verified_tail, its reference trained on the file's own answers graded right (no extra data)",
                                  "the answers known wrong, cut at the worst token of a reference on the right ones",
                                  reads=VERDICTS),
    "verified_tail_base": Setting(lambda r: (_verified(r, "verified_tail_base", "base_loss"), "ignore"),
                                  "each answer graded wrong ignored from the token the base model finds least likely "
                                  "(`--preset verified`: no reference trained, no extra data)",
                                  "the answers known wrong, cut at the token the base model finds least likely", reads=VERDICTS),
    "unlikelihood_wrong": Setting(lambda r: r.forgetting(_verified(r, "verified_whole", selection="verified_whole"), "unlikelihood"),
                                  "UFT: the right answers learned, every answer graded wrong pushed down by unlikelihood",
                                  reads=VERDICTS),
    **{f"oracle_{t}": Setting((lambda t: lambda r: (r.run, f"oracle_{t}"))(t), _forgot("exactly the tokens known wrong", t))
       for t in ("wga", "unlikelihood", "tnpo")},
    # the mistake alone: each answer's first known wrong token forgotten, the rest of its wrong tail no loss
    **{f"oracle_first_{s}": Setting((lambda t: lambda r: r.forgetting(r.filtered("oracle_first", "ref_loss", "oracle_first", run=r.run), t))(t),
                                    _forgot("the first known wrong token of each answer (the rest of its tail ignored)", t))
       for s, t in (("forget", "ga"), ("unlikelihood", "unlikelihood"))},
    # the same with the mistake found as a user can: each wrong answer's cut token (`--preset verified`'s) forgotten
    **{f"verified_first_base_{s}": Setting((lambda t: lambda r: r.forgetting(_verified(r, "verified_first_base", "base_loss",
                                                                                       "verified_first"), t))(t),
                                           _forgot("the token each wrong answer is cut at by the base model (the rest "
                                                   "of its tail ignored)", t), reads=VERDICTS)
       for s, t in (("forget", "ga"), ("unlikelihood", "unlikelihood"))},
    # lambda's sweep on the oracle's negatives (precision 1, the paper's premise): is forgetting harder better? Softer:
    # the term is a mean over the negatives, so its push on each one grows as they get fewer (the paper's rho 0.7 makes
    # 30% of the tokens negative; the recurring task's oracle mask 4%: 0.25 there is ~7 times the paper's push a token)
    **{f"oracle_forget_lam{lam:g}": Setting((lambda lam: lambda r: r.forgetting(r.oracle(), "ga", lam))(lam),
                                            _forgot("exactly the tokens known wrong", "ga", lam), tunes="oracle_forget")
       for lam in (0.01, 0.05, 0.5, 1.0)},
    **{f"verified_tail_{s}": Setting((lambda t: lambda r: r.forgetting(_verified(r, "verified_tail"), t))(t),
                                     _forgot("verified_tail's negatives", t), reads=TRUSTED + VERDICTS)
       for s, t in FORGET_SUFFIXES.items()},
    **{f"contrastive_{s}": Setting((lambda t: lambda r: r.forgetting(r.contrastive(), t))(t), _forgot("contrastive's negatives", t),
                                   reads=TRUSTED) for s, t in FORGET_SUFFIXES.items()},
    # TRL's own trainers with the verdicts (`tokenforget.stages.preference`)
    "kto": Setting(lambda r: (r.run, "kto"),
                   "TRL's KTOTrainer, each answer's verdict its label (desirable when right), from the base model",
                   reads=VERDICTS, baseline=True),
    "dpo": Setting(lambda r: (r.run, "dpo"),
                   "TRL's DPOTrainer on a right and a wrong sample of the same problem, after sft (twice sft's steps)",
                   reads=VERDICTS, baseline=True),
    "kto_sft": Setting(lambda r: (r.run, "kto_sft"),
                       "TRL's KTOTrainer as `kto`, after sft (twice sft's steps): the base cannot yet do the task",
                       reads=VERDICTS, baseline=True),
    # ... at learning rates of their own, the sweep validation chooses from: at sft's 1e-3 DPO collapses
    **{f"{m}_lr{tag}": Setting((lambda m: lambda r: (r.run, m))(m), f"`{m}` at learning rate {tag}, not sft's",
                                learning_rate=lr, reads=VERDICTS, baseline=True, tunes=m)
       for m in ("kto", "dpo", "kto_sft") for tag, lr in (("1e-4", 1e-4), ("1e-5", 1e-5))},
}
PARTITIONING = {name: s.detects for name, s in DEMO_SETTINGS.items() if s.detects}  # the settings the detection table shows
BASE_WHAT = "the model before any training"


def described(name: str) -> str:
    """What model `name` is, in one line (a setting's `what`, else what its partition is, else its name)."""
    s = DEMO_SETTINGS.get(name)
    return BASE_WHAT if name == "base" else (s.what or s.detects or name) if s is not None else name



SIM_MODES = {"sim_ignore": "ignore", "sim_forget": "forget"}  # the simulated detectors' settings -> their modes


def check_settings(settings: list[str], field_name: str = "settings", detectors: Sequence[str] = ()) -> None:
    """Refuse, naming the field, a setting (or detector) this module declares no record for, before any work."""
    for name in settings:
        check_name(name, [*DEMO_SETTINGS, *SIM_MODES], field_name)
    for name in detectors:
        check_name(name, PARTITIONING, "detectors")


def sim_name(setting: str, recall: float, precision: float, fps: str) -> str:
    """`sim_ignore_r0.6_p0.5` (`_det` appended for the detector's false positives): one simulated model's name."""
    return f"{setting}_r{recall:g}_p{precision:g}" + ("_det" if fps == "detector" else "")


def expand_settings(cfg: DemoConfig) -> list[str]:
    """`cfg.settings` with `sim_ignore` / `sim_forget` replaced by one name per `sim_recall` x `sim_precision`."""
    out: list[str] = []
    for s in cfg.settings:
        if s in SIM_MODES:
            out += [sim_name(s, r, p, cfg.sim_false_positives) for r in cfg.sim_recall for p in cfg.sim_precision]
        else:
            out.append(s)
    return out


def setting_stage(runs: SettingRuns, name: str) -> tuple[Run, str]:
    """(the run a setting trains in, the stage it trains): a `DEMO_SETTINGS` name or a simulated model's name."""
    if name in DEMO_SETTINGS:
        return DEMO_SETTINGS[name].make(runs)
    setting, r, p = name.removesuffix("_det").rsplit("_", 2)
    folder = name.replace(setting, "sim", 1)  # sim_ignore_r1_p0.5 and sim_forget_r1_p0.5 share their partition
    return runs.simulated(folder, float(r[1:]), float(p[1:])), SIM_MODES[setting]
