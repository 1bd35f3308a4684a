"""What the report reads from a run folder (never a model): its config, tokens, scores, classes, partition stats,
training logs and results files, and every response token flat; tokens as readable text."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from tokenforget.config import RunConfig, from_dict
from tokenforget.errors import UserError
from tokenforget.report.tables import RESULTS_FILE as COMPARE_FILE
from tokenforget.runfolder import round_stage

RESULT_FILES = (COMPARE_FILE, "demo_results.json")  # shown in this order when present
SEED_FOLDER = re.compile(r"seed-(\d+)")  # a comparison's run folder per seed (`tokenforget.commands.compare`)


class ReportError(UserError):
    """The folder is not a run folder the report can read; the message says what is missing."""


@dataclass
class ReportedRun:
    """Everything the report reads from a run folder; stages not run yet are None or empty."""

    root: Path  # the folder reported on
    source: Path  # where tokens, scores and training logs come from: `root`, or a comparison's first seed
    cfg: RunConfig
    tokens: datasets.Dataset  # input_ids, response_mask, corrupt, example
    scores: Optional[datasets.Dataset] = None  # ce_base, ce_ref, score
    classes: Optional[datasets.Dataset] = None  # token_class
    stats: Optional[dict[str, Any]] = None  # partition/stats.json
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # train-<mode> -> log_history
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # results file name -> its JSON



def _dataset(path: Path) -> Optional[datasets.Dataset]:
    return datasets.load_from_disk(str(path)) if path.is_dir() else None



def _json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.is_file() else None



def token_source(root: Path) -> Path:
    """The folder with the tokens: `root`, or for a comparison folder (no `data/`) its lowest seed's folder."""
    if (root / "data").is_dir():
        return root
    seeds = [p for p in root.glob("seed-*") if SEED_FOLDER.fullmatch(p.name) and (p / "data").is_dir()]
    return min(seeds, key=lambda p: int(p.name.split("-")[1])) if seeds else root



def read_results(root: Path) -> dict[str, dict[str, Any]]:
    """The results files of `root`, and of the comparison it is a seed folder of."""
    folders = [root, root.parent] if SEED_FOLDER.fullmatch(root.name) else [root]
    return {name: _json(f / name) for f in folders for name in RESULT_FILES if (f / name).is_file()}



def read_run(root: Path) -> ReportedRun:
    """Read a run folder. Raises ReportError without `config.json` or the `data` stage."""
    source = token_source(root)
    cfg_dict, tokens = _json(source / "config.json"), _dataset(source / "data" / "tokens")
    if cfg_dict is None or tokens is None:
        raise ReportError(f"'{root}' is not a run folder with data: it needs config.json and data/ (run a stage first)")
    histories = {p.parent.name: json.loads(p.read_text()) for p in sorted(source.glob("train-*/log_history.json"))}
    cfg = from_dict(RunConfig, cfg_dict)
    scores, partition = (round_stage(s, cfg.reference.rounds) for s in ("scores", "partition"))  # the last round's
    return ReportedRun(
        root=root,
        source=source,
        cfg=cfg,
        tokens=tokens,
        scores=_dataset(source / scores / "scores"),
        classes=_dataset(source / partition / "classes"),
        stats=_json(source / partition / "stats.json"),
        histories=histories,
        results=read_results(root),
    )



@dataclass
class FlatTokens:
    """Every response token of the data set in data order, as flat (N,) arrays."""

    ids: np.ndarray
    corrupt: np.ndarray  # bool
    score: Optional[np.ndarray] = None
    ce_base: Optional[np.ndarray] = None
    ce_ref: Optional[np.ndarray] = None
    token_class: Optional[np.ndarray] = None  # +1 / -1



def flat_column(ds: datasets.Dataset, name: str) -> np.ndarray:
    """All values of a list column, concatenated (through Arrow: no Python lists for big data sets)."""
    return pc.list_flatten(ds.with_format("arrow")[name]).to_numpy()



def flat_tokens(run: ReportedRun) -> FlatTokens:
    mask = flat_column(run.tokens, "response_mask").astype(bool)
    flat = FlatTokens(ids=flat_column(run.tokens, "input_ids")[mask], corrupt=flat_column(run.tokens, "corrupt")[mask] > 0)
    if run.scores is not None:
        flat.score, flat.ce_base, flat.ce_ref = (flat_column(run.scores, c)[mask] for c in ("score", "ce_base", "ce_ref"))
    if run.classes is not None:
        flat.token_class = flat_column(run.classes, "token_class")[mask]
    return flat



def token_pieces(tok: PreTrainedTokenizerBase, ids: Sequence[int], context: int = 6) -> list[str]:
    """The text each token adds, so that `"".join(pieces) == tok.decode(ids)`.

    Each token is decoded after up to `context` earlier tokens and the earlier text is cut off (tokenizers
    that drop a leading space at the start of a decode drop it on the context, not on the token). A token
    that ends inside a multi-byte character gets "" and the token completing the character gets all of it.
    """
    pieces: list[str] = []
    pending = 0  # tokens before i whose text is not complete yet
    for i in range(len(ids)):
        lo = max(0, i - pending - context)
        before = _decode(tok, ids[lo : i - pending])
        after = _decode(tok, ids[lo : i + 1])
        if after.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")
            pending += 1
            continue
        pieces.append(after[len(before) :] if after.startswith(before) else _decode(tok, ids[i - pending : i + 1]))
        pending = 0
    return pieces



def _decode(tok: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)



def visible(piece: str) -> str:
    """A token's text with its whitespace made visible, for tables."""
    return piece.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"



def token_label(tok: PreTrainedTokenizerBase, token_id: int) -> str:
    """One token id as readable text (its raw vocabulary entry when it is only part of a character)."""
    text = _decode(tok, [token_id])
    return visible(text if "\ufffd" not in text else tok.convert_ids_to_tokens(token_id))
