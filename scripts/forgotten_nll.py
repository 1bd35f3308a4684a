"""What forgetting does to the tokens it forgets, measured without training (issue 36, item 3).

For the models of one data seed of `tokenforget fair` on the weaker model's answers (`seed-S/` of its run folder):
each model's mean NLL (nats/token) on four token sets of a file of noisy answers, from one forward pass each:
the known wrong tokens (the oracle's negatives: what `oracle_forget` pushes down), the right tokens before them in
the same wrong answers, the tokens of the answers graded right, and every response token. On the seed's own training
answers (what the models saw) and on another seed's (answers none of them saw: do they generalise?).

    python scripts/forgotten_nll.py /work/grid/weak-outcome/seed-2 --held_out /work/grid/weak-outcome/seed-1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import datasets

from tokenforget.config import ModelConfig
from tokenforget.model.loading import BaseModel, device
from tokenforget.stages.evaluate import load_trained, masked_nll

# setting -> its train stage under seed-S/ (`{t}`: the training seed, the data seed's own in these cells)
MODELS = {
    "sft": "train-sft-t{t}",
    "oracle_ignore": "variant-oracle_ignore/train-oracle_ignore-t{t}",
    "oracle_forget": "variant-oracle_forget/train-oracle_forget-t{t}",
    "oracle_wga": "variant-oracle_wga/train-oracle_wga-t{t}",
    "verified_whole": "verified_whole/train-ignore-t{t}",
    "unlikelihood_wrong": "verified_whole/train-forget_unlikelihood-t{t}",
}
SETS = ("every response token", "wrong tokens", "first wrong token", "right tokens before them", "right answers")


def token_sets(folder: Path) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The answers' token ids, and per set of `SETS` one 0/1 mask per answer, in its order (the first, every response
    token, spans the others: one forward scores all of them)."""
    tokens = datasets.load_from_disk(str(folder / "data" / "tokens"))
    ids, resp, bad = tokens["input_ids"], tokens["response_mask"], tokens["corrupt"]
    wrong_answer = [any(b) for b in bad]
    before = [[int(r and not b and w) for r, b in zip(rs, bs)] for rs, bs, w in zip(resp, bad, wrong_answer)]
    right = [[int(r and not w) for r in rs] for rs, w in zip(resp, wrong_answer)]
    wrong = [[int(r and b) for r, b in zip(rs, bs)] for rs, bs in zip(resp, bad)]
    first = [[int(i == w.index(1)) if 1 in w else 0 for i in range(len(w))] for w in wrong]  # where the answer turns
    return ids, [resp, wrong, first, before, right]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seed_dir", type=Path, help="seed-S/ of a weak-outcome fair run folder")
    ap.add_argument("--held_out", type=Path, required=True, help="another seed's folder: its answers as held-out text")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON here too")
    args = ap.parse_args()
    seed = int(args.seed_dir.name.split("-")[1])
    files = {"seen": token_sets(args.seed_dir), "held out": token_sets(args.held_out)}
    base = BaseModel(ModelConfig(name_or_path="smollm2", precision="fp32"))
    pad = base.tokenizer.pad_token_id
    table: dict[str, dict[str, list[float]]] = {}
    for name, stage in {"base": None, **MODELS}.items():
        model = base.frozen().to(device()) if stage is None else load_trained(args.seed_dir / stage.format(t=seed))
        table[name] = {}
        for which, (ids, masks) in files.items():
            sums = masked_nll(model, ids, masks, 16, False, pad)
            table[name][which] = [float(s.sum() / max(c.sum(), 1)) for s, c in sums]
        print(name, {w: [round(x, 3) for x in v] for w, v in table[name].items()}, flush=True)
        del model
    print(f"\nmean NLL, nats/token; seen = seed {seed}'s training answers, held out = {args.held_out.name}'s")
    for which in files:
        print(f"\n| {which} | " + " | ".join(SETS[1:] + SETS[:1]) + " |")
        print("|---" * (len(SETS) + 1) + "|")
        for name, row in table.items():
            v = row[which]
            print(f"| `{name}` | " + " | ".join(f"{x:.3f}" for x in v[1:] + v[:1]) + " |")
    if args.out:
        args.out.write_text(json.dumps({"seed": seed, "held_out": str(args.held_out), "sets": SETS, "table": table}, indent=1))


if __name__ == "__main__":
    main()
