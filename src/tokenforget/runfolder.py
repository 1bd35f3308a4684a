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
      held-out-<file>-<model>/ held_out.json: the demo's answers and gold NLL of one model on test or val
      tensorboard/  <stage>/ TensorBoard events of each training (reference, train-<mode>)
      report/       report.html and its PNG plots (`tokenforget report`)

A stage is reused when `stage.json` in its folder holds the fingerprint of its current inputs; a stale or
half-written stage is redone (`RunFolder.ensure`: reuse or build, then commit). Outputs are built in a hidden
temporary folder and renamed into place. Work in progress that survives a crash lives in `.<stage>.work/`:
training checkpoints, and finished scoring shards. Under `torchrun` every rank trains (DDP through the
Trainer) and scores its own shards; rank 0 alone writes stages.

Nothing here knows what a stage computes: the stage modules (data, reference, score, partition, train,
benchmarks) do, and `pipeline` says which stage feeds which.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

from tokenforget.config.data import RECURRING_SENTENCE
from tokenforget.errors import UserError
from tokenforget.version import made_by

STAGE_FILE = "stage.json"
CONFIG_FILE = "config.json"
# below this much free space a failed save is a full disk, whatever the writer raised: torch's zip writer says
# "unexpected pos" (a Trainer checkpoint's optimizer state), not ENOSPC
FULL_BELOW = 64 * 2**20
# `tokenforget audit`'s folder and files in a run folder (read by the report too)
AUDIT_DIR, TABLE_FILE, ROWS_FILE, SUMMARY_FILE = "audit", "audit.parquet", "audit.jsonl", "audit.json"

T = TypeVar("T")


def nearly_full(path: Path) -> bool:
    """Under `FULL_BELOW` free on the device of `path` (or of its nearest folder that exists)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free < FULL_BELOW


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


def folder_digest(folder: Path) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times of a folder's files: a cheap identity for a model folder."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


# Config fields added after runs were made, with their defaults: left out of a fingerprint while they hold
# the default, so a stage finished by an older version is still reused.
ADDED_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"lambda_warmup": 0.1, "forget_objective": "ga", "beta": 1.0, "seed": None, "trusted_path": None},
    "partition": {"selection": "global", "threshold": 0.0, "recall": 1.0, "precision": 1.0, "false_positives": "random",
                  "seed": 0},
    "reference": {"folds": 1, "rounds": 1, "checkpoint": None, "noisy_folds": 0, "noisy_fraction": 1.0,
                  "disjoint_from": "all"},
    "score": {"spans": "token"},
    "data": {"noise": "step_result", "noise_sentence": RECURRING_SENTENCE, "sample": None, "sample_seed": 0,
             "num_proc": 1},
    "eval": {"task_shots": {}},
    # attn_implementation: `sdpa` was the default until `auto` (which is sdpa wherever sdpa was accepted)
    "model": {"weights": "fp32", "attn_implementation": "auto"},
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
        from datetime import timedelta

        import torch
        from accelerate import PartialState  # initialises the process group (gloo on CPU)

        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))
        return Ranks(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch

            torch.distributed.barrier()

    def from_main(self, value: T) -> T:
        """Rank 0's `value`, on every rank: for a decision every rank must take alike. Whether a stage is done is
        one: a rank that looked at the disk after rank 0 had written the stage skipped the barrier the others
        waited at, and the run hung at its next collective."""
        if self.world == 1:
            return value
        import torch

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) example ranges of at most `size` examples."""
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


IDENTITY = {"model": ("name_or_path", "gguf_file"), "data": ("path", "hub_config", "split")}


def same_run_keys(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What makes a run folder one run: the base model and the training data (other fields may change)."""
    return {sec: {k: cfg.get(sec, {}).get(k) for k in keys} for sec, keys in IDENTITY.items()}


def release_memory() -> None:
    """Free what a finished stage left behind before the next one starts.

    A Trainer holds reference cycles (callbacks, accelerator), so its model and optimizer wait for the cycle
    collector; and glibc keeps freed heap pages, so a `compare` process's resident memory stayed at the peak
    of its first training through every later stage (12 GB for SmolLM2-135M). `malloc_trim` hands them back.
    """
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


@dataclass
class RunFolder:
    """One run folder: which stages are done, atomic stage writes, work folders, and the ranks that share it.

    `config`: the run's config as a dict (`config.to_dict`), recorded as `config.json` with each stage.
    """

    root: Path
    config: dict[str, Any]
    ranks: Ranks = field(default_factory=Ranks)
    log: Callable[[str], None] = print
    reused: list[str] = field(default_factory=list)  # stages reused in this process, in order

    def check_same_run(self, overwrite: bool) -> None:
        """Refuse a run folder that holds a run of another model or data set (unless `overwrite`)."""
        recorded = self.root / CONFIG_FILE
        if overwrite or not recorded.is_file():
            return
        before = same_run_keys(json.loads(recorded.read_text()))
        now = same_run_keys(self.config)
        changed = [f"{sec}.{k}" for sec in now for k in now[sec] if before.get(sec, {}).get(k) != now[sec][k]]
        if changed:
            raise RunFolderError(
                f"run_dir '{self.root}' holds a different run ({', '.join(changed)} differ from {recorded}); "
                "choose another run_dir or pass --overwrite true"
            )

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    def is_done(self, name: str, fp: str) -> bool:
        """Whether `name`'s `stage.json` holds `fp`, as this process sees the disk now."""
        f = self.stage_dir(name) / STAGE_FILE
        return f.is_file() and json.loads(f.read_text()).get("fingerprint") == fp

    def done_on_main(self, name: str, fp: str) -> bool:
        """`is_done` as rank 0 sees it, on every rank (a collective: every rank calls it, or none)."""
        return self.ranks.from_main(self.is_done(name, fp))

    def record(self, name: str) -> dict[str, Any]:
        """The `stage.json` of a finished stage."""
        return json.loads((self.stage_dir(name) / STAGE_FILE).read_text())

    def ensure(
        self,
        name: str,
        fp: str,
        build: Callable[[], T],
        commit: Callable[[T, Path], Optional[dict[str, Any]]],
        every_rank: bool = False,
    ) -> Path:
        """Reuse or build, then commit: the one loop every stage goes through.

        When `name`'s `stage.json` holds `fp` the stage is reused. Otherwise `build()` computes it (on rank 0
        only, or with `every_rank` on every rank: trainings and scoring share the work), and rank 0 `commit`s the
        result into a temporary folder, returning what to record in `stage.json`; the folder then replaces
        `run_dir/name`. Every rank waits for the stage before going on. Returns the stage's folder.
        """
        if self.done_on_main(name, fp):
            self.skip(name)
        else:
            self.check_replaceable(name)
            t0 = time.perf_counter()
            with self.disk_full_is_one_line(name):
                result = build() if every_rank or self.ranks.is_main else None
                if self.ranks.is_main:
                    record: dict[str, Any] = {}
                    with self.writing(name, fp, record) as d:
                        record.update(commit(result, d) or {})  # type: ignore[arg-type]
                        # what made it and its wall time (build and commit), for the tables that publish its figures
                        record["made"] = {"seconds": round(time.perf_counter() - t0, 1), **made_by()}
                    self.log(f"[{name}] done in {record['made']['seconds']:.0f} s")  # a line a stage: what took the time
            self.ranks.barrier()
        return self.stage_dir(name)

    @contextlib.contextmanager
    def disk_full_is_one_line(self, name: str) -> Iterator[None]:
        """A full disk while a stage is made (a trainer's save raises OSError, safetensors an error of its own that
        names os error 28, torch's checkpoint writer "unexpected pos": any error with under `FULL_BELOW` left free)
        becomes one line naming the stage and the folder: `writing` has already discarded the half-made stage, and
        the stages before it stay, so freeing space and rerunning resumes here."""
        try:
            yield
        except Exception as e:
            full = ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "os error 28" in str(e)
                    or nearly_full(self.root))
            if not full:
                raise
            raise RunFolderError(f"[{name}] no space left on the device of {self.root}: the stage was discarded, "
                                 "the finished stages are kept; free space and rerun to resume") from e

    @contextlib.contextmanager
    def writing(self, name: str, fp: str, record: dict[str, Any]) -> Iterator[Path]:
        """Yield a temporary folder; on success it replaces `run_dir/name`, with `stage.json` (`record`, read
        when the body has finished) last."""
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

    def check_replaceable(self, name: str) -> None:
        """A stage replaces only a stage: `run_dir/name` holding files but no `stage.json` is someone's data (say,
        the output of `tokenforget weak` written there), which a stage write would delete. Refused, before any work."""
        d = self.stage_dir(name)
        if d.is_dir() and any(d.iterdir()) and not (d / STAGE_FILE).is_file():
            raise UserError(f"run_dir: '{d}' holds files that are not a tokenforget stage (no {STAGE_FILE}), and stage "
                            f"'{name}' would replace it: move them or choose another run_dir (nothing was deleted)")

    def copy_stage(self, name: str, source: Path) -> None:
        """Put a copy of a finished stage folder of another run folder in place as `name` (rank 0)."""
        self.check_replaceable(name)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(self.stage_dir(name), ignore_errors=True)
        os.replace(tmp, self.stage_dir(name))
        self.log(f"[{name}] copied from {source}")

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

    def release_work(self, name: str) -> None:
        """Remove the finished stage `name`'s work folder (rank 0)."""
        if self.ranks.is_main:
            shutil.rmtree(self.root / f".{name}.work", ignore_errors=True)

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
        tmp.write_text(json.dumps(self.config, indent=2))
        os.replace(tmp, self.root / CONFIG_FILE)

    def skip(self, name: str) -> None:
        if name in self.reused:
            return
        self.reused.append(name)
        self.log(f"[{name}] up to date, reusing {self.stage_dir(name)}")
