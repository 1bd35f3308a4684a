"""Data: records from files or the Hub -> chat messages -> tokens with a response mask.

Formats: `prompt`/`completion` (strings, or TRL's conversational lists of messages), OpenAI `messages`
(`role`/`content`, system and multi-turn), ShareGPT `conversations` (`from`/`value` with `human`/`gpt`/`system`),
`instruction`/`input`/`output` and `question`/`answer`. A record becomes a list of messages; the messages
are rendered to text (chat template, or plain `prompt + completion + eos`), and the text is tokenized once with character offsets. A token is a response
token when it starts inside an assistant message's content; character spans that a record marks as
corrupted (`corrupt_spans`, from the demo's generator) become a per-token `corrupt` mask the same way.

Labels the data already has (`tokenforget.labels_in_data`: a message's `weight`, `spans` of
`{start, end, weight}` in a message's or completion's characters, a tokenized record's `token_weight`) become a
per-token `data_weight` column the same way (NaN where the data says nothing), read by `partition.selection: data`.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from tokenforget.config import to_dict
from tokenforget.config.data import DataConfig
from tokenforget.runfolder import file_digest, fingerprint, stable_view
from tokenforget.sampling import in_processes, sample_indices
from tokenforget.stages.labels_in_data import (
    DataError, MessageLabels, Record, Span, TokenLabels, check_unlabelled, message_labels, record_labels, token_record, token_weights,
)
from tokenforget.stages.stage import Arg, PlanInputs, Stage, StagePlan, StageRun, no_needs

ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> OpenAI roles. `user`/`assistant` appear in ShareGPT exports as well.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# Our canonical field names per format; `field_map` renames the file's columns onto them.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "instruction": ("instruction", "output"),
    "question_answer": ("question", "answer"),
    "tokens": ("input_ids", "token_weight"),  # already tokenized, a weight per token (`labels_in_data`)
}


# ---------------------------------------------------------------- reading


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # local data files; .jsonl and .json may also be gzipped (.gz)
UTF8_BOM = b"\xef\xbb\xbf"  # some editors start a UTF-8 file with it; json.loads refuses it


def data_suffix(path: str) -> tuple[str, bool]:
    """(format suffix, gzipped): `a.jsonl` -> (".jsonl", False), `a.jsonl.gz` -> (".jsonl", True)."""
    p = Path(path)
    if p.suffix == ".gz":
        return Path(p.stem).suffix, True
    return p.suffix, False


def read_records(path: str, split: str = "train", hub_config: Optional[str] = None) -> list[tuple[str, dict]]:
    """(location, record) pairs from a .jsonl/.json(.gz)/.parquet file or a Hub data set name."""
    p = Path(path).expanduser()
    suffix, gzipped = data_suffix(path)
    if suffix == ".jsonl":
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet" and not gzipped:
        return _read_parquet(p)
    if p.exists() or path.startswith((".", "/", "~")):
        raise DataError(f"{path}: unsupported data file (use .jsonl, .json or .parquet; .jsonl.gz or .json.gz gzipped)")
    return _read_hub(path, split, hub_config)


def resolve_source(path: str, fallback: Optional[str]) -> str:
    """`path`, or the Hub data set `fallback` when `path` names a local file that does not exist.

    A local file is one whose name has a data-file suffix or starts with `.`, `/` or `~`; anything else is
    already a Hub name and is returned as it is.
    """
    p = Path(path).expanduser()
    local = data_suffix(path)[0] in DATA_SUFFIXES or path.startswith((".", "/", "~"))
    if fallback and local and not p.exists():
        return fallback
    return path


def is_local_file(path: str) -> bool:
    """True when `path` is an existing local file (not a Hub name)."""
    return Path(path).expanduser().is_file()


def _read_bytes(p: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in `.gz`, without a leading UTF-8 byte-order mark."""
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    raw = p.read_bytes()
    if data_suffix(str(p))[1]:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut file is an EOFError
            raise DataError(f"{p}: not a readable gzip file ({e})") from None
    return raw.removeprefix(UTF8_BOM)


def _decode_lines(p: Path) -> list[str]:
    lines = _read_bytes(p).split(b"\n")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}:{n}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return out


def _read_jsonl(p: Path) -> list[tuple[str, dict]]:
    records = []
    for n, line in enumerate(_decode_lines(p), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{n}: expected a JSON object, got {type(rec).__name__}")
        records.append((f"{p}:{n}", rec))
    return records


def _read_json(p: Path) -> list[tuple[str, dict]]:
    text = "\n".join(_decode_lines(p))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{p}: expected a JSON list of objects")
    return [(f"{p}[{i}]", r) for i, r in enumerate(data)]


def _read_parquet(p: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    rows = pq.read_table(p).to_pylist()
    return [(f"{p} row {i}", r) for i, r in enumerate(rows)]


def _read_hub(name: str, split: str, hub_config: Optional[str]) -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, hub_config, split=split)
    except Exception as e:  # noqa: BLE001 - surface any Hub/network failure as a data error
        raise DataError(f"data.path '{name}': not a local file and could not be loaded from the Hub ({e})") from None
    return [(f"{name}[{split}] row {i}", r) for i, r in enumerate(ds)]


# ---------------------------------------------------------------- records -> messages


def detect_format(record: dict, field_map: dict[str, str]) -> str:
    """The format whose leading (mapped) field is in the record; its other fields are checked per record."""
    for fmt, fields in FORMAT_FIELDS.items():
        if field_map.get(fields[0], fields[0]) in record:
            return fmt
    raise DataError(
        f"cannot tell the data format from the fields {sorted(record)}; expected one of "
        f"{[list(f) for f in FORMAT_FIELDS.values()]} or set data.format and data.field_map"
    )


def _text(record: dict, name: str, field_map: dict[str, str], where: str, allow_empty: bool = False) -> str:
    key = field_map.get(name, name)
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _messages_field(record: dict, field_map: dict[str, str], where: str) -> list[dict[str, str]]:
    """OpenAI messages (`role`/`content`), checked; at least one assistant turn."""
    key = field_map.get("messages", "messages")
    msgs = record.get(key)
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of messages")
    out = [_message(m, f"{where}: {key}[{i}]", "role", "content", {r: r for r in ROLES}) for i, m in enumerate(msgs)]
    return _with_assistant(out, where, "")


def _turn_labels(turns: list[Any], messages: list[dict[str, str]], where: str, key: str, text_key: str) -> dict[int, MessageLabels]:
    """Each message's `weight` and `spans` (in its `text_key`'s characters), checked; messages without either left out."""
    found = {i: message_labels(t, m, f"{where}: {key}[{i}]", text_key) for i, (t, m) in enumerate(zip(turns, messages))}
    return {i: lab for i, lab in found.items() if lab is not None}


def _sharegpt_field(record: dict, field_map: dict[str, str], where: str) -> list[dict[str, str]]:
    """ShareGPT `conversations` (`from`/`value`, speakers human/gpt/system) as OpenAI messages."""
    key = field_map.get("conversations", "conversations")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{key}' must be a non-empty list of turns")
    if all(isinstance(t, dict) and "role" in t for t in turns):
        raise DataError(f"{where}: {key}[0] needs 'from' and 'value' (for role/content turns set "
                        f"data.field_map: {{messages: {key}}})")
    out = [_message(t, f"{where}: {key}[{i}]", "from", "value", SHAREGPT_ROLES) for i, t in enumerate(turns)]
    return _with_assistant(out, where, " (a 'gpt' turn)")


def _message(m: Any, where: str, role_key: str, text_key: str, roles: dict[str, str]) -> dict[str, str]:
    if not isinstance(m, dict) or role_key not in m or text_key not in m:
        raise DataError(f"{where} needs '{role_key}' and '{text_key}'")
    if m[role_key] not in roles:
        raise DataError(f"{where} has unknown {role_key} '{m[role_key]}' (expected one of {list(roles)})")
    role, text = roles[m[role_key]], m[text_key]
    if not isinstance(text, str) or (role == "assistant" and not text.strip()):
        raise DataError(f"{where} {text_key} must be a non-empty string")
    return {"role": role, "content": text}


def _with_assistant(messages: list[dict[str, str]], where: str, hint: str) -> list[dict[str, str]]:
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant message{hint}, so no token would get a loss")
    return messages


def _prompt_completion(raw: dict, fm: dict[str, str], where: str) -> Optional[list[dict[str, str]]]:
    """TRL's conversational prompt-completion (both fields lists of messages) as one conversation, else None."""
    prompt, completion = raw.get(fm.get("prompt", "prompt")), raw.get(fm.get("completion", "completion"))
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        return None
    return _messages_field({"messages": prompt + completion}, {}, where)


def to_record(raw: dict, where: str, cfg: DataConfig, fmt: str) -> Record:
    """Map one raw record to chat messages in our canonical shape, with its `is_correct` label if it has one
    and the weights it carries (`labels_in_data`)."""
    if fmt == "tokens":
        return Record([], where, tokens=token_record(raw, where))
    record = _to_messages(raw, where, cfg, fmt)
    record.labels = _labels(raw, record.messages, where, cfg, fmt)
    label = raw.get("is_correct")
    if label is not None and not isinstance(label, bool):
        raise DataError(f"{where}: field 'is_correct' must be true or false, got {label!r}")
    record.is_correct = label
    return record


def _to_messages(raw: dict, where: str, cfg: DataConfig, fmt: str) -> Record:
    fm = cfg.field_map
    if fmt == "messages":
        return Record(_messages_field(raw, fm, where), where)
    if fmt == "sharegpt":
        return Record(_sharegpt_field(raw, fm, where), where)
    if fmt == "prompt_completion" and (conversation := _prompt_completion(raw, fm, where)) is not None:
        return Record(conversation, where)
    if fmt == "prompt_completion":
        prompt, answer = _text(raw, "prompt", fm, where), _text(raw, "completion", fm, where)
    elif fmt == "instruction":
        prompt = _text(raw, "instruction", fm, where)
        extra = raw.get(fm.get("input", "input")) or ""
        prompt = f"{prompt}\n\n{extra}" if str(extra).strip() else prompt
        answer = _text(raw, "output", fm, where)
    else:
        prompt, answer = _text(raw, "question", fm, where), _text(raw, "answer", fm, where)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if cfg.system_prompt:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    spans = tuple((int(s), int(e)) for s, e in raw.get("corrupt_spans") or ())
    return Record(messages, where, spans)


def _labels(raw: dict, messages: list[dict[str, str]], where: str, cfg: DataConfig, fmt: str) -> dict[int, MessageLabels]:
    """The record's weights by message: on each turn of a conversation, or on the one answer of a single-turn record."""
    fm = cfg.field_map
    if fmt in ("messages", "sharegpt"):
        key = fm.get(FORMAT_FIELDS[fmt][0], FORMAT_FIELDS[fmt][0])
        check_unlabelled(raw, where, f"a '{fmt}' record (put them on the message they mark)")
        return _turn_labels(raw[key], messages, where, key, "content" if fmt == "messages" else "value")
    prompt, completion = raw.get(fm.get("prompt", "prompt")), raw.get(fm.get("completion", "completion"))
    if fmt == "prompt_completion" and isinstance(prompt, list) and isinstance(completion, list):
        check_unlabelled(raw, where, "a conversational prompt/completion record (put them on the message they mark)")
        return _turn_labels(prompt + completion, messages, where, "prompt+completion", "content")
    answer = len(messages) - 1  # single-turn: the record's weight and spans belong to its answer
    found = record_labels(raw, messages[answer]["content"], where)
    return {answer: found} if found is not None else {}


def load_records(cfg: DataConfig, path: Optional[str] = None, split: Optional[str] = None) -> list[Record]:
    """Read and normalise every record of `path` (default `cfg.path`; `split`, default `cfg.split`, for Hub data)."""
    path = path or cfg.path
    if not path:
        raise DataError("config field 'data.path' is required")
    if training := path == cfg.path:
        path = resolve_source(path, cfg.hub_fallback)
    raw = read_records(path, split or cfg.split, cfg.hub_config)
    if cfg.limit:
        raw = raw[: cfg.limit]
    if training and cfg.sample is not None:  # the training data only, not a trusted or evaluation file
        raw = [raw[i] for i in sample_indices(len(raw), cfg.sample, cfg.sample_seed, path)]
    if not raw:
        raise DataError(f"{path}: no records")
    fmt = cfg.format if cfg.format != "auto" else detect_format(raw[0][1], cfg.field_map)
    return [to_record(r, where, cfg, fmt) for where, r in raw]


# ---------------------------------------------------------------- rendering and tokenization


@dataclass
class Turn:
    """Where one assistant message sits in the rendered text."""

    message: int  # its index in `Record.messages`
    span: Span  # the turn: from the end of the generation prompt to the end of its rendered text
    content_start: int  # where its content starts (-1: the template changed the content, so it is not found)


def render(tokenizer: PreTrainedTokenizerBase, record: Record, chat: bool) -> tuple[str, list[Span], int]:
    """(text, assistant content spans, offset of the first assistant content) for one record."""
    text, turns = render_turns(tokenizer, record, chat)
    first = turns[0].content_start
    return text, [t.span for t in turns], first if first >= 0 else turns[0].span[0]


def render_turns(tokenizer: PreTrainedTokenizerBase, record: Record, chat: bool) -> tuple[str, list[Turn]]:
    """(text, every assistant turn) for one record.

    Chat rendering relies on the template rendering a prefix of the conversation as a prefix of the
    whole text (true of ChatML, Llama, Gemma templates); a template that rewrites history is an error.
    """
    msgs = record.messages
    if not chat:
        if len(msgs) > 2 + (msgs[0]["role"] == "system"):
            raise DataError(f"{record.where}: multi-turn data needs data.chat_template: true")
        prompt = "\n".join(m["content"] for m in msgs[:-1])
        start = len(prompt)
        text = prompt + msgs[-1]["content"] + (tokenizer.eos_token or "")
        return text, [Turn(len(msgs) - 1, (start, len(text)), start)]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    turns: list[Turn] = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(msgs[: k + 1], tokenize=False)
        if not full.startswith(before) or not full.startswith(upto):
            raise DataError(f"{record.where}: the chat template does not render turns as prefixes")
        turns.append(Turn(k, (len(before), len(upto.rstrip())), full.find(m["content"], len(before))))
    return full, turns


@dataclass
class Tokenized:
    input_ids: list[int]
    response_mask: list[int]  # 1 where the token is a response token (and so gets a loss)
    corrupt: list[int]  # 1 where the token overlaps a span the record marks as corrupted
    data_weight: Optional[list[float]] = None  # the data's weight of each token, NaN where it gives none


def tokenize_record(
    tokenizer: PreTrainedTokenizerBase, record: Record, max_length: int, chat: bool
) -> Tokenized:
    """Tokens, response mask, corrupt mask and (for a record with labels) data weights of one record, cut to
    `max_length` tokens."""
    if record.tokens is not None:
        return _tokenized_record(record.tokens, max_length)
    text, turns = render_turns(tokenizer, record, chat)
    enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_length], enc["offset_mapping"][:max_length]
    response = [int(any(t.span[0] <= a < t.span[1] for t in turns) and b > a) for a, b in offsets]
    response[0] = 0  # the first token is never predicted
    content_start = turns[0].content_start if turns[0].content_start >= 0 else turns[0].span[0]
    bad = [(content_start + s, content_start + e) for s, e in record.corrupt_spans]
    corrupt = [int(r and any(a < e and b > s for s, e in bad)) for (a, b), r in zip(offsets, response)]
    weights = token_weights(record.labels, turns, offsets, response, record.where) if record.labels else None
    return Tokenized(ids, response, corrupt, weights)


def _tokenized_record(tokens: TokenLabels, max_length: int) -> Tokenized:
    """A record that came tokenized: a token is a response token where its weight is not 0 (never the first)."""
    ids, weights = tokens.input_ids[:max_length], tokens.weights[:max_length]
    response = [int(w != 0 and i > 0) for i, w in enumerate(weights)]
    return Tokenized(ids, response, [0] * len(ids), [w if r else math.nan for w, r in zip(weights, response)])


@dataclass
class TokenizeReport:
    kept: int
    skipped_no_response: int


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], cfg: DataConfig
) -> tuple[dict[str, list[Any]], TokenizeReport]:
    """Columns `input_ids`, `response_mask`, `corrupt`, `example` for every record with a response left,
    `is_correct` (1, 0, or -1 when unlabelled) when any record carries that label, and `data_weight` (float per
    token, NaN where the data gives none) when any record carries weights.

    Records whose prompt fills `max_length` are skipped and counted; if all are, that is an error.
    """
    cols: dict[str, list[Any]] = {"input_ids": [], "response_mask": [], "corrupt": [], "example": []}
    labelled = any(r.is_correct is not None for r in records)
    if labelled:
        cols["is_correct"] = []
    weighted = any(r.labels or r.tokens is not None for r in records)
    if weighted:
        cols["data_weight"] = []
    skipped = 0
    one = lambda i: vars(tokenize_record(tokenizer, records[i], cfg.max_length, cfg.chat_template))  # noqa: E731
    done = in_processes(one, len(records), cfg.num_proc, "tokenizing")  # data.num_proc processes
    for i, (rec, tok) in enumerate(zip(records, map(Tokenized, *(done[f.name] for f in dataclass_fields(Tokenized))))):
        if not any(tok.response_mask):
            skipped += 1
            continue
        cols["input_ids"].append(tok.input_ids)
        cols["response_mask"].append(tok.response_mask)
        cols["corrupt"].append(tok.corrupt)
        cols["example"].append(i)
        if labelled:
            cols["is_correct"].append(-1 if rec.is_correct is None else int(rec.is_correct))
        if weighted:
            cols["data_weight"].append(tok.data_weight or [math.nan] * len(tok.input_ids))
    if not cols["input_ids"]:
        raise DataError(
            f"data.max_length={cfg.max_length}: every one of the {len(records)} examples has no response "
            "token left after truncation; raise data.max_length"
        )
    return cols, TokenizeReport(kept=len(cols["input_ids"]), skipped_no_response=skipped)


def check_noise_keeps_labels(records: Sequence[Record], cfg: DataConfig) -> None:
    """Injected noise rewrites answers, which would move the characters a record's spans mark: refuse both."""
    labelled = next((r for r in records if r.labels or r.tokens is not None), None)
    if cfg.corrupt_fraction and labelled is not None:
        raise DataError(f"{labelled.where}: carries weights, which data.corrupt_fraction's noise would misplace; "
                        "set data.corrupt_fraction: 0 or drop the weights")


# ---------------------------------------------------------------- the stage


def _fingerprint(run: StageRun, _arg: Arg) -> str:
    c = run.cfg
    data = {k: v for k, v in stable_view("data", to_dict(c.data)).items() if k != "num_proc"}  # same tokens either way
    return fingerprint("data", data, file_digest(c.data.path), stable_view("model", to_dict(c.model)))


def _make(run: StageRun, _arg: Arg) -> Any:
    """Tokenized training examples with response and corrupt masks (`tokens/`)."""
    import datasets

    from tokenforget.stages import noise

    dc = run.cfg.data

    def build() -> dict[str, Any]:
        records = load_records(dc)
        check_noise_keeps_labels(records, dc)
        records, n_corrupted = noise.corrupt(records, dc, run.log)
        cols, rep = tokenize_records(run.base.tokenizer, records, dc)
        run.log(f"[data] {rep.kept} examples tokenized, {rep.skipped_no_response} skipped (no response token left)")
        return {"cols": cols, "kept": rep.kept, "skipped_no_response": rep.skipped_no_response, "corrupted": n_corrupted}

    def commit(built: dict[str, Any], d: Path) -> dict[str, Any]:
        datasets.Dataset.from_dict(built.pop("cols")).save_to_disk(str(d / "tokens"))
        return built

    out = run.folder.ensure("data", run.fp("data"), build, commit)
    return datasets.load_from_disk(str(out / "tokens"))


def _plan(run: StageRun, _arg: Arg, fp: str, reuse: bool, inputs: PlanInputs) -> StagePlan:
    sets, seconds = inputs.sets, 0.0 if reuse else inputs.tokenize_s
    return StagePlan("data", fp, reuse, len(sets.all), sum(map(len, sets.all)), "tokenize", seconds)


STAGES = (Stage("data", no_needs, _fingerprint, _make, _plan),)
