"""The oracle through the data's own labels (issue 28): on the learnable task, the known wrong spans written as
`spans` in the data and read by `partition.selection: data` give the token classes the oracle gives.

For each seed: the demo's noisy training file (`demo.make_task`, n 160, noise 0.4, its `corrupt_spans`), and the same
records with those spans written as `spans` of weight 0 and of weight -1 (no `corrupt_spans`). Each goes through the
data stage (the demo's data settings: SmolLM2's chat template, its system prompt, max_length 256) and the partition
stage's own function on zero scores (`partition_exact`): the oracle on the noisy file, `data` on the span files.
Compared token by token over every example:
  weight -1 against `oracle_forget` (mode forget, selection oracle): the classes themselves;
  weight 0 against `oracle_ignore` (mode ignore, selection oracle): the classes the ignore objective reads (its
  negatives get exactly zero gradient, `losses.ignore_loss`, so the oracle's -1 counts as 0 there).
Equal token ids and classes (and no `token_weight` column on either side) make the trainings the same by
construction, so the oracle rows of docs/results.md are this path's results.

    PYTHONPATH=src python scripts/oracle_through_data.py --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np

from tokenforget.stages import data as data_mod
from tokenforget.config import DataConfig, ModelConfig, PartitionConfig
from tokenforget.stages.demo_task import SYSTEM_PROMPT, make_task, write_jsonl
from tokenforget.training.objectives import FORGET, NO_LOSS
from tokenforget.model.loading import load_tokenizer
from tokenforget.stages.partition import flat_list_column, partition_exact
from tokenforget.stages.score import zero_scores


def with_spans(rows: list[dict], weight: float) -> list[dict]:
    """The records with their `corrupt_spans` written as `spans` of `weight`."""
    out = []
    for r in rows:
        spans = [{"start": s, "end": e, "weight": weight} for s, e in r["corrupt_spans"]]
        out.append({k: v for k, v in r.items() if k != "corrupt_spans"} | ({"spans": spans} if spans else {}))
    return out


def classes_of(path: Path, selection: str, tokenizer) -> tuple[list[list[int]], np.ndarray, np.ndarray, list[str]]:
    """(input_ids, flat classes, flat response flags, the partition table's columns) of one file."""
    dc = DataConfig(path=str(path), max_length=256, system_prompt=SYSTEM_PROMPT)
    cols, _ = data_mod.tokenize_records(tokenizer, data_mod.load_records(dc), dc)
    tokens = datasets.Dataset.from_dict(cols)
    table, _stats = partition_exact(tokens, zero_scores(tokens), PartitionConfig(selection=selection))
    classes, _ = flat_list_column(table.column("token_class"))
    response, _ = flat_list_column(tokens.data.column("response_mask"))
    return cols["input_ids"], classes, response.astype(bool), table.column_names


def check_seed(seed: int, tokenizer, folder: Path) -> dict:
    noisy, _clean = make_task(160, seed, 0.4)
    write_jsonl(noisy, folder / "noisy.jsonl")
    ids, oracle, response, oracle_cols = classes_of(folder / "noisy.jsonl", "oracle", tokenizer)
    row = {"seed": seed, "examples": len(ids), "response_tokens": int(response.sum()),
           "oracle_negatives": int((oracle == FORGET).sum())}
    for weight, setting in ((-1.0, "oracle_forget"), (0.0, "oracle_ignore")):
        path = folder / f"spans{weight:g}.jsonl"
        write_jsonl(with_spans(noisy, weight), path)
        ids_w, ours, _, cols = classes_of(path, "data", tokenizer)
        want = oracle if weight < 0 else np.where(oracle == FORGET, NO_LOSS, oracle)  # what `ignore` reads
        row[setting] = {"same_ids": ids_w == ids, "tokens_compared": int(ours.size),
                        "marked": int((ours == (FORGET if weight < 0 else NO_LOSS))[response].sum()),
                        "mismatches": int((ours != want).sum()), "columns": cols == oracle_cols}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.model))
    with tempfile.TemporaryDirectory() as tmp:
        rows = [check_seed(s, tokenizer, Path(tmp)) for s in args.seeds]
    for r in rows:
        print(json.dumps(r))
    print(f"wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
