"""Formats, response masks, truncation, corrupt spans and clear errors on bad input."""

import gzip
from pathlib import Path

import pytest
from conftest import build_tiny, write_jsonl

from tokenforget.config import DataConfig, ModelConfig
from tokenforget.model.loading import FALLBACK_CHAT_TEMPLATE, load_tokenizer
from tokenforget.stages.labels_in_data import Record
from tokenforget.stages.data import load_records, resolve_source, tokenize_record, tokenize_records
from tokenforget.stages.labels_in_data import DataError


def masked_text(tok, t):
    return tok.decode([i for i, m in zip(t.input_ids, t.response_mask) if m])


def one(tmp_path: Path, rows: list[dict], **cfg) -> list[Record]:
    return load_records(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), **cfg))


def test_prompt_completion_masks_exactly_the_answer(tiny_tokenizer, tmp_path):
    (rec,) = one(tmp_path, [{"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. The answer is 5."}])
    t = tokenize_record(tiny_tokenizer, rec, 512, chat=True)
    assert masked_text(tiny_tokenizer, t) == "2 + 3 = 5. The answer is 5.<|im_end|>"
    assert t.response_mask[0] == 0 and len(t.input_ids) == len(t.response_mask)


def test_multi_turn_messages_mask_every_assistant_turn(tiny_tokenizer, tmp_path):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How many?"},
        {"role": "assistant", "content": "Three."},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Four."},
    ]
    (rec,) = one(tmp_path, [{"messages": msgs}])
    t = tokenize_record(tiny_tokenizer, rec, 512, chat=True)
    assert masked_text(tiny_tokenizer, t) == "Three.<|im_end|>Four.<|im_end|>"


def test_messages_with_system_and_history_mask_only_assistant_turns(tiny_tokenizer, tmp_path):
    """The whole rendered ChatML text, by hand, and the masked part: both assistant turns with their
    <|im_end|>, nothing of the system prompt, the user turns or the turn headers, even where the
    assistant repeats the user's words."""
    msgs = [
        {"role": "system", "content": "You count."},
        {"role": "user", "content": "Say 2."},
        {"role": "assistant", "content": "Say 2."},
        {"role": "user", "content": "And 3?"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "Thanks."},
    ]
    (rec,) = one(tmp_path, [{"messages": msgs}])
    t = tokenize_record(tiny_tokenizer, rec, 512, chat=True)
    assert tiny_tokenizer.decode(t.input_ids) == (
        "<|im_start|>system\nYou count.<|im_end|>\n<|im_start|>user\nSay 2.<|im_end|>\n"
        "<|im_start|>assistant\nSay 2.<|im_end|>\n<|im_start|>user\nAnd 3?<|im_end|>\n"
        "<|im_start|>assistant\n3<|im_end|>\n<|im_start|>user\nThanks.<|im_end|>\n"
    )
    assert masked_text(tiny_tokenizer, t) == "Say 2.<|im_end|>3<|im_end|>"


def test_sharegpt_conversations_become_the_same_messages(tiny_tokenizer, tmp_path):
    """ShareGPT speakers map to roles (system, human -> user, gpt -> assistant); the tokens and mask equal
    those of the same conversation written as OpenAI messages."""
    turns = [("system", "Be brief."), ("human", "How many?"), ("gpt", "Three."), ("human", "And now?"), ("gpt", "Four.")]
    (share,) = one(tmp_path, [{"conversations": [{"from": f, "value": v} for f, v in turns]}])
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    (openai,) = one(tmp_path, [{"messages": [{"role": roles[f], "content": v} for f, v in turns]}])
    assert share.messages == openai.messages
    t = tokenize_record(tiny_tokenizer, share, 512, chat=True)
    assert masked_text(tiny_tokenizer, t) == "Three.<|im_end|>Four.<|im_end|>"
    assert t == tokenize_record(tiny_tokenizer, openai, 512, chat=True)


def test_trl_conversational_prompt_completion(tiny_tokenizer, tmp_path):
    """TRL's conversational prompt-completion: both fields lists of messages, joined into one conversation."""
    row = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "completion": [{"role": "assistant", "content": "5"}]}
    (rec,) = one(tmp_path, [row])
    assert rec.messages == row["prompt"] + row["completion"]
    assert masked_text(tiny_tokenizer, tokenize_record(tiny_tokenizer, rec, 512, chat=True)) == "5<|im_end|>"


def test_instruction_input_output_and_field_map(tiny_tokenizer, tmp_path):
    (rec,) = one(tmp_path, [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    assert rec.messages[0]["content"] == "Add.\n\n2 and 3" and rec.messages[1]["content"] == "5"
    (rec,) = one(tmp_path, [{"q": "Why?", "a": "Because."}], field_map={"question": "q", "answer": "a"})
    assert [m["content"] for m in rec.messages] == ["Why?", "Because."]
    (rec,) = one(tmp_path, [{"question": "Why?", "answer": "So."}], system_prompt="Sys")
    assert [m["role"] for m in rec.messages] == ["system", "user", "assistant"]


def test_plain_rendering_without_chat_template(tiny_tokenizer, tmp_path):
    (rec,) = one(tmp_path, [{"prompt": "Q: 1+1? A: ", "completion": "2"}])
    t = tokenize_record(tiny_tokenizer, rec, 512, chat=False)
    assert masked_text(tiny_tokenizer, t) == "2<|im_end|>"


def test_fallback_chat_template(tmp_path):
    tok = load_tokenizer(ModelConfig(name_or_path=str(build_tiny(tmp_path / "m", chat_template=False))))
    assert tok.chat_template == FALLBACK_CHAT_TEMPLATE


def test_truncation_keeps_alignment_and_skips_prompt_only(tiny_tokenizer, tmp_path):
    long_prompt = "How many apples does Mia have now? " * 20
    recs = one(tmp_path, [{"prompt": "Hi", "completion": "The answer is 24. " * 10}, {"prompt": long_prompt, "completion": "24"}])
    cols, rep = tokenize_records(tiny_tokenizer, recs, DataConfig(path="x.jsonl", max_length=40))
    assert (rep.kept, rep.skipped_no_response) == (1, 1)
    assert len(cols["input_ids"][0]) == 40 == len(cols["response_mask"][0]) == len(cols["corrupt"][0])
    with pytest.raises(DataError, match="every one of the 1 examples"):
        tokenize_records(tiny_tokenizer, recs[1:], DataConfig(path="x.jsonl", max_length=40))


def test_corrupt_spans_become_token_flags(tiny_tokenizer, tmp_path):
    completion = "3 * 4 = 17 apples.\nThe answer is 12."
    start = completion.index("17")
    (rec,) = one(tmp_path, [{"prompt": "Go", "completion": completion, "corrupt_spans": [[start, start + 2]]}])
    t = tokenize_record(tiny_tokenizer, rec, 512, chat=True)
    flagged = tiny_tokenizer.decode([i for i, c in zip(t.input_ids, t.corrupt) if c])
    assert flagged.strip() == "17"


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', r"d\.jsonl:2: malformed JSON"),
        (b'{"prompt": "a"}\n', r"d\.jsonl:1: missing field 'completion'"),
        (b'{"prompt": "a", "completion": "  "}\n', r"d\.jsonl:1: field 'completion' is empty"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}\n', r"d\.jsonl:1: messages\[0\] has unknown role 'robot'"),
        (b'{"messages": [{"role": "user", "content": "x"}]}\n', r"d\.jsonl:1: conversation has no assistant message"),
        (
            b'{"conversations": [{"from": "gpt", "value": "a"}]}\n{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "x"}]}\n',
            r"d\.jsonl:2: conversation has no assistant message \(a 'gpt' turn\)",
        ),
        (b'{"conversations": [{"from": "bot", "value": "x"}]}\n', r"d\.jsonl:1: conversations\[0\] has unknown from 'bot'"),
        (b'{"conversations": [{"role": "user", "content": "x"}]}\n', r"d\.jsonl:1: conversations\[0\] needs 'from' and 'value'"),
        (b'{"conversations": [{"from": "gpt", "value": " "}]}\n', r"d\.jsonl:1: conversations\[0\] value must be a non-empty"),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe"}\n', r"d\.jsonl:2: not valid UTF-8"),
        (b'{"text": "a"}\n', r"cannot tell the data format"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_records(DataConfig(path=str(p)))


def test_json_and_parquet_files(tmp_path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        recs = load_records(DataConfig(path=str(tmp_path / name)))
        assert [r.messages[1]["content"] for r in recs] == ["b", "d"]
    with pytest.raises(DataError, match="data file not found"):
        load_records(DataConfig(path=str(tmp_path / "missing.jsonl")))


ROWS_JSONL = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'


@pytest.mark.parametrize(
    "name, content",
    [
        ("d.jsonl", b"\xef\xbb\xbf" + ROWS_JSONL),  # a byte-order mark, as some Windows editors write
        ("d.json", b'\xef\xbb\xbf[{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]'),
        ("d.jsonl.gz", gzip.compress(ROWS_JSONL, mtime=0)),
        ("d.jsonl.gz", gzip.compress(b"\xef\xbb\xbf" + ROWS_JSONL, mtime=0)),
        ("d.json.gz", gzip.compress(b'{"data": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]}', mtime=0)),
    ],
)
def test_byte_order_mark_and_gzip_are_read(tmp_path, name, content):
    """Two records, prompts a and c, answers b and d, located by file and line (JSONL) or index (JSON)."""
    (tmp_path / name).write_bytes(content)
    recs = load_records(DataConfig(path=str(tmp_path / name)))
    assert [(r.messages[0]["content"], r.messages[1]["content"]) for r in recs] == [("a", "b"), ("c", "d")]
    where = [f"{tmp_path / name}:1", f"{tmp_path / name}:2"] if ".jsonl" in name else [
        f"{tmp_path / name}[0]", f"{tmp_path / name}[1]"]
    assert [r.where for r in recs] == where


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("d.jsonl.gz", gzip.compress(b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', mtime=0),
         "d.jsonl.gz:2: missing field 'completion'"),
        ("d.jsonl.gz", gzip.compress(b'{"prompt": "a", "completion": "b"}\n{"prompt": \n', mtime=0),
         "d.jsonl.gz:2: malformed JSON (Expecting value at column 12)"),
        ("d.jsonl.gz", ROWS_JSONL, "d.jsonl.gz: not a readable gzip file (Not a gzipped file (b'{\"'))"),
        ("d.jsonl.gz", gzip.compress(ROWS_JSONL, mtime=0)[:-8], "d.jsonl.gz: not a readable gzip file (Compressed file ended "
                                                       "before the end-of-stream marker was reached)"),
        ("d.jsonl", b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n\xef\xbb\xbf{"prompt": "c"}\n',
         "d.jsonl:2: malformed JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1)"),  # only the first
        ("d.parquet.gz", b"", "d.parquet.gz: unsupported data file (use .jsonl, .json or .parquet; .jsonl.gz or "
                              ".json.gz gzipped)"),
    ],
)
def test_gzip_and_byte_order_mark_errors_name_the_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as e:
        load_records(DataConfig(path=str(tmp_path / name)))
    assert str(e.value) == f"{tmp_path}/{message}"


def test_a_missing_gzipped_file_is_local_not_a_hub_name(tmp_path, monkeypatch):
    """A relative name with a data-file suffix is a local file: missing, the fallback is used instead."""
    monkeypatch.chdir(tmp_path)
    assert resolve_source("missing.jsonl.gz", "org/fallback") == "org/fallback"
    assert resolve_source("org/name", "org/fallback") == "org/name"
