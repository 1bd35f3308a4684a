"""Labels the data already has (message weights, spans, token weights) -> per-token weights -> token classes.

The tiny byte-level BPE tokenizer (tests/conftest.py) splits "She buys 3 * 4 = 12 apples." into
    She (0,3) | ' buys' (3,8) | ' 3' (8,10) | ' *' (10,12) | ' 4' (12,14) | ' =' (14,16) | ' 12' (16,19) | ' apples' (19,26) | . (26,27)
and "café ✓" into c | a | f | é as two byte tokens, both with offsets (3,4) | ' ' | ✓ as three byte tokens (5,6).
The ChatML fallback template renders an assistant turn as `<|im_start|>assistant\\n{content}<|im_end|>\\n`; the
response is the content and the `<|im_end|>` token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from tokenforget.config import DataConfig
from tokenforget.stages.data import load_records, tokenize_records
from tokenforget.stages.labels_in_data import DataError
from tokenforget.training.objectives import FORGET, LEARN, NO_LOSS
from tokenforget.stages.partition import data_classes, with_data_labels

nan = math.nan
ANSWER = "She buys 3 * 4 = 12 apples."


def response_weights(tokenizer, tmp_path: Path, rows: list[dict], **data) -> list[list[tuple[str, float]]]:
    """(token text, data weight) of every response token of each record."""
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(path=str(path), **data)
    cols, _ = tokenize_records(tokenizer, load_records(cfg), cfg)
    return [[(tokenizer.decode([t]), w) for t, m, w in zip(ids, mask, ws) if m]
            for ids, mask, ws in zip(cols["input_ids"], cols["response_mask"], cols["data_weight"])]


def same(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> bool:
    """Token texts equal and weights equal, NaN equal to NaN."""
    return [t for t, _ in got] == [t for t, _ in want] and all(
        (math.isnan(a) and math.isnan(b)) or a == b for (_, a), (_, b) in zip(got, want))


def test_a_span_that_splits_a_token_gives_the_whole_token_its_weight(tiny_tokenizer, tmp_path):
    """Span 17-18 is the '2' of ' 12' (16,19): the token shares a character, so it takes -1. Span 4-6 ('uy') lies
    inside ' buys' (3,8): weight 0. Span 0-3 is exactly 'She'. Every other token: NaN (the data says nothing); the
    end-of-turn token too."""
    spans = [{"start": 17, "end": 18, "weight": -1}, {"start": 4, "end": 6, "weight": 0}, {"start": 0, "end": 3, "weight": 0.5}]
    (got,) = response_weights(tiny_tokenizer, tmp_path, [{"prompt": "Q", "completion": ANSWER, "spans": spans}])
    assert same(got, [("She", 0.5), (" buys", 0.0), (" 3", nan), (" *", nan), (" 4", nan), (" =", nan), (" 12", -1.0),
                      (" apples", nan), (".", nan), ("<|im_end|>", nan)])


def test_multi_byte_characters_are_counted_as_characters(tiny_tokenizer, tmp_path):
    """'é' is character 3 (two UTF-8 bytes, two tokens with offsets (3,4)): span 3-4 marks both byte tokens; the
    message weight 0.5 covers the rest of the turn, the end-of-turn token included; the user message's weight 0 is
    allowed (it gets no loss anyway)."""
    msgs = [{"role": "user", "content": "hi", "weight": 0},
            {"role": "assistant", "content": "café ✓", "weight": 0.5, "spans": [{"start": 3, "end": 4, "weight": 0}]}]
    (got,) = response_weights(tiny_tokenizer, tmp_path, [{"messages": msgs}])
    assert [w for _, w in got] == [0.5, 0.5, 0.5, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5]
    assert got[-1][0] == "<|im_end|>"


def test_message_weights_in_a_chat_template_cover_each_turn(tiny_tokenizer, tmp_path):
    """Two assistant turns: the first weight 0 (axolotl's masking), the second -1 (forget), each over its content
    and its `<|im_end|>`; ShareGPT turns carry the same weights to the same tokens."""
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is 24.", "weight": 0},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "The answer is 24.", "weight": -1}]
    (got,) = response_weights(tiny_tokenizer, tmp_path, [{"messages": msgs}])
    turn = ["The", " answer", " is", " 24", ".", "<|im_end|>"]
    assert same(got, [(t, 0.0) for t in turn] + [(t, -1.0) for t in turn])
    speakers = {"user": "human", "assistant": "gpt"}
    convs = [{"from": speakers[m["role"]], "value": m["content"], **({"weight": m["weight"]} if "weight" in m else {})}
             for m in msgs]
    (shared,) = response_weights(tiny_tokenizer, tmp_path, [{"conversations": convs}])
    assert same(shared, got)


@pytest.mark.parametrize("row", [
    {"instruction": "Q", "output": ANSWER, "spans": [{"start": 17, "end": 18, "weight": -1}]},
    {"question": "Q", "answer": ANSWER, "spans": [{"start": 17, "end": 18, "weight": -1}]},
    {"prompt": [{"role": "user", "content": "Q"}],
     "completion": [{"role": "assistant", "content": ANSWER, "spans": [{"start": 17, "end": 18, "weight": -1}]}]},
])
def test_every_single_answer_format_carries_spans(tiny_tokenizer, tmp_path, row):
    (got,) = response_weights(tiny_tokenizer, tmp_path, [row])
    assert [w for t, w in got if not math.isnan(w)] == [-1.0] and dict(got)[" 12"] == -1.0


def test_plain_rendering_and_a_record_weight(tiny_tokenizer, tmp_path):
    """Without the chat template the text is prompt + completion + eos; a record-level `weight` covers the whole
    answer and the eos; a record without weights beside it is all NaN."""
    rows = [{"prompt": "Q", "completion": "The answer is 24.", "weight": -1}, {"prompt": "Q2", "completion": "The answer is 24."}]
    got = response_weights(tiny_tokenizer, tmp_path, rows, chat_template=False)
    assert all(w == -1.0 for _, w in got[0]) and got[0][-1][0] == "<|im_end|>"
    assert all(math.isnan(w) for _, w in got[1])


def test_tokenized_records_with_a_token_weight_column(tiny_tokenizer, tmp_path):
    """A parquet file of `input_ids` and `token_weight`: a weight of 0 is no loss (not a response token), the first
    token never gets one; the others keep their weights."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "tok.parquet"
    pq.write_table(pa.table({"input_ids": [[5, 6, 7, 8, 9]], "token_weight": [[1.0, 0.0, 1.0, -1.0, 0.25]]}), path)
    cfg = DataConfig(path=str(path))
    cols, _ = tokenize_records(tiny_tokenizer, load_records(cfg), cfg)
    assert cols["response_mask"] == [[0, 0, 1, 1, 1]]
    assert np.allclose(cols["data_weight"][0], [nan, nan, 1.0, -1.0, 0.25], equal_nan=True)


def test_data_classes_by_hand():
    """Response flags 0 1 1 1 1 1, data weights NaN NaN 0 -1 1 NaN: learn where unsaid, no loss at 0, forget below
    0; no |weight| column while every weight is -1, 0 or 1; 0.5 makes one (|w| where said, 1 elsewhere)."""
    resp = np.array([0, 1, 1, 1, 1, 1])
    w = np.array([nan, nan, 0, -1, 1, nan], dtype=np.float32)
    classes, weights = data_classes(w, resp)
    assert classes.tolist() == [NO_LOSS, LEARN, NO_LOSS, FORGET, LEARN, LEARN] and weights is None
    w[4] = -0.5
    classes, weights = data_classes(w, resp)
    assert classes.tolist() == [NO_LOSS, LEARN, NO_LOSS, FORGET, FORGET, LEARN]
    assert weights.tolist() == [0.0, 1.0, 0.0, 1.0, 0.5, 1.0]


def test_the_data_wins_over_a_detector_where_both_speak():
    """A detector's classes +1 -1 +1 -1 (soft |weights| 0.75 0.25 0.125 0.5); the data says 1 at token 1 and -0.5 at
    token 2, nothing at 0 and 3: those keep the detector's class and weight."""
    resp = np.ones(4, dtype=np.int8)
    detector = np.array([LEARN, FORGET, LEARN, FORGET], dtype=np.int8)
    soft = np.array([0.75, 0.25, 0.125, 0.5], dtype=np.float32)
    w = np.array([nan, 1, -0.5, nan], dtype=np.float32)
    classes, weights = with_data_labels(detector, soft, w, resp)
    assert classes.tolist() == [LEARN, LEARN, FORGET, FORGET] and weights.tolist() == [0.75, 1.0, 0.5, 0.5]
    classes, weights = with_data_labels(detector, None, np.array([nan, 1, 0, nan], dtype=np.float32), resp)
    assert classes.tolist() == [LEARN, LEARN, NO_LOSS, FORGET] and weights is None


BAD = [
    ({"prompt": "Q", "completion": ANSWER, "weight": "high"}, "d.jsonl:1: field 'weight': must be a finite number"),
    ({"prompt": "Q", "completion": ANSWER, "weight": True}, "d.jsonl:1: field 'weight': must be a finite number"),
    ('{"prompt": "Q", "completion": "A b", "spans": [{"start": 0, "end": 1, "weight": NaN}]}',
     "d.jsonl:1: field 'spans'[0].weight: must be a finite number, got nan"),
    ({"prompt": "Q", "completion": "A b", "spans": [{"start": 1, "end": 9, "weight": 0}]},
     "d.jsonl:1: field 'spans'[0]: 1-9 is not a span of its text (need 0 <= start < end <= 3)"),
    ({"prompt": "Q", "completion": "A b", "spans": [{"start": 2, "end": 2, "weight": 0}]},
     "d.jsonl:1: field 'spans'[0]: 2-2 is not a span of its text"),
    ({"prompt": "Q", "completion": ANSWER, "spans": [{"start": 0, "end": 5, "weight": 0}, {"start": 3, "end": 8, "weight": -1}]},
     "d.jsonl:1: field 'spans'[1]: overlaps span [0] (0-5) with another weight"),
    ({"prompt": "Q", "completion": ANSWER, "spans": [{"start": 0, "weight": 0}]},
     "d.jsonl:1: field 'spans'[0]: must be an object with start, end and weight"),
    ({"messages": [{"role": "user", "content": "Q", "weight": 1}, {"role": "assistant", "content": "A"}]},
     "d.jsonl:1: messages[0]: a user message gets no loss, so it cannot carry weights"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "spans": []},
     "d.jsonl:1: field 'spans' at the top level of a 'messages' record"),
    ({"prompt": "Q", "completion": "A", "token_weight": [1, 1]}, "d.jsonl:1: field 'token_weight' needs the record's tokens"),
    ({"input_ids": [1, 2, 3], "token_weight": [1, 1]},
     "d.jsonl:1: field 'token_weight' must be a list of one number per token (3 input_ids, got 2)"),
]


@pytest.mark.parametrize("row, message", BAD)
def test_bad_weights_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    path.write_text((row if isinstance(row, str) else json.dumps(row)) + "\n")
    with pytest.raises(DataError) as e:
        load_records(DataConfig(path=str(path)))
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- end to end on the tiny model


def spans_from_corrupt(rows: list[dict], weight: float) -> list[dict]:
    """The demo's records with their known corrupt spans written as `spans` of `weight` (and no corrupt_spans)."""
    out = []
    for r in rows:
        spans = [{"start": s, "end": e, "weight": weight} for s, e in r["corrupt_spans"]]
        out.append({k: v for k, v in r.items() if k != "corrupt_spans"} | ({"spans": spans} if spans else {}))
    return out


def test_training_on_the_data_s_labels_skips_reference_and_scoring(tmp_path, tiny_model_dir, capsys):
    """The demo's corrupt spans written as spans of weight -1, `partition.selection: data`: the dry run shows no
    reference and the scores stage as not needed; `train` then trains no reference, and its classes are the
    oracle's on the same records exactly (the same overlap rule). Changing one weight changes the data's and the
    partition's fingerprints."""
    from conftest import tiny_run_config, write_config
    from tokenforget.cli import main, parse_config
    from tokenforget.stages.demo_task import make_examples
    from tokenforget.pipeline.resolver import Run
    from test_plan import statuses

    rows = make_examples(12, seed=0, noise=0.5)
    labelled = spans_from_corrupt(rows, -1)
    cfg = tiny_run_config(tmp_path, tiny_model_dir, rows=labelled, partition={"selection": "data"})
    config = write_config(tmp_path, cfg)
    assert main(["run", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows_shown = statuses(out, ["data", "reference", "scores", "partition", "labels", "train-forget"])
    assert list(rows_shown) == ["data", "scores", "partition", "labels", "train-forget"]
    assert "not needed: partition.selection 'data'" in out
    assert main(["train", str(config)]) == 0
    run = Path(cfg["run_dir"])
    assert not (run / "reference").exists()
    ours = Run(parse_config(["train", str(config)])[1]).partition()["token_class"]
    oracle_dir = tmp_path / "oracle"
    oracle_dir.mkdir()
    oracle_cfg = tiny_run_config(oracle_dir, tiny_model_dir, rows=rows, partition={"selection": "oracle"})
    oracle = Run(parse_config(["train", str(write_config(oracle_dir, oracle_cfg))])[1]).partition()["token_class"]
    assert ours == oracle and sum(c == FORGET for cls in ours for c in cls) > 0
    before = Run(parse_config(["train", str(config)])[1])
    fps = before.fp("data"), before.fp("partition")
    labelled[0 if labelled[0].get("spans") else 1]["weight"] = 0.5
    write_jsonl(Path(cfg["data"]["path"]), labelled)
    after = Run(parse_config(["train", str(config)])[1])
    assert after.fp("data") != fps[0] and after.fp("partition") != fps[1]


def test_bad_weights_exit_2_with_one_line_before_any_model_loads(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from conftest import forbid_loading, tiny_run_config, write_config
    from tokenforget.cli import main

    rows = [{"prompt": "Q", "completion": "A b", "spans": [{"start": 0, "end": 7, "weight": -1}]}]
    config = write_config(tmp_path, tiny_run_config(tmp_path, tiny_model_dir, rows=rows, partition={"selection": "data"}))
    forbid_loading(monkeypatch, AutoModelForCausalLM)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.jsonl:1: field 'spans'[0]: 0-7 is not a span of its text" in err


def test_the_data_selection_without_weights_is_a_config_error(config, capsys):
    from tokenforget.cli import main

    assert main(["train", str(config), "--partition.selection", "data"]) == 2
    assert "'data' needs data that carries weights" in capsys.readouterr().err


def test_the_partition_stage_lets_the_data_win_over_the_global_ranking():
    """Two examples, 3 response tokens each (position 0 is never one); scores 5 4 3 | 2 1 0 at rho 0.5 make the
    top three positive: + + + | - - -. The data says -1 at the first response token and 0.5 at the last: those
    two change (the second becomes a learn token weighted 0.5), the others keep the ranking's class and weight 1."""
    import datasets

    from tokenforget.config import PartitionConfig
    from tokenforget.stages.partition import partition_exact

    tokens = datasets.Dataset.from_dict({
        "response_mask": [[0, 1, 1, 1], [0, 1, 1, 1]],
        "data_weight": [[nan, -1.0, nan, nan], [nan, nan, nan, 0.5]],
    })
    scores = datasets.Dataset.from_dict({"score": [[0.0, 5, 4, 3], [0.0, 2, 1, 0]]})
    table, stats = partition_exact(tokens, scores, PartitionConfig(rho=0.5))
    assert table.column("token_class").to_pylist() == [[0, -1, 1, 1], [0, -1, -1, 1]]
    assert table.column("token_weight").to_pylist() == [[0, 1, 1, 1], [0, 1, 1, 0.5]]
    assert (stats["n_positive"], stats["n_negative"], stats["data_labels"]) == (3, 3, True)
