"""Which records a run reads and where the work over them runs: a seeded subset (`data.sample`), and one function
over many items in worker processes through `datasets.map` (the ecosystem's pool: each worker a contiguous slice,
results back in order; `data.num_proc`)."""

from __future__ import annotations

import random
from typing import Any, Callable

from tokenforget.errors import UserError


def sample_indices(n: int, k: int, seed: int, where: str) -> list[int]:
    """Sorted indices of a seeded random `k` of `n` records (`data.sample`): the same for the same n, k and seed."""
    if k > n:
        raise UserError(f"data.sample={k} is larger than {where} ({n} records)")
    return sorted(random.Random(seed).sample(range(n), k))


def in_processes(fn: Callable[[int], dict[str, Any]], n: int, num_proc: int, desc: str) -> dict[str, list[Any]]:
    """Columns of `fn(i)` for i in 0..n-1 (each call a dict of the same keys), in `num_proc` processes; `fn` and what
    it holds (records, a tokenizer) are pickled to each worker once. In this process when `num_proc` is 1 or the
    items are too few to pay for a pool (it costs about a second to start)."""
    if num_proc <= 1 or n < 2 * num_proc:
        rows = [fn(i) for i in range(n)]
        return {k: [r[k] for r in rows] for k in (rows[0] if rows else {})}
    import datasets

    def some(batch: dict[str, list[int]]) -> dict[str, list[Any]]:
        rows = [fn(i) for i in batch["i"]]
        return {k: [r[k] for r in rows] for k in rows[0]}

    index = datasets.Dataset.from_dict({"i": list(range(n))})
    # new_fingerprint: datasets would otherwise hash `fn` and all it holds to name a cache it never writes
    out = index.map(some, batched=True, batch_size=256, num_proc=num_proc, remove_columns=["i"],
                    new_fingerprint="tokenforget-in-processes", keep_in_memory=True, desc=desc)
    return out.to_dict()
