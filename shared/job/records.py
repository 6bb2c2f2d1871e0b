"""Training records as Hugging Face users write them (the TRL conventions), read from JSONL, CSV or Parquet.

A file holds one kind of record, decided by its first record (or the CSV/Parquet columns):

* **chat**: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``;
  the loss is taken on the assistant turns. A conversation without an assistant turn is refused.
* **pair**: ``{"prompt": ..., "completion": ...}`` (also ``prompt``/``response``, ``question``/``answer``,
  ``instruction``/``output``, or the fields named with ``prompt_field``/``response_field``); the loss is
  taken on the completion.
* **text**: ``{"text": ...}``: language modelling, the loss on every token.

In a CSV file ``messages`` is a JSON array in one cell. Every refusal names the file, the line (JSONL,
CSV) or row (Parquet) and the field.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from splitft.shared.errors import ConfigError, DataError

PAIR_FIELDS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"), ("instruction", "output"))
JSONL_SUFFIXES = (".jsonl", ".json")
SUFFIXES = (*JSONL_SUFFIXES, ".csv", ".parquet")
ASSISTANT = "assistant"


@dataclass(frozen=True)
class Text:
    """A document for language modelling."""

    text: str


class Pair(NamedTuple):
    """A prompt and the completion the model learns to write after it (a tuple: ``prompt, completion = pair``)."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class Chat:
    """A conversation: (role, content) turns; the model learns the assistant's."""

    messages: tuple[tuple[str, str], ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


Record = Text | Pair | Chat


def record_json(record: Record) -> dict[str, Any]:
    """A record as one JSONL object, in the field names this module reads first."""
    if isinstance(record, Text):
        return {"text": record.text}
    if isinstance(record, Chat):
        return {"messages": record.as_dicts()}
    prompt, completion = record  # a Pair, or any (prompt, completion) tuple
    return {"prompt": prompt, "completion": completion}


def record_text(record: Record) -> str:
    """All the text of a record, run together (for sizes)."""
    if isinstance(record, Text):
        return record.text
    if isinstance(record, Chat):
        return "".join(content for _, content in record.messages)
    prompt, completion = record
    return prompt + completion


@dataclass(frozen=True)
class _Kind:
    """How to read every record of one file: its kind and the fields it is read from."""

    name: str  # "chat", "pair" or "text"
    fields: tuple[str, ...]

    def read(self, record: Mapping[str, Any], where: str) -> Record:
        missing = [name for name in self.fields if name not in record or record[name] is None]
        if missing:
            raise DataError(f"{where}: record lacks field(s) {', '.join(map(repr, missing))}")
        if self.name == "chat":
            return _chat(record["messages"], where)
        for name in self.fields:
            if not isinstance(record[name], str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(record[name]).__name__}")
        if self.name == "text":
            return Text(record["text"])
        return Pair(record[self.fields[0]], record[self.fields[1]])


def _kind_of(names: Sequence[str], where: str, pair_fields: tuple[str, str] | None) -> _Kind:
    if pair_fields is not None:
        return _Kind("pair", pair_fields)
    if "messages" in names:
        return _Kind("chat", ("messages",))
    for pair in PAIR_FIELDS:
        if pair[0] in names and pair[1] in names:
            return _Kind("pair", pair)
    if "text" in names:
        return _Kind("text", ("text",))
    known = ", ".join(f"{p}/{r}" for p, r in PAIR_FIELDS)
    raise DataError(
        f"{where}: no field 'messages', 'text' or any of the pairs {known} in {sorted(names)}; name a pair's fields "
        "with --prompt-field and --response-field (splitft-agent join, splitft-coordinator local)"
    )


def _chat(messages: Any, where: str) -> Chat:
    if isinstance(messages, str):  # a CSV cell holds the list as JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: field 'messages' is not a JSON list: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise DataError(f"{where}: messages[{i}].role must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string, got {type(content).__name__}")
        turns.append((role, content))
    if not any(role == ASSISTANT for role, _ in turns):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from it")
    return Chat(tuple(turns))


def _jsonl_rows(path: Path, f: TextIO) -> Iterator[tuple[str, dict[str, Any]]]:
    first = True
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            raise DataError(
                f"{path}: holds a JSON array; SplitFT reads one JSON object per line (JSONL): convert it with "
                f"`jq -c '.[]' {path} > data.jsonl`"
            )
        first = False
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: a record must be a JSON object, got {type(record).__name__}")
        yield f"{path}:{lineno}", record


def _csv_rows(path: Path, f: TextIO) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if not header:
        raise DataError(f"{path}: the CSV file has no header")
    # A short row leaves its last fields None: they count as missing, as in JSON.
    rows = ((f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v is not None}) for row in reader)
    return list(header), rows


def _parquet_rows(path: Path) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    import pyarrow.parquet as pq  # pyarrow is large: loaded only for a Parquet file

    try:
        table = pq.ParquetFile(path)
        names = list(table.schema_arrow.names)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        row = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}: row {row}", record

    return names, rows()


def load_records(
    path: str | Path, prompt_field: str | None = None, response_field: str | None = None, limit: int | None = None
) -> list[Record]:
    """The records of a JSONL (``.jsonl``/``.json``, one object a line), CSV (with a header) or Parquet file.

    The kind follows the first record (or the columns): see the module docstring. Empty JSONL lines are
    skipped; at most ``limit`` records are read.
    """
    path = Path(path)
    if (prompt_field is None) != (response_field is None):
        raise ConfigError("prompt_field and response_field must be given together")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unknown data file suffix {path.suffix!r}; expected {', '.join(SUFFIXES)}")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a data file")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    fields = None if prompt_field is None or response_field is None else (prompt_field, response_field)
    records: list[Record] = []
    try:
        with contextlib.ExitStack() as files:
            kind: _Kind | None = None
            columns: list[str] | None = None
            if suffix == ".parquet":
                columns, rows = _parquet_rows(path)
            else:
                f = files.enter_context(path.open(encoding="utf-8", newline="" if suffix == ".csv" else None))
                if suffix == ".csv":
                    columns, rows = _csv_rows(path, f)
                else:
                    rows = _jsonl_rows(path, f)
            if columns is not None:
                kind = _kind_of(columns, f"{path} (columns)", fields)
                absent = [name for name in kind.fields if name not in columns]
                if absent:
                    raise DataError(f"{path}: no column(s) {', '.join(map(repr, absent))} in {columns}")
            for where, row in rows:
                kind = kind or _kind_of(list(row), where, fields)
                records.append(kind.read(row, where))
                if limit is not None and len(records) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    if not records:
        raise DataError(f"{path}: no usable records")
    return records
