"""The demo's trained settings as token views of the report: which response tokens each setting learned, ignored or
forgot, on the examples the page embeds, so a reader can switch between them (issue 35).

A view per setting of `demo_results.json` that trained on the page's examples (the same training file): `sft` and
`dft` learn every response token; a partitioning setting's classes come from its run folder's partition. A setting
trained on other data (`clean`, `rft`, `sft_plus_trusted`, ...) shows other examples and has no view here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import datasets

from tokenforget.training.objectives import FORGET, LEARN, needs_partition

NEGATIVE = {"ignore": "ignored", "forget": "forgotten"}  # what a mode does to its negative tokens


def setting_views(root: Path, data_path: str, masks: list[list[int]]) -> dict[str, dict[str, Any]]:
    """{setting: {"what": one line, "neg": "ignored" | "forgotten", "c": classes of each embedded example}} for the
    settings of `root/demo_results.json` trained on `data_path`; `masks`: the embedded examples' response masks."""
    results_file = root / "demo_results.json"
    if not results_file.is_file():
        return {}
    results = json.loads(results_file.read_text())
    what = results.get("descriptions", {})
    views = {}
    for name, stage in results.get("stages", {}).items():
        view = _view(Path(stage), data_path, masks)
        if view is not None:
            views[name] = {"what": what.get(name, name), **view}
    return views


def _view(stage: Path, data_path: str, masks: list[list[int]]) -> Optional[dict[str, Any]]:
    record, config = stage / "stage.json", stage.parent / "config.json"
    if not record.is_file() or not config.is_file():
        return None
    mode = json.loads(record.read_text()).get("mode")
    if mode is None or json.loads(config.read_text())["data"]["path"] != data_path:
        return None  # another training file: other examples
    if mode not in NEGATIVE and not needs_partition(mode):  # sft, dft: every response token learned
        return {"neg": "forgotten", "c": [[LEARN * m for m in mask] for mask in masks]}
    classes = stage.parent / "partition" / "classes"
    if mode not in NEGATIVE or not classes.is_dir():
        return None
    rows = datasets.load_from_disk(str(classes))["token_class"][: len(masks)]
    return {"neg": NEGATIVE[mode], "c": [[c if c in (LEARN, FORGET) else 0 for c in row] for row in rows]}
