"""How the report copes with a big run: build it for a synthetic run folder of GSM8K size and time it.

    PYTHONPATH=src python scripts/report_scale.py /tmp/report-scale [--examples 7473] [--tokens 300] [--reps 3]

The folder gets random token ids (SmolLM2's vocabulary, `model: smollm2`), scores, classes and a log
history; no model is trained. Prints the build time (min / median / max over --reps builds after one
warm-up), the page's size and, with headless Chromium, the time from navigation to the page's load event
(its script has rendered the first page of examples by then), same repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import datasets
import numpy as np

from tokenforget.config import RunConfig, to_dict
from tokenforget.model.loading import BaseModel
from tokenforget.report.html import build_report


def fake_run(root: Path, n: int, length: int, seed: int = 0) -> None:
    """A run folder with `n` examples of `length` tokens, the last 60% response, rho = 0.7."""
    rng = np.random.default_rng(seed)
    cfg = RunConfig(run_dir=str(root))
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(to_dict(cfg)))
    ids = rng.integers(100, 20000, size=(n, length))
    mask = np.zeros((n, length), np.int64)
    mask[:, int(0.4 * length):] = 1
    ce_base = rng.gamma(2.0, 1.0, size=(n, length)).astype(np.float32)
    ce_ref = (ce_base - rng.normal(0.3, 0.5, size=(n, length))).astype(np.float32)
    score = ce_base - ce_ref
    cut = np.quantile(score[mask == 1], 0.3)
    cls = np.where(mask == 1, np.where(score >= cut, 1, -1), 0)
    datasets.Dataset.from_dict({"input_ids": ids.tolist(), "response_mask": mask.tolist(),
                                "corrupt": np.zeros_like(mask).tolist(), "example": list(range(n))}
                               ).save_to_disk(str(root / "data" / "tokens"))
    datasets.Dataset.from_dict({"ce_base": ce_base.tolist(), "ce_ref": ce_ref.tolist(), "score": score.tolist()}
                               ).save_to_disk(str(root / "scores" / "scores"))
    datasets.Dataset.from_dict({"token_class": cls.tolist()}).save_to_disk(str(root / "partition" / "classes"))
    stats = {"n_tokens": int(mask.sum()), "n_positive": int((cls == 1).sum()), "n_negative": int((cls == -1).sum()),
             "threshold": float(cut), "quantiles": {}}
    (root / "partition" / "stats.json").write_text(json.dumps(stats))
    history = [{"step": s, "loss": 1.0 / s, "loss_pos": 1.0, "loss_neg": 2.0, "lambda": s / 1000} for s in range(1, 935, 10)]
    (root / "train-forget").mkdir(exist_ok=True)
    (root / "train-forget" / "log_history.json").write_text(json.dumps(history))


def spread(times: list[float]) -> str:
    return f"{min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f} s (min / median / max of {len(times)})"


def repeat(fn: Callable[[], float], reps: int) -> list[float]:
    """`reps` timings of `fn` after one warm-up call; `fn` returns its own duration."""
    fn()
    return [fn() for _ in range(reps)]


def load_times(page: Path, reps: int) -> list[float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from browser import chromium

    with chromium() as driver:
        def load() -> float:
            driver.get(page.resolve().as_uri())
            t = driver.execute_script("const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd;")
            return t / 1000

        return repeat(load, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--examples", type=int, default=7473)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    fake_run(args.root, args.examples, args.tokens)
    tok = BaseModel(RunConfig().model).tokenizer

    def build() -> float:
        t0 = time.perf_counter()
        build_report(args.root, tokenizer=tok)
        return time.perf_counter() - t0

    page = args.root / "report" / "report.html"
    print(f"{args.examples} examples x {args.tokens} tokens: build {spread(repeat(build, args.reps))}, "
          f"page {page.stat().st_size / 1e6:.1f} MB")
    print(f"page load in headless Chromium: {spread(load_times(page, args.reps))}")


if __name__ == "__main__":
    main()
