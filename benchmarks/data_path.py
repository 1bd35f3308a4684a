"""The data path at the paper's scale on this machine: 50,000 Tulu-shaped `messages` records through the data stage
(tokenized in 1 process, then `data.num_proc` 2 through `datasets.map`), a small reference, scoring (1 process, then
2 under torchrun, every rank writing its own shards) and the streaming partition, on the tiny model of the tests.
Prints the wall time of each stage; docs/performance.md records a run.

Usage: python benchmarks/data_path.py OUT_DIR [--examples 50000]
       (it runs itself under torchrun for the 2-process scoring: `--stage score` there)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

WORDS = ("the answer is apples she buys bags with each how many does have now shop sells pencils for dollars "
         "change quick brown fox jumps over lazy dog what when where then").split()


def tulu_rows(n: int, seed: int = 0) -> list[dict]:
    """Records shaped like the Tulu mixture: a user turn of 8-40 words, an answer of 10-120 words with numbers, a
    system turn in a third of them, a second exchange in a quarter."""
    rng = random.Random(seed)
    say = lambda lo, hi: " ".join(rng.choice(WORDS) if rng.random() > 0.15 else str(rng.randint(0, 999))  # noqa: E731
                                  for _ in range(rng.randint(lo, hi)))
    rows = []
    for i in range(n):
        msgs = [{"role": "user", "content": say(8, 40) + "?"}, {"role": "assistant", "content": say(10, 120) + "."}]
        if i % 3 == 0:
            msgs.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        if i % 4 == 1:
            msgs += [{"role": "user", "content": say(4, 12) + "?"}, {"role": "assistant", "content": say(5, 40) + "."}]
        rows.append({"dataset": "stand_in", "id": f"tulu_{i}", "messages": msgs})
    return rows


def config(out: Path, run: str, num_proc: int = 1) -> "RunConfig":  # noqa: F821
    from tokenforget.config import RunConfig, from_dict

    training = {"batch_size": 8, "logging_steps": 50, "learning_rate": 1e-3, "save_steps": 100_000}
    return from_dict(RunConfig, {
        "run_dir": str(out / run), "report_to": ["none"],
        "model": {"name_or_path": str(out / "model"), "precision": "fp32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"path": str(out / "tulu.jsonl"), "format": "messages", "max_length": 256, "num_proc": num_proc},
        "reference": {"size": 500, "training": training},
        "score": {"batch_size": 32, "shard_size": 4096},
        "partition": {"streaming": True, "stream_rows": 100_000},
        "train": {"training": training},
    })


def timed(label: str, fn, log: dict) -> None:
    t0 = time.perf_counter()
    fn()
    log[label] = round(time.perf_counter() - t0, 1)
    print(f"== {label}: {log[label]} s", flush=True)


def one_process(out: Path) -> dict:
    from tokenforget.pipeline.resolver import Run

    log: dict = {}
    quiet = lambda _m: None  # noqa: E731
    timed("data, 1 process", lambda: Run(config(out, "one"), log=quiet).data(), log)
    timed("data, num_proc 2", lambda: Run(config(out, "two", num_proc=2), log=quiet).data(), log)
    run = Run(config(out, "one"), log=quiet)
    timed("reference (500 examples, 1 epoch)", run.reference, log)
    timed("scores, 1 process", run.score, log)
    timed("partition (streaming)", run.partition, log)
    return log


def two_process_scores(out: Path) -> float:
    for stage in ("reference",):
        shutil.copytree(out / "one" / stage, out / "two" / stage)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(out),
                    "--stage", "score"], env=env, check=True)
    return round(time.perf_counter() - t0, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--stage", default="all")
    a = ap.parse_args()
    if a.stage == "score":  # under torchrun: the data and reference stages are there, score only
        from tokenforget.pipeline.resolver import Run

        Run(config(a.out, "two")).score()
        return
    import torch

    from conftest import build_tiny

    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    (a.out / "tulu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tulu_rows(a.examples)))
    build_tiny(a.out / "model")
    print(f"== wrote {a.examples} records and the tiny model: {time.perf_counter() - t0:.1f} s", flush=True)
    log = one_process(a.out)
    log["scores, 2 processes (torchrun, incl. start-up)"] = two_process_scores(a.out)
    import datasets

    tokens = datasets.load_from_disk(str(a.out / "one" / "data" / "tokens"))
    log["examples"], log["tokens"] = len(tokens), int(sum(map(len, tokens["input_ids"])))
    log["torch_threads"] = torch.get_num_threads()
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
